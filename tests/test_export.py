"""`capsflow export`: the ONNX model of a graph's inference forward pass agrees with
capsflow's NumPy forward in onnxruntime, for every graph in graphs/, keeps the YAML's
names and a symbolic batch, and classifies like capsflow once trained."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import CAPSNET, REPO, SHARED_DATA

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import capsflow  # noqa: E402
from capsflow.cli import main as cli_main  # noqa: E402
from capsflow.core.opdef import OPS  # noqa: E402
from capsflow.export.onnx import EXPORTERS, NOT_EXPORTED, OPSET, export_model  # noqa: E402
from capsflow.runners.data import load_split  # noqa: E402
from capsflow.runners.training import TrainConfig, Trainer, load_data, load_model  # noqa: E402

GRAPHS = sorted((REPO / "graphs").glob("*.yaml"))
needs_mnist = pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(),
                                 reason=f"real MNIST not found in {SHARED_DATA / 'mnist'}")

# Ops that graphs/ does not use, or uses with other attributes: padding, no bias, a list
# of axes, a mean over everything, a required label (the mask is then the label), and
# squash_exp on capsules so short that 1 - exp(-r) would lose digits in float32.
EVERY_OP = """\
name: every-op
inputs:
  x: {shape: [N, 2, 6, 6]}
  y: {shape: [N, 3]}
params:
  w: {shape: [4, 2, 3, 3], init: {normal: 0.5}}
  m: {shape: [36, 3], init: {normal: 0.3}}
  k: {shape: [3, 5], init: {normal: 0.5}}
nodes:
  - {id: conv, op: conv2d, in: [x, w], attrs: {stride: 2, padding: 1}}
  - {id: flat, op: reshape, in: [conv], attrs: {shape: [-1, 36]}}
  - {id: lin, op: linear, in: [flat, m]}
  - {id: held, op: stop_gradient, in: [lin]}
  - {id: diff, op: sub, in: [held, y]}
  - {id: prod, op: matmul, in: [diff, k]}
  - {id: leaky, op: leaky_softmax, in: [prod], attrs: {axis: 1}}
  - {id: total, op: sum, in: [conv], attrs: {axis: [1, 3], keepdims: true}}
  - {id: avg, op: mean, in: [conv]}
  - {id: same, op: sum, in: [lin], attrs: {axis: []}}     # sums over nothing: ONNX must not reduce
  - {id: same_mean, op: mean, in: [lin], attrs: {axis: []}}
  - {id: mask, op: label_or_argmax, in: [lin, y]}
  - {id: caps, op: squash_exp, in: [prod], attrs: {axis: -1}}
  - {id: tiny, op: scale, in: [prod], attrs: {by: 1.0e-5}}
  - {id: tiny_caps, op: squash_exp, in: [tiny], attrs: {axis: -1}}   # where 1 - exp(-r) cancels
outputs: {leaky: leaky, total: total, avg: avg, same: same, same_mean: same_mean, mask: mask,
          caps: caps, tiny_caps: tiny_caps}
"""


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def assert_matches(graph, params, model, inputs, rtol=None):
    """onnxruntime's outputs equal graph.run's: same names, float32 within rtol 1e-4 (or
    ``rtol[name]``) and an atol of 1e-5 of each output's scale, for the entries near 0."""
    expected = graph.run(params, inputs)
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, inputs)))
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        want = np.asarray(want)
        assert got[name].shape == want.shape, name
        np.testing.assert_allclose(got[name], want, rtol=(rtol or {}).get(name, 1e-4),
                                   atol=1e-5 * float(np.abs(want).max()), err_msg=name)


def images(n: int, seed: int = 0, shape: tuple = (1, 28, 28)) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


@pytest.mark.parametrize("path", GRAPHS, ids=lambda p: p.name)
def test_every_graph_matches_onnxruntime_at_two_batch_sizes(path):
    graph = capsflow.compile(path)
    params = graph.init_params(seed=0)
    model = export_model(graph, params)
    onnx.checker.check_model(model, full_check=True)
    for n in (1, 3):  # one model, any batch (seed routing averages over the batch)
        assert_matches(graph, params, model,
                       {"x": images(n, seed=n, shape=graph.spec.inputs["x"].shape[1:])})


def test_every_op_of_the_library_is_exported_or_named():
    assert set(EXPORTERS).isdisjoint(NOT_EXPORTED)
    assert set(EXPORTERS) | set(NOT_EXPORTED) == set(OPS)


def test_ops_outside_graphs_match_too(tmp_path):
    path = tmp_path / "every-op.yaml"
    path.write_text(EVERY_OP)
    graph = capsflow.compile(path)
    params = graph.init_params(seed=1)
    model = export_model(graph, params)
    rng = np.random.default_rng(2)
    for n in (2, 5):
        x = rng.normal(size=(n, 2, 6, 6)).astype(np.float32)
        y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)]
        # 1 - exp(-r) computed directly would be 1e-4 off here, just inside the default
        assert_matches(graph, params, model, {"x": x, "y": y}, rtol={"tiny_caps": 1e-5})


