"""Array backends: the one place where a backend name becomes an array module.

The ops call ``xp.<function>`` on the module chosen here, so NumPy and CuPy run the
same reference code (the Chainer idiom). What is faster on one of them lives in that
backend's own package, as registered variants of ops and routines: capsflow/backends/cpu
(threads, BLAS shapes) and capsflow/backends/cuda (GPU). ``get_backend`` imports the
package the first time its backend is used.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from capsflow.errors import BackendError
from capsflow.options import Options, as_options


@dataclass(frozen=True)
class Backend:
    """An array library with the options it runs under: what the executor, the ops'
    variants and the optimizers receive (``be.xp`` is NumPy or CuPy)."""
    options: Options
    xp: ModuleType

    @property
    def name(self) -> str:
        return self.options.backend

    def asarray(self, a: Any, dtype: Any = None):
        """Host or device array -> contiguous array of this backend (a 0-d array stays
        0-d: ascontiguousarray would make it 1-d)."""
        array = self.xp.asarray(a, dtype=dtype)
        return array if array.ndim == 0 else self.xp.ascontiguousarray(array)

    def synchronize(self) -> None:
        if self.name == "cupy":
            self.xp.cuda.get_current_stream().synchronize()


def to_numpy(a: Any) -> np.ndarray:
    """Any backend array (or scalar) -> NumPy array on the host."""
    if hasattr(a, "get"):
        return a.get()
    return np.asarray(a)


#: The package under capsflow.backends that registers each backend's variants of ops.
VARIANT_PACKAGES = {"numpy": "cpu", "cupy": "cuda"}
_cache: dict = {}


def get_backend(spec: "str | Options | Backend | None" = None) -> Backend:
    """The Backend for a name ("numpy", "cupy"), an Options object or a Backend (as
    given): the one place where a backend name becomes an array module. The first call
    for a backend imports its variant package, which registers its fast paths."""
    if isinstance(spec, Backend):
        return spec
    options = as_options(spec)
    if options not in _cache:
        xp = ARRAY_MODULES[options.backend]()
        # The engine's own variants (factored gradients) register before any backend's,
        # so that they are tried first.
        importlib.import_module("capsflow.core.gradients")
        importlib.import_module(f"capsflow.backends.{VARIANT_PACKAGES[options.backend]}")
        _cache[options] = Backend(options, xp)
    return _cache[options]


def _import_numpy() -> ModuleType:
    return np


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


#: How each backend's array module is imported (the tests put an emulated CuPy here).
ARRAY_MODULES = {"numpy": _import_numpy, "cupy": _import_cupy}


def get_array_module(*arrays: Any) -> ModuleType:
    """NumPy or CuPy, whichever owns the arrays (NumPy for plain Python values)."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            return importlib.import_module("cupy")
    return np
