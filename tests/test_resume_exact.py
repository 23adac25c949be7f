"""Exact resume at the awkward moments: a run stopped in an epoch's evaluation, and one
whose epoch-end save then failed, continue to the metrics of an uninterrupted run (the
training review found the epoch record's learning rate and a duplicate epoch record)."""
from __future__ import annotations

import errno

import numpy as np
import pytest
from test_data import _make_dataset
from test_hostile_runtime import write_graph

from capsflow.cli import main as cli_main
from capsflow.core.graph import Graph
from capsflow.runners import training
from capsflow.runners.training import read_checkpoint, read_metrics

pytestmark = pytest.mark.usefixtures("no_user_data")

# A rate that halves every step: an epoch record with the next step's rate shows.
PER_STEP = ["--lr", "0.01", "--lr-schedule", "per-step", "--decay-steps", "1",
            "--lr-decay", "0.5", "--min-lr", "0"]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """(the training flags without --save_dir, an uninterrupted 2-epoch run's folder)."""
    root = tmp_path_factory.mktemp("resume")
    graph = write_graph(root)
    _make_dataset(root / "data" / "mnist", compress=False, n_train=40, n_test=20)
    flags = ["train", str(graph), "--data-dir", str(root / "data"), "--bs", "15",
             "--num_epochs", "2", "--disp", "1", "--no-progress", *PER_STEP]
    assert cli_main([*flags, "--save_dir", str(root / "straight")]) == 0
    return flags, root / "straight"


def without_time(records: list) -> list:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def raising_on_call(monkeypatch, owner, name: str, number: int, error: BaseException):
    real, calls = getattr(owner, name), []

    def hooked(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise error
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, hooked)


def assert_same_run(resumed, straight):
    assert without_time(read_metrics(resumed / "metrics.jsonl")) == \
        without_time(read_metrics(straight / "metrics.jsonl"))
    a, b = read_checkpoint(resumed / "last.npz"), read_checkpoint(straight / "last.npz")
    for name, value in b.params.items():
        assert np.array_equal(a.params[name], value), name
    for key, value in b.optim.items():
        assert np.array_equal(a.optim[key], value), key


def test_ctrl_c_in_the_evaluation_resumes_exactly(setting, tmp_path, monkeypatch):
    """Resumed with no batch left in epoch 1, the epoch's record had the rate of the
    step after it (0.000625 for 0.00125)."""
    flags, straight = setting
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        raising_on_call(m, Graph, "run", 1, KeyboardInterrupt())  # epoch 1's test pass
        assert cli_main([*flags, "--save_dir", str(out)]) == 130
    assert not [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "epoch"]
    assert cli_main([*flags, "--resume", str(out / "last.npz")]) == 0
    assert_same_run(out, straight)


def test_a_failed_epoch_end_save_after_resuming_writes_no_second_epoch_record(
        setting, tmp_path, monkeypatch, capsys):
    """Stopped in epoch 1's evaluation; resumed, the epoch's record is written and then
    its save fails (a full disk; a kill there leaves the same files). last.npz is still
    the one made in the evaluation, at the epoch record's iteration: resuming again kept
    the record and wrote it a second time."""
    flags, straight = setting
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        raising_on_call(m, Graph, "run", 1, KeyboardInterrupt())
        assert cli_main([*flags, "--save_dir", str(out)]) == 130
    with monkeypatch.context() as m:
        raising_on_call(m, training, "save_npz_atomic", 1,
                        OSError(errno.ENOSPC, "No space left on device"))
        assert cli_main([*flags, "--resume", str(out / "last.npz")]) == 2
    epochs = [r["epoch"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "epoch"]
    assert epochs == [1]
    capsys.readouterr()
    assert cli_main([*flags, "--resume", str(out / "last.npz")]) == 0
    assert_same_run(out, straight)
