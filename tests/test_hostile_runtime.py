"""Hostile input at run time (issue 17): bad flags, crafted or damaged checkpoints, a
diverging run, resuming another graph, an incomplete --data-dir, a run killed by SIGKILL
at any moment, and the CLI's last resort for a bug. Every one ends in one line: exit
status 2 for the user's input, 1 for a bug in capsflow.

A linear model on synthetic IDX data keeps it fast; its ``ballast`` parameter (unused
by the loss) makes checkpoints big, and so slow to write, where a test needs that.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_data import _make_dataset

import capsflow.runners.check
from capsflow.cli import main as cli_main
from capsflow.errors import CapsflowError
from capsflow.runners import data as data_module
from capsflow.runners import train as train_module
from capsflow.runners.training import (CheckpointError, graph_from_checkpoint,
                                       read_checkpoint)
from capsflow.training.checkpoint import (TEMP_SUFFIX, _TEMP_NAME, load_npz,
                                         remove_stale_temporaries, same_file_atomic,
                                         save_npz_atomic)

GRAPH = """\
name: {name}
vars:
  ballast: 1
inputs:
  x: {{shape: [N, 1, 28, 28]}}
  y: {{shape: [N, 10], optional: true}}
params:
  w: {{shape: [784, 10], init: {{uniform_fan_in: 784}}}}
  b: {{shape: [10], init: zeros}}
  dec.w: {{shape: [10, 784], init: {{uniform_fan_in: 10}}}}
  dec.b: {{shape: [784], init: zeros}}
  ballast: {{shape: ["${{ballast}}"], init: zeros}}
nodes:
  - {{id: x_flat, op: reshape, in: [x], attrs: {{shape: [-1, 784]}}}}
  - {{id: lengths, op: linear, in: [x_flat, w, b]}}
  - {{id: dec, op: linear, in: [lengths, dec.w, dec.b]}}
  - {{id: recon, op: sigmoid, in: [dec]}}
  - {{id: margin, op: margin_loss, in: [lengths, y]}}
  - {{id: sse, op: sum_squared_error, in: [recon, x_flat]}}
  - {{id: recon_term, op: scale, in: [sse], attrs: {{by: 0.0005}}}}
  - {{id: per_example, op: add, in: [margin, recon_term]}}
  - {{id: mean_loss, op: mean, in: [per_example]}}
  - {{id: ballast_sum, op: sum, in: [ballast]}}
  - {{id: ballast_term, op: scale, in: [ballast_sum], attrs: {{by: 0.0}}}}
  - {{id: loss, op: add, in: [mean_loss, ballast_term]}}
outputs:
  loss: loss
  lengths: lengths
  recon: recon
"""

pytestmark = pytest.mark.usefixtures("no_user_data")


def write_graph(folder: Path, name: str = "tiny") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(GRAPH.format(name=name))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(graph, data root, a 1-epoch run's folder) shared by the tests that only read."""
    root = tmp_path_factory.mktemp("world")
    graph = write_graph(root)
    _make_dataset(root / "data" / "mnist", compress=False, n_train=40, n_test=20)
    run = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        assert cli_main(["train", str(graph), "--data-dir", str(root / "data"), "--bs", "10",
                         "--num_epochs", "1", "--no-progress", "--save_dir", str(run)]) == 0
    return graph, root / "data", run


def cli(capsys, *argv) -> tuple:
    """(exit status, stderr) of ``capsflow ARGV`` run in this process."""
    try:
        rc = cli_main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    return rc, capsys.readouterr().err.strip()


def one_line(capsys, *argv, status: int = 2) -> str:
    """The error line of a command that must fail with ``status`` and one line."""
    rc, err = cli(capsys, *argv)
    assert rc == status, err
    command = next(a for a in argv if not str(a).startswith("-"))
    assert err.startswith(f"capsflow {command}: ") and "\n" not in err, err
    return err


def train_args(world, save_dir, *flags) -> list:
    graph, data, _ = world
    return ["train", graph, "--data-dir", data, "--bs", "10", "--no-progress",
            "--save_dir", save_dir, *flags]


# ------------------------------------------------------------- last resort


def test_unexpected_exception_is_one_line_naming_the_bug(monkeypatch, capsys, world):
    def broken(args):
        return {}["no such key"]  # the bug, on this line

    monkeypatch.setattr(capsflow.runners.check, "main", broken)
    err = one_line(capsys, "check", world[0], status=1)
    line = broken.__code__.co_firstlineno + 1
    assert "bug in capsflow" in err and "KeyError" in err and "report it" in err
    assert f"tests/test_hostile_runtime.py:{line}" in err and "--debug" in err

    for argv in (["--debug", "check", world[0]], ["check", world[0], "--debug"]):
        rc, err = cli(capsys, *argv)
        assert rc == 1 and err.startswith("Traceback (most recent call last)"), err
        assert "bug in capsflow" in err.splitlines()[-1]


