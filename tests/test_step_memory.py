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


def step_bound(graph, batch):
    """check_step_fits' lower bound: the saved activations or the largest value."""
    from capsflow.core.memory import largest_value_bytes, saved_for_backward_bytes
    dag, plan = step_memory._lowered_plan(graph, Options(), set(graph.spec.inputs),
                                          ["loss", "lengths"], "loss")
    return max(saved_for_backward_bytes(dag, plan, batch, 4),
               largest_value_bytes(dag, plan, batch, 4))


@pytest.fixture
def measured(monkeypatch):
    """Every check measures (whatever the bound), with small probe batches, single-row
    convolution chunks (the line's last part: see test_the_peak_grows_along_the_line),
    and this process's resident memory taken as 0, so that the estimate alone decides."""
    from capsflow.backends.cpu import conv
    monkeypatch.setattr(conv, "CHUNK_BYTES", 2**20)
    monkeypatch.setattr(step_memory, "MEASURE_ABOVE", 0.0)
    monkeypatch.setattr(step_memory, "PROBE_BYTES", 8 * 2**20)
    monkeypatch.setattr(step_memory, "proc_status", lambda field: 0)


@pytest.mark.parametrize("peak", [step_peak, forward_peak])
def test_the_peak_grows_along_the_line_through_two_probe_batches(graph, peak, measured):
    """The premise of the estimate: once the convolution's window copies are a single
    kernel row each (here from batch 13 on; CapsNet's PrimaryCaps at full size from 76),
    a step's traced peak is linear in the batch: the line through batches 40 and 80
    (``extrapolate``) predicts batch 240."""
    params = graph.init_params(0)
    at_40, at_80, at_240 = (peak(graph, params, b) for b in (40, 80, 240))
    assert at_40 < at_80 < at_240
    predicted = step_memory.extrapolate(40, at_40, 80, at_80, 240)
    assert predicted == pytest.approx(at_240, rel=0.1), (at_40, at_80, at_240)


def pretend_memory(monkeypatch, size):
    monkeypatch.setattr("capsflow.core.memory.physical_memory", lambda: size)


@pytest.mark.parametrize("room, fits", [(0.85, False), (1.3, True)])
def test_a_measured_step_is_refused_or_let_through_by_its_real_peak(graph, monkeypatch,
                                                                    measured, room, fits):
    """Memory for the parameters, Adam's moments and ``room`` x the step's real traced
    peak (measured here at the batch itself): the estimate (with its margin) refuses
    0.85 x and lets 1.3 x through, so it lies within about 20% of the real peak. The
    lower bound alone would pass both."""
    params = graph.init_params(0)
    batch = 200
    real = step_peak(graph, params, batch)
    assert step_bound(graph, batch) < 0.85 * real
    pretend_memory(monkeypatch, 3 * sum(p.nbytes for p in params.values()) + int(room * real))
    lines = []
    check = lambda: check_step_fits(graph, Options(), batch, "float32", "lengths",  # noqa: E731
                                    log=lines.append)
    if fits:
        check()
    else:
        with pytest.raises(CapsflowError) as info:
            check()
        message = str(info.value)
        assert "\n" not in message and message.startswith(
            f"a training step of capsnet at batch {batch} needs about ")
        assert "extrapolated, with a 10% margin), and the run holds " in message
        assert message.endswith("of memory; use a smaller --bs or smaller --set values")
    assert len(lines) == 1 and lines[0].startswith("measuring the memory of a training step")
    assert f"to extrapolate to batch {batch}" in lines[0]


def test_nothing_is_measured_far_below_a_tenth_of_memory(graph, monkeypatch):
    lines = []
    pretend_memory(monkeypatch, 2**50)
    check_step_fits(graph, Options(), 200, "float32", "lengths", log=lines.append)
    assert lines == []


