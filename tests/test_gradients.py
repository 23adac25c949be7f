"""The gradient accumulator (capsflow/core/gradients.py): fan-out sums that never write
into a contribution they did not make, outer-product gradients kept as factors and
summed once, and saved activations freed right after their last use."""
import gc
import textwrap
import weakref

import numpy as np
import pytest

import capsflow
from capsflow import Options
from capsflow.backends import get_backend
from capsflow.core import executor, gradients
from capsflow.core.gradients import GradientAccumulator, Outer, OuterLayout, as_outer, outer_layout
from capsflow.core.opdef import get_op

NUMPY = get_backend("numpy")


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


@pytest.mark.parametrize("fast_paths", [False, True], ids=["reference", "cpu"])
@pytest.mark.parametrize("count", [1, 2, 5])
def test_outer_terms_sum_to_the_plain_products(count, fast_paths):
    terms = _terms(np.random.default_rng(count), count)
    acc = GradientAccumulator(get_backend(Options(fast_paths=fast_paths)))
    for t in terms:
        acc.add("u", t)
    np.testing.assert_allclose(acc.pop("u"), _plain(terms), rtol=1e-13, atol=1e-14)
    assert "u" not in acc and acc.pop("u") is None


def test_contributions_are_summed_without_touching_them():
    rng = np.random.default_rng(0)
    terms = _terms(rng, 2)
    dense = [rng.standard_normal((3, 5, 4, 6)) for _ in range(3)]
    kept = [d.copy() for d in dense]
    acc = GradientAccumulator(NUMPY)
    for g in (dense[0], terms[0], dense[1], dense[2], terms[1]):
        acc.add("u", g)
    np.testing.assert_allclose(acc.pop("u"), _plain(terms) + kept[0] + kept[1] + kept[2],
                               rtol=1e-13)
    for d, k in zip(dense, kept):
        np.testing.assert_array_equal(d, k)


def test_one_contribution_is_passed_on_as_it_is():
    g = np.ones(3)
    acc = GradientAccumulator(NUMPY)
    acc.add("v", g)
    assert acc.pop("v") is g


SHARED = """
    inputs: {x: {shape: [N, 3]}}
    params:
      w: {shape: [3], init: {constant: 0.5}}
      v: {shape: [3], init: {constant: 2.0}}
    nodes:
      - {id: a, op: mul, in: [x, w]}
      - {id: b, op: mul, in: [x, v]}
      - {id: ab, op: add, in: [a, b]}      # VJP gives a and b the same array
      - {id: a2, op: mul, in: [a, a]}      # a gets two more contributions
      - {id: t, op: add, in: [ab, a2]}
      - {id: st, op: scale, in: [t], attrs: {by: 1.0}}   # a writable gradient from here on
      - {id: loss, op: sum, in: [st], attrs: {axis: null}}
    outputs: {loss: loss}
"""


class _ReusesTheNewContribution(GradientAccumulator):
    """An unsafe policy: the sum is made in the array of the contribution that arrives
    (saves an allocation, but that array may be shared)."""

    def add(self, name, g):
        entry = self._sums.get(name)
        if entry is not None and entry.dense is not None and not isinstance(g, Outer):
            g += entry.dense
            entry.dense = g
        else:
            super().add(name, g)


@pytest.mark.parametrize("unsafe", [False, True])
def test_a_shared_contribution_is_never_written(tmp_path, monkeypatch, unsafe):
    """add's VJP hands one array to both its inputs: summing a's later contributions into
    it in place would change b's gradient too, and v's with it."""
    path = tmp_path / "fan.yaml"
    path.write_text(textwrap.dedent(SHARED))
    graph = capsflow.compile(path)
    if unsafe:
        monkeypatch.setattr(executor, "GradientAccumulator", _ReusesTheNewContribution)
    x = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]])
    _, grads = graph.value_and_grad(graph.init_params(dtype="float64"), {"x": x})
    a = x * 0.5
    right = (np.allclose(grads["v"], x.sum(0))                       # d/dv sum(x v)
             and np.allclose(grads["w"], (x * (1 + 2 * a)).sum(0)))
    assert right != unsafe  # the test tells the policies apart


CHAIN = """
    inputs: {x: {shape: [N, 4]}}
    params:
      w: {shape: [4], init: {constant: 0.5}}
    nodes:
      - {id: m, op: mul, in: [x, w]}
      - {id: h1, op: relu, in: [m]}
      - {id: h2, op: relu, in: [h1]}
      - {id: h3, op: relu, in: [h2]}
      - {id: loss, op: sum, in: [h3], attrs: {axis: null}}
    outputs: {loss: loss}
"""


def test_saved_activations_are_freed_right_after_their_last_use(tmp_path, monkeypatch):
    """relu saves its output for its VJP: once that VJP has run, nothing holds the array
    any more (the reverse pass runs h3, h2, h1, m)."""
    path = tmp_path / "chain.yaml"
    path.write_text(textwrap.dedent(CHAIN))
    graph = capsflow.compile(path)
    relu = get_op("relu")
    reference = relu.vjp_fn
    seen, alive_at = [], []

    def watching(xp, saved, g, needs):
        gc.collect()
        alive_at.append([ref() is not None for ref in seen])  # the earlier relus' outputs
        seen.append(weakref.ref(saved["out"]))
        return reference(xp, saved, g, needs)

    monkeypatch.setattr(relu, "vjp_fn", watching)
    x = np.random.default_rng(0).standard_normal((2, 4))
    graph.value_and_grad(graph.init_params(dtype="float64"), {"x": x},
                         backend=Options(fast_paths=False))
    assert alive_at == [[], [False], [False, False]]


