"""Every op's VJP against central finite differences in float64 (relative error <= 1e-6):
the reference, and the CPU backend's variant where one applies."""
import numpy as np
import pytest

from capsflow import Options
from capsflow.core.gradcases import CASES, R, one_hot
from capsflow.core.gradcheck import op_gradcheck
from capsflow.core.opdef import OPS, get_op


@pytest.mark.parametrize("fast_paths", [False, True], ids=["reference", "cpu"])
@pytest.mark.parametrize("name,args,attrs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_vjp_matches_finite_differences(name, args, attrs, fast_paths):
    errors = op_gradcheck(name, args, attrs, backend=Options(fast_paths=fast_paths))
    checked = [e for e in errors if e is not None]
    op = get_op(name)
    if not op.nondiff or len(op.nondiff) < len(args):
        assert checked, f"{name}: no input was checked"
    for e in checked:
        assert e <= 1e-6, f"{name}{attrs}: relative error {e:.2e}"


def test_every_registered_op_has_a_gradient_case():
    get_op("relu")
    covered = {c[0] for c in CASES}
    extra = getattr(pytest, "capsflow_extra_op_cases", set())
    missing = sorted(set(OPS) - covered - extra)
    assert not missing, f"ops without a finite-difference test: {missing}"


def test_stop_gradient_and_mask_give_no_gradient():
    assert op_gradcheck("stop_gradient", [R(3)]) == [None]
    assert op_gradcheck("label_or_argmax", [R(3, 4), one_hot([0, 1, 2], 4)]) == [None, None]


def test_softmax_is_max_subtracted():
    from capsflow.core.gradcheck import apply_op
    out, *_ = apply_op("softmax", "numpy", [np.array([[1000.0, 1001.0, 999.0]])], {"axis": -1})
    assert np.isfinite(out).all() and np.isclose(out.sum(), 1.0)


@pytest.mark.parametrize("fast_paths", [False, True], ids=["reference", "cpu"])
@pytest.mark.parametrize("eps", [0.0, 1e-7])
def test_squash_is_zero_with_a_zero_gradient_at_zero(fast_paths, eps):
    """squash(s) = s |s| / (1 + |s|^2) is differentiable at 0 with derivative 0; with an
    eps too. A zero capsule beside others: its value and gradient are exactly 0, the
    others' are untouched by it, and nothing is NaN (no 0/0, no warning)."""
    from capsflow.core.gradcheck import apply_op
    from capsflow.backends import get_backend
    be = get_backend(Options(fast_paths=fast_paths))
    op = get_op("squash")
    s = R(3, 4, 16)
    s[1, 2] = 0
    g = R(3, 4, 16)
    with np.errstate(all="raise"):
        out, saved, attrs, variant = apply_op("squash", be, [s], {"axis": -1, "eps": eps})
        (gs,) = op.run_vjp(be, variant, saved, g, (True,), attrs)
    assert np.all(out[1, 2] == 0) and np.all(gs[1, 2] == 0)
    assert np.isfinite(out).all() and np.isfinite(gs).all()
    n = np.linalg.norm(s[0], axis=-1, keepdims=True)
    r = np.sqrt(n * n + eps)
    np.testing.assert_allclose(out[0], n * n / (1 + n * n) * s[0] / r, rtol=1e-12)


@pytest.mark.parametrize("fast_paths", [False, True], ids=["reference", "cpu"])
@pytest.mark.parametrize("eps", [0.0, 1e-7])
@pytest.mark.parametrize("size", [1e4, 3e5, 1e8, 5e9])
def test_squash_gradient_of_long_capsules_in_float32(fast_paths, eps, size):
    """Written as one fraction, the VJP's denominators overflowed float32 from |s| of about
    5e7 (eps = 0) or 3e5 (eps > 0): the radial term fell to 0 (a gradient 13-63% off) or
    NaN. Divided a factor at a time they do not; against float64 (where nothing
    overflows at these sizes) to float32 round-off."""
    from capsflow.backends import get_backend
    from capsflow.core.gradcheck import apply_op
    be = get_backend(Options(fast_paths=fast_paths))
    rng = np.random.default_rng(3)
    s = (rng.standard_normal((4, 8)) * size).astype(np.float32)
    g = rng.standard_normal((4, 8)).astype(np.float32)
    op = get_op("squash")
    outs = []
    for x, dy in ((s, g), (s.astype(np.float64), g.astype(np.float64))):
        out, saved, attrs, variant = apply_op("squash", be, [x], {"axis": -1, "eps": eps})
        outs.append((out, op.run_vjp(be, variant, saved, dy, (True,), attrs)[0]))
    (out32, grad32), (out64, grad64) = outs
    assert np.isfinite(grad32).all()
    np.testing.assert_allclose(out32, out64, rtol=1e-5)
    np.testing.assert_allclose(grad32, grad64, rtol=1e-4, atol=1e-5 * np.abs(grad64).max())


@pytest.mark.parametrize("eps", [0.0, 1e-7])
def test_norm_is_the_exact_length_with_a_zero_gradient_at_zero(eps):
    """norm is |x| (sqrt(|x|^2 + eps) with the eps option); its gradient x / |x| is 0 at
    x = 0, as PyTorch's norm backward."""
    from capsflow.core.gradcheck import apply_op
    op = get_op("norm")
    x = R(3, 4, 16)
    x[1, 2] = 0
    g = R(3, 4)
    with np.errstate(all="raise"):
        out, saved, attrs, _ = apply_op("norm", "numpy", [x], {"axis": -1, "eps": eps})
        (gx,) = op.vjp_fn(np, saved, g, (True,), **attrs)
    want = np.sqrt((x * x).sum(-1) + eps)
    np.testing.assert_allclose(out, want, rtol=1e-14)
    if not eps:
        np.testing.assert_allclose(out, np.linalg.norm(x, axis=-1), rtol=1e-14)
        assert out[1, 2] == 0
    assert np.all(gx[1, 2] == 0) and np.isfinite(gx).all()
    np.testing.assert_allclose(gx[0], g[0, :, None] * x[0] / want[0, :, None], rtol=1e-12)


def test_squash_and_norm_default_to_the_paper_formulas():
    assert get_op("squash").attrs["eps"].default == 0.0
    assert get_op("norm").attrs["eps"].default == 0.0


def test_leaky_softmax_is_softmax_with_a_dropped_zero_logit():
    from capsflow.core.gradcheck import apply_op
    x = R(3, 4) * 3
    out, *_ = apply_op("leaky_softmax", "numpy", [x], {"axis": -1})
    padded = np.concatenate([x, np.zeros((3, 1))], axis=1)
    full = np.exp(padded) / np.exp(padded).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out, full[:, :4], rtol=1e-12)
    assert np.all(out.sum(axis=-1) < 1)
    big, *_ = apply_op("leaky_softmax", "numpy", [np.array([[1000.0, 999.0], [-1000.0, -999.0]])])
    assert np.isfinite(big).all() and np.isclose(big[0].sum(), 1.0) and big[1].sum() < 1e-300


