"""capsflow render: forward and backward drawings, gradient norms, stable output,
and the one-line error when Graphviz's dot program is missing."""
import json
import re
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import capsflow
from capsflow.cli import main
from capsflow.runners.gradcheck import random_batch
from conftest import CAPSNET, SHARED_DATA

pytest.importorskip("graphviz")
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' not installed")
SVG = "{http://www.w3.org/2000/svg}"
STAGES = ["Conv1", "PrimaryCaps", "DigitCaps", "Decoder", "Loss"]


def render(tmp_path, capsys, *args, name="out.svg"):
    """Run ``capsflow render CAPSNET ARGS -o tmp/NAME``; return (path, stdout)."""
    out = tmp_path / name
    rc = main(["render", str(CAPSNET), "-o", str(out), *args])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return out, captured.out


def svg_groups(path) -> dict:
    """{class: {id: <g> element}} for the SVG's nodes, edges and clusters."""
    groups: dict = {"node": {}, "edge": {}, "cluster": {}}
    for g in ET.parse(path).getroot().iter(f"{SVG}g"):
        kind = (g.get("class") or "").split(" ")[0]
        if kind in groups:
            groups[kind][g.get("id")] = g
    return groups


def text_of(g) -> str:
    return " ".join(t.text or "" for t in g.iter(f"{SVG}text"))


def box(g) -> tuple:
    """(xmin, xmax, ymin, ymax) of a cluster's outline (a polygon or a rounded path)."""
    shape = g.find(f"{SVG}polygon")
    coords = shape.get("points") if shape is not None else g.find(f"{SVG}path").get("d")
    nums = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", coords)]
    xs, ys = nums[0::2], nums[1::2]
    return min(xs), max(xs), min(ys), max(ys)


def inside(node, cluster) -> bool:
    t = next(node.iter(f"{SVG}text"))
    x, y = float(t.get("x")), float(t.get("y"))
    x0, x1, y0, y1 = box(cluster)
    return x0 < x < x1 and y0 < y < y1


@needs_dot
@pytest.mark.parametrize("iters", [1, 3])
def test_forward_svg_has_every_node_stage_and_one_cluster_per_iteration(tmp_path, capsys, iters):
    out, _ = render(tmp_path, capsys, "--set", f"routing_iters={iters}")
    groups = svg_groups(out)
    graph = capsflow.compile(CAPSNET, {"routing_iters": iters})
    assert set(graph.dag) <= set(groups["node"])
    iterations = sorted(k for k in groups["cluster"] if k.startswith("iteration:"))
    assert iterations == [f"iteration:routing/{k}" for k in range(iters)]
    assert {f"stage:{s}" for s in STAGES} | {"legend"} <= set(groups["cluster"])
    # Graphviz drew each node inside its clusters.
    for k in range(iters):
        node = groups["node"][f"routing/{k}/v"]
        assert inside(node, groups["cluster"][f"iteration:routing/{k}"])
        assert inside(node, groups["cluster"]["stage:DigitCaps"])
        for other in range(iters):
            if other != k:
                assert not inside(node, groups["cluster"][f"iteration:routing/{other}"])
    assert inside(groups["node"]["conv1.w"], groups["cluster"]["stage:Conv1"])
    assert not inside(groups["node"]["x"], groups["cluster"]["stage:Conv1"])
    # Edges: one per DAG edge, labelled with the value's shape (batch symbolic).
    for src, dst in graph.dag.edges:
        assert f"fwd:{src}->{dst}" in groups["edge"]
    assert "N×1152×10×16" in text_of(groups["edge"]["fwd:u_hat->routing/0/weighted"])
    assert "N×1×28×28" in text_of(groups["edge"]["fwd:x->conv1"])


