"""`capsflow export`: the ONNX model of a graph's inference forward pass agrees with
capsflow's NumPy forward in onnxruntime, for every graph in graphs/, keeps the YAML's
names and a symbolic batch, and classifies like capsflow once trained."""
from __future__ import annotations

from pathlib import Path

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

# The rest of the exported ops, and attributes the graphs leave at their defaults: eps > 0,
# a shift large enough to see, pooling with stride and padding, ties in argmax (ONNX's
# ArgMax must take the first maximum, as NumPy does).
MORE_OPS = """\
name: more-ops
inputs:
  x: {shape: [N, 2, 6, 6]}
  y: {shape: [N, 3]}
params:
  m: {shape: [18, 3], init: {normal: 0.5}}
nodes:
  - {id: pooled, op: max_pool2d, in: [x], attrs: {kernel: 3, stride: 2, padding: 1}}
  - {id: flat, op: reshape, in: [pooled], attrs: {shape: [-1, 18]}}
  - {id: lin, op: linear, in: [flat, m]}
  - {id: lsm, op: log_softmax, in: [lin], attrs: {axis: 0}}
  - {id: xent, op: softmax_cross_entropy, in: [lin, y]}
  - {id: e, op: exp, in: [lin]}
  - {id: root, op: sqrt, in: [e]}
  - {id: inv_root, op: rsqrt, in: [e]}
  - {id: caps, op: squash, in: [lin], attrs: {axis: -1, eps: 0.5}}
  - {id: length, op: norm, in: [lin], attrs: {axis: -1, eps: 0.5}}
  - {id: shifted, op: offset, in: [lin], attrs: {by: 0.5}}
  - {id: log_act, op: log_sigmoid, in: [lin]}
  - {id: flat_scores, op: scale, in: [lin], attrs: {by: 0.0}}
  - {id: tied, op: label_or_argmax, in: [flat_scores]}
outputs: {lsm: lsm, xent: xent, root: root, inv_root: inv_root, caps: caps, length: length,
          shifted: shifted, log_act: log_act, tied: tied}
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
    """...and in docs/export.md's op table, whose first column names each op in `code`."""
    import re
    assert set(EXPORTERS).isdisjoint(NOT_EXPORTED)
    assert set(EXPORTERS) | set(NOT_EXPORTED) == set(OPS)
    text = (REPO / "docs" / "export.md").read_text()
    table = text.split("## Op mapping", 1)[1].split("\n\n`tests/", 1)[0]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    assert {op for row in rows for op in re.findall(r"`(\w+)`", row)} == set(OPS)


def exported(tmp_path, spec: str, seed: int) -> tuple:
    """(graph, params, model) of a graph written from ``spec``."""
    path = tmp_path / "g.yaml"
    path.write_text(spec)
    graph = capsflow.compile(path)
    params = graph.init_params(seed=seed)
    return graph, params, export_model(graph, params)


def images_and_labels(rng, n: int) -> dict:
    """EVERY_OP's and MORE_OPS's inputs: x (n, 2, 6, 6) and one-hot y of 3 classes."""
    return {"x": rng.normal(size=(n, 2, 6, 6)).astype(np.float32),
            "y": np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)]}


def test_ops_outside_graphs_match_too(tmp_path):
    graph, params, model = exported(tmp_path, EVERY_OP, seed=1)
    rng = np.random.default_rng(2)
    for n in (2, 5):
        # 1 - exp(-r) computed directly would be 1e-4 off here, just inside the default
        assert_matches(graph, params, model, images_and_labels(rng, n),
                       rtol={"tiny_caps": 1e-5})


def test_the_other_ops_and_attributes_match_too(tmp_path):
    graph, params, model = exported(tmp_path, MORE_OPS, seed=1)
    rng = np.random.default_rng(3)
    for n in (2, 5):
        inputs = images_and_labels(rng, n)
        assert_matches(graph, params, model, inputs)
    assert graph.run(params, inputs)["tied"][:, 0].all()  # ties: the first class


