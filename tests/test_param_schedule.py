"""A ``trainable: false`` parameter with a ``schedule`` (docs/spec.md, "params"): the
trainer sets it at each epoch's start, records it, saves it and sets it again on resume;
a bad schedule is one line naming the parameter. On test_frozen's tiny graph, whose
frozen ``gain`` lies on the way to the loss."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, ctrl_c_in_call, run_cli
from test_frozen import GRAPH

import capsflow
from capsflow.errors import SpecError
from capsflow.lang.spec import EpochSchedule
from capsflow.runners.training import read_checkpoint, read_metrics

FROZEN = "  gain: {shape: [10], init: {normal: 1.0}, trainable: false}\n"
SCHEDULED = ("  gain: {shape: [10], init: {constant: 1.0}, trainable: false,\n"
             "         schedule: {per_epoch: 0.5, until: 2.0}}\n")
EM_GRAPH = REPO / "graphs" / "capsnet-em.yaml"
assert FROZEN in GRAPH

pytestmark = pytest.mark.usefixtures("no_user_data")


def graph_text(gain_line: str = SCHEDULED) -> str:
    return GRAPH.replace(FROZEN, gain_line)


@pytest.mark.parametrize("start,step,until,expected", [
    (0.2, 0.1, 0.9, [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.9, 0.9]),
    (1.0, -0.25, 0.5, [1.0, 0.75, 0.5, 0.5]),
    (3.0, 0.0, 3.0, [3.0, 3.0]),
    (0.95, 0.0, 0.9, [0.95, 0.95]),     # a zero step keeps the start, wherever until is
])
def test_the_value_moves_each_epoch_and_stops_at_until(start, step, until, expected):
    schedule = EpochSchedule(step, until)
    got = [schedule.value_at(start, epoch) for epoch in range(len(expected))]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_the_em_graph_raises_its_margin_from_the_papers_start_to_its_end(capsys):
    graph = capsflow.compile(EM_GRAPH)
    margins = [graph.scheduled_values(epoch)["spread.margin"] for epoch in range(10)]
    np.testing.assert_allclose(margins, [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.9, 0.9],
                               atol=1e-12)
    assert graph.init_params(seed=0)["spread.margin"].tolist() == [np.float32(0.2)]
    fixed = capsflow.compile(EM_GRAPH, {"margin_per_epoch": 0})
    assert {fixed.scheduled_values(e)["spread.margin"] for e in range(10)} == {0.2}
    rc, out, _ = run_cli(capsys, "check", EM_GRAPH, "--quiet")
    assert rc == 0 and out.splitlines()[-1] == (
        "scheduled: spread.margin 0.2 in the first epoch, +0.1 per epoch, until 0.9")


@pytest.mark.parametrize("gain_line,message", [
    ("  gain: {shape: [10], init: {constant: 1.0}, schedule: {per_epoch: 0.5, until: 2.0}}\n",
     "parameter 'gain': a schedule sets the value at each epoch, so the optimizer must not: "
     "add trainable: false"),
    ("  gain: {shape: [10], init: {normal: 1.0}, trainable: false,"
     " schedule: {per_epoch: 0.5, until: 2.0}}\n",
     "parameter 'gain': a schedule starts from a constant init (zeros, ones or "
     "{constant: VALUE}), got normal"),
    ("  gain: {shape: [10], init: ones, trainable: false, schedule: {per_epoch: 0.5}}\n",
     "parameter 'gain': schedule must be {per_epoch: STEP, until: LAST}, got"),
    ("  gain: {shape: [10], init: ones, trainable: false, schedule: 0.5}\n",
     "parameter 'gain': schedule must be {per_epoch: STEP, until: LAST}, got 0.5"),
    ("  gain: {shape: [10], init: ones, trainable: false,"
     " schedule: {per_epoch: fast, until: 2.0}}\n",
     "parameter 'gain': schedule's per_epoch must be a finite number, got 'fast'"),
    ("  gain: {shape: [10], init: ones, trainable: false,"
     " schedule: {per_epoch: 0.5, until: .inf}}\n",
     "parameter 'gain': schedule's until must be a finite number, got inf"),
    ("  gain: {shape: [10], init: ones, trainable: false,"
     " schedule: {per_epoch: 0.5, until: 0.5}}\n",
     "parameter 'gain': schedule's per_epoch 0.5 moves up from the start 1, away from until 0.5"),
    ("  gain: {shape: [10], init: zeros, trainable: false,"
     " schedule: {per_epoch: -1, until: 1}}\n",
     "parameter 'gain': schedule's per_epoch -1 moves down from the start 0, away from until 1"),
])
def test_a_bad_schedule_is_one_line_naming_the_parameter(tmp_path, capsys, gain_line, message):
    path = tmp_path / "g.yaml"
    path.write_text(graph_text(gain_line))
    with pytest.raises(SpecError) as caught:
        capsflow.compile(path)
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"{path}:8: ")     # the parameter's line
    rc, _, err = run_cli(capsys, "check", path)
    assert rc == 2 and len(err.splitlines()) == 1 and message in err


def test_an_until_too_large_for_the_dtype_is_one_line(tmp_path, capsys):
    path = tmp_path / "g.yaml"
    path.write_text(graph_text("  gain: {shape: [10], init: ones, trainable: false,"
                               " schedule: {per_epoch: 1.0e+300, until: 1.0e+300}}\n"))
    graph = capsflow.compile(path)
    graph.init_params(seed=0, dtype="float64")                  # float64 holds it
    with pytest.raises(SpecError, match=f"^{path}:8: parameter 'gain': schedule's until "
                                        "1e\\+300 is too large for float32$"):
        graph.init_params(seed=0, dtype="float32")


@pytest.fixture
def train(tmp_path):
    """The train command's first words (the scheduled graph, 40 train / 20 test images),
    given the save folder."""
    from test_data import _make_dataset
    graph = tmp_path / "scheduled.yaml"
    graph.write_text(graph_text())
    _make_dataset(tmp_path / "data" / "mnist", compress=False, n_train=40, n_test=20)

    def command(save_dir: str) -> list:
        return ["train", graph, "--data-dir", tmp_path / "data", "--bs", "10", "--lr", "0.01",
                "--no-progress", "--save_dir", tmp_path / save_dir]
    return command


def epoch_records(run) -> list:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "epoch"]


def test_training_sets_records_and_saves_the_value_of_each_epoch(train, tmp_path, capsys):
    rc, out, err = run_cli(capsys, *train("run"), "--num_epochs", "4")
    assert rc == 0, err
    records = epoch_records(tmp_path / "run")
    assert [r["scheduled"] for r in records] == [{"gain": v} for v in (1.0, 1.5, 2.0, 2.0)]
    assert re.search(r"^epoch 2/4 .* lr \S+  gain 1\.5  \S+ s$", out, re.M), out  # its line
    saved = read_checkpoint(tmp_path / "run" / "last.npz")
    assert np.array_equal(saved.params["gain"], np.full(10, 2.0, np.float32))
    assert "gain" not in {key.partition("/")[2] for key in saved.optim}


def test_a_resumed_run_sets_the_value_of_its_epoch_and_matches_an_uninterrupted_one(
        train, tmp_path, capsys):
    """The value changes the loss (gain scales the logits), so a resumed run that kept the
    saved value instead of its epoch's would end with other parameters. Resumed at an
    epoch's end, then in the middle of epoch 2 (a Ctrl-C in its second step)."""
    assert run_cli(capsys, *train("whole"), "--num_epochs", "3")[0] == 0
    assert run_cli(capsys, *train("split"), "--num_epochs", "1")[0] == 0
    last = tmp_path / "split" / "last.npz"
    assert np.array_equal(read_checkpoint(last).params["gain"], np.full(10, 1.0, np.float32))
    with ctrl_c_in_call(2):
        assert run_cli(capsys, *train("split"), "--num_epochs", "3", "--resume", last)[0] == 130
    assert read_checkpoint(last).meta["progress"]["iteration"] == 5     # epoch 2, step 1
    rc, _, err = run_cli(capsys, *train("split"), "--num_epochs", "3", "--resume", last)
    assert rc == 0, err
    whole = read_checkpoint(tmp_path / "whole" / "last.npz")
    split = read_checkpoint(tmp_path / "split" / "last.npz")
    for name in whole.params:
        np.testing.assert_array_equal(split.params[name], whole.params[name], err_msg=name)
    assert epoch_records(tmp_path / "split") == [
        {**r, "seconds": s["seconds"]}
        for r, s in zip(epoch_records(tmp_path / "whole"), epoch_records(tmp_path / "split"))]


def test_every_data_parallel_rank_sets_the_value_of_its_epoch(train, tmp_path, capsys):
    """2 gloo ranks over 2 epochs end as one process does, to float32 round-off: a rank
    that kept the start value would give other gradients in the second epoch."""
    pytest.importorskip("torch.distributed")
    from test_distributed import clean_env

    from capsflow.runners.dist_check import worst_difference
    command = [str(part) for part in train("two")] + ["--num_epochs", "2"]
    rc, _, err = run_cli(capsys, *train("one"), "--num_epochs", "2")
    assert rc == 0, err
    result = subprocess.run([sys.executable, "-m", "capsflow", *command, "--nproc", "2",
                             "--dist-timeout", "30"], capture_output=True, text=True,
                            timeout=180, env=clean_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert [r["scheduled"] for r in epoch_records(tmp_path / "two")] == [{"gain": 1.0},
                                                                         {"gain": 1.5}]
    name, rel = worst_difference(tmp_path / "one" / "last.npz", tmp_path / "two" / "last.npz")
    assert rel <= 1e-5, (name, rel)
