"""capsflow.backends.cuda.gemm's cuBLAS call plan, checked on the CPU: an emulation of
cublasGemmStridedBatchedEx (column-major, leading dimensions, batch strides) reads the
operands' memory exactly as cuBLAS would, and must reproduce numpy.matmul."""
import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

from capsflow.backends.cuda import gemm


def _stored(op: gemm.Operand, rows: int, cols: int, batch: int):
    """The (batch, rows, cols) matrices cuBLAS reads for an operand whose op() is
    rows x cols: stored column-major with leading dimension ld."""
    x = op.array
    s = x.itemsize
    r, c = (rows, cols) if op.op == gemm._OP_N else (cols, rows)
    assert op.ld >= max(1, r), "cuBLAS needs ld >= the stored rows"
    view = as_strided(x, shape=(batch, r, c), strides=(op.batch_stride * s, s, op.ld * s))
    return view if op.op == gemm._OP_N else view.transpose(0, 2, 1)


def emulate(a, b, out=None, accumulate=False):
    """What the planned call leaves in memory: a new array, or ``out`` written (beta 0)
    or added to (beta 1) through the call's ldc and batch stride."""
    p = gemm.plan(np, a, b, out)
    op_a = _stored(p.A, p.m, p.k, p.batch)
    op_b = _stored(p.B, p.k, p.n, p.batch)
    c = op_a @ op_b                                          # (batch, m, n) column-major
    target = np.empty(p.out_shape, dtype=a.dtype) if p.out is None else p.out
    s = target.itemsize
    stored = as_strided(target, shape=(p.batch, p.m, p.n), strides=(p.stride_c * s, s, p.ldc * s))
    if accumulate:
        stored += c
    else:
        stored[...] = c
    return target if out is None else out


rng = np.random.default_rng(0)


def R(*shape):
    return rng.standard_normal(shape)


