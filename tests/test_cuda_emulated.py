"""capsflow's CUDA backend run on the CPU by tests/cuda_emulator.py (g++): each kernel
against the ops' reference code, each CUDA variant against its reference, then the
whole CapsNet and Adam steps with every variant on (``Options(backend="cupy")``)
against the reference on the same backend and against NumPy, with the checks that
``bash runners/gpu_check.sh`` runs on a real GPU."""
import numpy as np
import pytest

import cuda_emulator
from capsflow.backends import get_backend
from capsflow.backends.cuda import conv, kernels
from capsflow.core.gradients import Outer, sum_outer_terms
from capsflow.core.opdef import DECLINED, get_op
from capsflow.options import Options

pytestmark = pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++")
FAST = Options(backend="cupy")
PLAIN = FAST.replace(fast_paths=False, factored_grads=False)


def _rng():
    return np.random.default_rng(0)


def test_the_emulator_refuses_strided_pointers(emu):
    x = _rng().standard_normal((4, 6))
    kernel = emu.RawKernel("typedef double T;\n" + kernels._CONV, "sum_leading")
    with pytest.raises(ValueError, match="C-contiguous"):
        kernel((1,), (32,), (x[:, ::2], np.empty(3), np.int32(4), np.int64(3)))
    with pytest.raises(TypeError, match="fixed width"):
        kernel((1,), (32,), (x, np.empty(6), 4, np.int64(6)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op,kind,eps", [("softmax", "fwd", None), ("softmax", "vjp", None),
                                         ("squash", "fwd", 0.0), ("squash", "vjp", 0.0),
                                         ("squash", "fwd", 1e-7), ("squash", "vjp", 1e-7)])
def test_rowwise_kernels(emu, dtype, op, kind, eps):
    rng = _rng()
    x = rng.standard_normal((3, 7, 16)).astype(dtype)
    x[1, 2] = 0  # a zero capsule: squash's value and gradient are 0 there, without 0/0
    g = rng.standard_normal((3, 7, 16)).astype(dtype)
    attrs = {"axis": -1} if eps is None else {"axis": -1, "eps": eps}
    opdef = get_op(op)
    if kind == "fwd":
        fused = kernels.rowwise(emu, f"{op}_fwd", -1, x, eps=eps)
        plain = opdef.forward_fn(np, x, **attrs)
    else:
        saved = {"out": opdef.forward_fn(np, x, **attrs)} if op == "softmax" else {"s": x}
        first = saved["out"] if op == "softmax" else x
        fused = kernels.rowwise(emu, f"{op}_vjp", -1, first, g, eps=eps)
        plain = opdef.vjp_fn(np, saved, g, (True,), **attrs)[0]
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(fused, plain, rtol=tol, atol=tol)
    assert np.isfinite(fused).all()
    if op == "squash" and not eps:
        assert not fused[1, 2].any()


@pytest.mark.parametrize("eps", [0.0, 1e-7])
def test_squash_kernels_on_long_capsules_in_float32(emu, eps):
    """|s| up to 5e9: the kernels divide a factor at a time, as ops/caps.py, so float32
    neither overflows nor drops the gradient's radial term (the float64 reference)."""
    rng = _rng()
    x = rng.standard_normal((3, 4, 16)) * np.array([1e4, 3e5, 1e8, 5e9])[:, None]
    g = rng.standard_normal((3, 4, 16))
    opdef, attrs = get_op("squash"), {"axis": -1, "eps": eps}
    x32, g32 = x.astype(np.float32), g.astype(np.float32)
    out = kernels.rowwise(emu, "squash_fwd", -1, x32, eps=eps)
    grad = kernels.rowwise(emu, "squash_vjp", -1, x32, g32, eps=eps)
    np.testing.assert_allclose(out, opdef.forward_fn(np, x, **attrs), rtol=1e-5)
    want = opdef.vjp_fn(np, {"s": x}, g, (True,), **attrs)[0]
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("subs,out", [(["nijd", "njd"], "nij"), (["njd", "nijd"], "nij"),
                                      (["nij", "nijd"], "njd"), (["nijd", "nij"], "njd")])