TWO_SPLITS = """
    inputs: {x: {shape: [N, 1]}}
    params:
      p: {shape: [2, 3, 4, 5], init: {normal: 1.0}}
      q: {shape: [2, 4, 5], init: {normal: 1.0}}
      r: {shape: [3, 4, 5], init: {normal: 1.0}}
    nodes:
      - {id: e1, op: einsum, in: [p, q], attrs: {eq: "abcd,acd->abc"}}
      - {id: e2, op: einsum, in: [p, r], attrs: {eq: "abcd,bcd->ab"}}
      - {id: e3, op: einsum, in: [p, q], attrs: {eq: "abcd,acd->abc"}}
      - {id: s1, op: sum, in: [e1]}
      - {id: s2, op: sum, in: [e2]}
      - {id: s3, op: sum, in: [e3]}
      - {id: xs, op: sum, in: [x]}
      - {id: a, op: add, in: [s1, s2]}
      - {id: b, op: add, in: [a, s3]}
      - {id: loss, op: add, in: [b, xs]}
    outputs: {loss: loss}
"""


@pytest.mark.parametrize("fast_paths", [False, True])
def test_outer_terms_that_split_a_value_differently_are_summed(tmp_path, fast_paths):
    """p's gradient arrives as outer products of factors (2, 3, 4) x (2, 4, 5) from e1 and
    e3 but (1, 2, 3) x (1, 3, 20) from e2: the terms were summed as one group, a
    ValueError."""
    path = tmp_path / "splits.yaml"
    path.write_text(textwrap.dedent(TWO_SPLITS))
    graph = capsflow.compile(path)
    params, x = graph.init_params(dtype="float64"), {"x": np.ones((2, 1))}
    _, grads = graph.value_and_grad(params, x, backend=Options(fast_paths=fast_paths))
    p, q, r = params["p"], params["q"], params["r"]
    want = 2 * np.broadcast_to(q[:, None], p.shape) + np.broadcast_to(r[None], p.shape)
    np.testing.assert_allclose(grads["p"], want, rtol=1e-12)
    _, plain = graph.value_and_grad(params, x, backend=Options(factored_grads=False))
    np.testing.assert_allclose(grads["p"], plain["p"], rtol=1e-12)


def test_factored_gradients_only_where_asked():
    g, v = np.ones((2, 3, 4)), np.ones((2, 4, 5))
    assert isinstance(as_outer(np, ["nij", "njd"], "nijd", (g, v)), Outer)
    assert as_outer(np, ["nij", "njd"], "nid", (g, v)) is None
    einsum = get_op("einsum")
    saved = {"operands": (np.ones((2, 3, 4, 5)), np.ones((2, 4, 5)))}
    grad = np.ones((2, 3, 4))
    for factored in (True, False):
        be = get_backend(Options(factored_grads=factored))
        du, dv = einsum.run_vjp(be, None, saved, grad, (True, True), {"eq": "nijd,njd->nij"})
        assert isinstance(du, Outer) == factored and isinstance(dv, np.ndarray)
        np.testing.assert_allclose(gradients.as_array(be, du), np.einsum("nij,njd->nijd", grad,
                                                                         saved["operands"][1]))


def test_factored_vjp_declines_before_computing_anything(monkeypatch):
    """u_hat's 'ijdk,nik->nijd' has no outer-product gradient: the factored VJP declines
    without first making the two gradient GEMMs that the plain VJP then makes again."""
    einsum = get_op("einsum")
    calls = []
    real = einsum.compute
    monkeypatch.setattr(einsum, "compute", lambda be, *xs, eq: calls.append(eq) or real(be, *xs, eq=eq))
    rng = np.random.default_rng(0)
    w, u = rng.standard_normal((6, 5, 4, 3)), rng.standard_normal((2, 6, 3))
    grad = rng.standard_normal((2, 6, 5, 4))
    be = get_backend(Options(factored_grads=True))
    gw, gu = einsum.run_vjp(be, None, {"operands": (w, u)}, grad, (True, True),
                            {"eq": "ijdk,nik->nijd"})
    assert calls == []
    np.testing.assert_allclose(gw, np.einsum("nijd,nik->ijdk", grad, u))
    np.testing.assert_allclose(gu, np.einsum("nijd,ijdk->nik", grad, w))


@pytest.mark.parametrize("count", [1, 3, 9])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_outer_sum_kernel_emulated(emu, count, dtype):
    """The CUDA backend's one-pass sum (up to 8 terms a launch) against the plain sum."""
    terms = _terms(np.random.default_rng(count), count, dtype)
    got = gradients.sum_outer_terms(get_backend("cupy"), terms)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got, _plain(terms), rtol=tol, atol=tol)


def test_capsnet_gradients_with_and_without_factoring(capsnet, batch64, monkeypatch):
    """u_hat's five routing gradients arrive as Outer terms and are summed once; every
    output and gradient matches the plain path."""
    params = capsnet.init_params(seed=0, dtype="float64")
    x, y = batch64
    sizes = []
    real = gradients.sum_outer_terms
    monkeypatch.setattr(gradients, "sum_outer_terms",
                        lambda be, terms: sizes.append(len(terms)) or real(be, terms))
    out, grads = capsnet.value_and_grad(params, {"x": x, "y": y})
    assert sizes == [5]  # 3 weighted sums + 2 agreements
    plain_out, plain_grads = capsnet.value_and_grad(params, {"x": x, "y": y},
                                                    backend=Options(factored_grads=False))
    for k in plain_out:
        np.testing.assert_allclose(out[k], plain_out[k], rtol=1e-13, atol=1e-15)
    for k in plain_grads:
        np.testing.assert_allclose(grads[k], plain_grads[k], rtol=1e-12, atol=1e-15)
