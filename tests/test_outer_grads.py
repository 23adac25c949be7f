"""Outer-product gradients kept as factors and summed in one pass (capsflow/core/gradients.py):
which einsums qualify, the sums on NumPy and (emulated) CuPy against the plain
products, and the whole CapsNet with the deferral against without it."""
import numpy as np
import pytest

from capsflow.backends.cuda import kernels as cuda_kernels

from capsflow.core import gradients as outer_grads
from capsflow.core.gradients import Outer, OuterLayout, outer_layout


@pytest.mark.parametrize("subs,out,expected", [
    (["nij", "njd"], "nijd", OuterLayout(0, 1, "n", "i", "j", "d")),   # agreement's du_hat
    (["njd", "nij"], "nijd", OuterLayout(1, 0, "n", "i", "j", "d")),   # weighted sum's du_hat
    (["jin", "ndj"], "nijd", OuterLayout(0, 1, "n", "i", "j", "d")),   # any axis order
    (["ab", "bc"], "abc", OuterLayout(0, 1, "", "a", "b", "c")),        # no batch
    (["nij", "njd"], "nid", None),                                     # sums over j
    (["nij", "njd"], "nidj", None),                                    # j not between
    (["nijd", "njd"], "nij", None),
    (["ni", "nj"], "nij", None),                                       # no shared index
])
def test_outer_layout(subs, out, expected):
    assert outer_layout(subs, out) == expected


def _terms(rng, count, dtype=np.float64):
    return [Outer(rng.standard_normal((3, 5, 4)).astype(dtype),
                  rng.standard_normal((3, 4, 6)).astype(dtype), (3, 5, 4, 6)) for _ in range(count)]


def _plain(terms):
    return sum(np.einsum("blj,bjr->bljr", t.left, t.right) for t in terms)


@pytest.mark.parametrize("count", [1, 2, 5])
def test_total_on_numpy(count):
    terms = _terms(np.random.default_rng(count), count)
    pending = terms[0]
    for t in terms[1:]:
        pending = outer_grads.add(pending, t)
    np.testing.assert_allclose(outer_grads.total(np, pending), _plain(terms), rtol=1e-13, atol=1e-14)


def test_plain_parts_are_added_without_touching_the_inputs():
    rng = np.random.default_rng(0)
    terms = _terms(rng, 2)
    dense = [rng.standard_normal((3, 5, 4, 6)) for _ in range(2)]
    kept = [d.copy() for d in dense]
    pending = outer_grads.add(dense[0], terms[0])      # a plain array first
    pending = outer_grads.add(pending, dense[1])
    pending = outer_grads.add(pending, terms[1])
    np.testing.assert_allclose(outer_grads.total(np, pending), _plain(terms) + kept[0] + kept[1],
                               rtol=1e-13)
    for d, k in zip(dense, kept):
        np.testing.assert_array_equal(d, k)


def test_defer_only_while_collecting():
    g, v = np.ones((2, 3, 4)), np.ones((2, 4, 5))
    assert outer_grads.defer(np, ["nij", "njd"], "nijd", (g, v)) is None
    with outer_grads.collecting():
        assert isinstance(outer_grads.defer(np, ["nij", "njd"], "nijd", (g, v)), Outer)
        assert outer_grads.defer(np, ["nij", "njd"], "nid", (g, v)) is None
        with outer_grads.disabled(), outer_grads.collecting():
            assert outer_grads.defer(np, ["nij", "njd"], "nijd", (g, v)) is None


@pytest.mark.parametrize("count,dtype", [(1, np.float64), (5, np.float32), (11, np.float64)])
def test_outer_sum_kernel_emulated(emu, monkeypatch, count, dtype):
    """The CUDA kernel (8 terms a launch, then accumulating launches) on the CPU."""
    terms = _terms(np.random.default_rng(count), count, dtype)
    launches = []
    real = cuda_kernels.outer_sum
    monkeypatch.setattr(cuda_kernels, "outer_sum",
                        lambda *a, **k: launches.append(len(a[1])) or real(*a, **k))
    got = outer_grads.total(emu, outer_grads.Pending(list(terms)))
    assert launches == [min(count, 8)] + ([count - 8] if count > 8 else [])
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got, _plain(terms), rtol=tol, atol=tol)


def test_capsnet_gradients_with_and_without_deferral(capsnet, batch64, monkeypatch):
    """u_hat's five routing gradients arrive as Outer terms and are summed once; every
    output and gradient matches the plain path."""
    params = capsnet.init_params(seed=0, dtype="float64")
    x, y = batch64
    sizes = []
    real = outer_grads.total
    monkeypatch.setattr(outer_grads, "total", lambda xp, g: (
        sizes.append(len(g.terms) if isinstance(g, outer_grads.Pending) else 1)
        if outer_grads.is_deferred(g) else None) or real(xp, g))
    out, grads = capsnet.value_and_grad(params, {"x": x, "y": y})
    assert sizes == [5]  # 3 weighted sums + 2 agreements
    with outer_grads.disabled():
        plain_out, plain_grads = capsnet.value_and_grad(params, {"x": x, "y": y})
    for k in plain_out:
        np.testing.assert_allclose(out[k], plain_out[k], rtol=1e-13, atol=1e-15)
    for k in plain_grads:
        np.testing.assert_allclose(grads[k], plain_grads[k], rtol=1e-10, atol=1e-15, err_msg=k)
