"""Memory layout on the GPU: element-wise ops in their input's memory order, and small
arrays the host rewrites every step without waiting for the device."""
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