def test_names_opset_and_shapes_come_from_the_dag(capsnet):
    model = export_model(capsnet, capsnet.init_params(seed=0))
    g = model.graph
    assert model.opset_import[0].version == OPSET >= 13
    assert [v.name for v in g.input] == ["x"]  # y is optional: the inference graph has none
    assert [v.name for v in g.output] == ["lengths", "recon", "digitcaps"]
    assert {t.name for t in g.initializer} >= set(capsnet.spec.params)
    # Every op node the forward pass runs is an ONNX node and value of the same name,
    # with its DAG shape and a symbolic batch N.
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(g.value_info) + list(g.input) + list(g.output)}
    nodes = {n.name for n in g.node}
    steps = capsnet.plan({"x"}).steps
    assert "routing/2/v" in steps and "margin" not in steps
    for step in steps:
        assert step in nodes and shapes[step] == list(capsnet.dag.nodes[step]["shape"]), step
    assert shapes["x"] == ["N", 1, 28, 28] and shapes["digitcaps"] == ["N", 10, 16]
    assert all(s[0] == "N" for name, s in shapes.items() if name.startswith("routing/"))
    line = next(k for k, text in enumerate(CAPSNET.read_text().splitlines(), 1)
                if "id: conv1," in text)
    assert next(n for n in g.node if n.name == "conv1").doc_string.endswith(f"capsnet.yaml:{line})")


LOSS_ONLY = """\
name: loss-only
inputs: {a: {shape: [N, 4]}, b: {shape: [N, 4]}}
nodes:
  - {id: h, op: relu, in: [a]}
  - {id: err, op: sum_squared_error, in: [h, b]}
outputs: {err: err}
"""
CLASH = """\
name: clash
inputs: {a: {shape: [N, 4]}}
nodes:
  - {id: s, op: squash, in: [a]}
  - {id: s/n2, op: relu, in: [s]}
outputs: {out: s/n2}
"""


@pytest.mark.parametrize("spec, message", [
    (LOSS_ONLY, "{path}:5: node 'err': op 'sum_squared_error' cannot be exported to ONNX "
                "(a training loss); exportable ops: add, conv2d, "),
    (CLASH, "two values of the ONNX model would be named 's/n2': "),
], ids=["unexported-op", "name-clash"])
def test_what_cannot_be_exported_is_one_line(tmp_path, capsys, spec, message):
    path, out = tmp_path / "g.yaml", tmp_path / "g.onnx"
    path.write_text(spec)
    assert cli_main(["export", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and not out.exists()
    assert err.startswith("capsflow export: error: " + message.format(path=path)), err


def test_a_parameter_file_exports_its_weights_and_draws(tmp_path, capsys):
    graph = capsflow.compile(CAPSNET, {"routing_iters": 1})
    params = graph.init_params(seed=3)
    capsflow.save_params(tmp_path / "p.npz", params)
    out, picture = tmp_path / "m.onnx", tmp_path / "m.dot"
    assert cli_main(["export", str(CAPSNET), "--set", "routing_iters=1", "--checkpoint",
                     str(tmp_path / "p.npz"), "-o", str(out), "--draw", str(picture)]) == 0
    assert "outputs: lengths (N, 10), recon (N, 784), digitcaps (N, 10, 16)" in \
        capsys.readouterr().out
    model = onnx.load(out)
    assert "routing/1/c" not in {n.name for n in model.graph.node}
    assert_matches(graph, params, model, {"x": images(2)})
    # The drawing: squash's ONNX nodes in one box, edges labelled with shapes.
    dot = picture.read_text()
    assert "squash u" in dot and "ReduceSumSquare" in dot and "N\u00d71152\u00d78" in dot


@needs_mnist
def test_a_training_checkpoint_exports_with_its_settings(tmp_path):
    config = TrainConfig(batch_size=10, num_epochs=1, limit_train=40, limit_test=10,
                         data_dir=str(SHARED_DATA))
    graph = capsflow.compile(CAPSNET, {"routing_iters": 1})
    Trainer(graph, load_data(config), config, tmp_path / "run", log=lambda line: None,
            progress_bar=False).fit()
    ckpt, out = tmp_path / "run" / "last.npz", tmp_path / "capsnet.onnx"
    assert cli_main(["export", str(CAPSNET), "--checkpoint", str(ckpt), "-o", str(out)]) == 0
    model = onnx.load(out)
    assert "routing/0/v" in {n.name for n in model.graph.node}  # routing_iters=1, as trained
    graph, params, _ = load_model(CAPSNET, ckpt)
    x, _ = load_split("mnist", "test", SHARED_DATA, limit=20)
    assert_matches(graph, params, model, {"x": x})


@needs_mnist
def test_an_export_classifies_mnist_like_capsflow(tmp_path):
    graph = capsflow.compile(CAPSNET)
    params = graph.init_params(seed=0)
    # Capsules 10x longer than at init: every test image gets a class of its own, not
    # the one class an untrained or briefly trained CapsNet gives them all.
    params["digit.W"] *= 10
    capsflow.save_params(tmp_path / "p.npz", params)
    out = tmp_path / "capsnet.onnx"
    assert cli_main(["export", str(CAPSNET), "--checkpoint", str(tmp_path / "p.npz"),
                     "-o", str(out)]) == 0
    x, _ = load_split("mnist", "test", SHARED_DATA, limit=300)
    ours = graph.run(params, {"x": x}, outputs=["lengths"])["lengths"]
    theirs = session(onnx.load(out)).run(["lengths"], {"x": x})[0]
    assert len(set(ours.argmax(axis=1))) >= 5
    # Near-ties, where float32 rounding may pick either class, do not count.
    top2 = np.sort(ours, axis=1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 1e-5 * top2[:, 1]
    assert decided.mean() > 0.95
    assert np.array_equal(theirs.argmax(axis=1)[decided], ours.argmax(axis=1)[decided])
