"""Memory layout on the GPU: element-wise ops in their input's memory order, and arrays
the host writes or reads every step without waiting for the device."""
from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np


def memory_order(a: Any) -> tuple:
    """``a``'s axes from the largest stride to the smallest: ``a.transpose(memory_order(a))``
    walks ``a``'s memory in order (C-contiguous when ``a`` is a transposed view of a
    contiguous array, e.g. a convolution's channels-last output)."""
    return tuple(sorted(range(a.ndim), key=lambda k: -a.strides[k]))


def in_memory_order(fn: Any, *arrays: Any) -> Any:
    """``fn(*arrays)`` for an element-wise ``fn``, computed on the arrays viewed in the
    first one's memory order and viewed back, so that the result is laid out in memory as
    ``arrays[0]`` is. (CuPy's element-wise ops return C order whatever their input's
    layout: a channels-last convolution output would come back from relu in (N, C, H, W)
    order, and the next convolution would copy it back.)"""
    order = memory_order(arrays[0])
    out = fn(*(a.transpose(order) for a in arrays))
    return out.transpose(tuple(int(k) for k in np.argsort(order)))


class HostToDevice:
    """A small device array that the host rewrites every step without waiting for the
    device: the values go through pinned host memory by an asynchronous copy on the
    current stream (a copy from pageable memory, as ``xp.asarray`` makes, waits for the
    work queued before it). Needs ``xp.cuda.alloc_pinned_memory`` and ``dst.set``."""

    def __init__(self, xp: ModuleType, dst: Any) -> None:
        self.dst = dst
        self._xp = xp
        memory = xp.cuda.alloc_pinned_memory(dst.nbytes)
        self.host = np.frombuffer(memory, dst.dtype, dst.size).reshape(dst.shape)
        self._copied = None  # event after the last copy: the host buffer is free again

    def write(self, values: Any) -> None:
        if self._copied is not None:
            self._copied.synchronize()  # at once, unless the last copy has not run yet
        self.host[...] = values
        stream = self._xp.cuda.get_current_stream()
        self.dst.set(self.host, stream=stream)
        self._copied = stream.record()


class DeviceToHost:
    """Small device arrays the host reads a step late: ``start(src)`` queues a copy of
    ``src`` into pinned host memory on the current stream and records an event after
    it; the function it returns waits for that event alone, so reading step t's numbers
    does not wait for step t+1, queued since (a copy into pageable memory, as
    ``xp.asnumpy`` makes, waits for everything queued). Two pinned buffers in turn: one
    copy may be in flight while the one before it is read. Needs
    ``xp.cuda.alloc_pinned_memory`` and ``xp.asnumpy(..., out=, blocking=False)``."""

    SLOTS = 2

    def __init__(self, xp: ModuleType, shape: tuple, dtype: Any) -> None:
        self._xp = xp
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64))
        self._slots = []
        for _ in range(self.SLOTS):
            memory = xp.cuda.alloc_pinned_memory(max(size * dtype.itemsize, 1))
            self._slots.append(np.frombuffer(memory, dtype, size).reshape(shape))
        self._unread = [False] * self.SLOTS
        self._next = 0

    def start(self, src: Any):
        k = self._next
        if self._unread[k]:  # its values would be overwritten before anyone read them
            raise RuntimeError("DeviceToHost: read a copy before starting the second after it")
        self._next = (k + 1) % self.SLOTS
        host = self._slots[k]
        stream = self._xp.cuda.get_current_stream()
        # A contiguous array of the slot's type; if that is a temporary, the pool reuses
        # its memory only for work queued after this copy on the same stream.
        self._xp.asnumpy(self._xp.ascontiguousarray(src, dtype=host.dtype), stream=stream,
                         out=host, blocking=False)
        copied = stream.record()
        self._unread[k] = True
        values: list = []

        def read() -> np.ndarray:
            if not values:
                copied.synchronize()
                values.append(host.copy())
                self._unread[k] = False
            return values[0]
        return read