def test_routing_contractions(emu, subs, out):
    rng = _rng()
    sizes = dict(n=3, i=37, j=10, d=16)  # i not a multiple of the 16 splits
    xs = [rng.standard_normal([sizes[c] for c in s]) for s in subs]
    fused = kernels.routing_contraction(emu, subs, out, tuple(xs))
    np.testing.assert_allclose(fused, np.einsum(f"{subs[0]},{subs[1]}->{out}", *xs),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eq", ["nijd,njd->nij", "nij,nijd->njd",     # routing kernels
                                "nij,njd->nijd", "ab,c->acb",         # broadcast products
                                "ijdk,nik->nijd", "ab,bc->a", "nij,nj->ni"])  # batched GEMMs
def test_einsum_variant_forward_and_vjp_match_the_reference(emu, eq):
    """Each way the CUDA einsum takes, forward and VJP (outer-product gradients made at
    once, as without factored gradients), against the reference."""
    op = get_op("einsum")
    variant = next(v for v in op.variants if v.backend == "cupy")
    sizes = dict(zip("abcdijkn", (2, 3, 4, 5, 6, 3, 4, 2)))
    rng = _rng()
    xs = [rng.standard_normal([sizes[i] for i in sub]) for sub in eq.split("->")[0].split(",")]
    out, extras = variant.forward_fn(get_backend(FAST), *xs, eq=eq)
    want, want_extras = op.forward_fn(np, *xs, eq=eq)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(out.shape)
    got = variant.vjp_fn(get_backend(FAST), extras, g, (True, True), eq=eq)
    for a, b in zip(got, op.vjp_fn(np, want_extras, g, (True, True), eq=eq)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_empty_operands_and_a_float32_eps_of_zero_match_the_reference(emu):
    """From the CUDA review: linear's bias gradient over no rows crashed (sum_leading
    declined, sum_rows used its None); a broadcast product with a size-0 axis against a
    size-1 one was sized 1; squash with an eps that float32 holds as 0 gave the kernel's
    paper formula but the reference's eps formula (NaN at a zero capsule)."""
    be = get_backend(FAST)
    linear = get_op("linear")
    x, w, b, g = np.ones((0, 5)), np.ones((5, 3)), np.ones(3), np.ones((0, 3))
    _, variant = linear.run_forward(be, [x, w, b], {})
    grads = linear.run_vjp(be, variant, {"x": x, "w": w}, g, (True, True, True), {})
    np.testing.assert_array_equal(grads[2], np.zeros(3))
    einsum = get_op("einsum")
    a, c = np.ones((2, 3, 4)), np.ones((2, 4, 0))
    out, _ = next(v for v in einsum.variants if v.backend == "cupy").forward_fn(
        be, a, c, eq="nij,njd->nijd")
    assert out.shape == (2, 3, 4, 0)
    s = np.zeros((2, 4), np.float32)
    s[1] = [0.5, -1.0, 2.0, 0.25]
    g = np.ones((2, 4), np.float32)
    squash, attrs = get_op("squash"), {"axis": -1, "eps": 1e-50}
    np.testing.assert_array_equal(kernels.rowwise(emu, "squash_fwd", -1, s, eps=1e-50),
                                  squash.forward_fn(np, s, **attrs))
    np.testing.assert_array_equal(kernels.rowwise(emu, "squash_vjp", -1, s, g, eps=1e-50),
                                  squash.vjp_fn(np, {"s": s}, g, (True,), **attrs)[0])


def test_einsums_of_other_than_two_operands_are_cupys(emu, monkeypatch):
    variant = next(v for v in get_op("einsum").variants if v.backend == "cupy")
    calls = []
    monkeypatch.setattr(emu, "einsum", lambda *a, **k: calls.append(a[0]) or np.einsum(*a, **k),
                        raising=False)
    a = _rng().standard_normal((2, 3))
    out, _ = variant.forward_fn(get_backend(FAST), a, a.T, a, eq="ab,bc,cd->ad")
    np.testing.assert_allclose(out, a @ a.T @ a, rtol=1e-12)
    assert calls == ["ab,bc,cd->ad"]


def test_sums(emu):
    rng = _rng()
    for rows in (1, 2, 4, 5, 8, 11):  # four running sums, and every remainder after them
        a = rng.standard_normal((rows, 33))
        np.testing.assert_allclose(kernels.sum_leading(emu, a), a.sum(axis=0), rtol=1e-12)
    tall = rng.standard_normal((960, 7))
    np.testing.assert_allclose(kernels.sum_rows(emu, tall), tall.sum(axis=0), rtol=1e-12)
    odd = rng.standard_normal((97, 3))  # a prime number of rows: one partial sum per row
    np.testing.assert_allclose(kernels.column_sums(emu, odd), odd.sum(axis=0), rtol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels", [24, 6, 5])  # col2im's 8, 2 and 1 lanes; im2col kernel at 24
@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 0), (2, 1), (3, 2)])
def test_conv2d_variant(emu, stride, padding, channels, bias):
    """The windows (by the im2col kernel, or copied with a ones column for the bias)
    kept for the VJP, the batched input-gradient GEMMs, col2im and the bias sum, against
    the reference conv2d."""
    rng = _rng()
    c = channels
    x, w = rng.standard_normal((2, c, 11, 12)), rng.standard_normal((5, c, 3, 4))
    b = rng.standard_normal(5) if bias else None
    assert (4 * c >= conv.MIN_GPU_ROW) == (c == 24)
    op = get_op("conv2d")
    out, extras = conv.gpu_conv2d.forward_fn(get_backend(FAST), x, w, b, stride=stride,
                                             padding=padding)
    assert extras["cols"].shape[1] == 3 * 4 * c + (bias and c != 24)
    want = op.forward_fn(np, x, w, b, stride=stride, padding=padding)
    g = np.random.default_rng(1).standard_normal(out.shape)
    needs = (True, True, True) if bias else (True, True)
    saved = {**extras, "w": w}
    grads = conv.gpu_conv2d.vjp_fn(get_backend(FAST), saved, g, needs, stride=stride,
                                   padding=padding)
    wants = op.vjp_fn(np, {"x": x, "w": w}, g, needs, stride=stride, padding=padding)
    np.testing.assert_allclose(out, want, rtol=1e-11, atol=1e-11)
    assert "cols" not in saved  # the VJP let the windows go
    for got, want in zip(grads, wants):
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
    assert kernels.adam_update(emu, p, g, m, v, hyper, (0.9, 0.999), 1e-8)
    mm = ref[1] + (g - ref[1]) * 0.1
    vv = ref[2] * 0.999 + 0.001 * g * g
    np.testing.assert_allclose(m, mm, rtol=1e-14)
    np.testing.assert_allclose(v, vv, rtol=1e-14)
    np.testing.assert_allclose(p, ref[0] - mm / (np.sqrt(vv) / 0.3 + 1e-8) * 1e-3, rtol=1e-13)


