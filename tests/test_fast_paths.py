"""The speed paths compute what the plain paths compute: fusion against the unfused graph,
the CPU backend's chunked, threaded convolution against itself in other splits, its
outer products and short reductions against NumPy's."""
import textwrap

import numpy as np
import pytest

import capsflow
from capsflow import Options
from capsflow.backends import get_backend
from capsflow.backends.cpu import conv as cpu_conv
from capsflow.backends.cpu import parallel
from capsflow.core import fusion
from capsflow.core.gradcheck import op_gradcheck
from capsflow.core.opdef import get_op

UNFUSED = Options(fusion=False)


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def test_capsnet_fused_matches_unfused_float64(capsnet, batch64):
    x, y = batch64
    params = capsnet.init_params(seed=3, dtype="float64")
    out, grads = capsnet.value_and_grad(params, {"x": x, "y": y})
    ref_out, ref_grads = capsnet.value_and_grad(params, {"x": x, "y": y}, backend=UNFUSED)
    for k in ref_out:
        assert rel(out[k], ref_out[k]) <= 1e-12, k
    for k in params:
        assert rel(grads[k], ref_grads[k]) <= 1e-12, k


def test_fusion_lowers_a_copy_and_leaves_the_dag_alone(capsnet):
    plan = capsnet.plan({"x", "y"}, None, "loss")
    nodes_before = set(capsnet.dag.nodes)
    fusions = fusion.find_weighted_sums(capsnet.dag, plan)
    assert [f.sum for f in fusions] == [f"routing/{k}/s" for k in range(3)]
    assert {f.eq for f in fusions} == {"abc,abcd->acd"}  # nij,nijd->njd
    dag, lowered = fusion.lower(capsnet.dag, plan)
    assert set(capsnet.dag.nodes) == nodes_before
    assert capsnet.dag.nodes["routing/0/s"]["op"] == "sum"
    assert dag.nodes["routing/0/s"]["op"] == "einsum"
    assert dag.nodes["routing/0/s"]["inputs"] == ["routing/0/c", "u_hat"]
    assert not any(n.endswith(("/weighted", "/c_col")) for n in lowered.steps + lowered.backward)
    # b0 is a constant, so the first iteration's coupling coefficients need no gradient
    assert lowered.needs["routing/0/s"] == (False, True)
    assert lowered.needs["routing/1/s"] == (True, True)
    freed = [v for dead in lowered.free_after.values() for v in dead]
    assert "u_hat" in freed and len(freed) == len(set(freed))


def test_grad_hook_sees_the_unfused_edges_and_says_what_it_needs(capsnet, batch64):
    x, y = batch64
    seen = set()
    params = capsnet.init_params(seed=1, dtype="float64")
    hook = lambda consumer, value, slot, g: seen.add((consumer, value))  # noqa: E731
    capsnet.value_and_grad(params, {"x": x, "y": y}, grad_hook=hook,
                           backend=Options(fusion=False, factored_grads=False))
    assert ("routing/1/s", "routing/1/weighted") in seen
    assert ("routing/1/weighted", "routing/1/c_col") in seen
    with pytest.raises(capsflow.CapsflowError, match="fusion=False, factored_grads=False"):
        capsnet.value_and_grad(params, {"x": x, "y": y}, grad_hook=hook)


SPEC = """
    inputs: {x: {shape: [N, 3, 4]}, c: {shape: [N, 4]}}
    params:
      w: {shape: [3, 4], init: {normal: 1.0}}
    nodes:
      - {id: u, op: mul, in: [x, w]}                          # (N, 3, 4)
      - {id: cc, op: expand_dims, in: [c], attrs: {axis: 1}}   # (N, 1, 4)
      - {id: p, op: mul, in: [u, cc]}                         # c on mul's second slot
      - {id: s, op: sum, in: [p], attrs: {axis: [0, 2]}}       # (3,)
      - {id: loss, op: sum, in: [s], attrs: {axis: null}}
    outputs: {loss: loss, OUT}
"""


def _spec(tmp_path, extra_output: str):
    path = tmp_path / "g.yaml"
    path.write_text(textwrap.dedent(SPEC.replace("OUT", extra_output)))
    return capsflow.compile(path)


def test_small_graph_fusion_with_list_axis_and_second_slot(tmp_path):
    graph = _spec(tmp_path, "s: s")
    plan = graph.plan({"x", "c"}, None, "loss")
    (f,) = fusion.find_weighted_sums(graph.dag, plan)
    assert f.inputs == ("u", "c") and f.c_slot == 1 and f.eq == "abc,ac->b"
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((2, 3, 4)), "c": rng.standard_normal((2, 4))}
    params = graph.init_params(seed=0, dtype="float64")
    out, grads = graph.value_and_grad(params, inputs)
    ref_out, ref_grads = graph.value_and_grad(params, inputs, backend=UNFUSED)
    assert rel(out["s"], ref_out["s"]) <= 1e-14 and rel(grads["w"], ref_grads["w"]) <= 1e-14


def test_a_product_read_elsewhere_is_not_fused(tmp_path):
    graph = _spec(tmp_path, "product: p")  # p is an output: it must exist
    assert fusion.find_weighted_sums(graph.dag, graph.plan({"x", "c"}, None, "loss")) == []