@needs_dot
def test_forward_styles_tell_ops_inputs_and_parameters_apart(tmp_path, capsys):
    out, _ = render(tmp_path, capsys, "--set", "routing_iters=1")
    nodes = svg_groups(out)["node"]
    fill = {n: next(nodes[n].iter(f"{SVG}ellipse"), None) for n in ("x", "digit.W", "u_hat")}
    assert fill["x"].get("fill") != fill["digit.W"].get("fill")
    assert fill["u_hat"] is None  # op nodes are boxes, not ellipses
    assert "einsum" in text_of(nodes["u_hat"]) and "u_hat" in text_of(nodes["u_hat"])
    assert "1152×10×16×8" in text_of(nodes["digit.W"])


@needs_dot
def test_focus_draws_one_region_with_its_neighbours(tmp_path, capsys):
    out, _ = render(tmp_path, capsys, "--focus", "DigitCaps", "--set", "routing_iters=3")
    groups = svg_groups(out)
    assert {"u_hat", "digit.W", "b0", "lengths", "routing/2/v"} <= set(groups["node"])
    assert "conv1" not in groups["node"] and "fc1" not in groups["node"]
    context = {k for k, g in groups["node"].items() if "context" in g.get("class")}
    assert context == {"u", "mask", "masked", "margin"}
    assert [k for k in sorted(groups["cluster"]) if k.startswith("iteration:")] == [
        "iteration:routing/0", "iteration:routing/1", "iteration:routing/2"]


