"""TrainStep: the trainer's step in two halves, eager or recorded and replayed. On the
CPU the replay path runs with train_step.Replayed (the reference recording) standing in
for the GPU's, so the static buffers, the per-step Adam numbers and the fallbacks are
exercised here; the GPU check compares real recordings with eager steps."""
import numpy as np
import pytest

import capsflow
from capsflow.training import train_step as ts_module
from capsflow.runners.gradcheck import random_batch
from capsflow.training.optim import SGD, Adam
from capsflow.training.train_step import RecordError, TrainStep


@pytest.fixture(scope="module")
def graph():
    return capsflow.compile("graphs/capsnet.yaml", {"routing_iters": 2})


def _train(graph, simulate, batches, optimizer=None):
    params = graph.init_params(0, "float64")
    opt = optimizer or Adam(1e-3)
    step = TrainStep(graph, params, opt, opt.init_state(params), outputs=["loss"],
                     simulate=simulate)
    losses = []
    for k, batch in enumerate(batches):
        losses.append(float(step.gradients(batch)["loss"]))
        step.update(lr=1e-3 * 0.5 ** k)  # a new learning rate every step
    return params, losses, step


def _batches(graph, sizes):
    return [random_batch(graph, n, seed) for seed, n in enumerate(sizes)]


def test_graph_path_matches_eager_steps(graph):
    batches = _batches(graph, [3, 3, 3, 2, 3])  # the 2-example batch runs eagerly
    p_eager, l_eager, s_eager = _train(graph, False, batches)
    p_graph, l_graph, s_graph = _train(graph, True, batches)
    assert s_eager.mode == "eager" and s_graph.mode == "replay"
    assert l_graph == l_eager
    for name in p_eager:
        np.testing.assert_array_equal(p_graph[name], p_eager[name])


def test_eager_step_is_value_and_grad_then_adam(graph):
    batch = random_batch(graph, 2, 7)
    params = graph.init_params(1, "float64")
    reference = {k: v.copy() for k, v in params.items()}
    opt = Adam(1e-3)
    state, ref_state = opt.init_state(params), opt.init_state(reference)
    step = TrainStep(graph, params, opt, state)
    out = step.gradients(batch)
    step.update()
    ref_out, grads = graph.value_and_grad(reference, batch)
    opt.step(reference, grads, ref_state)
    assert float(out["loss"]) == float(ref_out["loss"])
    for name in params:
        np.testing.assert_array_equal(params[name], reference[name])


def test_a_failed_recording_says_so_once_and_stays_eager(graph, monkeypatch, capsys):
    def refuse(xp, fn):
        raise RecordError("NotImplementedError: no recording here")
    monkeypatch.setattr(ts_module.record_step, "reference", refuse)
    batches = _batches(graph, [2, 2, 2])
    p_fallback, l_fallback, step = _train(graph, True, batches)
    p_eager, l_eager, _ = _train(graph, False, batches)
    assert step.mode == "eager" and l_fallback == l_eager
    err = capsys.readouterr().err
    assert err.count("recording the training step failed, running it op by op "
                     "(NotImplementedError") == 1


def test_a_failed_update_recording_applies_that_step_and_stays_eager(graph, monkeypatch, capsys):
    """The gradients half records, the update half does not: that step is applied op by
    op from the recorded gradients, and the run goes on eagerly with the same numbers."""
    real = ts_module.record_step.reference

    def refuse_updates(xp, fn):
        if getattr(fn, "__name__", "") == "_guarded_update":
            raise RecordError("NotImplementedError: no update recording here")
        return real(xp, fn)

    monkeypatch.setattr(ts_module.record_step, "reference", refuse_updates)
    batches = _batches(graph, [2, 2, 2])
    p_fallback, l_fallback, step = _train(graph, True, batches)
    p_eager, l_eager, _ = _train(graph, False, batches)
    assert step.mode == "eager" and l_fallback == l_eager
    for name in p_eager:
        np.testing.assert_array_equal(p_fallback[name], p_eager[name])
    assert capsys.readouterr().err.count("no update recording here") == 1


