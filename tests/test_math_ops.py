"""The math ops (ops/math.py, ops/normalization.py, log_softmax and softmax_cross_entropy in
ops/losses.py) beyond their finite-difference cases (capsflow/core/gradcases.py): forward
values against their formulas and PyTorch in float64, stability for large logits, layer
norm's statistics, shape errors, a whole graph's gradients, and the ONNX export."""
from __future__ import annotations

import numpy as np
import pytest

import capsflow
from capsflow.backends import get_backend
from capsflow.core.gradcheck import apply_op, graph_gradcheck
from capsflow.core.opdef import get_op
from capsflow.core.shapes import ShapeError
from capsflow.errors import SpecError

torch = pytest.importorskip("torch")
F = torch.nn.functional

rng = np.random.default_rng(11)


def fwd(name, *args, **attrs):
    return apply_op(name, "numpy", list(args), attrs)[0]


def T(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


# -- forward values ----------------------------------------------------------------------
def test_log_sigmoid_stays_finite_where_log_of_sigmoid_does_not():
    """EM routing's ln a_j: log(sigmoid(x)) is -inf in float32 below about -104 (and its
    gradient NaN); log_sigmoid is x there, with gradient 1, and matches PyTorch elsewhere."""
    x = np.array([-1000.0, -200.0, -104.0, -20.0, -1.0, 0.0, 1.0, 20.0, 200.0], np.float32)
    with np.errstate(divide="ignore"):
        assert np.isneginf(np.log(fwd("sigmoid", x)[:2])).all()
    out, saved, attrs, variant = apply_op("log_sigmoid", "numpy", [x])
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(out, F.logsigmoid(torch.from_numpy(x)).numpy(), rtol=1e-6,
                               atol=1e-30)
    (grad,) = get_op("log_sigmoid").run_vjp(get_backend("numpy"), variant, saved,
                                            np.ones_like(x), (True,), attrs)
    np.testing.assert_allclose(grad, 1 / (1 + np.exp(x.astype(np.float64))), rtol=1e-6,
                               atol=1e-40)  # float32 has nothing near 1e-87
    wide = rng.standard_normal(50) * 30
    np.testing.assert_allclose(fwd("log_sigmoid", wide), F.logsigmoid(T(wide)).numpy(),
                               rtol=1e-14, atol=0)


def test_elementwise_ops_compute_their_formulas():
    a, b = rng.standard_normal((3, 4)), rng.uniform(0.5, 2, 4)
    np.testing.assert_array_equal(fwd("div", a, b), a / b)
    np.testing.assert_array_equal(fwd("sqrt", b), np.sqrt(b))
    np.testing.assert_array_equal(fwd("rsqrt", b), 1 / np.sqrt(b))
    np.testing.assert_array_equal(fwd("exp", a), np.exp(a))
    np.testing.assert_array_equal(fwd("log", b), np.log(b))
    np.testing.assert_array_equal(fwd("pow", a), a ** 2.0)          # default exponent 2
    np.testing.assert_array_equal(fwd("pow", b, exponent=-1.5), b ** -1.5)
    assert get_op("pow").attrs["exponent"].default == 2.0

    # exponent 0: x ** 0 is 1 everywhere, so its gradient is 0, at x = 0 too (was 0 * inf)
    zero_one = np.array([0.0, 1.0, -2.0])
    out, saved, attrs, variant = apply_op("pow", "numpy", [zero_one], {"exponent": 0.0})
    (grad,) = get_op("pow").run_vjp(get_backend("numpy"), variant, saved,
                                    np.ones_like(zero_one), (True,), attrs)
    np.testing.assert_array_equal(out, 1.0)
    np.testing.assert_array_equal(grad, 0.0)
    assert get_op("layer_norm").attrs["eps"].default == 1e-5


def test_layer_norm_matches_torch_and_normalises():
    x = rng.standard_normal((4, 3, 6)) * 5 + 2
    gamma, beta = rng.standard_normal(6), rng.standard_normal(6)
    out = fwd("layer_norm", x, gamma, beta)
    want = F.layer_norm(T(x), (6,), T(gamma), T(beta), eps=1e-5).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    # over two trailing axes, as a list
    g2, b2 = rng.standard_normal((3, 6)), rng.standard_normal((3, 6))
    out = fwd("layer_norm", x, g2, b2, axis=[1, 2], eps=1e-3)
    want = F.layer_norm(T(x), (3, 6), T(g2), T(b2), eps=1e-3).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    # without gamma and beta: zero mean, variance var / (var + eps), i.e. 1 with eps = 0
    plain = fwd("layer_norm", x)
    np.testing.assert_allclose(plain.mean(axis=-1), 0, atol=1e-12)
    var = x.var(axis=-1)
    np.testing.assert_allclose(plain.var(axis=-1), var / (var + 1e-5), rtol=1e-12)
    exact = fwd("layer_norm", x, eps=0.0)
    np.testing.assert_allclose(exact.var(axis=-1), 1, rtol=1e-12)


def test_layer_norm_params_shaped_like_inner_axes_lie_on_them():
    x = rng.standard_normal((2, 3, 4))
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    out = fwd("layer_norm", x, gamma, beta, axis=1)
    moved = F.layer_norm(T(x).transpose(1, 2), (3,), T(gamma), T(beta)).transpose(1, 2)
    np.testing.assert_allclose(out, moved.numpy(), rtol=1e-12, atol=1e-12)
    # beta alone (gamma absent): its gradient, and none for the absent gamma
    op = get_op("layer_norm")
    out, saved, attrs, _ = apply_op("layer_norm", "numpy", [x, None, beta], {"axis": 1})
    np.testing.assert_allclose(out, fwd("layer_norm", x, axis=1) + beta[:, None], rtol=1e-12)
    g = rng.standard_normal(x.shape)
    gx, ggamma, gbeta = op.vjp_fn(np, saved, g, (True, False, True), **attrs)
    assert ggamma is None and gx.shape == x.shape
    np.testing.assert_allclose(gbeta, g.sum(axis=(0, 2)), rtol=1e-12)


def test_log_softmax_and_cross_entropy_match_torch():
    x = rng.standard_normal((3, 5, 4)) * 4
    np.testing.assert_allclose(fwd("log_softmax", x, axis=1),
                               F.log_softmax(T(x), dim=1).numpy(), rtol=1e-12, atol=1e-12)
    logits = rng.standard_normal((6, 5)) * 3
    labels = rng.integers(0, 5, 6)
    ce = fwd("softmax_cross_entropy", logits, np.eye(5)[labels])
    assert ce.shape == (6,)
    torch_ce = F.cross_entropy(T(logits), torch.from_numpy(labels), reduction="none")
    np.testing.assert_allclose(ce, torch_ce.numpy(), rtol=1e-12)
    # -log softmax of the true class
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(ce, -np.log(p[np.arange(6), labels]), rtol=1e-12)
    # probability rows, and a batch of sequences (class axis last)
    soft = rng.dirichlet(np.ones(4), (3, 5))
    ce = fwd("softmax_cross_entropy", x, soft)
    torch_ce = F.cross_entropy(T(x).reshape(-1, 4), T(soft).reshape(-1, 4), reduction="none")
    np.testing.assert_allclose(ce, torch_ce.numpy().reshape(3, 5), rtol=1e-12)


def test_large_logits_stay_finite():
    big = np.array([[1000.0, 999.0, -1000.0], [-1000.0, -1001.0, -3000.0]])
    ls = fwd("log_softmax", big)
    assert np.isfinite(ls).all()
    np.testing.assert_allclose(ls, F.log_softmax(T(big), dim=-1).numpy(), rtol=1e-12)
    target = np.eye(3)[[0, 2]]
    op = get_op("softmax_cross_entropy")
    ce, saved, attrs, _ = apply_op("softmax_cross_entropy", "numpy", [big, target])
    assert np.isfinite(ce).all() and ce[1] == pytest.approx(2000 + np.log1p(np.exp(-1.0)))
    g, none = op.vjp_fn(np, saved, np.ones(2), (True, False))
    assert none is None and np.isfinite(g).all()
    np.testing.assert_allclose(g.sum(axis=-1), 0, atol=1e-12)   # softmax - one-hot
    (gl,) = get_op("log_softmax").vjp_fn(np, {"out": ls}, np.ones_like(big), (True,), axis=-1)
    assert np.isfinite(gl).all()
    f32 = fwd("softmax_cross_entropy", big.astype(np.float32) * 30, target.astype(np.float32))
    assert f32.dtype == np.float32 and np.isfinite(f32).all()


# -- shape errors ------------------------------------------------------------------------
@pytest.mark.parametrize("op, shapes, attrs, message", [
    ("layer_norm", [("N", 3, 4), (5,)], {"axis": -1, "eps": 1e-5},
     r"layer_norm gamma \(5,\) must have the shape of the normalised axes \(4,\) of x "
     r"\(N, 3, 4\), or broadcast to x"),
    ("layer_norm", [("N", 3, 4), None, (2, 3, 4)], {"axis": -1, "eps": 1e-5},
     r"layer_norm beta \(2, 3, 4\) must have the shape"),
    ("layer_norm", [("N", 3, 4)], {"axis": 3, "eps": 1e-5}, "axis 3 is out of range"),
    ("layer_norm", [("N", 3, 4)], {"axis": [1, -2], "eps": 1e-5}, "names an axis twice"),
    ("layer_norm", [("N", 3, 4)], {"axis": [], "eps": 1e-5}, "at least one axis"),
    ("log_softmax", [("N", 3)], {"axis": 2}, "axis 2 is out of range"),
    ("softmax_cross_entropy", [("N", 10), ("N", 9)], {},
     r"logits \(N, 10\) and target \(N, 9\) differ in shape"),
    ("softmax_cross_entropy", [(), ()], {}, "class axis last"),
    ("div", [(3, 4), (5,)], {}, r"shapes \(3, 4\) and \(5,\) do not broadcast"),
])
def test_shape_errors_say_what_is_wrong(op, shapes, attrs, message):
    with pytest.raises(ShapeError, match=message):
        get_op(op).shape_fn(*shapes, **attrs)


BAD_GAMMA = """\
name: bad-gamma
inputs: {x: {shape: [N, 3, 4]}}
params: {g: {shape: [3], init: ones}}
nodes:
  - {id: ln, op: layer_norm, in: [x, g]}
outputs: {ln: ln}
"""


def test_a_graph_with_a_wrong_gamma_is_one_spec_error(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(BAD_GAMMA)
    with pytest.raises(SpecError) as info:
        capsflow.compile(path)
    assert str(info.value) == (
        f"{path}:5: node 'ln': shape mismatch in layer_norm(x (N, 3, 4), g (3,)): layer_norm "
        "gamma (3,) must have the shape of the normalised axes (4,) of x (N, 3, 4), or "
        "broadcast to x")


# -- whole graphs: gradients and the ONNX export ------------------------------------------
GRAPH = """\
name: math-ops
inputs:
  x: {shape: [N, 3, 5]}
  t: {shape: [N, 5]}
params:
  gamma: {shape: [3], init: {normal: 1.0}}     # on axis 1: not a trailing axis
  beta: {shape: [3], init: {normal: 0.5}}
  g2: {shape: [5], init: {normal: 1.0}}
  b2: {shape: [1, 5], init: {normal: 0.5}}     # broadcasts to x
nodes:
  - {id: ln1, op: layer_norm, in: [x, gamma, beta], attrs: {axis: 1}}
  - {id: ln2, op: layer_norm, in: [x, g2, b2]}
  - {id: ln3, op: layer_norm, in: [x], attrs: {axis: [1, 2], eps: 1.0e-3}}
  - {id: pos, op: exp, in: [ln2]}
  - {id: root, op: sqrt, in: [pos]}
  - {id: inv_root, op: rsqrt, in: [pos]}
  - {id: logs, op: log, in: [pos]}
  - {id: power, op: pow, in: [pos], attrs: {exponent: 1.5}}
  - {id: square, op: pow, in: [ln1]}
  - {id: ratio, op: div, in: [ln1, pos]}
  - {id: lsm, op: log_softmax, in: [ratio], attrs: {axis: 1}}
  - {id: mix, op: add, in: [ratio, ln3]}
  - {id: mix2, op: mul, in: [mix, inv_root]}
  - {id: mix3, op: add, in: [mix2, root]}
  - {id: mix4, op: add, in: [mix3, logs]}
  - {id: mix5, op: sub, in: [mix4, square]}
  - {id: mix6, op: add, in: [mix5, power]}
  - {id: mix7, op: add, in: [mix6, lsm]}
  - {id: logits, op: sum, in: [mix7], attrs: {axis: 1}}
  - {id: ce, op: softmax_cross_entropy, in: [logits, t]}
  - {id: loss, op: mean, in: [ce]}
outputs: {loss: loss, ce: ce, logits: logits, lsm: lsm, ln1: ln1, ln3: ln3}
"""


def _graph(tmp_path):
    path = tmp_path / "math-ops.yaml"
    path.write_text(GRAPH)
    return capsflow.compile(path)


def _inputs(n, dtype, seed=0):
    r = np.random.default_rng(seed)
    return {"x": r.standard_normal((n, 3, 5)).astype(dtype),
            "t": np.eye(5, dtype=dtype)[r.integers(0, 5, n)]}


def test_graph_gradients_match_finite_differences(tmp_path):
    graph = _graph(tmp_path)
    params = graph.init_params(seed=0, dtype="float64")
    report = graph_gradcheck(graph, params, _inputs(3, np.float64), directions=2)
    assert set(report) == set(params)
    assert max(report.values()) <= 1e-6, report


def test_onnx_export_matches_capsflow(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from capsflow.export.onnx import export_model
    graph = _graph(tmp_path)
    params = graph.init_params(seed=1)
    model = export_model(graph, params)
    types = {n.op_type for n in model.graph.node}
    assert {"Div", "Sqrt", "Reciprocal", "Exp", "Log", "Pow", "LogSoftmax"} <= types
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    for n in (1, 4):
        inputs = _inputs(n, np.float32, seed=n)
        expected = graph.run(params, inputs)
        got = dict(zip(names, sess.run(None, inputs)))
        assert sorted(got) == sorted(expected)
        for name, want in expected.items():
            want = np.asarray(want)
            assert got[name].shape == want.shape, name
            np.testing.assert_allclose(got[name], want, rtol=1e-4,
                                       atol=1e-5 * float(np.abs(want).max()), err_msg=name)
