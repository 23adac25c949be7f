"""Array backends: the one place where NumPy and CuPy differ.

Everything else in capsflow calls ``xp.<function>`` on the module returned here, so
NumPy and CuPy run the same op code (the Chainer idiom). Where a path is for one of
them only (threads and BLAS limits on the CPU, kernels and graphs on the GPU), the code
asks ``on_cpu(xp)`` or ``on_gpu(xp)`` from here.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from .errors import BackendError

BACKENDS = ("numpy", "cupy")


@dataclass(frozen=True)
class Backend:
    name: str
    xp: ModuleType

    def asarray(self, a: Any, dtype: Any = None):
        """Host or device array -> contiguous array of this backend."""
        return self.xp.ascontiguousarray(self.xp.asarray(a, dtype=dtype))

    def synchronize(self) -> None:
        if self.name == "cupy":
            self.xp.cuda.get_current_stream().synchronize()


PRECISIONS = ("fp32", "tf32")


def use_precision(precision: str) -> None:
    """Choose how CuPy runs float32 matrix products: exact fp32, or TF32 tensor cores.

    CuPy reads CUPY_TF32 when it first multiplies float32 matrices, so call this before
    any GPU work (the bench workers do it first thing). NumPy ignores it.
    """
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision '{precision}'; choose one of: {', '.join(PRECISIONS)}")
    os.environ["CUPY_TF32"] = "1" if precision == "tf32" else "0"


def to_numpy(a: Any) -> np.ndarray:
    """Any backend array (or scalar) -> NumPy array on the host."""
    if hasattr(a, "get"):
        return a.get()
    return np.asarray(a)


_cache: dict[str, Backend] = {}


def get_backend(name: str = "numpy") -> Backend:
    """Return the backend called ``name`` ("numpy" or "cupy"), or raise one clear line."""
    if name in _cache:
        return _cache[name]
    if name == "numpy":
        backend = Backend("numpy", np)
    elif name == "cupy":
        backend = Backend("cupy", _import_cupy())
    else:
        raise BackendError(f"unknown backend '{name}'; choose one of: {', '.join(BACKENDS)}")
    _cache[name] = backend
    return backend


def _import_cupy() -> ModuleType:
    try:
        cupy = importlib.import_module("cupy")
    except ImportError:
        raise BackendError("backend 'cupy' needs CuPy: pip install 'capsflow[cuda12]' "
                           "(or [cuda13]) on a machine with an NVIDIA GPU") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or broken
        raise BackendError(f"backend 'cupy': no usable CUDA device ({exc})") from None
    if count < 1:
        raise BackendError("backend 'cupy': CuPy is installed but no CUDA device was found")
    return cupy


def on_cpu(xp: Any) -> bool:
    """Whether ``xp`` is NumPy: the CPU-only tricks apply (batch threads, BLAS limits,
    short-axis loops, window chunks sized for caches)."""
    return getattr(xp, "__name__", "") == "numpy"


def on_gpu(xp: Any) -> bool:
    """Whether ``xp`` is CuPy (or a stand-in by that name): the GPU paths apply (own
    cuBLAS call, CUDA kernels, CUDA graphs, one large launch rather than many)."""
    return getattr(xp, "__name__", "") == "cupy"


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
    device: on CuPy the values go through pinned host memory by an asynchronous copy on
    the current stream (a copy from pageable memory, as ``xp.asarray`` makes, waits for
    the work queued before it). Elsewhere it is a plain assignment."""

    def __init__(self, xp: ModuleType, dst: Any) -> None:
        self.dst = dst
        self._xp = xp
        pinned = getattr(getattr(xp, "cuda", None), "alloc_pinned_memory", None)
        self._async = on_gpu(xp) and pinned is not None and hasattr(dst, "set")
        if self._async:
            memory = pinned(dst.nbytes)
            self.host = np.frombuffer(memory, dst.dtype, dst.size).reshape(dst.shape)
        else:
            self.host = np.empty(dst.shape, dst.dtype)
        self._copied = None  # event after the last copy: the host buffer is free again

    def write(self, values: Any) -> None:
        if self._copied is not None:
            self._copied.synchronize()  # at once, unless the last copy has not run yet
        self.host[...] = values
        if not self._async:
            self.dst[...] = self._xp.asarray(self.host)
            return
        stream = self._xp.cuda.get_current_stream()
        self.dst.set(self.host, stream=stream)
        self._copied = stream.record()


def get_array_module(*arrays: Any) -> ModuleType:
    """NumPy or CuPy, whichever owns the arrays (NumPy for plain Python values)."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            return importlib.import_module("cupy")
    return np


def sliding_windows(xp: ModuleType, x, kh: int, kw: int, stride: int):
    """View (N, C, OH, OW, kh, kw) of all conv windows of x (N, C, H, W); no copy.

    ``as_strided`` exists in both NumPy and CuPy, ``sliding_window_view`` not in all
    CuPy versions, hence this helper.
    """
    n, c, h, w = x.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    sn, sc, sh, sw = x.strides
    return xp.lib.stride_tricks.as_strided(
        x, shape=(n, c, oh, ow, kh, kw),
        strides=(sn, sc, sh * stride, sw * stride, sh, sw))