@pytest.mark.parametrize("room, fits", [(0.85, False), (1.3, True)])
def test_a_measured_forward_pass_is_refused_or_let_through(graph, monkeypatch, measured,
                                                           room, fits):
    params = graph.init_params(0)
    real = forward_peak(graph, params, 200)
    pretend_memory(monkeypatch, int(room * real))
    check = lambda: check_forward_fits(graph, params, Options(), 200, ["lengths"],  # noqa: E731
                                       ["x"], log=lambda line: None)
    if fits:
        check()
    else:
        with pytest.raises(CapsflowError, match=r"^a forward pass of capsnet at batch 200 "
                                                r"needs about "):
            check()


def test_ranks_on_one_machine_share_its_memory(graph, monkeypatch, measured):
    """Data-parallel ranks on one machine each check their step against their share: the
    lower bound that one rank's step passes (to be measured) refuses two ranks' steps."""
    bound = step_bound(graph, 10)
    pretend_memory(monkeypatch, int(1.5 * bound))
    # One rank passes the bound and is measured (and then refused: the parameters alone
    # do not fit this pretend machine).
    with pytest.raises(CapsflowError, match=r"needs about .* more than this machine's "):
        check_step_fits(graph, Options(), 10, "float32", "lengths", log=lambda line: None)
    with pytest.raises(CapsflowError, match=r"keeps at least .*, more than .*, the share of "
                                            r"each of the 2 processes training on this machine of its "):
        check_step_fits(graph, Options(), 10, "float32", "lengths", processes_here=2)


def mnist_run(batch_size: int) -> tuple:
    """(config, data) of a run on 40 real MNIST images (skips without them)."""
    from conftest import SHARED_DATA
    from capsflow.runners.training import TrainConfig, load_data
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip("real MNIST not found")
    config = TrainConfig(batch_size=batch_size, num_epochs=1, limit_train=40, limit_test=10,
                         data_dir=str(SHARED_DATA))
    return config, load_data(config)


def test_the_trainer_checks_a_ranks_share_against_the_ranks_on_its_machine(graph, monkeypatch):
    """A Trainer joined to a world of 2 ranks on this machine checks half the batch against
    half the memory, before it makes parameters or talks to the other rank."""
    from capsflow.runners.distributed import World
    from capsflow.runners.training import Trainer
    config, data = mnist_run(40)
    pretend_memory(monkeypatch, int(1.5 * step_bound(graph, 20)))
    world = World(rank=0, world_size=2, local_rank=0, backend="gloo", timeout=5,
                  local_world_size=2)
    with pytest.raises(CapsflowError, match=r"training step of capsnet at batch 20 keeps at "
                                            r"least .* the share of each of the 2 processes"):
        Trainer(graph, data, config, "/nonexistent/never-written", log=lambda line: None,
                progress_bar=False, world=world)


def test_a_compare_job_checks_its_step_against_its_share(graph, monkeypatch):
    """`compare --jobs 2` trains two graphs at once, each on the whole batch: each job's
    step is checked against half of the machine's memory."""
    from capsflow.runners.compare import train_one
    config, data = mnist_run(20)
    pretend_memory(monkeypatch, int(1.5 * step_bound(graph, 20)))
    with pytest.raises(CapsflowError, match=r"training step of capsnet at batch 20 keeps at "
                                            r"least .* the share of each of the 2 processes"):
        train_one(graph, data, config, 1, "/nonexistent/never-written", jobs=2)


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
            "--data-dir", str(SHARED_DATA), "--limit-test", "300", "--bs", "1000000"]
    # The checkpoint (22 MiB) and MNIST's test file (37 MiB with its float32 copy) load;
    # u_hat at batch 300 takes 53 MiB.
    pretend_memory(monkeypatch, 40 * 2**20)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(
        "capsflow eval: error: a forward pass of capsnet at batch 300 keeps at least "), err
    pretend_memory(monkeypatch, None)
    assert cli_main(argv) == 0
    assert "test accuracy:" in capsys.readouterr().out

