"""capsflow's CUDA kernels run on the CPU, so that CI checks their index arithmetic.

``emulated_cupy()`` is a stand-in for the ``cupy`` module: NumPy arrays and functions,
plus ``RawKernel`` and ``ElementwiseKernel`` that compile the very CUDA source strings
of capsflow/backends/cuda/kernels.py with g++ and run them on NumPy buffers. A small shim
defines ``__global__``, ``blockIdx``/``threadIdx``/``blockDim``/``gridDim``, and a
generated launcher calls the kernel once per (block, thread), one after another.

That is faithful for kernels whose threads do not talk to each other (no shared
memory, no ``__syncthreads``, no two threads writing one element), which is every
kernel capsflow has; a kernel that needs more fails to compile here rather than
passing wrongly. Pointer arguments must be C-contiguous NumPy arrays of the kernel's
element type, as on the GPU, where a strided array passed as a pointer reads the
wrong elements; the emulator refuses anything else.

With the emulated module registered as the 'cupy' array module (the ``emu`` fixture of
conftest.py), every CUDA variant of capsflow/backends/cuda (the GPU convolution, the
routing kernels, im2col/col2im, the fused Adam update, the fused gradient sums) runs on
the CPU and can be compared with the ops' reference code. Only capsflow's own cuBLAS
call and CUDA graph capture cannot run here: gemm.py finds no cuBLAS and uses NumPy's
matmul, and the recording of a training step is left to its reference.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import types
from pathlib import Path

import numpy as np

_SHIM = r"""
#include <cmath>
#include <algorithm>
using std::min; using std::max; using std::sqrt; using std::exp;
struct capsflow_dim3 { unsigned int x, y, z; };
static capsflow_dim3 blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
"""

_CACHE = Path(tempfile.gettempdir()) / "capsflow-cuda-emulator"
_libraries: dict = {}


def available() -> bool:
    return shutil.which("g++") is not None


def _compile(source: str) -> ctypes.CDLL:
    """``source`` built into a shared library (cached on disk by its hash)."""
    key = hashlib.sha256(source.encode()).hexdigest()[:20]
    if key in _libraries:
        return _libraries[key]
    _CACHE.mkdir(exist_ok=True)
    lib = _CACHE / f"{key}.so"
    if not lib.exists():  # built under this process' own names, then moved into place
        src = _CACHE / f"{key}.{os.getpid()}.cpp"
        src.write_text(source)
        tmp = _CACHE / f"{key}.{os.getpid()}.so"
        done = subprocess.run(["g++", "-O1", "-shared", "-fPIC", "-std=c++17", "-w",
                               str(src), "-o", str(tmp)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"g++ could not build the emulated kernel:\n{done.stderr}")
        tmp.replace(lib)
        src.unlink()
    _libraries[key] = ctypes.CDLL(str(lib))
    return _libraries[key]


_SIGNATURE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)')


def _param_names(params: str) -> list:
    return [p.split()[-1].lstrip("*&") for p in params.split(",") if p.strip()]


def _pointer_element(a: np.ndarray, what: str) -> ctypes.c_void_p:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{what}: expected a NumPy array, got {type(a).__name__}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{what}: a kernel pointer needs a C-contiguous array, got strides "
                         f"{a.strides} for shape {a.shape}")
    return ctypes.c_void_p(a.ctypes.data)


_SCALARS = {np.int32: ctypes.c_int, np.int64: ctypes.c_longlong,
            np.float32: ctypes.c_float, np.float64: ctypes.c_double}


def _scalar(v, what: str):
    kind = type(v)
    if kind not in _SCALARS:
        raise TypeError(f"{what}: kernel scalars must be NumPy scalars of a fixed width "
                        f"(as CuPy needs), got {kind.__name__}")
    return _SCALARS[kind](v)


class RawKernel:
    """``cupy.RawKernel(code, name)``: ``kernel(grid, block, args)`` runs every thread."""

    def __init__(self, code: str, name: str) -> None:
        kernels = {m.group(1): m.group(2) for m in _SIGNATURE.finditer(code)}
        if name not in kernels:
            raise ValueError(f"no kernel '{name}' in the source")
        self.name, self.params = name, _param_names(kernels[name])
        launchers = "\n".join(self._launcher(k, p) for k, p in kernels.items())
        self._lib = _compile(_SHIM + code + launchers)

    @staticmethod
    def _launcher(name: str, params: str) -> str:
        args = ", ".join(_param_names(params))
        return f"""
