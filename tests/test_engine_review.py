"""Engine regressions found in review: fusion's frees, the training-step memory bound,
the CPU einsum variant's memory, incremental live-byte metering, and one-line errors for
a loss whose inputs are missing, stray params, fed batch sizes and Options switches."""
import textwrap

import numpy as np
import pytest

import capsflow
from capsflow import Options


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _compile(tmp_path, text, name="g.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return capsflow.compile(path)


# c is read by `other`, declared between the expand_dims and the sum: the unfused plan
# frees c after `other`, but the fused einsum reads c at the sum's step.
FUSE_FREE = """
    inputs:
      x: {shape: [N, 3, 4]}
      z: {shape: [N, 3, 4, 5]}
    params:
      w: {shape: [3, 4], init: {normal: 1.0}}
      v: {shape: [3, 4, 5], init: {normal: 1.0}}
    nodes:
      - {id: c, op: mul, in: [x, w]}
      - {id: u, op: mul, in: [z, v]}
      - {id: e, op: expand_dims, in: [c], attrs: {axis: -1}}
      - {id: other, op: scale, in: [c], attrs: {by: 2.0}}
      - {id: m, op: mul, in: [e, u]}
      - {id: s, op: sum, in: [m], attrs: {axis: 1}}
      - {id: t, op: sum, in: [other]}
      - {id: r, op: sum, in: [s]}
      - {id: loss, op: add, in: [r, t]}
    outputs:
      loss: loss
      s: s
"""


def test_fusion_keeps_a_value_read_between_expand_dims_and_sum(tmp_path):
    graph = _compile(tmp_path, FUSE_FREE)
    from capsflow.core import fusion
    assert len(fusion.find_weighted_sums(graph.dag, graph.plan({"x", "z"}, None, "loss"))) == 1
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((2, 3, 4)), "z": rng.standard_normal((2, 3, 4, 5))}
    params = graph.init_params(seed=0, dtype="float64")
    out, grads = graph.value_and_grad(params, inputs)
    ref_out, ref_grads = graph.value_and_grad(params, inputs, backend=Options(fusion=False))
    for k in ref_out:
        assert rel(out[k], ref_out[k]) <= 1e-14, k
    for k in params:
        assert rel(grads[k], ref_grads[k]) <= 1e-14, k
    assert rel(graph.run(params, inputs)["s"], ref_out["s"]) <= 1e-14  # forward only


# A 40000 x 40000 product summed at once: mul's VJP saves only the parameters and sum's
# saves nothing, so no saved activation counts it, but the step holds it (6 GiB).
HUGE_PRODUCT = """
    inputs:
      x: {shape: [N, 1]}
    params:
      p: {shape: [40000, 1], init: {normal: 1.0}}
      q: {shape: [1, 40000], init: {normal: 1.0}}
    nodes:
      - {id: big, op: mul, in: [p, q]}
      - {id: s, op: sum, in: [big]}
      - {id: xs, op: sum, in: [x]}
      - {id: loss, op: add, in: [s, xs]}
    outputs:
      loss: loss
"""


def test_a_step_whose_largest_value_cannot_fit_is_refused(tmp_path, monkeypatch):
    from capsflow.runners.step_memory import check_step_fits
    graph = _compile(tmp_path, HUGE_PRODUCT)
    monkeypatch.setattr("capsflow.core.memory.physical_memory", lambda: 2 * 2**30)
    lines = []
    with pytest.raises(capsflow.CapsflowError, match=r"^a training step of .* at batch 4 keeps "
                                                     r"at least 6\.0 GiB in its largest value, "
                                                     r"more than this machine's 2\.0 GiB"):
        check_step_fits(graph, Options(), 4, "float32", log=lines.append)
    assert lines == []  # refused by the bound, before anything is measured


def test_einsums_saved_operands_count_toward_the_step_bound(tmp_path):
    """einsum saves all its inputs under one name ("operands"), fused or written."""
    from capsflow.core.memory import saved_for_backward_bytes
    graph = _compile(tmp_path, """
        inputs:
          x: {shape: [N, 50, 60]}
        params:
          w: {shape: [60], init: ones}
        nodes:
          - {id: a, op: mul, in: [x, w]}
          - {id: b, op: exp, in: [x]}
          - {id: e, op: einsum, in: [a, b], attrs: {eq: "nij,nij->n"}}
          - {id: loss, op: sum, in: [e]}
        outputs:
          loss: loss
    """)
    plan = graph.plan({"x"}, ["loss"], "loss")
    # a and b, 50 x 60 float32 each per example (a is saved by the einsum alone)
    assert saved_for_backward_bytes(graph.dag, plan, 3, 4) == 2 * 3 * 50 * 60 * 4