def test_replay_only_for_adam_and_an_update_needs_gradients(graph):
    params = graph.init_params(0, "float64")
    sgd = SGD(0.01)
    assert not TrainStep(graph, params, sgd, sgd.init_state(params), simulate=True).replay_wanted
    adam = Adam()
    step = TrainStep(graph, params, adam, adam.init_state(params))
    assert not step.replay_wanted  # NumPy, no simulation
    for off in (capsflow.Options(replay_steps=False), capsflow.Options(fast_paths=False)):
        assert not TrainStep(graph, params, adam, adam.init_state(params), backend=off,
                             simulate=True).replay_wanted
    with pytest.raises(RuntimeError, match="needs a gradients"):
        step.update()


def test_adam_advance_then_apply_is_step():
    rng = np.random.default_rng(0)
    p1 = {"w": rng.standard_normal((3, 4))}
    p2 = {"w": p1["w"].copy()}
    opt = Adam(1e-2)
    s1, s2 = opt.init_state(p1), opt.init_state(p2)
    for k in range(3):
        g = {"w": rng.standard_normal((3, 4))}
        opt.step(p1, g, s1, lr=0.01 / (k + 1))
        opt.apply(p2, g, s2, np.asarray(opt.advance(s2, lr=0.01 / (k + 1))))
    assert s1["t"] == s2["t"] == 3
    np.testing.assert_array_equal(p1["w"], p2["w"])


@pytest.mark.parametrize("simulate", [False, True])
def test_a_step_with_a_non_finite_loss_is_not_applied(graph, simulate):
    """update() skips a step whose loss is nan: on the host when eager, in the replayed
    update itself (Adam reads the flag the recording sets first) on the replay path; the
    steps around it are applied as usual."""
    good = _batches(graph, [3, 3])
    bad = {k: v.copy() for k, v in good[1].items()}
    bad["x"][0, 0, 0, 0] = np.nan
    params = graph.init_params(0, "float64")
    opt = Adam(1e-3)
    step = TrainStep(graph, params, opt, opt.init_state(params), outputs=["loss"],
                     simulate=simulate)
    for batch in good:  # an eager step, then (simulated) graphs
        step.gradients(batch)
        step.update()
    before = {k: v.copy() for k, v in params.items()}
    assert not np.isfinite(float(step.gradients(bad)["loss"]))
    step.update()
    assert step.mode == ("replay" if simulate else "eager")
    for name in params:
        np.testing.assert_array_equal(params[name], before[name])
    step.gradients(good[0])
    step.update()
    assert all(not np.array_equal(params[k], before[k]) for k in params)


def test_adam_with_a_go_flag_of_zero_changes_nothing():
    rng = np.random.default_rng(0)
    p = {"w": rng.standard_normal((3, 4))}
    opt = Adam(1e-2)
    state = opt.init_state(p)
    before = p["w"].copy()
    opt.apply(p, {"w": rng.standard_normal((3, 4))}, state, np.array([1e-2, 0.5, 0.0]))
    np.testing.assert_array_equal(p["w"], before)
    assert not state["m"]["w"].any()
    opt.apply(p, {"w": rng.standard_normal((3, 4))}, state, np.array([1e-2, 0.5, 1.0]))
    assert not np.array_equal(p["w"], before)


@pytest.mark.parametrize("simulate", [False, True])
def test_last_inputs_are_the_device_arrays_the_step_read(graph, simulate):
    """What the trainer counts correct predictions from: the batch as the step read it
    (replayed, the static buffers, which the next step's batch overwrites)."""
    params = graph.init_params(0, "float64")
    opt = Adam(1e-3)
    step = TrainStep(graph, params, opt, opt.init_state(params), simulate=simulate)
    for batch in _batches(graph, [2, 2, 2]):
        step.gradients(batch)
        np.testing.assert_array_equal(step.last_inputs["y"], batch["y"])
        assert step.last_inputs["x"].dtype == np.float64
        step.update()
    assert step.mode == ("replay" if simulate else "eager")
    assert simulate == (step._inputs is not None and step.last_inputs is step._inputs.buffers)
