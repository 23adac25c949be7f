"""runners/step_memory.py: a batch that cannot fit in memory is one line before it runs.
The lower bound refuses what could never run; past a tenth of memory, the step is
measured at two small batches and extrapolated, and that estimate refuses the rest."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import CAPSNET

import capsflow
from capsflow.errors import CapsflowError
from capsflow.options import Options
from capsflow.runners import step_memory
from capsflow.runners.bench_worker import proc_status
from capsflow.runners.step_memory import (_traced_peak, _zero_inputs, check_forward_fits,
                                          check_step_fits)

SMALL = {"conv1_maps": 32, "primary_types": 8, "routing_iters": 2}


@pytest.fixture(scope="module")
def graph():
    return capsflow.compile(CAPSNET, SMALL)


def step_peak(graph, params, batch):
    inputs = _zero_inputs(graph, batch, list(graph.spec.inputs), "float32")
    return _traced_peak(lambda: graph.value_and_grad(params, inputs, Options(),
                                                     outputs=["loss", "lengths"]))


def forward_peak(graph, params, batch):
    inputs = _zero_inputs(graph, batch, ["x"], "float32")
    return _traced_peak(lambda: graph.run(params, inputs, Options(), outputs=["lengths"]))


@pytest.mark.parametrize("peak", [step_peak, forward_peak])
def test_the_peak_grows_along_the_line_through_two_probe_batches(graph, peak, monkeypatch):
    """The premise of the estimate: once the convolution's window copies are a single
    kernel row each (here from batch 13 on; CapsNet's PrimaryCaps at full size from 76),
    a step's traced peak is linear in the batch: the line through batches 40 and 80
    predicts batch 240."""
    from capsflow.backends.cpu import conv
    monkeypatch.setattr(conv, "CHUNK_BYTES", 2**20)
    params = graph.init_params(0)
    at_40, at_80, at_240 = (peak(graph, params, b) for b in (40, 80, 240))
    predicted = at_80 + (at_80 - at_40) / 40 * 160
    assert at_40 < at_80 < at_240
    assert predicted == pytest.approx(at_240, rel=0.1), (at_40, at_80, at_240)


def pretend_memory(monkeypatch, size):
    monkeypatch.setattr("capsflow.core.memory.physical_memory", lambda: size)


def test_a_step_the_bound_lets_through_is_measured_and_refused(graph, monkeypatch):
    """The memory is just above the lower bound (plus what the process holds): the bound
    passes, the measurement (a peak several times the bound) refuses, in one line."""
    from capsflow.core.memory import saved_for_backward_bytes
    monkeypatch.setattr(step_memory, "PROBE_BYTES", 2 * 2**20)
    monkeypatch.setattr(step_memory, "MEASURE_ABOVE", 0.0)  # whatever this process holds
    dag, plan = step_memory._lowered_plan(graph, Options(), set(graph.spec.inputs),
                                          ["loss", "lengths"], "loss")
    batch = 400
    bound = saved_for_backward_bytes(dag, plan, batch, 4)
    pretend_memory(monkeypatch, proc_status("VmRSS") + bound)
    lines = []
    with pytest.raises(CapsflowError) as info:
        check_step_fits(graph, Options(), batch, "float32", "lengths", log=lines.append)
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        f"a training step of capsnet at batch {batch} needs about ")
    assert "extrapolated), and the run holds " in message
    assert message.endswith("of memory; use a smaller --bs or smaller --set values")
    assert len(lines) == 1 and lines[0].startswith("measuring the memory of a training step")
    assert f"to extrapolate to batch {batch}" in lines[0]


def test_a_step_that_fits_is_measured_and_let_through(graph, monkeypatch):
    """With room for the real peak (measured here at the batch itself) the measurement
    lets the step through; far below a tenth of memory nothing is measured at all."""
    params = graph.init_params(0)
    batch = 200
    real = step_peak(graph, params, batch)
    held = proc_status("VmRSS") + 3 * sum(p.nbytes for p in params.values())
    monkeypatch.setattr(step_memory, "MEASURE_ABOVE", 0.0)  # measure whatever the bound
    pretend_memory(monkeypatch, held + 2 * real)
    lines = []
    check_step_fits(graph, Options(), batch, "float32", "lengths", log=lines.append)
    assert len(lines) == 1 and "at batches" in lines[0]
    monkeypatch.setattr(step_memory, "MEASURE_ABOVE", 0.1)
    pretend_memory(monkeypatch, 2**50)
    check_step_fits(graph, Options(), batch, "float32", "lengths", log=lines.append)
    assert len(lines) == 1


def test_ranks_on_one_machine_share_its_memory(graph, monkeypatch):
    """Data-parallel ranks on one machine each check their step against their share: the
    lower bound that one rank's step passes (to be measured) refuses two ranks' steps."""
    from capsflow.core.memory import saved_for_backward_bytes
    dag, plan = step_memory._lowered_plan(graph, Options(), set(graph.spec.inputs),
                                          ["loss", "lengths"], "loss")
    bound = saved_for_backward_bytes(dag, plan, 10, 4)
    pretend_memory(monkeypatch, int(1.5 * bound))
    with pytest.raises(CapsflowError, match=r"needs about .* more than this machine's "):
        check_step_fits(graph, Options(), 10, "float32", "lengths", log=lambda line: None)
    with pytest.raises(CapsflowError, match=r"keeps at least .*, more than .*, the share of "
                                            r"each of the 2 ranks on this machine of its "):
        check_step_fits(graph, Options(), 10, "float32", "lengths", ranks_here=2)


def test_a_forward_pass_the_bound_refuses_is_never_measured(graph, monkeypatch):
    params = graph.init_params(0)
    pretend_memory(monkeypatch, 2**20)
    lines = []
    with pytest.raises(CapsflowError, match=r"^a forward pass of capsnet at batch 100 keeps at "
                                            r"least .* in its largest value, more than this "
                                            r"machine's 1\.0 MiB of memory"):
        check_forward_fits(graph, params, Options(), 100, ["lengths"], ["x"], log=lines.append)
    assert lines == []
    # On CuPy the check is CuPy's own out-of-memory error: nothing is checked here.
    check_forward_fits(graph, params, Options(backend="cupy"), 100, ["lengths"], ["x"])


def test_eval_refuses_a_batch_that_cannot_fit_in_one_line(tmp_path, monkeypatch, capsys):
    """Through the command line: `capsflow eval` checks its forward passes' batch (the
    test split's size at most) before running them, and says which batch, in one line."""
    from capsflow.cli import main as cli_main
    from capsflow.runners.training import TrainConfig, Trainer, load_data
    from conftest import SHARED_DATA
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip("real MNIST not found")
    graph = capsflow.compile(CAPSNET, SMALL)
    config = TrainConfig(batch_size=10, num_epochs=1, limit_train=10, limit_test=10,
                         data_dir=str(SHARED_DATA))
    Trainer(graph, load_data(config), config, tmp_path, log=lambda line: None,
            progress_bar=False).fit()
    argv = ["eval", str(CAPSNET), "--checkpoint", str(tmp_path / "last.npz"),
            "--data-dir", str(SHARED_DATA), "--limit-test", "200", "--bs", "1000000"]
    pretend_memory(monkeypatch, 32 * 2**20)  # the checkpoint (22 MiB) loads; u_hat is 37 MB
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(
        "capsflow eval: error: a forward pass of capsnet at batch 200 keeps at least "), err
    pretend_memory(monkeypatch, None)
    assert cli_main(argv) == 0
    assert "test accuracy:" in capsys.readouterr().out