extern "C" void emulate_{name}(unsigned gx, unsigned gy, unsigned bx, unsigned by, {params}) {{
    gridDim = {{gx, gy, 1}}; blockDim = {{bx, by, 1}};
    for (unsigned b = 0; b < gx * gy; ++b)
        for (unsigned t = 0; t < bx * by; ++t) {{
            blockIdx = {{b % gx, b / gx, 0}}; threadIdx = {{t % bx, t / bx, 0}};
            {name}({args});
        }}
}}
"""

    def __call__(self, grid: tuple, block: tuple, args: tuple) -> None:
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        grid, block = tuple(grid) + (1,) * (2 - len(grid)), tuple(block) + (1,) * (2 - len(block))
        c_args = [_pointer_element(a, f"{self.name}({p})") if isinstance(a, np.ndarray)
                  else _scalar(a, f"{self.name}({p})") for a, p in zip(args, self.params)]
        getattr(self._lib, f"emulate_{self.name}")(
            *(ctypes.c_uint(int(v)) for v in grid[:2] + block[:2]), *c_args)


_C_TYPES = {"float64": "double", "float32": "float", "int32": "int", "int64": "long long"}


def _c_type(dtype: np.dtype) -> str:
    return _C_TYPES[np.dtype(dtype).name]


class ElementwiseKernel:
    """``cupy.ElementwiseKernel(in_params, out_params, operation, name)`` for same-shaped
    array arguments (no broadcasting, which capsflow does not use): the operation runs
    once per index ``i`` with each non-raw array bound to its element."""

    def __init__(self, in_params: str, out_params: str, operation: str, name: str) -> None:
        self.inputs = [p.split() for p in in_params.split(",")]
        self.outputs = [p.split() for p in out_params.split(",")]
        self.operation, self.name = operation, name

    def __call__(self, *args):
        params = self.inputs + self.outputs
        if len(args) != len(params):
            raise TypeError(f"{self.name} takes {len(params)} arguments, got {len(args)}")
        typed = [a for a, p in zip(args, params) if p[-2] == "T"]
        t = _c_type(typed[0].dtype)
        size = next(a.size for a, p in zip(args, params) if p[0] != "raw" and isinstance(a, np.ndarray))
        decls, binds, c_args = [], [], []
        for a, p, k in zip(args, params, range(len(params))):
            raw, ctype, var = p[0] == "raw", p[-2], p[-1]
            ctype = t if ctype == "T" else _C_TYPES[ctype]
            is_out = k >= len(self.inputs)
            if isinstance(a, np.ndarray):
                if not raw and a.size != size:
                    raise ValueError(f"{self.name}({var}): size {a.size}, expected {size}")
                decls.append(f"{ctype}* {var}_ptr")
                c_args.append(_pointer_element(a, f"{self.name}({var})"))
                binds.append(f"{ctype}* {var} = {var}_ptr;" if raw else
                             f"{ctype}& {var} = {var}_ptr[i];" if is_out else
                             f"const {ctype} {var} = {var}_ptr[i];")
            else:
                decls.append(f"{ctype} {var}")
                c_args.append({"double": ctypes.c_double, "float": ctypes.c_float,
                               "int": ctypes.c_int, "long long": ctypes.c_longlong}[ctype](a))
        source = (f"typedef {t} T;\n" + _SHIM + f'extern "C" void emulate(long long n, '
                  f'{", ".join(decls)}) {{\n  for (long long i = 0; i < n; ++i) {{\n    '
                  + "\n    ".join(binds) + f"\n    {{ {self.operation} }}\n  }}\n}}\n")
        _compile(source).emulate(ctypes.c_longlong(size), *c_args)


def emulated_cupy() -> types.ModuleType:
    """A module named 'cupy' that is NumPy plus the emulated kernel classes."""
    module = types.ModuleType("cupy")
    module.__getattr__ = lambda name: getattr(np, name)
    module.RawKernel = RawKernel
    module.ElementwiseKernel = ElementwiseKernel
    # Every kernel has run when its call returns: one stream with nothing to wait for.
    # (No cuBLAS, graph capture or pinned memory here: their variants step aside.)
    stream = types.SimpleNamespace(synchronize=lambda: None)
    module.cuda = types.SimpleNamespace(get_current_stream=lambda: stream)
    return module