@pytest.mark.parametrize("chunk_bytes", [1, 10 ** 9])
def test_conv2d_row_chunks_give_the_same_gradients(monkeypatch, chunk_bytes):
    """One GEMM per kernel row (tiny budget) and one GEMM in all pass the same check."""
    monkeypatch.setattr(cpu_conv, "CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(2)
    args = [rng.standard_normal((2, 3, 9, 8)), rng.standard_normal((4, 3, 5, 3)),
            rng.standard_normal(4)]
    for attrs in ({"stride": 2, "padding": 1}, {"stride": 1, "padding": 0}):
        errors = op_gradcheck("conv2d", args, attrs)  # the CPU variant, on NumPy
        assert max(errors) <= 1e-6, (chunk_bytes, attrs, errors)


def test_row_chunks_cover_the_kernel_within_budget():
    row_chunks = cpu_conv.row_chunks
    assert row_chunks(9, 100, budget=250) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]
    assert row_chunks(9, 100, budget=10 ** 6) == [(0, 9)]
    assert row_chunks(3, 10 ** 9, budget=1) == [(0, 1), (1, 2), (2, 3)]


def test_batch_parallel_conv_matches_one_part(monkeypatch):
    """The conv's batch split over threads sums the same products as one part does."""
    be = get_backend("numpy")
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((5, 3, 9, 9)), rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    results = []
    for workers in (1, 3):
        monkeypatch.setitem(parallel._state, "workers", workers)
        out, extras = cpu_conv.threaded.forward_fn(be, x, w, b, stride=2, padding=1)
        g = rng.standard_normal(out.shape) if not results else results[0][1]
        grads = cpu_conv.threaded.vjp_fn(be, {"xt": extras["xt"], "w": w}, g, (True, True, True),
                                         stride=2, padding=1)
        results.append((out, g, grads))
    (out1, _, g1), (out3, _, g3) = results
    assert rel(out3, out1) <= 1e-14
    assert all(rel(a, b) <= 1e-14 for a, b in zip(g3, g1))


def test_ordered_sum_adds_in_part_order_whatever_the_arrival_order():
    """Where float addition's order shows (1e16 - 1e16 + 1), every arrival order of the
    parts' contributions gives the sum in part order: results repeat from run to run."""
    import itertools
    OrderedSum = parallel.OrderedSum
    parts = [slice(0, 2), slice(2, 4), slice(4, 6)]
    values = [np.array([1e16]), np.array([-1e16]), np.array([1.0])]
    in_order = (values[0] + values[1]) + values[2]
    for arrival in itertools.permutations(range(3)):
        total, summer = np.zeros(1), OrderedSum(parts)
        for k in arrival:
            summer.add("w", total, parts[k], values[k])
        np.testing.assert_array_equal(total, in_order)
    assert in_order[0] != values[0][0] + (values[1][0] + values[2][0])  # order does matter


def test_batch_parallel_conv_gradients_repeat_exactly(monkeypatch):
    """With several parts the conv's weight gradient is the same, bit for bit, on every run."""
    be = get_backend("numpy")
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((8, 3, 9, 9)), rng.standard_normal((4, 3, 3, 3))
    monkeypatch.setitem(parallel._state, "workers", 4)
    out, extras = cpu_conv.threaded.forward_fn(be, x, w, None, stride=1, padding=0)
    g = rng.standard_normal(out.shape)
    saved = {"xt": extras["xt"], "w": w}
    first = cpu_conv.threaded.vjp_fn(be, saved, g, (True, True), stride=1, padding=0)
    for _ in range(5):
        again = cpu_conv.threaded.vjp_fn(be, saved, g, (True, True), stride=1, padding=0)
        for a, b in zip(again, first):
            np.testing.assert_array_equal(a, b)


def test_batch_parts_cover_the_batch(monkeypatch):
    monkeypatch.setitem(parallel._state, "workers", 3)
    parts = parallel.batch_parts(7)
    assert parts == [slice(0, 2), slice(2, 4), slice(4, 7)]
    assert parallel.batch_parts(2) == [slice(0, 1), slice(1, 2)]
    assert parallel.in_parallel(lambda s: s.stop - s.start, [slice(0, 3), slice(3, 7)]) == [3, 4]



@pytest.mark.parametrize("eq,shapes", [
    ("nij,njd->nijd", [(5, 4, 3), (5, 3, 2)]),     # the routing gradient
    ("acd,abc->abcd", [(5, 3, 2), (5, 4, 3)]),     # the fused weighted sum's gradient
    ("nij,nj->nij", [(2, 3, 4), (2, 4)]),
    ("ij,kl->ijkl", [(2, 3), (4, 5)]),
])
def test_outer_products_equal_einsum_exactly(eq, shapes):
    """No index is summed: the CPU variant's GEMM or broadcast multiply into a C-ordered
    result."""
    rng = np.random.default_rng(6)
    xs = [rng.standard_normal(s) for s in shapes]
    got = get_op("einsum").compute(get_backend("numpy"), *xs, eq=eq)
    assert got.flags["C_CONTIGUOUS"] and np.array_equal(got, np.einsum(eq, *xs))


@pytest.mark.parametrize("size", [3, 20])
@pytest.mark.parametrize("kind", ["max", "sum"])
def test_short_axis_reductions_match_numpy(kind, size):
    from capsflow.backends.cpu.caps import reduce_axis
    x = np.random.default_rng(7).standard_normal((4, size, 5))
    np.testing.assert_allclose(reduce_axis(kind, x, 1), getattr(x, kind)(axis=1, keepdims=True),
                               rtol=1e-14)