@pytest.mark.parametrize("eps_form", ["torch", "tf1"])
def test_adam_variant_leaves_what_the_kernel_declines_to_the_reference(emu, eps_form):
    """A parameter the kernel cannot take (here a transposed view) is updated by the
    reference, the others by the kernel, to the same values (both forms of epsilon)."""
    from capsflow.training.optim import Adam
    rng = _rng()
    params = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal((4, 3)).T}
    grads = {k: rng.standard_normal(p.shape) for k, p in params.items()}
    runs = {}
    for options in (FAST, PLAIN):
        p = {k: v.copy() if v.flags.c_contiguous else v.T.copy().T for k, v in params.items()}
        opt = Adam(1e-2, eps_form=eps_form)
        state = opt.init_state(p)
        for _ in range(2):
            opt.step(p, grads, state, backend=get_backend(options))
        runs[options] = p
    for k in params:
        np.testing.assert_allclose(runs[FAST][k], runs[PLAIN][k], rtol=1e-13)


def test_gpu_check_parity_and_fast_paths_pass_on_the_emulator(emu, capsys):
    """What gpu_check runs on a GPU: CapsNet on 'CuPy' against NumPy (float64 and float32,
    plus finite differences) and three Adam steps with every variant against the
    reference on the same backend."""
    from capsflow.backends.cuda import check
    assert check.check_parity()
    assert check.check_kernels()
    printed = capsys.readouterr().out
    assert printed.count("-> ok") == 4, printed


