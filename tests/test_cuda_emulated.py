"""capsflow's CUDA kernels, run on the CPU by tests/cuda_emulator.py (g++), against the
ops' plain NumPy code: each kernel alone, then the whole CapsNet and Adam steps through
every CuPy-only branch, with the checks runners/gpu_check.py runs on a real GPU."""
import numpy as np
import pytest

import cuda_emulator
from capsflow.backends.cuda import kernels as cuda_kernels
from capsflow.core.opdef import get_op
from capsflow.ops import conv

pytestmark = pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++")


def _rng():
    return np.random.default_rng(0)


def test_the_emulator_refuses_strided_pointers(emu):
    x = _rng().standard_normal((4, 6))
    kernel = emu.RawKernel("typedef double T;\n" + cuda_kernels._CONV, "sum_leading")
    with pytest.raises(ValueError, match="C-contiguous"):
        kernel((1,), (32,), (x[:, ::2], np.empty(3), np.int32(4), np.int64(3)))
    with pytest.raises(TypeError, match="fixed width"):
        kernel((1,), (32,), (x, np.empty(6), 4, np.int64(6)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op,kind", [("softmax", "fwd"), ("softmax", "vjp"),
                                     ("squash", "fwd"), ("squash", "vjp")])
def test_rowwise_kernels(emu, dtype, op, kind):
    rng = _rng()
    x = rng.standard_normal((3, 7, 16)).astype(dtype)
    g = rng.standard_normal((3, 7, 16)).astype(dtype)
    attrs = {"axis": -1, "eps": 1e-7} if op == "squash" else {"axis": -1}
    eps = attrs.get("eps")
    opdef = get_op(op)
    if kind == "fwd":
        fused = cuda_kernels.rowwise(emu, f"{op}_fwd", -1, x, eps=eps)
        plain = opdef.forward_fn(np, x, **attrs)
    else:
        saved = {"out": opdef.forward_fn(np, x, **attrs)} if op == "softmax" else {"s": x}
        first = saved["out"] if op == "softmax" else x
        fused = cuda_kernels.rowwise(emu, f"{op}_vjp", -1, first, g, eps=eps)
        plain = opdef.vjp_fn(np, saved, g, (True,), **attrs)[0]
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(fused, plain, rtol=tol, atol=tol)


@pytest.mark.parametrize("subs,out", [(["nijd", "njd"], "nij"), (["njd", "nijd"], "nij"),
                                      (["nij", "nijd"], "njd"), (["nijd", "nij"], "njd")])
def test_routing_contractions(emu, subs, out):
    rng = _rng()
    sizes = dict(n=3, i=37, j=10, d=16)  # i not a multiple of the 16 splits
    xs = [rng.standard_normal([sizes[c] for c in s]) for s in subs]
    fused = cuda_kernels.routing_contraction(emu, subs, out, tuple(xs))
    np.testing.assert_allclose(fused, np.einsum(f"{subs[0]},{subs[1]}->{out}", *xs),
                               rtol=1e-12, atol=1e-12)


def test_sums(emu):
    rng = _rng()
    for rows in (1, 2, 4, 5, 8, 11):  # four running sums, and every remainder after them
        a = rng.standard_normal((rows, 33))
        np.testing.assert_allclose(cuda_kernels.sum_leading(emu, a), a.sum(axis=0), rtol=1e-12)
    tall = rng.standard_normal((960, 7))
    np.testing.assert_allclose(cuda_kernels.sum_rows(emu, tall), tall.sum(axis=0), rtol=1e-12)
    odd = rng.standard_normal((97, 3))  # a prime number of rows: one partial sum per row
    np.testing.assert_allclose(cuda_kernels.column_sums(emu, odd), odd.sum(axis=0), rtol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels", [24, 6, 5])  # col2im's 8, 2 and 1 lanes; im2col kernel at 24
@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 0), (2, 1), (3, 2)])
def test_conv2d_gpu_branches(emu, stride, padding, channels, bias):
    """The windows (by the im2col kernel, or copied with a ones column for the bias)
    kept for the VJP, the batched input-gradient GEMMs, col2im and the bias sum, against
    NumPy's conv2d."""
    rng = _rng()
    c = channels
    x, w = rng.standard_normal((2, c, 11, 12)), rng.standard_normal((5, c, 3, 4))
    b = rng.standard_normal(5) if bias else None
    assert (4 * c >= conv.MIN_GPU_ROW) == (c == 24)
    op = get_op("conv2d")
    outs = {}
    for name, xp in (("numpy", np), ("emulated", emu)):
        out, extras = op.forward_fn(xp, x, w, b, stride=stride, padding=padding)
        if name == "emulated":
            assert extras["cols"].shape[1] == 3 * 4 * c + (bias and c != 24)
        g = np.random.default_rng(1).standard_normal(out.shape)
        needs = (True, True, True) if bias else (True, True)
        grads = op.vjp_fn(xp, {**extras, "w": w}, g, needs, stride=stride, padding=padding)
        outs[name] = (out,) + tuple(grads)
    for got, want in zip(outs["emulated"], outs["numpy"]):
        if want is None:
            assert got is None
            continue
        assert got.flags.c_contiguous or got.ndim == 4  # gx is a channels-last view
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)