# squash and squash_exp at every eps that decides a branch in ops/, on capsules that are
# zero, tiny (|s|^2 underflows float32), ordinary, long enough that sinh(r/2) overflows
# float32 (r > 178), and long enough that (1 + |s|^2) sqrt(|s|^2 + eps) does (|s| > 7e12).
SQUASH_EDGES = """\
name: squash-edges
inputs: {x: {shape: [N, 4]}}
nodes:
  - {id: sq_0, op: squash, in: [x]}
  - {id: sq_tiny, op: squash, in: [x], attrs: {eps: 1.0e-50}}   # 0 in float32: the paper's
  - {id: sq_eps, op: squash, in: [x], attrs: {eps: 1.0e-7}}
  - {id: exp_0, op: squash_exp, in: [x], attrs: {eps: 0.0}}
  - {id: exp_tiny, op: squash_exp, in: [x], attrs: {eps: 1.0e-50}}
  - {id: exp_eps, op: squash_exp, in: [x], attrs: {eps: 1.0e-7}}
outputs: {sq_0: sq_0, sq_tiny: sq_tiny, sq_eps: sq_eps, exp_0: exp_0, exp_tiny: exp_tiny,
          exp_eps: exp_eps}
"""


def test_squash_and_squash_exp_match_at_zero_tiny_and_huge_capsules(tmp_path):
    """Exported squash_exp was inf/NaN from |s| of 178 (Sinh overflowed); squash with an
    eps that float32 rounds to 0 was NaN at a zero capsule, as squash_exp was with eps 0;
    squash with eps 1e-7 gave 0 for |s| >= 7e12 instead of the unit vector."""
    graph, params, model = exported(tmp_path, SQUASH_EDGES, seed=0)
    rows = [[0, 0, 0, 0], [1e-23, 0, 0, 0], [1e-23, -2e-23, 1e-23, 0], [1e-5, 0, 2e-5, 0],
            [0.3, -1.0, 2.0, 0.5], [100, 0, 0, 0], [178, 0, 0, 0], [180, 10, 0, 0],
            [1e3, 0, 0, 0], [1e13, 0, 0, 0], [1e13, -1e13, 3e12, 0], [3e18, 0, 0, 0]]
    x = np.array(rows, np.float32)
    want = graph.run(params, {"x": x})
    sess = session(model)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))
    for name, w in want.items():
        w = np.asarray(w)
        assert np.isfinite(w).all() and np.isfinite(got[name]).all(), name
        # atol: 1e-30 (values float32 holds only as subnormals) against unit-sized outputs
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-30, err_msg=name)
    for name in want:  # a zero capsule stays zero; a huge one is the unit vector
        assert not got[name][0].any(), name
        np.testing.assert_allclose(got[name][9], [1, 0, 0, 0], rtol=1e-6, err_msg=name)


def test_the_decoder_is_masked_by_the_predicted_class():
    """At init every capsule is about as short as the others and the reconstruction
    hardly depends on the mask; with longer class capsules it does, and the exported
    model masks by the same class."""
    graph = capsflow.compile(CAPSNET, {"routing_iters": 1})
    params = graph.init_params(seed=0)
    for name in ("digit.W", "fc1.w", "fc2.w", "fc3.w"):  # long capsules, a decoder that shows
        params[name] *= 10
    model = export_model(graph, params)
    x = images(6, seed=4)
    assert_matches(graph, params, model, {"x": x})
    lengths = graph.run(params, {"x": x}, outputs=["lengths"])["lengths"]
    other = np.eye(10, dtype=np.float32)[(lengths.argmax(axis=1) + 1) % 10]
    wrong = graph.run(params, {"x": x, "y": other}, outputs=["recon"])["recon"]
    right = graph.run(params, {"x": x}, outputs=["recon"])["recon"]
    assert np.abs(wrong - right).max() > 0.1 * np.abs(right).max()  # the mask shows


@pytest.mark.parametrize("spec, inputs", [
    # a parameter named as an output: the model holds it and returns it
    ("inputs: {x: {shape: [N, 4]}}\n"
     "params: {w: {shape: [4, 3], init: {normal: 1.0}}, v: {shape: [3], init: {normal: 1.0}}}\n"
     "nodes:\n  - {id: h, op: matmul, in: [x, w]}\noutputs: {h: h, vv: v, v: v}\n",
     {"x": (5, 4)}),
    # a class axis that is symbolic: the one-hot argmax counts the classes at run time
    ("inputs: {x: {shape: [3, N]}}\n"
     "nodes:\n  - {id: m, op: label_or_argmax, in: [x]}\noutputs: {m: m}\n", {"x": (3, 6)}),
    # layer_norm's gain on two symbolic axes
    ("inputs: {x: {shape: [N, T, 4]}, g: {shape: [N, T]}}\n"
     "nodes:\n  - {id: l, op: layer_norm, in: [x, g], attrs: {axis: [0, 1]}}\noutputs: {l: l}\n",
     {"x": (2, 5, 4), "g": (2, 5)}),
], ids=["param-output", "symbolic-classes", "layer-norm-symbolic-axes"])
def test_graphs_the_review_found_export_and_match(tmp_path, spec, inputs):
    graph, params, model = exported(tmp_path, "name: g\n" + spec, seed=0)
    rng = np.random.default_rng(0)
    assert_matches(graph, params, model,
                   {k: rng.normal(size=s).astype(np.float32) for k, s in inputs.items()})


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