def test_a_capsnet_step_runs_every_kernel(emu, capsnet, batch64, monkeypatch):
    """The fast path is not silently declined: one CapsNet step and an Adam update on
    'CuPy' launch each kernel, and each launch applies."""
    from capsflow.training.optim import Adam
    names = ("rowwise", "routing_contraction", "im2col", "col2im", "outer_sum", "relu_vjp",
             "sum_leading", "column_sums", "adam_update")
    applied: dict = {}
    for name in names:
        def counted(*args, _real=getattr(kernels, name), _name=name, **kw):
            result = _real(*args, **kw)
            applied.setdefault(_name, []).append(result is not None and result is not False)
            return result
        monkeypatch.setattr(kernels, name, counted)
    be = get_backend(FAST)
    x, y = batch64
    params = capsnet.init_params(seed=0, dtype="float64")
    _, grads = capsnet.value_and_grad(params, {"x": x, "y": y}, backend=be)
    opt = Adam(1e-3)
    opt.step(params, grads, opt.init_state(params), backend=be)
    assert set(applied) == set(names)
    # routing_contraction is asked for every two-operand einsum; the rest always apply
    assert all(all(v) for k, v in applied.items() if k != "routing_contraction"), applied
    assert sum(applied["routing_contraction"]) >= 4


@pytest.mark.parametrize("budget,chunked", [
    (7_200_000, "primary"),   # PrimaryCaps one image a chunk (6.0 MB of windows each)
    (600_000, "conv1")])      # Conv1 two images a chunk; PrimaryCaps' image too big: reference
def test_a_capsnet_step_with_convolutions_in_chunks_equals_numpy(emu, capsnet, batch64,
                                                                 monkeypatch, budget, chunked):
    """The chunked conv2d inside a whole CapsNet step (the engine's saved arrays, the
    gradient sums) gives NumPy's outputs and gradients."""
    monkeypatch.setattr(conv, "DEVICE_CHUNK_BYTES", budget)
    seen = []
    forward = conv.gpu_conv2d.forward_fn

    def spy(be, x, w, b=None, **attrs):
        result = forward(be, x, w, b, **attrs)
        seen.append("declined" if result is DECLINED else "cols" in result[1])
        return result
    monkeypatch.setattr(conv.gpu_conv2d, "forward_fn", spy)
    x, y = batch64
    params = capsnet.init_params(seed=0, dtype="float64")
    want_out, want = capsnet.value_and_grad(params, {"x": x, "y": y}, backend="numpy")
    got_out, got = capsnet.value_and_grad(params, {"x": x, "y": y}, backend=get_backend(FAST))
    # Conv1 then PrimaryCaps: kept windows (True), chunks (False) or the reference
    assert seen == ([True, False] if chunked == "primary" else [False, "declined"])
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-13, err_msg=k)
    np.testing.assert_allclose(got_out["loss"], want_out["loss"], rtol=1e-12)


@pytest.mark.parametrize("count,dtype", [(1, np.float64), (5, np.float32), (11, np.float64)])
def test_sum_outer_terms_kernel(emu, monkeypatch, count, dtype):
    """The CUDA variant: 8 terms a launch, then accumulating launches, against the
    reference sum."""
    rng = np.random.default_rng(count)
    terms = [Outer(rng.standard_normal((2, 5, 3)).astype(dtype),
                   rng.standard_normal((2, 3, 8)).astype(dtype), (2, 5, 3, 8))
             for _ in range(count)]
    launches = []
    real = kernels.outer_sum
    monkeypatch.setattr(kernels, "outer_sum",
                        lambda *a, **k: launches.append(len(a[1])) or real(*a, **k))
    got = sum_outer_terms(get_backend(FAST), terms)
    assert launches == [min(count, 8)] + ([count - 8] if count > 8 else [])
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got, sum_outer_terms.reference(np, terms), rtol=tol, atol=tol)


