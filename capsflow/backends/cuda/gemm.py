"""Matrix products: the one function every CUDA variant calls for a GEMM.

``matmul(xp, a, b)`` calls cuBLAS itself, ``cublasGemmStridedBatchedEx`` through ctypes
on a handle of capsflow's own: CuPy refuses to call cuBLAS while a stream is being
captured, and a training step captured as a CUDA graph (cudagraph.py) needs its GEMMs
inside the graph. The product is the same one CuPy would compute (same library, same
routine family), in fp32 or TF32 as ``Options.precision`` says (``matmul_on``). Where
no cuBLAS can be loaded (NumPy, the CPU emulator of the tests) it is ``xp.matmul``.

Row-major arrays meet column-major cuBLAS by the usual identity: C = A B is computed
as C^T = B^T A^T, and a row-major matrix with row stride ld is, to cuBLAS, its own
transpose with leading dimension ld. ``plan`` works out the call from the arrays'
strides (no copy when an operand is a row-major or transposed matrix, or a stack of
them with one batch stride) and is checked on the CPU against an emulation of the
cuBLAS call (tests/test_gemm.py); the GPU check compares the products with NumPy.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np

_OP_N, _OP_T = 0, 1
_CUDA_R_32F, _CUDA_R_64F = 0, 1
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32, _COMPUTE_64F = 68, 77, 70
_GEMM_DEFAULT = -1
#: cuBLAS' workspace size recommended for Hopper. capsflow gives its handle a workspace of
#: its own (again at each change of stream: _Cublas.on_stream), so no capture allocates one.
_WORKSPACE_BYTES = 32 * 2 ** 20


def matmul(xp: Any, a: Any, b: Any, out: Any = None, accumulate: bool = False,
           tf32: bool = False) -> Any:
    """``a @ b`` for a (..., M, K) and b (..., K, N), batch axes broadcast; float32
    products on TF32 tensor cores with ``tf32``.

    With ``out`` (an array of the product's shape, any strides) the product is written
    there, or added to it with ``accumulate``, and ``out`` is returned. cuBLAS writes it
    in place when ``out``'s matrices are row- or column-major with one batch stride
    (beta = 1 to accumulate), which saves a copy of the product.
    """
    if a.dtype != b.dtype or a.ndim < 2 or b.ndim < 2 \
            or np.dtype(a.dtype) not in (np.dtype(np.float32), np.dtype(np.float64)) \
            or (out is not None and out.dtype != a.dtype) or cublas(xp) is None:
        return _into(xp, a, b, out, accumulate)
    return _run(xp, a, b, out, accumulate, tf32)


def matmul_on(be: Any, a: Any, b: Any, out: Any = None, accumulate: bool = False) -> Any:
    """``matmul`` at the precision that backend ``be``'s options chose."""
    return matmul(be.xp, a, b, out, accumulate, tf32=be.options.precision == "tf32")


def _into(xp: Any, a: Any, b: Any, out: Any, accumulate: bool) -> Any:
    """``xp.matmul`` with ``matmul``'s ``out`` and ``accumulate``."""
    product = xp.matmul(a, b)
    return product if out is None else _store(out, product, accumulate)


def _store(out: Any, product: Any, accumulate: bool) -> Any:
    """``product`` copied into ``out``, or added to it; returns ``out``."""
    if accumulate:
        out += product
    else:
        out[...] = product
    return out


@dataclass(frozen=True)
class Operand:
    """One operand as cuBLAS sees it: its array (possibly a copy), op, leading dimension
    and batch stride, all in elements."""
    array: Any
    op: int
    ld: int
    batch_stride: int


def _matrix_layout(x: Any) -> tuple | None:
    """(op, ld) of the last two axes of x (R, C): row-major -> (N, row stride), a
    transposed row-major matrix -> (T, column stride); None for anything else."""
    s = x.itemsize
    r, c = x.shape[-2:]
    st_r, st_c = x.strides[-2:]
    if st_r < 0 or st_c < 0 or st_r % s or st_c % s:
        return None
    if (st_c == s or c == 1) and (r == 1 or st_r // s >= max(c, 1)):
        return _OP_N, max(c, 1) if r == 1 else st_r // s
    if (st_r == s or r == 1) and (c == 1 or st_c // s >= max(r, 1)):
        return _OP_T, max(r, 1) if c == 1 else st_c // s
    return None


def operand(xp: Any, x: Any, batch: int) -> Operand:
    """x (..., R, C) as a stack of ``batch`` matrices for cuBLAS (batch stride 0 when x
    is one matrix broadcast over the batch)."""
    rows, cols = x.shape[-2:]
    own = int(np.prod(x.shape[:-2], dtype=np.int64)) if x.ndim > 2 else 1
    if own == 1:
        x2 = x.reshape(x.shape[-2:]) if x.ndim > 2 else x
        layout = _matrix_layout(x2)
        if layout is None:
            x2 = xp.ascontiguousarray(x2)
            layout = _matrix_layout(x2)
        return Operand(x2, layout[0], layout[1], 0)
    assert own == batch, "plan() broadcasts every operand to the whole batch or to one matrix"
    x3 = x.reshape((batch, rows, cols))  # a copy only when the batch axes cannot merge
    layout = _matrix_layout(x3)
    if layout is None or x3.strides[0] < 0 or x3.strides[0] % x3.itemsize:
        x3 = xp.ascontiguousarray(x3)
        layout = _matrix_layout(x3)
    return Operand(x3, layout[0], layout[1], x3.strides[0] // x3.itemsize)


@dataclass(frozen=True)
class Plan:
    """One cublasGemmStridedBatchedEx call computing out (batch, M, N) = a @ b."""
    transa: int
    transb: int
    m: int
    n: int
    k: int
    A: Operand        # cuBLAS' first operand: b
    B: Operand        # cuBLAS' second operand: a
    ldc: int
    stride_c: int
    batch: int
    out_shape: tuple
    out: Any = None   # where the product goes: a view of the caller's ``out``, or None (a new array)


def plan(xp: Any, a: Any, b: Any, out: Any = None) -> Plan | None:
    """The cuBLAS call for ``a @ b`` (see the module docstring for the identity used).

    With ``out``: the call that writes into it, or None when its layout does not let
    cuBLAS write there (a column-major ``out`` is written as out^T = b^T a^T).
    """
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: {a.shape} @ {b.shape} do not fit")
    batch_shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    batch = int(np.prod(batch_shape, dtype=np.int64))
    m_rows, k, n_cols = a.shape[-2], a.shape[-1], b.shape[-1]
    c_layout = None
    if out is not None:
        if tuple(out.shape) != tuple(batch_shape) + (m_rows, n_cols):
            raise ValueError(f"matmul: out {out.shape} does not fit {a.shape} @ {b.shape}")
        c_layout = _out_layout(out, batch)
        if c_layout is None:
            t = out.swapaxes(-1, -2)
            if _out_layout(t, batch) is None:
                return None
            return plan(xp, b.swapaxes(-1, -2), a.swapaxes(-1, -2), t)
    if a.ndim > 2 and a.shape[:-2] != batch_shape and int(np.prod(a.shape[:-2])) != 1:
        a = xp.broadcast_to(a, batch_shape + a.shape[-2:])
    if b.ndim > 2 and b.shape[:-2] != batch_shape and int(np.prod(b.shape[:-2])) != 1:
        b = xp.broadcast_to(b, batch_shape + b.shape[-2:])
    opa, opb = operand(xp, b, batch), operand(xp, a, batch)
    ldc, stride_c = c_layout if c_layout else (n_cols, m_rows * n_cols)
    return Plan(opa.op, opb.op, n_cols, m_rows, k, opa, opb, ldc, stride_c, batch,
                batch_shape + (m_rows, n_cols), out)


def _out_layout(out: Any, batch: int) -> tuple | None:
    """(ldc, batch stride) in elements when ``out``'s matrices are row-major (unit column
    stride) and its batch axes step by one stride; else None."""
    s = out.itemsize
    r, c = out.shape[-2:]
    st_r, st_c = out.strides[-2:]
    if (st_c != s and c > 1) or st_r % s or st_r < 0 or (r > 1 and st_r // s < c):
        return None
    stride = merged_stride(out.shape[:-2], out.strides[:-2])
    if stride is None or stride % s or stride < 0:
        return None
    ld = st_r // s if r > 1 else max(c, 1)
    return ld, (stride // s if batch > 1 else r * c)


def merged_stride(shape: tuple, strides: tuple) -> int | None:
    """The one stride that walks every index of ``shape`` in order, i.e. the stride of
    those axes merged into one (0 when all have size 1), or None when they do not merge."""
    dims = [(n, st) for n, st in zip(shape, strides) if n != 1]
    if not dims:
        return 0
    for (n_outer, st_outer), (n_inner, st_inner) in zip(dims, dims[1:]):
        if st_outer != st_inner * n_inner:
            return None
    return dims[-1][1]


# -- the cuBLAS side ---------------------------------------------------------------------------
class _Cublas:
    """capsflow's cuBLAS handle, its workspace and the functions it calls."""

    def __init__(self, handle: Any, workspace: Any, gemm: Any, set_stream: Any,
                 set_workspace: Any = None) -> None:
        self.handle, self.workspace, self.gemm = handle, workspace, gemm
        self._set_stream, self._set_workspace = set_stream, set_workspace
        self._stream: Any = None

    def on_stream(self, ptr: int) -> None:
        """Queue the handle's GEMMs on stream ``ptr`` (CuPy's current one), with capsflow's
        workspace. cublasSetStream resets the handle's workspace to cuBLAS's default pool
        (cuBLAS documentation, cublasSetStream), so the workspace is set again after it;
        otherwise cuBLAS would allocate its own inside each CUDA graph capture."""
        if ptr == self._stream:
            return
        status = self._set_stream(self.handle, ctypes.c_void_p(ptr))
        if status == 0 and self._set_workspace is not None:
            status = self._set_workspace(self.handle, ctypes.c_void_p(self.workspace.data.ptr),
                                         ctypes.c_size_t(self.workspace.nbytes))
        if status != 0:
            raise RuntimeError(f"cuBLAS could not be bound to stream {ptr:#x} "
                               f"(status {status})")
        self._stream = ptr


#: By array module: its _Cublas, or None where none can be loaded (then ``xp.matmul``
#: runs, and steps are not captured as graphs).
_loaded: dict = {}


def cublas(xp: Any) -> "_Cublas | None":
    """capsflow's own cuBLAS for array module ``xp``, loaded on first use; None where
    there is none."""
    if xp not in _loaded:
        try:
            _loaded[xp] = _open(xp)
        except (OSError, AttributeError, StopIteration):
            _loaded[xp] = None
    return _loaded[xp]


def _open(xp: Any) -> "_Cublas | None":
    lib = _load_library(xp)
    handle = ctypes.c_void_p()
    if lib.cublasCreate_v2(ctypes.byref(handle)) != 0:
        return None
    workspace = xp.empty(_WORKSPACE_BYTES, dtype=xp.uint8)
    set_workspace = getattr(lib, "cublasSetWorkspace_v2", None)  # absent before CUDA 11
    if set_workspace is not None:
        set_workspace.restype = ctypes.c_int
        set_workspace.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    f = lib.cublasGemmStridedBatchedEx
    f.restype = ctypes.c_int
    vp, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    matrix = [vp, i, i, ll]                       # pointer, data type, ld, batch stride
    f.argtypes = ([vp] + [i] * 5 + [vp] + matrix + matrix  # handle, ops, m, n, k, alpha, A, B
                  + [vp] + matrix + [i, i, i])             # beta, C, batch, compute, algo
    lib.cublasSetStream_v2.restype = ctypes.c_int
    lib.cublasSetStream_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    return _Cublas(handle, workspace, f, lib.cublasSetStream_v2, set_workspace)


def mapped_cublas(maps: str) -> list:
    """The libcublas files mapped into a process, from its /proc/PID/maps text (the path
    is the sixth field and may hold spaces; a file deleted since it was mapped cannot be
    opened again and is left out)."""
    paths = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and "/libcublas.so" in fields[5]:
            path = fields[5].strip()
            if not path.endswith(" (deleted)"):
                paths.add(path)
    return sorted(paths)


def _load_library(xp: Any):
    """The libcublas that CuPy loaded (found in /proc/self/maps), else by soname."""
    xp.cuda.device.get_cublas_handle()  # makes CuPy load cuBLAS
    try:
        with open("/proc/self/maps") as f:
            paths = mapped_cublas(f.read())
    except OSError:
        paths = []
    for path in paths:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    for name in ("libcublas.so.13", "libcublas.so.12", "libcublas.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("libcublas not found")


def _run(xp: Any, a: Any, b: Any, out: Any, accumulate: bool, tf32: bool) -> Any:
    p = plan(xp, a, b, out)
    if p is None:  # an ``out`` cuBLAS cannot write: make the product, then copy or add it
        return _store(out, _run(xp, a, b, None, False, tf32), accumulate)
    c = xp.empty(p.out_shape, dtype=a.dtype) if p.out is None else p.out
    result = c if out is None else out
    if c.size == 0:
        return result
    if p.k == 0:
        if not accumulate:
            c[...] = 0
        return result
    if a.dtype == np.float64:
        dtype, compute, one = _CUDA_R_64F, _COMPUTE_64F, ctypes.c_double(1)
        beta = ctypes.c_double(1 if accumulate else 0)
    else:
        dtype, compute = _CUDA_R_32F, _COMPUTE_32F_FAST_TF32 if tf32 else _COMPUTE_32F
        one, beta = ctypes.c_float(1), ctypes.c_float(1 if accumulate else 0)
    lib = cublas(xp)
    lib.on_stream(xp.cuda.get_current_stream().ptr)
    status = lib.gemm(
        lib.handle, p.transa, p.transb, p.m, p.n, p.k, ctypes.c_void_p(ctypes.addressof(one)),
        ctypes.c_void_p(p.A.array.data.ptr), dtype, p.A.ld, p.A.batch_stride,
        ctypes.c_void_p(p.B.array.data.ptr), dtype, p.B.ld, p.B.batch_stride,
        ctypes.c_void_p(ctypes.addressof(beta)),
        ctypes.c_void_p(c.data.ptr), dtype, p.ldc, p.stride_c, p.batch, compute, _GEMM_DEFAULT)
    if status != 0:
        raise RuntimeError(f"cublasGemmStridedBatchedEx failed with status {status} "
                           f"for {a.shape} @ {b.shape}")
    return result
