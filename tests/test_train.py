"""`capsflow train` on a few hundred real MNIST images: loss, checkpoints, resume, errors.

Runs in-process through capsflow.cli.main with tiny settings (1 routing iteration,
batches of 20), so the whole file takes well under a minute on two cores.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CAPSNET, SHARED_DATA, assert_same_run

import capsflow
from capsflow.backends import get_backend
from capsflow.cli import main as cli_main
from capsflow.core.graph import Graph
from capsflow.options import Options
from capsflow.runners import training
from capsflow.runners.training import TrainConfig, read_checkpoint, read_metrics
from capsflow.training.train_step import TrainStep

pytestmark = [pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(),
                                reason=f"real MNIST not found in {SHARED_DATA / 'mnist'}"),
              pytest.mark.usefixtures("no_user_data")]

TINY = ["--data-dir", str(SHARED_DATA), "--limit-train", "120", "--limit-test", "60",
        "--bs", "20", "--set", "routing_iters=1", "--disp", "1", "--no-progress"]


def train(*flags: str) -> int:
    return cli_main(["train", str(CAPSNET), *TINY, *flags])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-epoch run: its folder."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert train("--num_epochs", "2", "--save_dir", str(out)) == 0
    return out


def test_loss_falls_and_checkpoints_are_written(reference, capsys):
    epochs = [r for r in read_metrics(reference / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[1]["test_loss"] < epochs[0]["test_loss"]
    assert epochs[1]["lr"] == pytest.approx(0.9e-3)          # default --lr-decay 0.9
    steps = [r for r in read_metrics(reference / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["iteration"] for r in steps] == list(range(1, 13))  # --disp 1, 6 steps/epoch

    ckpt = read_checkpoint(reference / "last.npz")
    assert ckpt.epoch == 2 and ckpt.meta["progress"]["iteration"] == 12
    assert ckpt.overrides == {"routing_iters": 1}
    assert ckpt.meta["config"]["batch_size"] == 20
    assert next(iter(ckpt.sources)) == "capsnet.yaml"
    assert int(ckpt.optim["t"]) == 12 and "m/digit.W" in ckpt.optim
    params = capsflow.load_params(reference / "last.npz")     # param/<name> keys
    graph = capsflow.compile(CAPSNET, {"routing_iters": 1})
    graph.check_params(params)
    assert all(p.dtype == np.float32 for p in params.values())
    best = read_checkpoint(reference / "best.npz")
    tested = [r["test_acc"] for r in epochs]
    assert best.meta["progress"]["best_acc"] == max(tested)


def test_interrupted_and_resumed_run_matches_uninterrupted(reference, tmp_path, monkeypatch,
                                                           capsys):
    out = tmp_path / "resumed"
    assert train("--num_epochs", "1", "--save_dir", str(out)) == 0

    # Ctrl-C in the middle of epoch 2: during the forward/backward of its 2nd batch.
    calls = {"n": 0}
    real = Graph.value_and_grad

    def interrupt_on_second(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Graph, "value_and_grad", interrupt_on_second)
    assert train("--resume", str(out / "last.npz"), "--num_epochs", "2") == 130
    assert "continue with --resume" in capsys.readouterr().out
    assert read_checkpoint(out / "last.npz").meta["progress"]["iteration"] == 7
    monkeypatch.setattr(Graph, "value_and_grad", real)

    assert train("--resume", str(out / "last.npz"), "--num_epochs", "2") == 0
    assert_same_run(out, reference)


def test_nan_loss_stops_with_one_line_and_keeps_last_good_checkpoint(tmp_path, monkeypatch,
                                                                      capsys):
    out = tmp_path / "nan"
    assert train("--num_epochs", "1", "--save_dir", str(out), "--limit-train", "40") == 0
    before = (out / "last.npz").read_bytes()
    real = Graph.value_and_grad

    def nan_loss(self, *args, **kwargs):
        outputs, grads = real(self, *args, **kwargs)
        return dict(outputs, loss=np.float32("nan")), grads

    monkeypatch.setattr(Graph, "value_and_grad", nan_loss)
    capsys.readouterr()
    assert train("--resume", str(out / "last.npz"), "--num_epochs", "2", "--limit-train", "40") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "loss became nan" in err and "last.npz (epoch 1)" in err
    assert (out / "last.npz").read_bytes() == before


def one_line_error(capsys, argv: list, command: str = "train") -> str:
    try:
        rc = cli_main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith(f"capsflow {command}: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("flags, message", [
    (["--bs", "0"], "--bs must be >= 1"),
    (["--opt", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["--lr-decay", "1.5"], "--lr-decay must lie in (0, 1]"),
    (["--num_epochs", "two"], "invalid int value"),
    (["--set", "no_such_var=1"], "unknown variable 'no_such_var'"),
    (["--backend", "tpu"], "invalid choice: 'tpu'"),
    (["--precision", "fp16"], "invalid choice: 'fp16'"),
])
def test_bad_flags_are_one_line(flags, message, capsys, tmp_path):
    argv = ["train", str(CAPSNET), *TINY, "--save_dir", str(tmp_path), *flags]
    assert message in one_line_error(capsys, argv)


def test_missing_data_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = one_line_error(capsys, ["train", str(CAPSNET), "--data-dir", str(empty),
                                  "--save_dir", str(tmp_path / "run")])
    assert "mnist data not found" in err and str(empty) in err and "--data-dir" in err


def test_corrupt_or_foreign_checkpoint_is_one_line(reference, tmp_path, capsys):
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes((reference / "last.npz").read_bytes()[:5000])
    err = one_line_error(capsys, ["train", str(CAPSNET), *TINY, "--resume", str(truncated)])
    assert "truncated" in err
    params_only = tmp_path / "params.npz"
    capsflow.save_params(params_only, {"w": np.zeros(3, np.float32)})
    err = one_line_error(capsys, ["train", str(CAPSNET), *TINY, "--resume", str(params_only)])
    assert "not a capsflow training checkpoint" in err
    err = one_line_error(capsys, ["train", str(CAPSNET), *TINY, "--resume",
                                  str(reference / "last.npz"), "--bs", "10"])
    assert "--bs 10 differs" in err


def test_checkpoint_meta_is_plain_json(reference):
    """No pickles: the checkpoint loads with allow_pickle=False and its meta is JSON."""
    with np.load(reference / "last.npz", allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        assert int(data["epoch"]) == meta["progress"]["epoch"] == 2
        assert "routing_iters" in str(data["spec/routing/paper.yaml"])


def test_options_reach_the_training_step_and_the_checkpoint(tmp_path, monkeypatch):
    """--precision tf32 and the other option flags make one Options object: the run's
    config, the TrainStep's backend and the checkpoint carry it, and a resumed run keeps
    the options it is not given."""
    seen = []

    class Recording(TrainStep):
        def __init__(self, *args, backend, **kwargs):
            seen.append(get_backend(backend).options)
            super().__init__(*args, backend=backend, **kwargs)

    monkeypatch.setattr(training, "TrainStep", Recording)
    short = ["--limit-train", "20", "--save_dir", str(tmp_path)]
    assert train("--num_epochs", "1", *short, "--precision", "tf32", "--no-fusion") == 0
    chosen = Options(precision="tf32", fusion=False)
    assert seen == [chosen]
    saved = read_checkpoint(tmp_path / "last.npz").meta["config"]
    assert TrainConfig.from_json(saved).options == chosen
    assert train("--num_epochs", "2", *short, "--resume", str(tmp_path / "last.npz"),
                 "--no-replay") == 0
    assert seen[-1] == chosen.replace(replay_steps=False)


def test_flips_are_a_setting_of_the_run(tmp_path, capsys):
    """--flip is said, stored in the checkpoint, kept on resume and cannot change there."""
    out = tmp_path / "flips"
    assert train("--num_epochs", "1", "--limit-train", "40", "--flip",
                 "--save_dir", str(out)) == 0
    assert "shifts up to 2 px, left-right flips, numpy float32" in capsys.readouterr().out
    assert read_checkpoint(out / "last.npz").meta["config"]["flip"] is True
    assert train("--num_epochs", "2", "--limit-train", "40",
                 "--resume", str(out / "last.npz")) == 0
    assert read_checkpoint(out / "last.npz").meta["config"]["flip"] is True
    plain = tmp_path / "plain"
    assert train("--num_epochs", "1", "--limit-train", "40", "--save_dir", str(plain)) == 0
    capsys.readouterr()
    assert train("--num_epochs", "2", "--limit-train", "40", "--flip",
                 "--resume", str(plain / "last.npz")) == 2
    assert "--flip True differs from the value False" in capsys.readouterr().err


def test_adam_tf1_reaches_the_step_and_is_kept_on_resume(tmp_path, capsys):
    """--opt adam-tf1 (TF1's epsilon, docs/training.md) is said, changes the numbers,
    is stored in the checkpoint and cannot change on resume."""
    runs = {}
    for opt in ("adam", "adam-tf1"):
        runs[opt] = tmp_path / opt
        assert train("--num_epochs", "1", "--limit-train", "40", "--opt", opt,
                     "--save_dir", str(runs[opt])) == 0
    assert "adam-tf1" in capsys.readouterr().out
    tf1 = read_checkpoint(runs["adam-tf1"] / "last.npz")
    assert tf1.meta["config"]["optimizer"] == "adam-tf1"
    torch_form = capsflow.load_params(runs["adam"] / "last.npz")
    changed = capsflow.load_params(runs["adam-tf1"] / "last.npz")
    assert not np.array_equal(torch_form["conv1.w"], changed["conv1.w"])
    assert train("--num_epochs", "2", "--limit-train", "40",
                 "--resume", str(runs["adam-tf1"] / "last.npz")) == 0
    assert read_checkpoint(runs["adam-tf1"] / "last.npz").epoch == 2
    capsys.readouterr()
    assert train("--num_epochs", "3", "--limit-train", "40", "--opt", "adam",
                 "--resume", str(runs["adam-tf1"] / "last.npz")) == 2
    assert "--opt adam differs from the value adam-tf1" in capsys.readouterr().err


def test_a_step_whose_activations_cannot_fit_is_refused_before_it_runs(tmp_path, capsys,
                                                                       monkeypatch):
    """Against a pretend 240 MiB machine (MNIST's training file, 45 MiB unpacked, fits
    with its float32 copy): the batch of 600 keeps more (262 MiB) for its backward pass;
    the message gives the bytes and what to shrink. Without a known size, no refusal."""
    monkeypatch.setattr("capsflow.core.memory.physical_memory", lambda: 240 * 2**20)
    assert train("--num_epochs", "1", "--limit-train", "600", "--bs", "600",
                 "--save_dir", str(tmp_path / "a")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(
        "capsflow train: error: a training step of capsnet at batch 600 keeps at least "), err
    assert err.endswith("MiB of activations for its backward pass, more than this machine's "
                        "240.0 MiB of memory; use a smaller --bs or smaller --set values")
    assert not (tmp_path / "a" / "last.npz").exists()
    monkeypatch.setattr("capsflow.core.memory.physical_memory", lambda: None)
    assert train("--num_epochs", "1", "--limit-train", "20", "--save_dir",
                 str(tmp_path / "b")) == 0