def test_adam_kernel(emu):
    rng = _rng()
    p, g = rng.standard_normal(50), rng.standard_normal(50)
    m, v = rng.standard_normal(50) * 0.1, rng.random(50)
    hyper = np.array([1e-3, 0.3])
    ref = [a.copy() for a in (p, m, v)]
    assert cuda_kernels.adam_update(emu, p, g, m, v, hyper, (0.9, 0.999), 1e-8)
    mm = ref[1] + (g - ref[1]) * 0.1
    vv = ref[2] * 0.999 + 0.001 * g * g
    np.testing.assert_allclose(m, mm, rtol=1e-14)
    np.testing.assert_allclose(v, vv, rtol=1e-14)
    np.testing.assert_allclose(p, ref[0] - mm / (np.sqrt(vv) / 0.3 + 1e-8) * 1e-3, rtol=1e-13)


def test_gpu_check_kernels_and_parity_pass_on_the_emulator(emu, capsys):
    """What gpu_check runs on a GPU: CapsNet on 'CuPy' against NumPy (float64 and float32,
    plus finite differences) and three Adam steps with the kernels against without."""
    from capsflow.runners import gpu_check
    assert gpu_check.check_parity()
    assert gpu_check.check_kernels()
    printed = capsys.readouterr().out
    assert printed.count("-> ok") == 4, printed


def test_kernels_with_32_bit_indices_decline_larger_arrays(emu, monkeypatch):
    """Past INT_MAX elements the flat-index kernels step aside and the xp path runs."""
    rng = _rng()
    monkeypatch.setattr(cuda_kernels, "INT_MAX", 50)
    v = rng.standard_normal((2, 3, 4))
    fits, too_big = rng.standard_normal((2, 5, 3, 4)), rng.standard_normal((2, 9, 3, 4))
    assert cuda_kernels.routing_contraction(emu, ["nijd", "njd"], "nij", (fits, v)) is not None
    assert cuda_kernels.routing_contraction(emu, ["nijd", "njd"], "nij", (too_big, v)) is None
    assert cuda_kernels.col2im(emu, np.zeros((2, 1, 2, 2, 2, 4)), (1, 3, 3, 4), 1) is not None
    assert cuda_kernels.col2im(emu, np.zeros((2, 2, 2, 2, 2, 4)), (2, 3, 3, 4), 1) is None
    assert cuda_kernels.outer_sum(emu, [np.ones((1, 3, 3))], [np.ones((1, 3, 4))],
                                  np.empty((1, 3, 3, 4)), False)
    assert not cuda_kernels.outer_sum(emu, [np.ones((2, 3, 3))], [np.ones((2, 3, 4))],
                                      np.empty((2, 3, 3, 4)), False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_vjp_kernel_keeps_the_output_layout(emu, dtype):
    """Conv1's output is a channels-last view; its gradient comes back in that layout."""
    rng = _rng()
    y = np.maximum(rng.standard_normal((2, 5, 4, 3)), 0).astype(dtype)
    y[0, 0, 0, 0] = 0.0
    y_view = y.transpose(0, 3, 1, 2)                 # (N, C, H, W) over channels-last memory
    g = rng.standard_normal(y_view.shape).astype(dtype)
    got = cuda_kernels.relu_vjp(emu, g, y_view)
    np.testing.assert_array_equal(got, g * (y_view > 0))
    assert got.transpose(0, 2, 3, 1).flags.c_contiguous
    assert cuda_kernels.relu_vjp(emu, g, y_view[:, :, ::2]) is None  # not dense: the xp path


def test_vector_and_scalar_branches_agree(emu):
    """contract_d and outer_sum read 4 values at a time when the sizes and the alignment
    allow; an odd last axis or a misaligned view takes the scalar branch, same result."""
    rng = _rng()
    for d in (16, 6):
        a, v = rng.standard_normal((2, 7, 3, d)), rng.standard_normal((2, 3, d))
        got = cuda_kernels.routing_contraction(emu, ["bijd", "bjd"], "bij", (a, v))
        np.testing.assert_allclose(got, np.einsum("bijd,bjd->bij", a, v), rtol=1e-13)
    buf = np.empty(2 * 5 * 3 * 8 + 1)
    misaligned = buf[1:] if buf.ctypes.data % 16 == 0 else buf[:-1]
    for out in (np.empty((2, 5, 3, 8)), misaligned.reshape(2, 5, 3, 8), np.empty((2, 5, 3, 7))):
        nr = out.shape[-1]
        lefts = [rng.standard_normal((2, 5, 3)) for _ in range(3)]
        rights = [rng.standard_normal((2, 3, nr)) for _ in range(3)]
        out[...] = 1.0
        assert cuda_kernels.outer_sum(emu, lefts, rights, out, True)
        want = 1.0 + sum(np.einsum("blj,bjr->bljr", l, r) for l, r in zip(lefts, rights))
        np.testing.assert_allclose(out, want, rtol=1e-13)


@pytest.mark.parametrize("lanes", [8, 4, 2, 1])
def test_col2im_with_each_number_of_lanes(emu, monkeypatch, lanes):
    """col2im gathers the same sums whether a thread takes 8, 4, 2 or 1 channels."""
    monkeypatch.setattr(cuda_kernels, "COL2IM_LANES", lanes)
    rng = _rng()
    cols = rng.standard_normal((3, 2, 4, 4, 3, 16))          # (KH, N, OH, OW, KW, C)
    want = np.zeros((2, 9, 9, 16))
    for i in range(3):
        for j in range(3):
            want[:, i:i + 2 * 4:2, j:j + 2 * 4:2] += cols[i, :, :, :, j]
    np.testing.assert_allclose(cuda_kernels.col2im(emu, cols, want.shape, 2), want, rtol=1e-13)