def test_value_and_grad_names_the_missing_input_of_the_loss(capsnet):
    params = capsnet.init_params(0)
    x = np.zeros((2, 1, 28, 28), "f4")
    with pytest.raises(capsflow.CapsflowError, match="^output 'loss' needs input 'y', which "
                                                     "was not given$"):
        capsnet.value_and_grad(params, {"x": x})
    with pytest.raises(capsflow.CapsflowError, match="^output 'loss' needs input 'y'"):
        capsnet.run(params, {"x": x}, outputs=["loss"])  # the line run gives, the same


def test_the_cpu_outer_product_never_takes_more_than_its_output(monkeypatch):
    """'nij,njd->nijd' with i of 1 and j of 32: the block-diagonal GEMM would build a
    matrix 32 times the output; the variant falls back to the broadcast multiply."""
    import tracemalloc
    from capsflow.backends import get_backend
    from capsflow.backends.cpu import linalg as cpu_linalg
    from capsflow.core.opdef import get_op
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 1, 32)), rng.standard_normal((2, 32, 1000))
    out_bytes = 2 * 1 * 32 * 1000 * 8
    tracemalloc.start()
    try:
        got = get_op("einsum").compute(get_backend("numpy"), a, b, eq="nij,njd->nijd")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(got, np.einsum("nij,njd->nijd", a, b))
    assert peak < 1.5 * out_bytes, peak
    # CapsNet's routing gradient (i 1152 > j 10) keeps its GEMM, whose diagonal is small.
    used = []
    real = cpu_linalg._outer_as_matmul
    monkeypatch.setattr(cpu_linalg, "_outer_as_matmul",
                        lambda *args: used.append(real(*args)) or used[-1])
    xs = rng.standard_normal((2, 1152, 10)), rng.standard_normal((2, 10, 16))
    got = get_op("einsum").compute(get_backend("numpy"), *xs, eq="nij,njd->nijd")
    assert used[0] is not None and np.array_equal(got, np.einsum("nij,njd->nijd", *xs))


SMALL_GRAPH = """
    inputs:
      x: {shape: [N, 3]}
    params:
      p: {shape: [3], init: {normal: 1.0}}
    nodes:
      - {id: a, op: mul, in: [x, p]}
      - {id: loss, op: sum, in: [a]}
    outputs:
      loss: loss
      a: a
"""


def test_an_extra_params_entry_does_not_set_the_runs_dtype(tmp_path):
    graph = _compile(tmp_path, SMALL_GRAPH)
    params = graph.init_params(0)
    x = {"x": np.ones((2, 3), "f4")}
    out = graph.run({"step": np.array(7), **params}, x)
    assert out["loss"].dtype == np.float32 and out["a"].dtype == np.float32
    out, grads = graph.value_and_grad({"step": np.array(7), **params}, x)
    assert out["loss"].dtype == np.float32 and grads["p"].dtype == np.float32
    assert graph.run(graph.init_params(0, "float64"), x)["loss"].dtype == np.float64


@pytest.mark.parametrize("dtype", ["int64", "float16", "complex64", "bool"])
def test_a_parameter_of_another_dtype_is_one_line(tmp_path, dtype):
    graph = _compile(tmp_path, SMALL_GRAPH)
    with pytest.raises(capsflow.CapsflowError, match=f"^parameter 'p' has dtype {dtype}, the "
                                                     "graph runs in float32 or float64$"):
        graph.run({"p": np.ones(3, dtype)}, {"x": np.ones((2, 3))})


def test_a_fed_values_batch_size_must_match_the_inputs(capsnet):
    params = capsnet.init_params(0)
    x = np.zeros((2, 1, 28, 28), "f4")
    with pytest.raises(capsflow.CapsflowError, match=r"^fed value 'routing/\d+/v' has shape "
                                                     r"\(3, 10, 16\): N is 3 here but 2 in input "
                                                     r"'x'$"):
        capsnet.run(params, {"x": x}, outputs=["recon"],
                    feed={"routing/v": np.zeros((3, 10, 16), "f4")})
    out = capsnet.run(params, {"x": x}, outputs=["recon"],
                      feed={"routing/v": np.zeros((2, 10, 16), "f4")})
    assert out["recon"].shape[0] == 2


