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


def test_squash_is_finite_at_zero():
    from capsflow.core.gradcheck import apply_op
    op = get_op("squash")
    s = np.zeros((2, 4))
    out, saved, attrs, _ = apply_op("squash", "numpy", [s], {"axis": -1})
    (g,) = op.vjp_fn(np, saved, np.ones_like(s), (True,), **attrs)
    assert np.all(out == 0) and np.isfinite(g).all()


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
