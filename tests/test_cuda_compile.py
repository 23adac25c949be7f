"""Every RawKernel source in capsflow/backends/cuda/kernels.py compiles with NVRTC, the compiler
CuPy uses, for float and double, on a machine without a GPU: compiling needs only the
library (pip's nvidia-cuda-nvrtc, which the CUDA build of torch brings). Together with
the CPU emulation (tests/test_cuda_emulated.py) this leaves a GPU run to check only
what the hardware itself does."""
import ctypes
import glob
import os
import sys

import numpy as np
import pytest

from capsflow.backends.cuda import kernels


def _nvrtc():
    patterns = [os.path.join(p, "nvidia", "*", "lib", "libnvrtc.so*") for p in sys.path if p]
    patterns += [os.path.join(p, "nvidia", "*", "*", "lib", "libnvrtc.so*") for p in sys.path if p]
    for path in sorted({f for pat in patterns for f in glob.glob(pat) if "builtins" not in f
                        and ".alt." not in f}):
        try:
            # NVRTC opens its builtins library by name: load it first from the same folder.
            for builtins in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*")):
                if ".alt." not in builtins:
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


NVRTC = _nvrtc()
SOURCES = {name: getattr(kernels, name) for name in ("_ROWWISE", "_ROUTING", "_CONV", "_OUTER")}


def compile_log(source: str) -> tuple:
    """(status, log) of compiling ``source`` for compute capability 9.0."""
    prog = ctypes.c_void_p()
    assert NVRTC.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"capsflow.cu", 0,
                                    None, None) == 0
    opts = (ctypes.c_char_p * 1)(b"--gpu-architecture=compute_90")
    status = NVRTC.nvrtcCompileProgram(prog, 1, opts)
    size = ctypes.c_size_t()
    NVRTC.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    NVRTC.nvrtcGetProgramLog(prog, log)
    NVRTC.nvrtcDestroyProgram(ctypes.byref(prog))
    return status, log.value.decode(errors="replace")


@pytest.mark.skipif(NVRTC is None, reason="needs libnvrtc (pip's nvidia-cuda-nvrtc)")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(SOURCES))
def test_kernel_sources_compile(name, dtype):
    status, log = compile_log(kernels.typed_source(SOURCES[name], dtype))
    assert status == 0, log


@pytest.mark.skipif(NVRTC is None, reason="needs libnvrtc (pip's nvidia-cuda-nvrtc)")
def test_a_broken_source_fails_to_compile():
    status, log = compile_log(kernels.typed_source(SOURCES["_CONV"].replace("+=", "+==", 1),
                                                        np.float32))
    assert status != 0 and "error" in log


def test_sources_are_typed_as_the_kernels_are():
    assert set(kernels._CTYPES.values()) == {"float", "double"}
    assert kernels._CTYPES[np.dtype(np.float32)] == "float"


@pytest.mark.skipif(NVRTC is None, reason="needs libnvrtc (pip's nvidia-cuda-nvrtc)")
def test_nvrtc_takes_the_wide_loads_not_the_emulators_loops():
    """load4/store4 have a CUDA branch (16-byte accesses) and a plain-loop branch for
    the CPU emulator, chosen by __CUDACC__: NVRTC must define it."""
    status, log = compile_log("#ifndef __CUDACC__\n#error __CUDACC__ is not defined\n#endif\n"
                              + kernels.typed_source(SOURCES["_OUTER"], np.float32))
    assert status == 0, log