def test_a_fed_values_product_dim_is_checked_too(tmp_path):
    graph = _compile(tmp_path, """
        inputs:
          x: {shape: [N, 3, 4]}
        nodes:
          - {id: flat, op: reshape, in: [x], attrs: {shape: [-1, 4]}}
          - {id: total, op: sum, in: [flat]}
        outputs:
          total: total
    """)
    assert graph.dag.nodes["flat"]["shape"][0] == "N*3"
    x = {"x": np.ones((2, 3, 4))}
    with pytest.raises(capsflow.CapsflowError, match=r"^fed value 'flat' has shape \(5, 4\): "
                                                     r"N\*3 is 5 here but 6 \(N is 2\) in input "
                                                     r"'x'$"):
        graph.run({}, x, feed={"flat": np.ones((5, 4))})
    assert graph.run({}, x, feed={"flat": np.ones((6, 4))})["total"] == 24


@pytest.mark.parametrize("switch", ["fusion", "fast_paths", "factored_grads", "replay_steps"])
@pytest.mark.parametrize("value", ["off", "false", 0, None])
def test_an_options_switch_must_be_a_bool(switch, value):
    with pytest.raises(capsflow.CapsflowError, match=f"^Options {switch} must be True or "
                                                     f"False, got {value!r}$"):
        Options(**{switch: value})
    assert getattr(Options(**{switch: False}), switch) is False
    assert Options().replace(**{switch: False}).plain.fusion is False


class CheckingMeter:
    """The incremental meter, checked at every point it is read against a walk over
    everything the executor holds there (what LiveBytes counted before)."""

    def __new__(cls):
        from capsflow.core.memory import LiveBytes

        class Checking(LiveBytes):
            samples = 0

            def sample(self, *containers):
                assert self.current == self.walk(*containers)
                self.samples += 1
                return super().sample(*containers)
        return Checking()


@pytest.mark.parametrize("options", [Options(), Options().plain,
                                     Options(fusion=False), Options(factored_grads=False)])
def test_the_counted_live_bytes_equal_a_walk_at_every_op(capsnet, options):
    from capsflow.core.executor import execute
    from capsflow.core.memory import LiveBytes
    from capsflow.backends import get_backend
    rng = np.random.default_rng(0)
    params = capsnet.init_params(0)
    inputs = {"x": rng.random((3, 1, 28, 28)).astype("f4"), "y": np.eye(10, dtype="f4")[:3]}
    be = get_backend(options)
    values = {**{k: be.asarray(v) for k, v in params.items()},
              **{k: be.asarray(v) for k, v in inputs.items()}}
    meter = CheckingMeter()
    execute(capsnet.dag, capsnet.plan({"x", "y"}, None, "loss"), values, be, meter)
    assert meter.samples > 50 and meter.peak > 0 and meter.current > 0
    peak = capsnet.value_and_grad(params, inputs, options, return_peak=True)[2]
    assert peak == meter.peak
    # a forward pass alone, too
    meter = CheckingMeter()
    execute(capsnet.dag, capsnet.plan({"x"}, ["lengths"]), values, be, meter)
    assert meter.peak == capsnet.run(params, {"x": inputs["x"]}, options, outputs=["lengths"],
                                     return_peak=True)[1] > 0
    assert isinstance(meter, LiveBytes)


def _chain(tmp_path, length):
    lines = ["inputs:", "  x: {shape: [N, 4]}", "params:", "  p: {shape: [4], init: ones}",
             "nodes:", "  - {id: a0, op: mul, in: [x, p]}"]
    lines += [f"  - {{id: a{k}, op: mul, in: [a{k - 1}, p]}}" for k in range(1, length)]
    lines += [f"  - {{id: loss, op: sum, in: [a{length - 1}]}}", "outputs:", "  loss: loss"]
    return _compile(tmp_path, "\n".join(lines) + "\n", f"chain{length}.yaml")


def test_metering_a_chain_costs_in_proportion_to_its_length(tmp_path, monkeypatch):
    """The arrays the meter visits (each through memory._root) grow linearly with the
    graph: a walk after each op visited every saved array, quadratically many."""
    from capsflow.core import memory
    visits = []
    real_root = memory._root
    monkeypatch.setattr(memory, "_root", lambda a: visits.append(1) or real_root(a))

    def count(length):
        graph = _chain(tmp_path, length)
        params, x = graph.init_params(0), {"x": np.ones((2, 4), "f4")}
        del visits[:]
        _, grads, peak = graph.value_and_grad(params, x, return_peak=True)
        assert peak > 0 and grads["p"].shape == (4,)
        return len(visits)

    at_500, at_2000 = count(500), count(2000)
    assert at_2000 <= 4.2 * at_500, (at_500, at_2000)