def test_bad_focus_and_bad_suffix_are_one_line_errors(tmp_path, capsys):
    rc = main(["render", str(CAPSNET), "--focus", "nowhere", "-o", str(tmp_path / "a.dot")])
    err = capsys.readouterr().err
    assert rc == 2 and "nowhere" in err and "DigitCaps" in err and err.count("\n") == 1
    rc = main(["render", str(CAPSNET), "-o", str(tmp_path / "a.jpeg")])
    err = capsys.readouterr().err
    assert rc == 2 and "a.jpeg" in err and ".svg" in err and err.count("\n") == 1
    rc = main(["render", str(CAPSNET), "--checkpoint", "w.npz", "-o", str(tmp_path / "a.dot")])
    assert rc == 2 and "--grad-norms" in capsys.readouterr().err
    # Output paths that are folders, and an infinite colour scale, before any work
    folder = tmp_path / "a.svg"
    folder.mkdir()
    for argv, said in ((["-o", str(folder)], f"-o {folder} is a folder; name a file"),
                       (["--stats", str(folder), "-o", str(tmp_path / "b.svg")],
                        f"--stats {folder} is a folder"),
                       (["--grad-norms", "--norm-range", "1e-10", "inf", "-o",
                         str(tmp_path / "b.svg")], "needs 0 < LOW < HIGH < inf"),
                       (["--grad-norms", "--random-input", "--bs", "100000", "-o",
                         str(tmp_path / "b.svg")], "at batch 100000 keeps at least")):
        assert main(["render", str(CAPSNET), *argv]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err


@pytest.mark.parametrize("iters, u_hat_terms", [(1, 1), (3, 5)])
def test_backward_dot_shows_vjps_sums_and_cut_edges(tmp_path, capsys, iters, u_hat_terms):
    out, _ = render(tmp_path, capsys, "--backward", "--set", f"routing_iters={iters}",
                    name="back.dot")
    source = out.read_text()
    graph = capsflow.compile(CAPSNET, {"routing_iters": iters})
    plan = graph.plan({"x", "y"}, ["loss"], "loss")
    for name in plan.backward:
        assert f'id="vjp:{name}"' in source
    for p in graph.spec.params:
        assert f'id="grad:{p}"' in source
    # u_hat feeds weighted in every iteration and agreement in all but the last.
    into_u_hat = re.findall(r'id="grad:(routing/\d/\w+)->u_hat"', source)
    assert len(into_u_hat) == u_hat_terms
    assert ('id="sum:u_hat"' in source) == (u_hat_terms > 1)
    assert ('id="sum:routing/0/b_next"' in source) == (iters > 1)
    # Non-differentiable inputs cut the flow: the decoder mask's argmax and b0's zeros.
    assert 'id="cut:mask->lengths"' in source and 'id="cut:b0->u_hat"' in source
    clusters = re.findall(r'id="(iteration:routing/\d)"', source)
    assert clusters == [f"iteration:routing/{k}" for k in range(iters)]


@needs_dot
def test_grad_norms_match_an_independent_gradient_and_colour_the_edges(tmp_path, capsys):
    graph = capsflow.compile(CAPSNET, {"routing_iters": 3})
    params = graph.init_params(5)
    capsflow.save_params(tmp_path / "w.npz", params)
    out, printed = render(tmp_path, capsys, "--grad-norms", "--random-input", "--bs", "2",
                          "--checkpoint", str(tmp_path / "w.npz"),
                          "--stats", str(tmp_path / "g.json"))
    stats = json.loads((tmp_path / "g.json").read_text())
    _, grads = graph.value_and_grad(params, random_batch(graph, 2, 0))
    for p in ("digit.W", "conv1.w", "fc3.b"):
        assert stats["values"][p]["norm"] == pytest.approx(np.linalg.norm(grads[p]), rel=1e-5)
    assert stats["values"]["u_hat"]["contributions"] == 5
    assert stats["batch"] == 2 and "w.npz" in stats["weights"] and "loss" in printed
    edges = svg_groups(out)["edge"]
    assert len(stats["edges"]) == len([k for k in edges if k.startswith("grad:")])
    strokes = {}
    for e in stats["edges"]:
        g = edges[f"grad:{e['from']}->{e['to']}"]
        assert e["norm"] > 0 and f"{e['norm']:.2e}" in text_of(g)
        path = next(g.iter(f"{SVG}path"))
        strokes[e["norm"]] = (path.get("stroke"), float(path.get("stroke-width", 1)))
    (small_colour, small_width), (big_colour, big_width) = strokes[min(strokes)], \
        strokes[max(strokes)]
    assert small_colour != big_colour and small_width < big_width


@needs_dot
@pytest.mark.skipif(not (SHARED_DATA / "mnist").exists(), reason="MNIST not in shared/data")
def test_grad_norms_on_an_mnist_batch(tmp_path, capsys):
    out, printed = render(tmp_path, capsys, "--grad-norms", "--data-dir", str(SHARED_DATA),
                          "--bs", "2", "--set", "routing_iters=1", "--focus", "routing",
                          "--stats", str(tmp_path / "g.json"))
    stats = json.loads((tmp_path / "g.json").read_text())
    assert stats["input"] == "mnist test[0:2]" and "mnist test[0:2]" in printed
    assert "grad:routing/0/weighted->u_hat" in svg_groups(out)["edge"]


@pytest.mark.skipif(not (SHARED_DATA / "mnist").exists(), reason="MNIST not in shared/data")
def test_a_checkpoint_is_drawn_with_its_own_set_values(tmp_path, capsys):
    """A run trained with routing_iters=1 has the parameters of the 3-iteration graph: its
    gradient norms were drawn on 3 iterations without a word."""
    run = tmp_path / "run"
    assert main(["train", str(CAPSNET), "--data-dir", str(SHARED_DATA), "--limit-train", "10",
                 "--limit-test", "5", "--bs", "5", "--num_epochs", "1", "--no-progress",
                 "--set", "routing_iters=1", "--set", "conv1_maps=8", "--set",
                 "primary_types=2", "--save_dir", str(run)]) == 0
    out, _ = render(tmp_path, capsys, "--grad-norms", "--random-input", "--bs", "2",
                    "--checkpoint", str(run / "last.npz"), name="g.dot")
    text = out.read_text()
    assert "routing/0/" in text and "routing/1/" not in text


def test_missing_dot_is_one_line_and_dot_source_still_works(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    rc = main(["render", str(CAPSNET), "-o", str(tmp_path / "g.svg")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "install graphviz" in err.replace("apt-get install graphviz", "install graphviz")
    assert "-o" in err and ".dot" in err and not (tmp_path / "g.svg").exists()
    out, _ = render(tmp_path, capsys, "--backward", name="g.dot")
    assert out.read_text().startswith("digraph capsnet {")


@needs_dot
@pytest.mark.parametrize("suffix", ["svg", "pdf", "dot"])
def test_rerendering_gives_the_same_file(tmp_path, capsys, suffix):
    first, _ = render(tmp_path, capsys, "--backward", name=f"a.{suffix}")
    second, _ = render(tmp_path, capsys, "--backward", name=f"b.{suffix}")
    assert first.read_bytes() == second.read_bytes()
    if suffix == "svg":
        assert b'id="vjp:routing/2/v"' in first.read_bytes()


TINY = """
name: tiny
inputs: {x: {shape: [N, 4]}}
params: {w: {shape: [4, 4], init: {normal: 0.5}}}
nodes:
  - {id: h, op: matmul, in: [x, w]}
  - {id: h_stop, op: stop_gradient, in: [h]}
  - {id: sq, op: mul, in: [h, h]}
  - {id: gated, op: mul, in: [sq, h_stop]}
  - {id: loss, op: mean, in: [gated]}
outputs: {loss: loss}
"""


@needs_dot
@pytest.mark.filterwarnings("ignore:invalid value encountered in log")
def test_a_loss_that_is_not_finite_is_said(tmp_path, capsys):
    # log of a matmul with values below zero: the loss is NaN; the picture is drawn, and
    # the line says so (it printed "loss nan" as though all were well).
    spec = tmp_path / "nan.yaml"
    spec.write_text(TINY.replace("op: mean, in: [gated]", "op: mean, in: [logged]").replace(
        "  - {id: loss,", "  - {id: logged, op: log, in: [h]}\n  - {id: loss,"))
    rc = main(["render", str(spec), "--grad-norms", "--random-input", "--bs", "3",
               "-o", str(tmp_path / "nan.svg")])
    out = capsys.readouterr().out
    assert rc == 0 and "note: the loss is nan" in out and (tmp_path / "nan.svg").is_file()
    # ...and the numbers that are not finite are null in --stats (strict JSON)
    rc = main(["render", str(spec), "--grad-norms", "--random-input", "--bs", "3",
               "--stats", str(tmp_path / "nan.json"), "-o", str(tmp_path / "nan.svg")])
    stats = json.loads((tmp_path / "nan.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"{c} in --stats"))
    assert rc == 0 and stats["loss"] is None


@needs_dot
def test_stop_gradient_is_cut_and_a_value_used_twice_is_summed(tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    out = tmp_path / "tiny.svg"
    rc = main(["render", str(spec), "--grad-norms", "--random-input", "--bs", "3",
               "--stats", str(tmp_path / "tiny.json"), "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    groups = svg_groups(out)
    assert {"cut:h_stop->h", "grad:sq->h[0]", "grad:sq->h[1]", "gradsum:h"} <= set(groups["edge"])
    assert {"stop:h_stop", "sum:h", "vjp:sq", "grad:w"} <= set(groups["node"])
    assert "vjp:h_stop" not in groups["node"]
    stats = json.loads((tmp_path / "tiny.json").read_text())
    assert stats["values"]["h"]["contributions"] == 2
    assert stats["cut"] == [{"from": "h_stop", "to": "h", "slot": 0}]
    # gated = h^2 * stop(h): the gradient flows only through sq, i.e. 2 h * h / size.
    graph = capsflow.compile(spec)
    params = graph.init_params(0)
    x = random_batch(graph, 3, 0)["x"]
    h = x @ params["w"]
    expected = np.linalg.norm(2 * h * h / h.size)
    assert stats["values"]["h"]["norm"] == pytest.approx(expected, rel=1e-5)