def test_squash_exp_matches_its_formula_and_is_finite_at_zero():
    from capsflow.core.gradcheck import apply_op
    s = R(2, 5, 16)
    out, *_ = apply_op("squash_exp", "numpy", [s], {"axis": -1, "eps": 0.0})
    n = np.linalg.norm(s, axis=-1, keepdims=True)
    np.testing.assert_allclose(out, (1 - np.exp(-n)) * s / n, rtol=1e-12)
    op = get_op("squash_exp")
    zero = np.zeros((2, 4))
    out, saved, attrs, _ = apply_op("squash_exp", "numpy", [zero], {"axis": -1})
    (g,) = op.vjp_fn(np, saved, np.ones_like(zero), (True,), **attrs)
    assert np.all(out == 0) and np.isfinite(g).all()



@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_squash_exp_without_eps_is_its_limit_at_zero_and_finite_for_long_capsules(dtype):
    """eps = 0 (accepted by the shape rule): at s = 0 the value is 0 and the Jacobian the
    identity (it was 0/0, NaN, for both). For |s| up to 1e13 the gradient's second term
    stays finite in float32 (r^3 overflowed it) and matches float64."""
    from capsflow.core.gradcheck import apply_op
    op = get_op("squash_exp")
    s = np.zeros((3, 4), dtype)
    s[1] = [0.3, -0.2, 0.1, 0.4]
    s[2] = np.array([3e12, -4e12, 1e12, 2e12])
    g = np.array([[1.0, -2.0, 3.0, 0.5]] * 3, dtype)
    with np.errstate(divide="raise", invalid="raise", over="raise"):  # e^-r may underflow
        out, saved, attrs, _ = apply_op("squash_exp", "numpy", [s], {"axis": -1, "eps": 0.0})
        (grad,) = op.vjp_fn(np, saved, g, (True,), **attrs)
    assert out.dtype == grad.dtype == dtype and np.isfinite(grad).all()
    assert np.all(out[0] == 0) and np.all(grad[0] == g[0])
    s64, g64 = s.astype(np.float64), g.astype(np.float64)
    r = np.linalg.norm(s64, axis=-1, keepdims=True)[1:]
    np.testing.assert_allclose(out[1:], -np.expm1(-r) / r * s64[1:], rtol=1e-6)
    if dtype == np.float32:
        _, saved64, _, _ = apply_op("squash_exp", "numpy", [s64], {"axis": -1, "eps": 0.0})
        (want,) = op.vjp_fn(np, saved64, g64, (True,), **attrs)
        np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6 * np.abs(want[2]).max())
    assert op_gradcheck("squash_exp", [s64[1:2]], {"axis": -1, "eps": 0.0})[0] <= 1e-6