def test_kernels_with_32_bit_indices_decline_larger_arrays(emu, monkeypatch):
    """Past INT_MAX elements the flat-index kernels step aside, and so does the conv2d
    variant (for col2im) where one image has that many: the reference runs. A batch that
    has that many in all is taken in chunks of images (test_conv2d_variant_in_chunks)."""
    rng = _rng()
    monkeypatch.setattr(kernels, "INT_MAX", 50)
    v = rng.standard_normal((2, 3, 4))
    fits, too_big = rng.standard_normal((2, 5, 3, 4)), rng.standard_normal((2, 9, 3, 4))
    assert kernels.routing_contraction(emu, ["nijd", "njd"], "nij", (fits, v)) is not None
    assert kernels.routing_contraction(emu, ["nijd", "njd"], "nij", (too_big, v)) is None
    assert kernels.col2im(emu, np.zeros((2, 1, 2, 2, 2, 4)), (1, 3, 3, 4), 1) is not None
    assert kernels.col2im(emu, np.zeros((2, 2, 2, 2, 2, 4)), (2, 3, 3, 4), 1) is None
    assert kernels.outer_sum(emu, [np.ones((1, 3, 3))], [np.ones((1, 3, 4))],
                             np.empty((1, 3, 3, 4)), False)
    assert not kernels.outer_sum(emu, [np.ones((2, 3, 3))], [np.ones((2, 3, 4))],
                                 np.empty((2, 3, 3, 4)), False)
    w = rng.standard_normal((2, 1, 3, 3))
    assert conv.gpu_conv2d.forward_fn(get_backend(FAST), np.ones((3, 1, 5, 5)), w,
                                      stride=1, padding=0) is not DECLINED
    assert conv._images_per_chunk(np.ones((3, 1, 5, 5)), w, 1, 0) == 2
    assert conv.gpu_conv2d.forward_fn(get_backend(FAST), np.ones((1, 1, 7, 8)), w,
                                      stride=1, padding=0) is DECLINED


def test_conv2d_variant_declines_only_an_image_over_its_budget(emu, monkeypatch):
    rng = _rng()
    x, w = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3))
    windows = 4 * 4 * 3 * 3 * 3 * 8  # bytes of one image's (OH*OW, kh*kw*C) float64 windows
    monkeypatch.setattr(conv, "DEVICE_CHUNK_BYTES", 2 * windows)
    out, extras = conv.gpu_conv2d.forward_fn(get_backend(FAST), x, w, stride=1, padding=0)
    assert "cols" in extras  # the whole batch at once, its windows kept
    monkeypatch.setattr(conv, "DEVICE_CHUNK_BYTES", 2 * windows - 1)
    out, extras = conv.gpu_conv2d.forward_fn(get_backend(FAST), x, w, stride=1, padding=0)
    assert "cols" not in extras  # one image at a time, nothing kept
    monkeypatch.setattr(conv, "DEVICE_CHUNK_BYTES", windows - 1)
    assert conv.gpu_conv2d.forward_fn(get_backend(FAST), x, w, stride=1, padding=0) is DECLINED


@pytest.mark.parametrize("needs", [(True, True, True), (True, True, False), (False, True, True),
                                   (True, False, False), (True, True)])
