"""Exact resume at the awkward moments: a run stopped in an epoch's evaluation, and one
whose epoch-end save then failed, continue to the metrics of an uninterrupted run (the
training review found the epoch record's learning rate and a duplicate epoch record)."""
from __future__ import annotations

import errno

import pytest
from conftest import assert_same_run
from test_data import _make_dataset
from test_hostile_runtime import write_graph

from capsflow.cli import main as cli_main
from capsflow.core.graph import Graph
from capsflow.runners import training
from capsflow.runners.training import read_metrics

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


def raising_on_call(monkeypatch, owner, name: str, number: int, error: BaseException):
    real, calls = getattr(owner, name), []

    def hooked(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise error
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, hooked)


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


# -- a run's folder is never overwritten without asking, and what resuming reads --------
def plain_flags(setting) -> list:
    """The setting's training flags with the default per-epoch schedule."""
    flags, _ = setting
    assert flags[-len(PER_STEP):] == PER_STEP
    return flags[:-len(PER_STEP)]


def test_a_fresh_run_into_a_run_folder_is_refused_unless_overwrite(setting, tmp_path, capsys):
    """A fresh run emptied metrics.jsonl at once and replaced last.npz and best.npz; one
    resumed into another run's folder trimmed that folder's metrics to its own."""
    flags, straight = setting
    folder = tmp_path / "kept"
    assert cli_main([*flags, "--num_epochs", "1", "--save_dir", str(folder)]) == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    capsys.readouterr()
    for extra in ([], ["--resume", str(straight / "last.npz")]):
        assert cli_main([*flags, "--save_dir", str(folder), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"capsflow train: error: {folder} already holds a training run "
                              f"(last.npz, best.npz, metrics.jsonl); ") and "\n" not in err
        assert ("--resume" in err) == (not extra) and "--overwrite" in err
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert cli_main([*flags, "--save_dir", str(folder), "--overwrite"]) == 0
    assert_same_run(folder, straight)


def test_resuming_into_a_new_folder_names_the_best_checkpoint_where_it_is(setting, tmp_path,
                                                                         capsys):
    flags, straight = setting
    first = tmp_path / "first"
    assert cli_main([*flags, "--num_epochs", "1", "--save_dir", str(first)]) == 0
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere"
    assert cli_main([*flags, "--resume", str(first / "last.npz"),
                     "--save_dir", str(elsewhere)]) == 0
    said = capsys.readouterr().out.strip().splitlines()[-1]
    best = elsewhere / "best.npz" if (elsewhere / "best.npz").is_file() else first / "best.npz"
    assert said.endswith(f"checkpoints: {elsewhere / 'last.npz'}, {best}") and best.is_file()


def test_a_last_line_cut_by_a_kill_does_not_block_resuming(setting, tmp_path):
    """A run killed while appending a record leaves half a line; resuming drops it (it
    was an error naming the line) and the run ends as an uninterrupted one."""
    flags, straight = setting
    out = tmp_path / "run"
    assert cli_main([*flags, "--num_epochs", "1", "--save_dir", str(out)]) == 0
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "epoch": 2, "iter')
    assert cli_main([*flags, "--resume", str(out / "last.npz")]) == 0
    assert_same_run(out, straight)


def test_schedule_flags_that_would_go_unused_are_refused(setting, tmp_path, capsys):
    flags = plain_flags(setting)
    for extra, said in ((["--min-lr", "1e-5"], "--min-lr belong to --lr-schedule per-step"),
                        (["--decay-steps", "5", "--min-lr", "0"],
                         "--decay-steps and --min-lr belong to --lr-schedule per-step"),
                        (["--lr-schedule", "per-step", "--lr", "5e-7"],
                         "--lr 5e-07 is below the per-step schedule's floor 1e-06; pass "
                         "--min-lr")):
        assert cli_main([*flags, "--save_dir", str(tmp_path / "x"), *extra]) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_metrics_file_on_a_full_disk_is_named(setting, tmp_path, capsys):
    flags = plain_flags(setting)
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")
    assert cli_main([*flags, "--save_dir", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'metrics.jsonl'}: cannot append a record (No space left on device)" in err


def test_resuming_on_other_training_data_is_refused(setting, tmp_path, capsys):
    """Another --data-dir holding a dataset of the same name (here the same count of
    other images) went on without a word."""
    flags, straight = setting
    other = tmp_path / "other"
    _make_dataset(other / "mnist", compress=False, n_train=40, n_test=20, seed=1)
    out = tmp_path / "run"
    assert cli_main([*flags, "--num_epochs", "1", "--save_dir", str(out)]) == 0
    data_at = flags.index("--data-dir") + 1
    moved = [*flags[:data_at], str(other), *flags[data_at + 1:]]
    capsys.readouterr()
    assert cli_main([*moved, "--resume", str(out / "last.npz")]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'last.npz'} was trained on other training data (40 examples, digest " in err
    assert cli_main([*flags, "--resume", str(out / "last.npz")]) == 0
    assert_same_run(out, straight)
