"""Spec language, compiler, scheduler and executor on CapsNet and on small graphs."""
import textwrap

import networkx as nx
import numpy as np
import pytest

import capsflow
from capsflow.errors import CapsflowError
from conftest import CAPSNET


def write(tmp_path, text, name="g.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("iters", [1, 3, 5])
def test_routing_iters_unrolls_that_many_iterations(iters):
    graph = capsflow.compile(CAPSNET, overrides={"routing_iters": iters})
    softmaxes = [n for n, d in graph.dag.nodes(data=True) if d.get("op") == "softmax"]
    assert softmaxes == [f"routing/{k}/c" for k in range(iters)]
    # the agreement update is skipped in the last iteration, as in the paper
    agreements = [n for n in graph.dag if n.endswith("/agreement")]
    assert len(agreements) == iters - 1
    assert graph.spec.outputs["digitcaps"] == f"routing/{iters - 1}/v"


def test_capsnet_shapes_and_parameter_counts(capsnet):
    shapes = {n: d["shape"] for n, d in capsnet.dag.nodes(data=True)}
    assert shapes["conv1"] == ("N", 256, 20, 20)
    assert shapes["primary_conv"] == ("N", 256, 6, 6)
    assert shapes["u"] == ("N", 1152, 8)
    assert shapes["u_hat"] == ("N", 1152, 10, 16)
    assert shapes["routing/2/s"] == ("N", 10, 16)
    assert shapes["lengths"] == ("N", 10) and shapes["recon"] == ("N", 784)
    assert shapes["loss"] == ()
    assert capsnet.param_count() == 8_215_568
    from capsflow.runners.check import decoder_params
    assert capsnet.param_count() - capsnet.param_count(decoder_params(capsnet)) == 6_804_224


def test_dag_is_a_networkx_digraph_in_deterministic_order(capsnet):
    assert isinstance(capsnet.dag, nx.DiGraph) and nx.is_directed_acyclic_graph(capsnet.dag)
    again = capsflow.compile(CAPSNET)
    assert again.order == capsnet.order
    position = {n: k for k, n in enumerate(capsnet.order)}
    assert all(position[u] < position[v] for u, v in capsnet.dag.edges)


def test_u_hat_and_W_fan_out_to_every_routing_iteration(capsnet):
    consumers = set(capsnet.dag.successors("u_hat"))
    assert {f"routing/{k}/weighted" for k in range(3)} <= consumers
    assert {f"routing/{k}/agreement" for k in range(2)} <= consumers


def test_deep_unrolling_needs_no_recursion():
    graph = capsflow.compile(CAPSNET, overrides={"routing_iters": 400})
    assert len(graph.order) > 2800


def test_run_and_value_and_grad_api(capsnet):
    params = capsnet.init_params(seed=0)
    assert params["digit.W"].dtype == np.float32 and params["digit.W"].shape == (1152, 10, 16, 8)
    assert abs(params["digit.W"].std() - 0.01) < 1e-3
    rng = np.random.default_rng(0)
    x = rng.random((4, 1, 28, 28), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[[0, 1, 2, 3]]
    outputs, grads, peak = capsnet.value_and_grad(params, {"x": x, "y": y}, return_peak=True)
    assert outputs["lengths"].shape == (4, 10) and outputs["recon"].shape == (4, 784)
    assert float(outputs["loss"]) > 0 and set(grads) == set(params)
    assert all(grads[k].shape == params[k].shape for k in params)
    assert peak > 0
    inference = capsnet.run(params, {"x": x})
    assert set(inference) == {"lengths", "recon", "digitcaps"}
    with pytest.raises(CapsflowError, match="output 'loss' needs input 'y'"):
        capsnet.run(params, {"x": x}, outputs=["loss"])
    with pytest.raises(CapsflowError, match="input 'x' has shape"):
        capsnet.run(params, {"x": x[:, :, :20]})
    with pytest.raises(CapsflowError, match="parameter 'fc1.w' is missing"):
        capsnet.run({k: v for k, v in params.items() if k != "fc1.w"}, {"x": x})


def test_init_params_is_seeded_and_per_parameter(capsnet):
    a, b = capsnet.init_params(seed=1), capsnet.init_params(seed=1)
    c = capsnet.init_params(seed=2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv1.w"], c["conv1.w"])


def test_save_and_load_params_round_trip(capsnet, tmp_path):
    params = capsnet.init_params(seed=0)
    capsflow.save_params(tmp_path / "p.npz", params)
    loaded = capsflow.load_params(tmp_path / "p.npz")
    assert set(loaded) == set(params) and all(np.array_equal(loaded[k], params[k]) for k in params)
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    with pytest.raises(CapsflowError, match="bad.npz is not a readable .npz"):
        capsflow.load_params(tmp_path / "bad.npz")


SMALL = """
    vars: {k: 2.0}
    inputs: {x: {shape: [N, 3]}}
    params:
      w: {shape: [3], init: {constant: 0.5}}
    nodes:
      - {id: a, op: mul, in: [x, w]}
      - {id: frozen, op: stop_gradient, in: [a]}
      - {id: twice, op: add, in: [a, a]}          # fan-out: a feeds twice (and frozen)
      - {id: mixed, op: mul, in: [twice, frozen]}
      - {id: total, op: sum, in: [mixed], attrs: {axis: null}}
      - {id: loss, op: scale, in: [total], attrs: {by: "${k}"}}
    outputs: {loss: loss}
"""


def test_fan_out_sums_and_stop_gradient_is_honoured(tmp_path):
    graph = capsflow.compile(write(tmp_path, SMALL))
    x = np.array([[1.0, 2.0, 3.0]])
    params = graph.init_params(dtype="float64")
    outputs, grads = graph.value_and_grad(params, {"x": x})
    # loss = k * sum(2 a * stop(a)), a = x w: d/dw = k * 2 * x * a (only through `twice`)
    a = x * 0.5
    assert np.isclose(float(outputs["loss"]), 2.0 * np.sum(2 * a * a))
    np.testing.assert_allclose(grads["w"], (2.0 * 2 * x * a).sum(0))
    twice = capsflow.compile(write(tmp_path, SMALL), overrides={"k": 4.0})
    assert np.isclose(float(twice.run(params, {"x": x})["loss"]), 2 * float(outputs["loss"]))


def test_saved_activations_are_freed(capsnet):
    """Peak live bytes of a forward-only run stay well below the value-and-grad peak."""
    params = capsnet.init_params(seed=0)
    x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[np.arange(8) % 10]
    _, run_peak = capsnet.run(params, {"x": x, "y": y}, return_peak=True)
    _, _, grad_peak = capsnet.value_and_grad(params, {"x": x, "y": y}, return_peak=True)
    param_bytes = sum(p.nbytes for p in params.values())
    assert param_bytes < run_peak < grad_peak


def test_a_scalar_input_is_fed_as_a_scalar(tmp_path):
    path = tmp_path / "scalar.yaml"
    path.write_text("inputs: {x: {shape: [N, 3]}, s: {shape: []}}\n"
                    "nodes: [{id: out, op: mul, in: [x, s]}]\noutputs: {out: out}\n")
    graph = capsflow.compile(path)
    out = graph.run({}, {"x": np.ones((2, 3)), "s": np.float64(2.0)})["out"]
    np.testing.assert_array_equal(out, np.full((2, 3), 2.0))


def test_an_empty_batch_is_one_clear_error(tmp_path):
    """N = 0 ran into a NumPy ValueError in softmax's max (and a NaN mean elsewhere)."""
    path = tmp_path / "empty.yaml"
    path.write_text("inputs: {x: {shape: [N, 3]}}\n"
                    "nodes: [{id: p, op: softmax, in: [x], attrs: {axis: 0}},\n"
                    "        {id: loss, op: mean, in: [p]}]\noutputs: {loss: loss}\n")
    graph = capsflow.compile(path)
    assert graph.run({}, {"x": np.ones((2, 3))})["loss"] == pytest.approx(1 / 2)
    with pytest.raises(CapsflowError, match=r"input 'x' has shape \(0, 3\): N is 0"):
        graph.run({}, {"x": np.ones((0, 3))})


def test_label_or_argmax_needs_a_class_axis(tmp_path):
    path = tmp_path / "scalar.yaml"
    path.write_text("inputs: {s: {shape: []}}\n"
                    "nodes: [{id: m, op: label_or_argmax, in: [s]}]\noutputs: {m: m}\n")
    with pytest.raises(CapsflowError, match="label_or_argmax needs scores with a class axis"):
        capsflow.compile(path)


@pytest.mark.parametrize("stem, overrides", [("capsnet", {"routing_iters": 5}),
                                              ("capsnet", {"routing_iters": 60}),
                                              ("capsnet-em", {}), ("capsnet-attention", {})])
@pytest.mark.parametrize("fusion", [True, False])
def test_the_saved_for_backward_bytes_never_exceed_the_measured_peak(stem, overrides, fusion):
    """saved_for_backward_bytes is a lower bound on a training step's peak: what the
    executor's own live-bytes meter counts beyond the parameters, at two batch sizes, with
    and without fusion (unfused, routing saves c and a view of it: counted once)."""
    from capsflow.core import fusion as fusion_module
    from capsflow.core.memory import saved_for_backward_bytes
    from capsflow.options import Options
    graph = capsflow.compile(CAPSNET.parent / f"{stem}.yaml", overrides)
    params = graph.init_params(seed=0)
    param_bytes = sum(p.nbytes for p in params.values())
    scores = "lengths" if "lengths" in graph.spec.outputs else "scores"
    plan = graph.plan(set(graph.spec.inputs), ["loss", scores], "loss")
    dag = graph.dag
    if fusion:
        dag, plan = fusion_module.lower(dag, plan)
    rng = np.random.default_rng(0)
    for batch in (2, 16):  # 60 iterations at 16: activations, not parameters, dominate
        x = rng.random((batch, *graph.dag.nodes["x"]["shape"][1:])).astype(np.float32)
        y = np.eye(10, dtype=np.float32)[np.arange(batch) % 10]
        bound = saved_for_backward_bytes(dag, plan, batch, 4)
        peak = graph.value_and_grad(params, {"x": x, "y": y}, Options(fusion=fusion),
                                    return_peak=True)[2]
        # The meter counts the parameters too, and they are held throughout.
        assert 0 < bound and param_bytes + bound <= peak, (batch, bound, peak)