PARAM_CLASH = """\
name: param-clash
inputs: {a: {shape: [N, 4]}}
params: {s/n2: {shape: [4], init: {normal: 1.0}}}
nodes:
  - {id: s, op: squash, in: [a]}
  - {id: h, op: add, in: [s, s/n2]}
outputs: {h: h}
"""

NO_OUTPUT = """\
name: no-output
inputs: {x: {shape: [N, 4]}, y: {shape: [N, 4], optional: true}}
nodes:
  - {id: err, op: sub, in: [x, y]}
outputs: {err: err}
"""
SWAP = """\
name: swap
inputs: {x: {shape: [N, 4]}}
nodes:
  - {id: a, op: relu, in: [x]}
  - {id: b, op: sigmoid, in: [x]}
outputs: {a: b, b: a}
"""


@pytest.mark.parametrize("spec, message", [
    (LOSS_ONLY, "{path}:5: node 'err': op 'sum_squared_error' cannot be exported to ONNX "
                "(a training loss); exportable ops: add, conv2d, "),
    (CLASH, "{path}:5: node 's/n2': two values of the ONNX model would be named 's/n2': "),
    (PARAM_CLASH, "{path}:3: parameter 's/n2': two values of the ONNX model would be named "
                  "'s/n2': "),
    (NO_OUTPUT, "{path}: no output of no-output can be computed without its optional inputs "
                "(y)"),
    (SWAP, "{path}: output 'a' (value 'b'): two values of the ONNX model would be named 'a'"),
], ids=["unexported-op", "name-clash", "param-clash", "no-output", "swapped-outputs"])
def test_what_cannot_be_exported_is_one_line(tmp_path, capsys, spec, message):
    path, out = tmp_path / "g.yaml", tmp_path / "g.onnx"
    path.write_text(spec)
    assert cli_main(["export", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and not out.exists()
    assert err.startswith("capsflow export: error: " + message.format(path=path)), err


def test_weights_one_file_cannot_hold_are_refused_before_they_are_made(tmp_path, capsys,
                                                                      monkeypatch):
    """An ONNX file holds under 2 GiB: baseline-cnn at 120x120 (2.3 GiB of weights) was an
    internal error after 7 GB of memory; it is refused before init_params runs."""
    from capsflow.core.graph import Graph
    monkeypatch.setattr(Graph, "init_params", lambda *a, **k: pytest.fail("weights made"))
    out = tmp_path / "m.onnx"
    assert cli_main(["export", str(REPO / "graphs" / "baseline-cnn.yaml"), "--set", "height=120",
                     "--set", "width=120", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.endswith("baseline-cnn's weights are 2.26 GiB in float32; an ONNX file holds at "
                        "most 2 GiB (protobuf's limit), so this graph cannot be exported as "
                        "one file\n") and not out.exists()


def test_weights_that_float32_cannot_hold_are_one_line(tmp_path, capsys):
    graph = capsflow.compile(CAPSNET, {"routing_iters": 1})
    params = {k: v.astype(np.float64) for k, v in graph.init_params(seed=0).items()}
    params["digit.W"][0, 0, 0, 0] = 1e39
    capsflow.save_params(tmp_path / "p.npz", params)
    assert cli_main(["export", str(CAPSNET), "--set", "routing_iters=1", "--checkpoint",
                     str(tmp_path / "p.npz"), "-o", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.endswith(
        "parameter 'digit.W' has values that are not finite in float32 (NaN, infinite, or "
        "beyond 3.4e38): it cannot be a weight of the model\n")


def test_the_model_file_is_whole_or_absent(tmp_path, capsys):
    """Written through a temporary file with the permissions of any new file; a folder as
    -o, or a picture that cannot be drawn, leaves no model."""
    import os
    graph = tmp_path / "g.yaml"
    graph.write_text(CLASH.replace("  - {id: s/n2, op: relu, in: [s]}\n", "")
                     .replace("{out: s/n2}", "{out: s}"))
    assert cli_main(["export", str(graph), "-o", str(tmp_path)]) == 2
    assert capsys.readouterr().err.endswith(f"-o {tmp_path} is a folder; name a file\n")
    out = tmp_path / "m.onnx"
    assert cli_main(["export", str(graph), "-o", str(out), "--draw",
                     str(graph / "under-a-file.svg")]) == 2
    assert not out.exists()
    capsys.readouterr()
    assert cli_main(["export", str(graph), "-o", str(out)]) == 0
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.yaml", "m.onnx"]


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


TINY = """\
name: tiny
inputs: {x: {shape: [N, 4]}}
params: {w: {shape: [4, 3], init: {normal: 1.0}}}
nodes:
  - {id: h, op: matmul, in: [x, w]}
outputs: {h: h}
"""


def test_outputs_that_are_inputs_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """-o equal to the checkpoint or the graph replaced it with the model (exit 0), and
    --draw equal to any of them overwrote it; -o or --draw that cannot be written was
    said only after the export. Each is one line before the weights are made or read,
    and every file keeps its bytes."""
    from capsflow.core.graph import Graph
    from capsflow.runners import export as runner
    base, child = tmp_path / "base.yaml", tmp_path / "child.yaml"
    base.write_text(TINY)
    child.write_text("extends: base.yaml\nname: child\n")
    graph = capsflow.compile(base)
    ckpt = tmp_path / "p.npz"
    capsflow.save_params(ckpt, graph.init_params(seed=0))
    (tmp_path / "sub").mkdir()
    link = tmp_path / "sub" / "link.npz"
    link.symlink_to(ckpt)
    drawn_graph, drawn_ckpt = tmp_path / "sub" / "g.dot", tmp_path / "sub" / "p.svg"
    drawn_graph.symlink_to(child)  # a picture is written through a link
    drawn_ckpt.symlink_to(ckpt)
    before = {p: p.read_bytes() for p in (base, child, ckpt)}
    monkeypatch.setattr(Graph, "init_params", lambda *a, **k: pytest.fail("weights made"))
    monkeypatch.setattr(runner, "load_npz", lambda *a, **k: pytest.fail("weights read"))
    model, picture = tmp_path / "m.onnx", tmp_path / "m.dot"
    for argv, message in [
        ([child, "--checkpoint", ckpt, "-o", ckpt],
         f"-o {ckpt} is the --checkpoint file, which writing it would replace; "),
        ([child, "--checkpoint", ckpt, "-o", link],   # another name for it
         f"-o {link} is the --checkpoint file, which writing it would replace; "),
        ([child, "-o", child], f"-o {child} is the graph file, which writing it would replace; "),
        ([child, "--checkpoint", ckpt, "-o", tmp_path / "sub" / ".." / "p.npz"],
         f"-o {tmp_path / 'sub' / '..' / 'p.npz'} is the --checkpoint file, "),
        ([child, "-o", model, "--draw", drawn_graph], f"--draw {drawn_graph} is the graph file, "),
        ([child, "--checkpoint", ckpt, "-o", model, "--draw", drawn_ckpt],
         f"--draw {drawn_ckpt} is the --checkpoint file, "),
        ([child, "-o", picture, "--draw", picture], f"--draw {picture} is the -o file; "),
        ([child, "-o", tmp_path], f"-o {tmp_path} is a folder; name a file"),
        ([child, "-o", model, "--draw", child / "m.svg"], f"--draw {child} is not a folder"),
    ]:
        assert cli_main(["export", *map(str, argv)]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    # a base the graph extends: known once the graph is read, still before the weights
    assert cli_main(["export", str(child), "-o", str(base)]) == 2
    assert capsys.readouterr().err.endswith(
        f"-o {base} is a file of the graph, which writing it would replace; name another file\n")
    assert {p: p.read_bytes() for p in (base, child, ckpt)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.yaml", "child.yaml", "p.npz",
                                                          "sub"]


def test_a_parameter_file_of_another_graph_is_named(tmp_path, capsys):
    other = tmp_path / "other.yaml"
    other.write_text(TINY.replace("name: tiny", "name: other").replace("w:", "v:")
                     .replace("[x, w]", "[x, v]"))
    capsflow.save_params(tmp_path / "p.npz", capsflow.compile(other).init_params(seed=0))
    (tmp_path / "tiny.yaml").write_text(TINY)
    assert cli_main(["export", str(tmp_path / "tiny.yaml"), "--checkpoint",
                     str(tmp_path / "p.npz"), "-o", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err == (
        f"capsflow export: error: {tmp_path / 'p.npz'}: parameter 'w' is missing (1 of 1 "
        f"missing): it is not a parameter file of tiny\n")


def test_a_model_that_cannot_be_written_leaves_no_picture(tmp_path, capsys, monkeypatch):
    """The picture was drawn before the model was written, and stayed when writing it
    failed (a full disk); now it is drawn once the model's bytes are down, and removed
    if the model does not take its name after all."""
    import contextlib
    import errno
    import io
    from capsflow.runners import export as runner
    graph, out, picture = tmp_path / "g.yaml", tmp_path / "m.onnx", tmp_path / "m.dot"
    graph.write_text(TINY)

    class Full(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device", str(out))

    @contextlib.contextmanager
    def full_disk(path):
        yield Full()

    @contextlib.contextmanager
    def failed_rename(path):
        yield io.BytesIO()
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(path))

    for fake, why in ((full_disk, "No space left on device"),
                      (failed_rename, "Invalid cross-device link")):
        monkeypatch.setattr(runner, "atomic_file", fake)
        assert cli_main(["export", str(graph), "-o", str(out), "--draw", str(picture)]) == 2
        assert capsys.readouterr().err.startswith(f"capsflow export: error: {why}")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["g.yaml"]


def test_shape_inference_and_the_checker_see_no_weight_bytes(tmp_path, monkeypatch):
    """Both serialise and parse the model they get: with the weights in it, the export's
    peak memory was 8 times the weights. They now get the weights as typed inputs, and
    the model that comes back holds the weights and checks (with full_check)."""
    import onnx.checker
    import onnx.shape_inference
    seen = []
    for module, name in ((onnx.shape_inference, "infer_shapes"), (onnx.checker, "check_model")):
        def spy(model, *args, _real=getattr(module, name), **kwargs):
            seen.append(model.ByteSize())
            return _real(model, *args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    spec = TINY.replace("[4, 3]", "[4, 250000]")  # 4 MB of weights
    graph, params, model = exported(tmp_path, spec, seed=0)
    assert len(seen) == 2 and max(seen) < 10_000, seen
    monkeypatch.undo()
    onnx.checker.check_model(model, full_check=True)
    assert [v.name for v in model.graph.input] == ["x"]
    assert [t.name for t in model.graph.initializer] == ["w"]
    assert_matches(graph, params, model, {"x": np.ones((2, 4), np.float32)})


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's VmHWM")
def test_the_export_peak_memory_is_about_three_times_the_weights(tmp_path):
    """Measured in a process of its own: baseline-cnn at 14x14 (43 MB of weights) took
    8 times its weights more than before the export; it takes about 3 times now."""
    import subprocess
    import sys
    # VmHWM, not ru_maxrss: that one starts at the forking parent's peak (pytest's).
    script = (
        "import sys\n"
        "from capsflow.cli import main\n"
        "import capsflow.export.onnx, capsflow.runners.export\n"
        "from capsflow.core import memory\n"
        "memory.memory_room = lambda: None  # this measures; a busy machine must not refuse\n"
        "before = memory.proc_status('VmHWM')\n"
        "assert main(sys.argv[1:]) == 0\n"
        "print(memory.proc_status('VmHWM') - before)\n")
    out = tmp_path / "m.onnx"
    result = subprocess.run([sys.executable, "-c", script, "export",
                             str(REPO / "graphs" / "baseline-cnn.yaml"), "--set", "height=14",
                             "--set", "width=14", "-o", str(out)],
                            capture_output=True, text=True, check=True)
    grew = int(result.stdout.splitlines()[-1])
    weights = sum(t.ByteSize() for t in onnx.load(out).graph.initializer)
    assert 40e6 < weights < 50e6
    assert grew < 4 * weights, f"{grew / weights:.1f} times the weights"


def test_an_export_that_needs_more_memory_than_there_is_is_refused(tmp_path, capsys,
                                                                   monkeypatch):
    from capsflow.core import memory
    from capsflow.core.graph import Graph
    monkeypatch.setattr(memory, "physical_memory", lambda: 300 * 2**20)
    monkeypatch.setattr(memory, "available_memory", lambda: None)
    monkeypatch.setattr(Graph, "init_params", lambda *a, **k: pytest.fail("weights made"))
    out = tmp_path / "m.onnx"
    assert cli_main(["export", str(REPO / "graphs" / "baseline-cnn.yaml"), "-o", str(out)]) == 2
    assert capsys.readouterr().err == (
        "capsflow export: error: exporting baseline-cnn takes about 405.6 MiB of memory "
        "(3 times its 135.2 MiB of float32 weights), more than this machine's 300.0 MiB of "
        "memory\n")
    assert not out.exists()


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
    nodes = {n.name for n in model.graph.node}
    assert "routing/0/v" in nodes and "routing/1/v" not in nodes  # routing_iters=1, as trained
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