CASES = {
    "plain": (R(5, 3), R(3, 4)),
    "a transposed": (R(3, 5).T, R(3, 4)),
    "b transposed": (R(5, 3), R(4, 3).T),
    "both transposed": (R(3, 5).T, R(4, 3).T),
    "batched": (R(6, 5, 3), R(6, 3, 4)),
    "batched, b broadcast": (R(6, 5, 3), R(3, 4)),
    "batched, a broadcast": (R(5, 3), R(2, 3, 3, 4)),
    "batched, b transposed per matrix": (R(6, 5, 3), R(6, 4, 3).transpose(0, 2, 1)),
    "strided rows (a column slice)": (R(5, 8)[:, 2:5], R(3, 4)),
    "batch of one": (R(1, 5, 3), R(1, 3, 4)),
    "partial broadcast": (R(2, 1, 5, 3), R(1, 3, 3, 4)),
    "row vector": (R(1, 3), R(3, 4)),
    "column result": (R(5, 3), R(3, 1)),
    "non-mergeable batch": (R(4, 6, 5, 3).transpose(1, 0, 2, 3), R(6, 4, 3, 2)),
    "split-K as in conv2d": (R(8, 40, 6).transpose(0, 2, 1), R(8, 40, 5)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_plan_reproduces_matmul(name):
    a, b = CASES[name]
    np.testing.assert_allclose(emulate(a, b), a @ b, rtol=1e-12, atol=1e-12)


def test_without_cublas_it_is_the_modules_matmul():
    a, b = R(2, 3, 4), R(4, 5)
    assert gemm.cublas(np) is None
    np.testing.assert_array_equal(gemm.matmul(np, a, b, tf32=True), np.matmul(a, b))


@pytest.mark.parametrize("eq", ["ijdk,nik->nijd", "nijd,nik->ijdk", "nijd,ijdk->nik",
                                "nij,nj->ni", "ab,bc->a", "nijd,njd->nij", "nij,nijd->njd",
                                "ab,cb->ca"])
def test_einsum_as_one_batched_matmul(eq):
    """The lowering that CuPy's einsums take (backends/cuda/linalg.py), on NumPy."""
    from capsflow.backends import Backend
    from capsflow.backends.cuda.linalg import einsum_via_matmul
    from capsflow.ops.linalg import parse_equation
    from capsflow.options import Options
    subs, out = parse_equation(eq, 2)
    sizes = dict(zip("abcdijkn", (2, 3, 4, 5, 6, 3, 4, 2)))
    a, b = (R(*[sizes[i] for i in s]) for s in subs)
    be = Backend(Options(backend="cupy"), np)
    np.testing.assert_allclose(einsum_via_matmul(be, subs, out, a, b), np.einsum(eq, a, b),
                               rtol=1e-12, atol=1e-12)


OUT_CASES = {
    "row-major": lambda m: np.empty(m),
    "column-major (written as out^T = b^T a^T)": lambda m: np.empty(m[:-2] + m[-2:][::-1]).swapaxes(-1, -2),
    "interleaved batch, as u_hat's forward": lambda m: np.empty((m[2], m[0], m[1])).transpose(1, 2, 0),
    "rows of a wider array": lambda m: np.empty(m[:-1] + (m[-1] + 3,))[..., 1:m[-1] + 1],
}


@pytest.mark.parametrize("where", list(OUT_CASES))
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("name", ["plain", "batched", "batched, b transposed per matrix",
                                  "split-K as in conv2d"])
def test_plan_writes_into_out(name, where, accumulate):
    a, b = CASES[name]
    want = np.matmul(a, b)
    shape = want.shape if want.ndim == 3 else (1,) + want.shape
    out = OUT_CASES[where](shape).reshape(shape)
    if want.ndim == 2:
        out = out[0]
    out[...] = R(*out.shape)
    before = out.copy()
    base = out.base if out.base is not None else out
    assert gemm.plan(np, a, b, out) is not None
    got = emulate(a, b, out, accumulate)
    assert got is out and np.shares_memory(got, base)
    np.testing.assert_allclose(out, want + before if accumulate else want, rtol=1e-12, atol=1e-12)


def test_plan_declines_an_out_it_cannot_address():
    a, b = CASES["batched"]
    out = np.empty((6, 5, 4, 2))[..., 0]                     # no unit stride either way
    assert gemm.plan(np, a, b, out) is None
    with pytest.raises(ValueError, match="does not fit"):
        gemm.plan(np, a, b, np.empty((6, 4, 5)))


@pytest.mark.parametrize("accumulate", [False, True])
def test_matmul_into_out_without_cublas(accumulate):
    a, b = R(2, 3, 4), R(4, 5)
    out = R(2, 5, 3).swapaxes(1, 2)
    want = a @ b + (out if accumulate else 0)
    assert gemm.matmul(np, a, b, out=out, accumulate=accumulate) is out
    np.testing.assert_allclose(out, want, rtol=1e-12)


def test_the_handle_keeps_its_workspace_across_streams():
    """cublasSetStream resets a handle's workspace to cuBLAS's default pool, so each
    change of stream (eager on the null stream, a capture on its own) sets capsflow's
    workspace again; the same stream twice calls neither."""
    from types import SimpleNamespace
    calls = []
    workspace = SimpleNamespace(data=SimpleNamespace(ptr=0xAB00), nbytes=1 << 20)

    def set_stream(handle, ptr):
        calls.append(("stream", ptr.value or 0))
        return 0

    def set_workspace(handle, ptr, size):
        calls.append(("workspace", ptr.value, size.value))
        return 0

    lib = gemm._Cublas("handle", workspace, None, set_stream, set_workspace)
    for stream in (0, 0, 0x51, 0x51, 0):
        lib.on_stream(stream)
    bound = [("workspace", 0xAB00, 1 << 20)]
    assert calls == [("stream", 0), *bound, ("stream", 0x51), *bound, ("stream", 0), *bound]

    failing = gemm._Cublas("handle", workspace, None, set_stream, lambda *args: 7)
    with pytest.raises(RuntimeError, match="status 7"):
        failing.on_stream(0x51)
    calls.clear()
    old = gemm._Cublas("handle", workspace, None, set_stream)  # no cublasSetWorkspace
    old.on_stream(0x51)
    assert calls == [("stream", 0x51)]


def test_the_cublas_that_cupy_mapped_is_found_in_proc_maps():
    maps = "\n".join([
        "7f00-7f01 r-xp 00000000 08:01 1 /opt/venv/nvidia/cu13/lib/libcublas.so.13",
        "7f01-7f02 r--p 00001000 08:01 1 /opt/venv/nvidia/cu13/lib/libcublas.so.13",
        "7f02-7f03 r-xp 00000000 08:01 2 /tmp/my libs/libcublasLt.so.13",
        "7f03-7f04 r-xp 00000000 08:01 3 /old/libcublas.so.12 (deleted)",
        "7f04-7f05 rw-p 00000000 00:00 0 ",
        "7f05-7f06 r-xp 00000000 08:01 4 /usr/lib/libc.so.6"])
    assert gemm.mapped_cublas(maps) == ["/opt/venv/nvidia/cu13/lib/libcublas.so.13"]