def test_user_errors_stay_one_line_with_status_2(monkeypatch, capsys, world, tmp_path):
    def refuses(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    def bad_input(args):
        raise CapsflowError("bad input")

    assert "unrecognized arguments: --nope" in one_line(capsys, "check", world[0], "--nope")
    monkeypatch.setattr(capsflow.runners.check, "main", refuses)
    err = one_line(capsys, "check", world[0])
    assert "Permission denied" in err and str(tmp_path / "x") in err
    monkeypatch.setattr(capsflow.runners.check, "main", bad_input)
    assert one_line(capsys, "check", world[0]) == "capsflow check: error: bad input"


def test_memory_that_the_sizes_cannot_get_is_a_user_error(monkeypatch, capsys, world):
    """A MemoryError comes from sizes the user chose (a batch, images, graph vars) that no
    earlier check refused: one line, status 2, not 'a bug in capsflow'."""
    def too_big(args):
        raise MemoryError("Unable to allocate 74.5 GiB for an array with shape (2, 1, 100000, "
                          "100000) and data type float32")

    monkeypatch.setattr(capsflow.runners.check, "main", too_big)
    assert one_line(capsys, "check", world[0]) == (
        "capsflow check: error: not enough memory (Unable to allocate 74.5 GiB for an array "
        "with shape (2, 1, 100000, 100000) and data type float32); smaller sizes (--bs, "
        "--image-size, --set ...) need less")
    rc, err = cli(capsys, "--debug", "check", world[0])      # where it came from, on request
    assert rc == 2 and err.startswith("Traceback (most recent call last)"), err
    assert "in too_big" in err and err.splitlines()[-1].startswith("capsflow check: error: ")

    def bare(args):
        raise MemoryError()

    monkeypatch.setattr(capsflow.runners.check, "main", bare)
    assert "error: not enough memory (MemoryError); smaller sizes" in one_line(
        capsys, "check", world[0])


# ------------------------------------------------------------------- flags


@pytest.mark.parametrize("flags, message", [
    (["eval", "--bs", "0"], "--bs must be >= 1"),
    (["eval", "--bs", "-1"], "--bs must be >= 1"),
    (["eval", "--limit-test", "-5"], "--limit-test must be >= 1"),
    (["train", "--seed", "-1"], "--seed must be >= 0"),
    (["train", "--num_epochs", "0"], "--num_epochs must be >= 1"),
    (["train", "--num_epochs", "-2"], "--num_epochs must be >= 1"),
    (["train", "--lr", "nan"], "--lr must be a finite number > 0"),
    (["train", "--lr", "inf"], "--lr must be a finite number > 0"),
    (["train", "--lr", "-0.1"], "--lr must be a finite number > 0"),
    (["train", "--limit-train", "-1"], "--limit-train must be >= 1"),
    (["train", "--limit-test", "0"], "--limit-test must be >= 1"),
    (["train", "--shift", "-2"], "--shift must be >= 0"),
    (["visualize", "--index", "-1"], "--index must be >= 0"),
])
def test_bad_numbers_stop_at_parsing(world, tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(train_module, "load_data", _no_work)
    command, *rest = flags
    graph, data, run = world
    required = {"train": ["--save_dir", tmp_path / "run"],
                "eval": ["--checkpoint", run / "last.npz"],
                "visualize": ["--checkpoint", run / "last.npz", "--out", tmp_path / "pics"]}
    argv = [command, graph, "--data-dir", data, *rest, *required[command]]
    assert message in one_line(capsys, *argv)
    assert not any(tmp_path.iterdir())


def test_inputs_the_cli_fuzzer_found(world, tmp_path, capsys):
    """tests/test_fuzz_cli.py's first campaign: a checkpoint that is a FIFO hung and
    /dev/zero was read until memory ran out; a newline typed into a path or a flag split
    the error line; a shift past the image size crashed in np.pad; a thread count past
    any machine's crashed in threadpoolctl. Each is one line now."""
    graph, data, run = world
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        start = time.perf_counter()
        err = one_line(capsys, "eval", graph, "--checkpoint", path, "--data-dir", data)
        assert err.endswith(f"{path} is not a regular file (a checkpoint is an .npz file)")
        assert time.perf_counter() - start < 10
    err = one_line(capsys, "eval", graph, "--checkpoint", "new\nline\x07.npz")
    assert err.endswith("no such file: new\\nline\\x07.npz"), err
    assert "invalid int value: 'v\\n'" in one_line(capsys, "train", graph, "--bs", "v\n")
    err = one_line(capsys, *train_args(world, tmp_path / "s", "--shift", "28"))
    assert err.endswith("--shift 28 is not less than the images' 28 pixels (height and width); "
                        "shifts of at most 27 keep some of each image"), err
    assert "--threads-per-job must be between 1 and 4,096" in one_line(
        capsys, "compare", graph, graph, "--threads-per-job", "901543451266510744692")


GOOD_TRAIN = '{"kind": "train", "epoch": 1, "iteration": 5, "loss": 0.5, "acc": 0.5, "lr": 0.1}'


@pytest.mark.parametrize("lines, message", [
    ([b"\xea\xff"], ":2: not UTF-8 text"),
    ([b"[1, 2]"], ":2: a list, not a metrics record (a JSON object)"),
    ([b'{"kind": "train"}'], ":2: a 'train' record without 'epoch'"),
    ([b'{"kind": "epoch", "epoch": 1, "iteration": 1, "train_loss": 1, "train_acc": 1,'
      b' "test_acc": "x", "test_loss": 1, "lr": 1, "seconds": 1}'],
     ":2: 'test_acc' is a string \"x\", expected a finite number or null"),
    ([GOOD_TRAIN.replace('"acc": 0.5', '"acc": 5').encode()], ":2: 'acc' is 5, not a fraction"),
    ([b'{"kind": "epoch", "epoch": 1, "iteration": 1, "train_loss": 1, "train_acc": 1,'
      b' "test_acc": 0.5, "test_loss": null, "lr": 1, "seconds": 1}'],
     ":2: 'test_loss' and 'test_acc' must be both null (an epoch not validated) or both"),
    ([GOOD_TRAIN.replace('"lr": 0.1', '"lr": NaN').encode()], ":2: 'lr' is a number NaN"),
    ([b"[" * 100_000], ":2: not a metrics record (nested too deeply)"),
    ([b"{" + b" " * (1 << 20) + b"}"], ":2: a line of more than 1048576 bytes"),
    ([GOOD_TRAIN.replace('"lr": 0.1', '"lr": 1' + "0" * 400).encode()],
     ":2: 'lr' is an integer 1000000000000000000000000000000000000000..."),
    ([GOOD_TRAIN.replace('"lr": 0.1', '"lr": 1' + "0" * 5000).encode()],
     ":2: not a metrics record (a number too long)"),
], ids=["non-utf8", "list", "missing-field", "string-field", "accuracy-5", "half-validated",
        "nan", "deep",
        "long-line", "integer-past-float", "number-too-long"])
def test_a_damaged_metrics_file_is_one_line(world, tmp_path, capsys, lines, message):
    """A metrics.jsonl is read by `visualize --metrics`, a resumed run and `reproduce
    --table`: a line that is not a whole record is one line naming the file and line
    (the CLI fuzzer's seed 102 found internal errors from all three)."""
    from capsflow.runners.metrics_file import read_metrics
    graph, data, run = world
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b"\n".join([GOOD_TRAIN.encode(), *lines]) + b"\n")
    with pytest.raises(CapsflowError) as caught:
        read_metrics(metrics)
    assert str(caught.value).startswith(f"{metrics}{message}"), caught.value
    err = one_line(capsys, "visualize", graph, "--checkpoint", run / "last.npz", "--out",
                   tmp_path / "pics", "--data-dir", data, "--limit-test", "8", "--count", "4",
                   "--metrics", metrics)
    assert f"{metrics}{message}" in err
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.copy(metrics, resumed / "metrics.jsonl")
    err = one_line(capsys, *train_args(world, tmp_path / "again", "--resume",
                                       resumed / "last.npz", "--num_epochs", "2"))
    assert f"{message}" in err


def test_metrics_that_are_not_a_file_are_refused_at_once(tmp_path):
    from capsflow.runners.metrics_file import read_metrics
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(CapsflowError, match="not a regular file"):
            read_metrics(path)


def test_curves_of_a_loss_of_zero_draw_without_a_warning(tmp_path):
    """A log axis cannot show a loss of 0: such curves (a hand-made file's) are linear."""
    import warnings
    from capsflow.runners.visualize import curves_figure
    record = {"kind": "train", "epoch": 1, "iteration": 1, "loss": 0.0, "acc": 1.0, "lr": 0.1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        curves_figure([record], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def _no_work(*args, **kwargs):
    raise AssertionError("the flags should have been refused before any data was loaded")


def test_save_dir_that_cannot_be_a_folder(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "load_data", _no_work)
    file = tmp_path / "a-file"
    file.write_text("not a folder")
    err = one_line(capsys, *train_args(world, file))
    assert f"--save_dir {file} is not a folder" in err
    err = one_line(capsys, *train_args(world, file / "run"))
    assert f"{file} is not a folder" in err
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "no permission to write" in one_line(capsys, *train_args(world, locked / "r"))
    assert file.read_text() == "not a folder"


# ------------------------------------------------------------- checkpoints


def craft(source: Path, target: Path, edit=None, **arrays) -> Path:
    """A copy of checkpoint ``source`` with ``edit(record)`` applied to its JSON meta
    record and entries replaced (``None`` deletes); keys use '__' for '/'."""
    with np.load(source) as f:
        entries = {k: f[k] for k in f.files}
    record = json.loads(str(entries["meta"]))
    if edit is not None:
        edit(record)
    entries["meta"] = np.asarray(json.dumps(record))
    for key, value in arrays.items():
        key = key.replace("__", "/")
        if value is None:
            entries.pop(key)
        else:
            entries[key] = value
    np.savez(target, **entries)
    return target


def _set(path: str, value):
    """An edit for ``craft``: set the field at 'a.b.c' to ``value``."""
    *parents, last = path.split(".")

    def change(record):
        for key in parents:
            record = record[key]
        record[last] = value
    return change


def _delete(key: str):
    return lambda record: record.pop(key)


BAD_META = {
    "epoch is text": _set("progress.epoch", "x"),
    "negative epoch": _set("progress.epoch", -1),
    "iteration is a float": _set("progress.iteration", 1.5),
    "sums are a list": _set("progress.epoch_sums", [1, 2]),
    "sums lack a count": lambda r: r["progress"]["window"].pop("count"),
    "iterator is a list": _set("progress.iterator", [1, 2]),
    "best accuracy is NaN": _set("progress.best_acc", float("nan")),
    "best accuracy is 500%": _set("progress.best_acc", 5.0),
    "no progress": _delete("progress"),
    "batch size is text": _set("config.batch_size", "x"),
    "batch size is zero": _set("config.batch_size", 0),
    "lr is a boolean": _set("config.lr", True),
    "lr is an integer past float's range": _set("config.lr", 10 ** 400),
    "unknown dtype": _set("config.dtype", "int8"),
    "dtype is a list": _set("config.dtype", ["float32"]),
    "data_dir is a number": _set("config.data_dir", 5),
    "config is text": _set("config", "x"),
    "options backend is a number": _set("config.options", {"backend": 3}),
    "unknown backend": _set("config.options", {"backend": "tpu"}),
    "overrides are a list": _set("overrides", [1]),
    "graph name is a number": _set("graph_name", 5),
    "spec files is text": _set("spec_files", "tiny.yaml"),
    "no spec files": _set("spec_files", []),
    "spec file name is a number": _set("spec_files", [1]),
    "a spec file twice": _set("spec_files", ["tiny.yaml", "tiny.yaml"]),
    "version is text": _set("version", "1"),
}


@pytest.mark.parametrize("case", list(BAD_META))
def test_checkpoint_metadata_of_the_wrong_type_is_one_line(world, tmp_path, capsys, case):
    graph, data, run = world
    ckpt = craft(run / "last.npz", tmp_path / "crafted.npz", BAD_META[case])
    with pytest.raises(CheckpointError):
        read_checkpoint(ckpt)
    err = one_line(capsys, "eval", graph, "--checkpoint", ckpt, "--data-dir", data)
    assert str(ckpt) in err
    err = one_line(capsys, *train_args(world, tmp_path / "resumed", "--resume", ckpt))
    assert str(ckpt) in err and not (tmp_path / "resumed").exists()


@pytest.mark.parametrize("edit, entries", [
    (_set("progress.iterator.rng", [1, 2]), {}),
    (_set("progress.iterator.position", 10 ** 6), {}),
    (None, {"optim__m__w": None}),
    (None, {"optim__v__w": np.zeros(3, np.float32)}),
    (_set("progress.iterator.rng.state.state", -1), {}),
    (_set("progress.iterator.rng.state.inc", 2 ** 200), {}),
    (None, {"optim__t": np.asarray(-1)}),
    (None, {"optim__m__w": lambda w: w.astype(np.int32)}),
    (None, {"optim__m__w": lambda w: w.astype(bool)}),
    (None, {"optim__m__w": lambda w: w.astype(np.float64)}),
    (None, {"optim__v__w": lambda w: w - 1}),
], ids=["rng-list", "position", "no-moment", "moment-shape", "rng-negative", "rng-huge",
        "step-negative", "moment-int", "moment-bool", "moment-float64", "variance-negative"])
def test_damaged_training_state_is_one_line_on_resume(world, tmp_path, capsys, edit, entries):
    """What only a resumed run reads: the batch order's state, the optimizer's. (The
    last seven were internal errors, or a negative v reported as the run diverging.)"""
    with np.load(world[2] / "last.npz") as stored:
        entries = {k: v(stored[k.replace("__", "/")]) if callable(v) else v
                   for k, v in entries.items()}
    ckpt = craft(world[2] / "last.npz", tmp_path / "crafted.npz", edit, **entries)
    err = one_line(capsys, *train_args(world, tmp_path / "resumed", "--resume", ckpt,
                                       "--num_epochs", "2"))
    assert str(ckpt) in err or "batch iterator state" in err


@pytest.mark.parametrize("entries", [
    {"meta": np.asarray("[" * 100_000)},                     # JSON nested too deeply
    {"meta": np.asarray("[]")},                               # not an object
    {"meta": np.arange(3)},                                   # not text
    {"spec__tiny.yaml": np.arange(3)},                        # spec text that is not text
    {"spec__tiny.yaml": None},                                # spec file missing
    {"param__w": np.full((784, 10), "a")},                    # parameters that are text
    {"param__b": np.full(10, np.nan, np.float32)},            # NaN parameters
    {"optim__t": np.asarray(1 + 2j)},                         # complex optimizer state
    {"meta": np.asarray('{"format": ' + "1" * 5000 + "}")},  # past Python's 4,300 digits
    {"param__w": np.zeros((10, 784), np.float32)},            # the graph's shape, transposed
    {"param__b": None},                                       # a parameter missing
], ids=["deep-json", "json-list", "meta-numbers", "spec-numbers", "spec-missing",
        "param-text", "param-nan", "optim-complex", "number-too-long", "param-shape",
        "param-missing"])
def test_damaged_checkpoint_entries_are_one_line(world, tmp_path, capsys, entries):
    graph, data, run = world
    ckpt = craft(run / "last.npz", tmp_path / "crafted.npz", **entries)
    err = one_line(capsys, "eval", graph, "--checkpoint", ckpt, "--data-dir", data)
    assert str(ckpt) in err


def test_truncated_or_corrupt_npz_is_one_line(world, tmp_path, capsys):
    """A seeded sample; a longer run of the same loop (4000 damaged files) found only
    CapsflowError after load_npz learnt the dozen exception types numpy and zipfile raise."""
    graph, data, run = world
    good = (run / "last.npz").read_bytes()
    rng = np.random.default_rng(0)
    damaged = [good[:n] for n in (0, 10, 100, len(good) // 2, len(good) - 1)]
    for _ in range(12):  # random bytes overwritten: headers, data, the zip directory
        copy = bytearray(good)
        start = int(rng.integers(0, len(good) - 16))
        copy[start:start + 16] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
        damaged.append(bytes(copy))
    for k, content in enumerate(damaged):
        path = tmp_path / f"damaged{k}.npz"
        path.write_bytes(content)
        try:
            read_checkpoint(path)  # a flip inside parameter data may still load
        except CapsflowError as exc:
            assert "\n" not in str(exc)
    half = tmp_path / "damaged3.npz"
    assert "truncated" in one_line(capsys, "eval", graph, "--checkpoint", half, "--data-dir", data)
    # A version byte zipfile does not know: NotImplementedError from zipfile itself.
    directory = good.index(b"PK\x01\x02")
    versioned = bytearray(good)
    versioned[directory + 6] = 0xFF  # "version needed to extract"
    path = tmp_path / "version.npz"
    path.write_bytes(bytes(versioned))
    assert "NotImplementedError" in one_line(capsys, "eval", graph, "--checkpoint", path,
                                             "--data-dir", data)


def test_a_checkpoint_that_unpacks_beyond_memory_is_refused_unread(world, tmp_path, capsys,
                                                                     monkeypatch):
    """A zip bomb: 256 MiB of deflated zeros is a file of a few hundred KiB. Against a
    pretend 128 MiB machine it is one line, from the sizes in the zip's directory,
    before a byte is unpacked; the real checkpoint still loads."""
    graph, data, run = world
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, **{"param/w": np.zeros(2**26, np.float32)})
    assert bomb.stat().st_size < 2**20
    monkeypatch.setattr("capsflow.core.memory.physical_memory", lambda: 2**27)
    unpacked = []
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__",
                        lambda self, key: unpacked.append(key))
    err = one_line(capsys, "eval", graph, "--checkpoint", bomb, "--data-dir", data)
    assert err.endswith(f"{bomb}: its arrays unpack to 256.0 MiB, more than this machine's "
                        f"128.0 MiB of memory; the file is damaged or not capsflow's"), err
    assert unpacked == []
    monkeypatch.undo()
    monkeypatch.setattr("capsflow.core.memory.physical_memory", lambda: 2**27)
    assert read_checkpoint(run / "last.npz").params
    # Less free than the machine has: the free memory is the bound (a 22 GiB bomb
    # passed on a 24 GiB machine with little free).
    monkeypatch.setattr("capsflow.core.memory.physical_memory", lambda: 2**30)
    monkeypatch.setattr("capsflow.core.memory.available_memory", lambda: 2**27)
    err = one_line(capsys, "eval", graph, "--checkpoint", bomb, "--data-dir", data)
    assert err.endswith("more than the 128.0 MiB of memory free now (of this machine's "
                        "1.0 GiB); the file is damaged or not capsflow's"), err


UNIQUE = f"capsflow-escape-{uuid.uuid4().hex}"


def _escapes(tmp_path: Path) -> dict:
    """Stored spec file names that would write outside the temporary spec folder."""
    return {"absolute": str(tmp_path / "escaped" / "evil.yaml"),
            "dot-dot": f"../{UNIQUE}/evil.yaml",
            "inner dot-dot": f"sub/../../{UNIQUE}.yaml",
            "backslash": "..\\evil.yaml",
            "empty part": "sub//evil.yaml"}


def _nothing_escaped(tmp_path: Path) -> bool:
    outside = [tmp_path / "escaped", Path(tempfile.gettempdir(), UNIQUE),
               Path(tempfile.gettempdir(), f"{UNIQUE}.yaml")]
    return not any(p.exists() for p in outside)


@pytest.mark.parametrize("main_file", [True, False], ids=["as-graph", "as-include"])
def test_stored_spec_names_never_become_paths(world, tmp_path, capsys, main_file):
    graph, data, run = world
    text = np.asarray(GRAPH.format(name="tiny"))
    for case, name in _escapes(tmp_path).items():
        names = [name] if main_file else ["tiny.yaml", name]
        ckpt = craft(run / "last.npz", tmp_path / "crafted.npz", _set("spec_files", names),
                     **{f"spec/{name}": text})
        shared = [graph, "--checkpoint", ckpt, "--data-dir", data]
        for argv in (["eval", *shared], ["visualize", *shared, "--out", tmp_path / "pics"]):
            err = one_line(capsys, *argv)
            assert "not a relative file name" in err, (case, err)
    assert _nothing_escaped(tmp_path) and not (tmp_path / "pics").exists()


def test_graph_from_checkpoint_checks_names_itself(world, tmp_path):
    """The second guard, for Checkpoint objects made by API users."""
    ckpt = read_checkpoint(world[2] / "last.npz")
    text = next(iter(ckpt.sources.values()))
    for name in _escapes(tmp_path).values():
        with pytest.raises(CheckpointError):
            graph_from_checkpoint(replace(ckpt, sources={"tiny.yaml": text, name: text}))
    assert _nothing_escaped(tmp_path)
    clash = replace(ckpt, sources={"a": text, "a/tiny.yaml": text})  # a file and a folder
    with pytest.raises(CheckpointError, match="cannot rebuild"):
        graph_from_checkpoint(clash)


# ---------------------------------------------------------------- training


def test_diverging_run_stops_without_saving(world, tmp_path, capsys):
    # One step per epoch: the step's loss is finite, the test loss after it is not.
    out = tmp_path / "one-step"
    err = one_line(capsys, *train_args(world, out, "--lr", "1e30", "--limit-train", "10",
                                       "--num_epochs", "3"))
    assert re.search(r"test loss became (nan|inf) after iteration 1 ", err), err
    assert "smaller --lr" in err
    assert not (out / "last.npz").exists() and not (out / "best.npz").exists()
    # Four steps per epoch: the second step's loss is not finite.
    out = tmp_path / "four-steps"
    err = one_line(capsys, *train_args(world, out, "--lr", "1e30"))
    assert re.search(r"the loss became (nan|inf) at iteration 2 ", err), err
    assert "no checkpoint was written" in err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]
    assert "NaN" not in (out / "metrics.jsonl").read_text()


def test_resuming_another_graphs_checkpoint_is_refused(world, tmp_path, capsys):
    graph, data, run = world
    other = write_graph(tmp_path, "other")  # same parameters, another graph
    before = (run / "last.npz").read_bytes()
    err = one_line(capsys, "train", other, "--data-dir", data, "--bs", "10", "--no-progress",
                   "--resume", run / "last.npz", "--num_epochs", "2")
    assert "checkpoint of graph 'tiny', not of 'other'" in err and str(other) in err
    assert (run / "last.npz").read_bytes() == before
    # eval and export evaluated it as the other graph's, with a note (exit 0)
    for command in (["eval", other, "--checkpoint", run / "last.npz", "--data-dir", data],
                    ["export", other, "--checkpoint", run / "last.npz", "-o",
                     tmp_path / "other.onnx"]):
        err = one_line(capsys, *command)
        assert "checkpoint of graph 'tiny', not of 'other'" in err
    assert not (tmp_path / "other.onnx").exists()


def test_explicit_data_dir_is_never_replaced(tmp_path, capsys, monkeypatch, world):
    graph, data, run = world
    monkeypatch.setenv("CAPSFLOW_DATA", str(data))  # a complete copy elsewhere
    monkeypatch.setattr(data_module, "default_data_root", lambda: data)
    partial = tmp_path / "partial" / "mnist"
    partial.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (partial / name).write_bytes((data / "mnist" / name).read_bytes())
    err = one_line(capsys, "eval", graph, "--checkpoint", run / "last.npz", "--data-dir",
                   partial.parent)
    assert f"{partial} lacks train-labels-idx1-ubyte, t10k-images-idx3-ubyte" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = one_line(capsys, *train_args(world, tmp_path / "run")[:2], "--data-dir", empty)
    assert f"mnist data not found in --data-dir {empty}: no IDX files" in err
    assert "t10k-images-idx3-ubyte" in err
    assert str(data) not in err


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead, alive = int(finished.stdout), os.getpid()
    stale = tmp_path / f".last.npz.{dead}.abc_123{TEMP_SUFFIX}"
    live = tmp_path / f".last.npz.{alive}.abc_123{TEMP_SUFFIX}"
    foreign = tmp_path / f".notes.{dead}.tmp"  # not capsflow's pattern
    for path in (stale, live, foreign):
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert live.exists() and foreign.exists()


def test_output_never_replaces_a_pipe_or_device_and_never_goes_through_a_link(tmp_path,
                                                                            capsys):
    """A FIFO (or a device: run as root, `-o /dev/null` once replaced /dev/null) where a
    file is to be written is refused, by the writer and by the flag check; a symbolic
    link is replaced and its target left as it was."""
    fifo = tmp_path / "out.npz"
    os.mkfifo(fifo)
    for write in (lambda: save_npz_atomic(fifo, {"w": np.zeros(2)}),
                  lambda: same_file_atomic(tmp_path / "x.npz", fifo)):
        with pytest.raises(OSError, match="not a regular file"):
            write()
        assert fifo.is_fifo()
    from capsflow.cli import check_output_file
    with pytest.raises(CapsflowError, match=f"^-o {fifo}: not a regular file .*; name a file$"):
        check_output_file(fifo, "-o")
    with pytest.raises(CapsflowError, match="not a regular file"):
        check_output_file("/dev/null", "-o")
    target = tmp_path / "notes.txt"
    target.write_text("precious")
    link = tmp_path / "link.npz"
    link.symlink_to(target)
    save_npz_atomic(link, {"w": np.zeros(2)})
    assert target.read_text() == "precious" and not link.is_symlink()
    assert list(load_npz(link)["w"]) == [0.0, 0.0]


@pytest.mark.parametrize("links", [True, False])
def test_last_checkpoint_as_the_best_one(tmp_path, monkeypatch, links):
    """best.npz becomes last.npz without a second write (a hard link renamed over it),
    or by a copy where links are refused; a later save of either leaves the other as
    it was, and no temporary file stays."""
    best, last = tmp_path / "best.npz", tmp_path / "last.npz"
    save_npz_atomic(best, {"w": np.arange(3.0)})
    save_npz_atomic(last, {"w": np.zeros(3)})
    made = []
    real_link = os.link

    def link(src, dst):
        made.append(Path(dst).name)
        if not links:
            raise PermissionError("no hard links on this file system")
        real_link(src, dst)
    monkeypatch.setattr(os, "link", link)
    same_file_atomic(best, last)
    assert _TEMP_NAME.match(made[0])  # a killed run's leftover would be cleaned up
    assert (best.stat().st_ino == last.stat().st_ino) == links
    assert list(load_npz(last)["w"]) == [0.0, 1.0, 2.0]
    save_npz_atomic(last, {"w": np.ones(3)})   # the next epoch's last.npz
    assert list(load_npz(best)["w"]) == [0.0, 1.0, 2.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.npz", "last.npz"]


def test_sigkill_at_any_moment_leaves_a_resumable_checkpoint(world, tmp_path):
    """`capsflow train` in a subprocess, killed with SIGKILL while it writes a checkpoint
    (a 12 MB ballast parameter makes each write take a while) and at a random moment
    after one: last.npz always loads, and the next run resumes and cleans up."""
    graph, data, _ = world
    run = tmp_path / "run"
    base = [sys.executable, "-m", "capsflow", "train", str(graph), "--data-dir", str(data),
            "--bs", "10", "--no-progress", "--save_dir", str(run), "--set",
            "ballast=3000000", "--lr-decay", "1"]
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    rng = np.random.default_rng(1)

    def temporaries() -> list:
        return [p for p in run.glob(f".*{TEMP_SUFFIX}")] if run.is_dir() else []

    def kill_when(flags: list, ready) -> None:
        proc = subprocess.Popen(base + flags, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not ready():
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "the run never reached the moment"
                time.sleep(0.001)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        read_checkpoint(run / "last.npz")  # whole and readable

    # 1. During the second checkpoint write (a good last.npz exists already).
    kill_when(["--num_epochs", "1000"],
              lambda: (run / "last.npz").exists() and bool(temporaries()))
    left = temporaries()
    assert left, "the kill should have landed during a write (a 45 ms window)"
    # 2. At a random moment after the next completed checkpoint.
    resume = ["--resume", str(run / "last.npz"), "--num_epochs", "1000"]
    written = (run / "last.npz").stat().st_mtime_ns
    wait_until = []

    def after_next_write() -> bool:
        if not wait_until and (run / "last.npz").stat().st_mtime_ns != written:
            wait_until.append(time.monotonic() + rng.uniform(0, 0.3))
        return bool(wait_until) and time.monotonic() >= wait_until[0]
    kill_when(resume, after_next_write)
    assert not any(p.exists() for p in left)  # removed by the run that started after

    # 3. The next run resumes, finishes one more epoch and leaves no temporary files.
    done = read_checkpoint(run / "last.npz").epoch
    finished = subprocess.run(base + ["--resume", str(run / "last.npz"), "--num_epochs",
                                      str(done + 1)], env=env, capture_output=True, text=True,
                              timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert read_checkpoint(run / "last.npz").epoch == done + 1
    assert temporaries() == []


def test_a_reader_that_leaves_early_is_no_error():
    """`capsflow reproduce --list | head -1`: the pipe closes before capsflow writes; that
    is the reader's choice, not a failure, so nothing goes to stderr and no bug is reported."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "capsflow", "reproduce", "--list"],
                              stdout=write_end, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 1
    assert done.stderr == b""


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_sigterm_saves_a_single_process_run(world, tmp_path, sigint):
    """A scheduler's SIGTERM (SLURM's at a time limit, `timeout`'s) stops `capsflow train`
    as Ctrl-C does: the last completed step is saved, status 130, and the run resumes.
    Also where SIGINT is ignored (a job that a script started in the background)."""
    graph, data, _ = world
    run = tmp_path / "run"
    base = [sys.executable, "-m", "capsflow", "train", str(graph), "--data-dir", str(data),
            "--bs", "10", "--no-progress", "--save_dir", str(run)]
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.Popen(base + ["--num_epochs", "100000"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_ignore_sigint if sigint == "ignored" else None)
    deadline = time.monotonic() + 60
    while not (run / "last.npz").exists():  # a few epochs in
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # SLURM signals every process: one may come twice
    said, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, said
    assert "interrupted in epoch" in said
    saved = read_checkpoint(run / "last.npz")
    assert saved.progress.iteration > 0
    finished = subprocess.run(base + ["--resume", str(run / "last.npz"), "--num_epochs",
                                      str(saved.epoch + 1)], env=env, capture_output=True,
                              text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