@pytest.mark.parametrize("channels", [24, 5])  # the im2col kernel; CuPy's copy + ones column
@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1)])
def test_conv2d_variant_in_chunks(emu, monkeypatch, stride, padding, channels, needs):
    """A batch whose windows exceed the budget: 5 images in chunks of 2, 2 and 1, each
    chunk's windows copied in the forward and again in the VJP, against the reference."""
    rng = _rng()
    c = channels
    x, w = rng.standard_normal((5, c, 9, 8)), rng.standard_normal((3, c, 3, 4))
    b = rng.standard_normal(3) if len(needs) > 2 else None
    h, wd = 9 + 2 * padding, 8 + 2 * padding
    one_image = ((h - 3) // stride + 1) * ((wd - 4) // stride + 1) * 3 * 4 * c * 8
    monkeypatch.setattr(conv, "DEVICE_CHUNK_BYTES", 2 * one_image + 1)
    assert conv._images_per_chunk(x, w, stride, padding) == 2
    out, extras = conv.gpu_conv2d.forward_fn(get_backend(FAST), x, w, b, stride=stride,
                                             padding=padding)
    assert "cols" not in extras
    op = get_op("conv2d")
    np.testing.assert_allclose(out, op.forward_fn(np, x, w, b, stride=stride, padding=padding),
                               rtol=1e-11, atol=1e-11)
    g = np.random.default_rng(1).standard_normal(out.shape)
    grads = conv.gpu_conv2d.vjp_fn(get_backend(FAST), {**extras, "x": x, "w": w}, g, needs,
                                   stride=stride, padding=padding)
    wants = op.vjp_fn(np, {"x": x, "w": w}, g, needs, stride=stride, padding=padding)
    for got, want in zip(grads, wants):
        assert (got is None) == (want is None)
        if want is not None:
            np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_vjp_kernel_keeps_the_output_layout(emu, dtype):
    """Conv1's output is a channels-last view; its gradient comes back in that layout."""
    rng = _rng()
    y = np.maximum(rng.standard_normal((2, 5, 4, 3)), 0).astype(dtype)
    y[0, 0, 0, 0] = 0.0
    y_view = y.transpose(0, 3, 1, 2)                 # (N, C, H, W) over channels-last memory
    g = rng.standard_normal(y_view.shape).astype(dtype)
    got = kernels.relu_vjp(emu, g, y_view)
    np.testing.assert_array_equal(got, g * (y_view > 0))
    assert got.transpose(0, 2, 3, 1).flags.c_contiguous
    assert kernels.relu_vjp(emu, g, y_view[:, :, ::2]) is None  # not dense: declined


class COrder(np.ndarray):
    """Arrays whose element-wise results come out in C order whatever the inputs' layout,
    as CuPy's do (NumPy's keep the inputs' layout)."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        plain = [np.asarray(a) if isinstance(a, COrder) else a for a in inputs]
        return np.ascontiguousarray(getattr(ufunc, method)(*plain, **kwargs)).view(COrder)


@pytest.mark.parametrize("name,attrs", [("relu", {}), ("sigmoid", {}), ("scale", {"by": 2.0})])
def test_one_input_ops_keep_a_channels_last_layout_where_elementwise_ops_return_c_order(
        emu, name, attrs):
    """The CUDA variants of the one-input ops work in their input's memory order,
    forward and VJP, so Conv1's channels-last output (and its gradient) stays
    channels-last on CuPy."""
    from capsflow.backends.cuda.layout import memory_order
    rng = np.random.default_rng(0)
    x, g = (rng.standard_normal((2, 5, 4, 3)).view(COrder).transpose(0, 3, 1, 2)
            for _ in range(2))                                    # channels-last memory
    assert memory_order(np.maximum(x, 0)) == (0, 1, 2, 3)          # what the variants undo
    op = get_op(name)
    variant = next(v for v in op.variants if v.backend == "cupy")
    out = variant.forward_fn(get_backend(FAST), x, **attrs)
    np.testing.assert_allclose(np.asarray(out), op.forward_fn(np, np.asarray(x), **attrs),
                               rtol=1e-15)
    (gx,) = variant.vjp_fn(get_backend(FAST), {"out": out}, g, (True,), **attrs)
    np.testing.assert_allclose(np.asarray(gx), op.vjp_fn(
        np, {"out": np.asarray(out)}, np.asarray(g), (True,), **attrs)[0], rtol=1e-15)
    for result in (out, gx):
        assert memory_order(result) == memory_order(x) == (0, 2, 3, 1)
        assert result.transpose(0, 2, 3, 1).flags.c_contiguous


def test_vector_and_scalar_branches_agree(emu):
    """contract_d and outer_sum read 4 values at a time when the sizes and the alignment
    allow; an odd last axis or a misaligned view takes the scalar branch, same result."""
    rng = _rng()
    for d in (16, 6):
        a, v = rng.standard_normal((2, 7, 3, d)), rng.standard_normal((2, 3, d))
        got = kernels.routing_contraction(emu, ["bijd", "bjd"], "bij", (a, v))
        np.testing.assert_allclose(got, np.einsum("bijd,bjd->bij", a, v), rtol=1e-13)
    buf = np.empty(2 * 5 * 3 * 8 + 1)
    misaligned = buf[1:] if buf.ctypes.data % 16 == 0 else buf[:-1]
    for out in (np.empty((2, 5, 3, 8)), misaligned.reshape(2, 5, 3, 8), np.empty((2, 5, 3, 7))):
        nr = out.shape[-1]
        lefts = [rng.standard_normal((2, 5, 3)) for _ in range(3)]
        rights = [rng.standard_normal((2, 3, nr)) for _ in range(3)]
        out[...] = 1.0
        assert kernels.outer_sum(emu, lefts, rights, out, True)
        want = 1.0 + sum(np.einsum("blj,bjr->bljr", l, r) for l, r in zip(lefts, rights))
        np.testing.assert_allclose(out, want, rtol=1e-13)


@pytest.mark.parametrize("lanes", [8, 4, 2, 1])
def test_col2im_with_each_number_of_lanes(emu, monkeypatch, lanes):
    """col2im gathers the same sums whether a thread takes 8, 4, 2 or 1 channels."""
    monkeypatch.setattr(kernels, "COL2IM_LANES", lanes)
    rng = _rng()
    cols = rng.standard_normal((3, 2, 4, 4, 3, 16))          # (KH, N, OH, OW, KW, C)
    want = np.zeros((2, 9, 9, 16))
    for i in range(3):
        for j in range(3):
            want[:, i:i + 2 * 4:2, j:j + 2 * 4:2] += cols[i, :, :, :, j]
    np.testing.assert_allclose(kernels.col2im(emu, cols, want.shape, 2), want, rtol=1e-13)


def test_a_replayed_step_with_a_non_finite_loss_is_skipped_by_the_adam_kernel(
        emu, capsnet, monkeypatch):
    """On the replay path the update reads its go flag on the device: the fused Adam
    kernel changes nothing after a NaN loss, and the next step applies. (The emulator
    cannot capture CUDA graphs: the steps are recorded by the reference, which runs the
    same update half.)"""
    from capsflow.runners.gradcheck import random_batch
    from capsflow.training import train_step
    from capsflow.training.optim import Adam
    monkeypatch.setattr(train_step.record_step, "variants", [])
    launches = []
    real = kernels.adam_update
    monkeypatch.setattr(kernels, "adam_update",
                        lambda xp, p, g, m, v, hyper, *rest: launches.append(hyper.size)
                        or real(xp, p, g, m, v, hyper, *rest))
    graph = capsnet
    good = [random_batch(graph, 2, seed=k) for k in range(2)]
    bad = {k: v.copy() for k, v in good[1].items()}
    bad["x"][0, 0, 0, 0] = np.nan
    params = graph.init_params(0, "float64")
    opt = Adam(1e-3)
    step = train_step.TrainStep(graph, params, opt, opt.init_state(params),
                                backend=get_backend(FAST), outputs=["loss"], simulate=True)
    for batch in good:  # an op-by-op step, then replayed ones
        step.gradients(batch)
        step.update()
    before = {k: v.copy() for k, v in params.items()}
    assert not np.isfinite(float(step.gradients(bad)["loss"]))
    step.update()
    assert step.mode == "replay" and set(launches[-len(params):]) == {3}  # with the go flag
    for name in params:
        np.testing.assert_array_equal(params[name], before[name])
    step.gradients(good[0])
    step.update()
    assert all(not np.array_equal(params[k], before[k]) for k in params)


def test_pinned_copies_step_aside_on_the_emulator(emu):
    """Adam's numbers reach the device by plain assignment where the module has no
    pinned memory (the emulator); tests/test_cuda_kernels.py checks HostToDevice."""
    from capsflow.backends.cuda.layout import HostToDevice
    from capsflow.training.train_step import host_to_device
    dst = np.zeros(2)
    writer = host_to_device(get_backend(FAST), dst)
    writer.write((1.0, 2.0))
    np.testing.assert_array_equal(dst, [1.0, 2.0])
    assert not isinstance(writer, HostToDevice)



def test_the_live_bytes_meter_counts_the_cuda_variants_as_its_walk(emu, capsnet):
    """`capsflow bench` reads a step's live-bytes peak on CuPy too: with every CUDA
    variant on, the counted bytes equal a walk over what the executor holds at every op."""
    from test_engine_review import CheckingMeter

    from capsflow.core.executor import execute
    be = get_backend(FAST)
    rng = np.random.default_rng(0)
    params = capsnet.init_params(0)
    inputs = {"x": rng.random((3, 1, 28, 28)).astype("f4"), "y": np.eye(10, dtype="f4")[:3]}
    values = {k: be.asarray(v) for k, v in {**params, **inputs}.items()}
    meter = CheckingMeter()
    execute(capsnet.dag, capsnet.plan({"x", "y"}, None, "loss"), values, be, meter)
    assert meter.samples > 50 and meter.peak > 0
