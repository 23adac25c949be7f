"""Recipes (graphs/recipes/, runners/recipe.py) and ``capsflow reproduce``: every shipped
recipe reads and compiles; a recipe runs a few steps on real MNIST, resumes, stops on a
time budget and writes its row; bad recipes and misuse are one line."""
from __future__ import annotations

import json
import re

import pytest
from conftest import CAPSNET, REPO, SHARED_DATA, run_cli

import capsflow
from capsflow.runners.recipe import load_recipe, recipe_names
from capsflow.runners.training import read_metrics

needs_mnist = pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(),
                                 reason=f"real MNIST not found in {SHARED_DATA / 'mnist'}")

# A recipe of the real kind, made small: 1 routing iteration, batches of 20.
TINY_RECIPE = f"""\
name: tiny
row: "MNIST: tiny CapsNet"
graph: {CAPSNET}
set: {{routing_iters: 1}}
data: {{dataset: mnist}}
train:
  optimizer: adam
  lr: 1.0e-3
  lr_schedule: per-step
  lr_decay: 0.5
  decay_steps: 4
  min_lr: 2.0e-4
  batch_size: 20
  epochs: 2
  shift: 2
  seed: 0
paper: {{test_acc: 99.0, source: "a test"}}
"""
SMALL = ["--data-dir", str(SHARED_DATA), "--limit-train", "120", "--limit-test", "60",
         "--no-progress"]


def write_recipe(tmp_path, text: str = TINY_RECIPE, name: str = "tiny.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def epoch_records(folder) -> list:
    return [{k: v for k, v in r.items() if k != "seconds"}
            for r in read_metrics(folder / "metrics.jsonl")]


# ------------------------------------------------------------------- shipped recipes
def test_every_shipped_recipe_reads_and_its_graph_compiles():
    names = recipe_names()
    assert {"mnist-capsnet", "mnist-r1-recon", "mnist-r1-norecon", "mnist-r3-norecon",
            "mnist-baseline-cnn", "fashion-mnist-capsnet", "multimnist-capsnet",
            "mnist-capsnet-per-epoch", "fashion-mnist-capsnet-per-epoch",
            "affine-mnist-capsnet"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name, f"{name}.yaml names itself {recipe.name!r}"
        assert recipe.paper is not None and recipe.source
        capsflow.compile(recipe.graph, recipe.overrides)


def test_table_1_rows_differ_from_the_mnist_row_only_in_what_the_table_varies():
    """The ablation is fair: same data, optimizer, schedule, epochs and seed."""
    main = load_recipe("mnist-capsnet")
    assert main.config.lr_schedule == "per-step" and main.config.lr_decay == 0.96
    assert main.config.decay_steps == 2000 and main.config.min_lr == 1e-6
    expected = {"mnist-r1-recon": {"routing_iters": 1, "recon_weight": 0.0005},
                "mnist-r1-norecon": {"routing_iters": 1, "recon_weight": 0.0},
                "mnist-r3-norecon": {"routing_iters": 3, "recon_weight": 0.0}}
    for name, overrides in expected.items():
        recipe = load_recipe(name)
        assert recipe.overrides == overrides
        assert recipe.graph == main.graph and recipe.config == main.config
    fashion = load_recipe("fashion-mnist-capsnet")
    assert fashion.config.dataset == "fashion-mnist"
    assert fashion.config.lr_schedule == main.config.lr_schedule


def test_per_epoch_rows_differ_from_their_siblings_only_in_the_schedule():
    """Each dataset's row is offered with both schedules; nothing else may differ."""
    from dataclasses import replace
    for name in ("mnist-capsnet", "fashion-mnist-capsnet"):
        official, keras = load_recipe(name), load_recipe(f"{name}-per-epoch")
        assert keras.config.lr_schedule == "per-epoch" and keras.config.lr_decay == 0.9
        assert keras.config.num_epochs == 50
        assert (keras.graph, keras.overrides, keras.paper) == \
            (official.graph, official.overrides, official.paper)
        assert replace(keras.config, lr_schedule="per-step", lr_decay=0.96, min_lr=1e-6,
                       num_epochs=official.config.num_epochs) == official.config


def test_the_table_marks_a_target_that_is_not_a_paper_figure():
    from capsflow.runners.reproduce import results_table
    row = {"row": "R", "recipe": "r", "complete": True, "final_test_acc": 93.1,
           "best_test_acc": 93.2, "best_epoch": 7, "paper_test_acc": 93.7, "epochs": 50,
           "train_seconds": 300.0, "card": None}
    paper = results_table([dict(row, paper_source="Sabour et al. 2017, Table 1")])
    target = results_table([dict(row, paper_source="target (no paper figure)")])
    assert "| 93.70% |" in paper and "| 93.70% (target) |" in target


def test_list_shows_every_recipe(capsys):
    rc, out, err = run_cli(capsys, "reproduce", "--list")
    assert rc == 0, err
    for name in recipe_names():
        assert name in out
    assert "99.75%" in out


# --------------------------------------------------------------------------- running
@needs_mnist
def test_a_recipe_runs_resumes_and_writes_its_row(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    rc, out, err = run_cli(capsys, "reproduce", recipe, *SMALL, "--out", whole)
    assert rc == 0, err
    row = json.loads((whole / "row.json").read_text())
    assert row["recipe"] == "tiny" and row["epochs"] == 2 and row["epochs_planned"] == 2
    assert not row["complete"] and row["caveats"] == ["--limit-train 120", "--limit-test 60"]
    epochs = [r for r in read_metrics(whole / "metrics.jsonl") if r["kind"] == "epoch"]
    assert row["final_test_acc"] == round(100 * epochs[-1]["test_acc"], 2)
    assert row["best_test_acc"] == round(100 * max(r["test_acc"] for r in epochs), 2)
    assert row["paper_test_acc"] == 99.0 and "reproduce" in row["command"]
    assert row["card"]["backend"] == "numpy"
    # The per-step schedule, as the official code computes it: 6 steps an epoch, the
    # lr of epoch 2's last step (the 12th update, after 11) is 1e-3 * 0.5 ** (11 / 4),
    # floored at 2e-4.
    assert epochs[0]["lr"] == pytest.approx(1e-3 * 0.5 ** (5 / 4))
    assert epochs[1]["lr"] == pytest.approx(2e-4)

    # One epoch, then the same command (without --epochs) continues to the recipe's two.
    rc, out, err = run_cli(capsys, "reproduce", recipe, *SMALL, "--out", parts, "--epochs", "1")
    assert rc == 0, err
    assert json.loads((parts / "row.json").read_text())["epochs"] == 1
    rc, out, err = run_cli(capsys, "reproduce", recipe, *SMALL, "--out", parts)
    assert rc == 0, err
    assert "continuing" in out and "1 of 2 epoch(s) done" in out
    assert epoch_records(parts) == epoch_records(whole)   # number for number
    parts_row = json.loads((parts / "row.json").read_text())
    assert parts_row["final_test_acc"] == row["final_test_acc"]
    # the first sitting's --epochs 1 stays a caveat of the row (only its flags were read)
    assert parts_row["caveats"] == ["--limit-train 120", "--limit-test 60",
                                    "--epochs 1 (the recipe says 2)"]

    # Run again when it is all done: nothing is trained, the row is written again.
    rc, out, err = run_cli(capsys, "reproduce", recipe, *SMALL, "--out", parts)
    assert rc == 0 and "already holds all 2 epochs" in out

    png = tmp_path / "curves.png"
    rc, out, err = run_cli(capsys, "reproduce", "--table", tmp_path, "--plot", png)
    assert rc == 0, err
    assert out.count("| MNIST: tiny CapsNet") == 2 and "99.00%" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


@needs_mnist
def test_a_time_budget_stops_at_an_epoch_end_and_the_same_command_goes_on(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    out_dir = tmp_path / "run"
    argv = ["reproduce", recipe, *SMALL, "--out", out_dir, "--max-minutes", "0.0001"]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    row = json.loads((out_dir / "row.json").read_text())
    assert row["epochs"] == 1 and "1 of 2 epochs" in row["caveats"]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert json.loads((out_dir / "row.json").read_text())["epochs"] == 2


@needs_mnist
def test_a_folder_holding_a_train_run_is_refused_untouched(tmp_path, capsys):
    """No recipe.yaml but a run's files (capsflow train's): a sitting replaced best.npz
    and cut metrics.jsonl to its own."""
    recipe, out_dir = write_recipe(tmp_path), tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "best.npz").write_bytes(b"another run's")
    (out_dir / "metrics.jsonl").write_text('{"kind": "train"}\n')
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    rc, _, err = run_cli(capsys, "reproduce", recipe, *SMALL, "--out", out_dir)
    assert rc == 2 and "holds a training run that is no recipe's (its best.npz, " \
                       "metrics.jsonl, no recipe.yaml)" in err, err
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before


@needs_mnist
def test_a_folder_holding_another_recipes_run_is_refused_untouched(tmp_path, capsys):
    first = write_recipe(tmp_path)
    other = write_recipe(tmp_path, TINY_RECIPE.replace("seed: 0", "seed: 1"), "other.yaml")
    out_dir = tmp_path / "run"
    rc, _, err = run_cli(capsys, "reproduce", first, *SMALL, "--out", out_dir, "--epochs", "1")
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    rc, _, err = run_cli(capsys, "reproduce", other, *SMALL, "--out", out_dir)
    assert rc == 2 and "holds a run of another recipe" in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("change, message", [
    (("epochs: 2", "epochs: two"), "tiny.yaml:14: train.epochs is a string 'two', expected an integer >= 0"),
    (("  seed: 0", "  seed: 0\n  momentum: 0.9"), "tiny.yaml:17: unknown key 'momentum' in train"),
    (("lr_schedule: per-step", "lr_schedule: cosine"), "--lr-schedule must be one of per-epoch, per-step"),
    (("min_lr: 2.0e-4", "min_lr: 1.0"), "--min-lr must lie in [0, --lr 0.001], got 1.0"),
    (("dataset: mnist", "dataset: imagenet"), "imagenet"),
    ((f"graph: {CAPSNET}", "graph: nowhere.yaml"), "tiny.yaml:3: graph 'nowhere.yaml' is not a file"),
    (("row: \"MNIST: tiny CapsNet\"\n", ""), "the recipe has no 'row'"),
    (("test_acc: 99.0", "test_acc: 120"), "paper.test_acc is a test accuracy in %, got 120"),
    (("name: tiny", "name: [tiny]"), "tiny.yaml:1: 'name' must be a non-empty string, got a list"),
    (("name: tiny", "name: ../../escaped"), "tiny.yaml:1: 'name' must be a plain file name"),
    (("name: tiny", "name: /tmp/escaped"), "tiny.yaml:1: 'name' must be a plain file name"),
])
def test_a_bad_recipe_is_one_line_naming_the_file(change, message, tmp_path, capsys):
    recipe = write_recipe(tmp_path, TINY_RECIPE.replace(*change))
    rc, _, err = run_cli(capsys, "reproduce", recipe, "--out", tmp_path / "run")
    assert rc == 2 and message in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["no-such-recipe"], "no recipe 'no-such-recipe': not a file, and not one of affine-mnist"),
    ([], "name a recipe"),
    (["--table", "nowhere"], "--table nowhere is not a folder"),
    (["--plot", "x.png"], "--plot draws the rows of --table DIR"),
])
def test_misuse_is_one_line(argv, message, capsys):
    rc, _, err = run_cli(capsys, "reproduce", *argv)
    assert rc == 2 and message in err and "\n" not in err, err


GOOD_ROW = {"recipe": "r", "row": "R", "complete": True, "final_test_acc": 93.1,
            "best_test_acc": 93.2, "best_epoch": 7, "paper_test_acc": 93.7, "epochs": 50,
            "train_seconds": 300.0, "caveats": []}


@pytest.mark.parametrize("change, message", [
    ({"final_test_acc": "abc"}, "'final_test_acc' is a string \"abc\", expected a finite number"),
    ({"train_seconds": "x"}, "'train_seconds' is a string \"x\", expected a finite number"),
    ({"best_epoch": None, "paper_test_acc": [1]}, "'paper_test_acc' is a list [1]"),
    ({"final_test_acc": 250.0}, "'final_test_acc' is a number 250.0, expected a finite number "
                                "or null in [0, 100]"),
    ({"caveats": "abc"}, "'caveats' is a string, expected a list of strings"),
], ids=["text-accuracy", "text-seconds", "list-paper", "accuracy-250", "caveats-text"])
def test_a_damaged_row_is_one_line(tmp_path, capsys, change, message):
    """Each was an internal error or a table cell of 'nan%' or '(partial: a, b, c)'."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "row.json").write_text(json.dumps(dict(GOOD_ROW, **change)))
    rc, _, err = run_cli(capsys, "reproduce", "--table", tmp_path)
    assert rc == 2 and message in err and "\n" not in err.strip(), err
    (tmp_path / "a" / "row.json").write_text(json.dumps(GOOD_ROW))
    rc, out, err = run_cli(capsys, "reproduce", "--table", tmp_path)
    assert rc == 0 and "| R | `r` | 93.10% | 93.20% (7) |" in out, err


def test_a_huge_row_file_is_refused_unread(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    with (tmp_path / "a" / "row.json").open("wb") as f:
        f.truncate(2 << 30)  # sparse: 2 GB that take no disk, and would take 4 GB to read
    rc, _, err = run_cli(capsys, "reproduce", "--table", tmp_path)
    assert rc == 2 and "2,147,483,648 bytes, not a row written by capsflow reproduce" in err


def test_a_table_of_foreign_files_is_one_line(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "row.json").write_text('{"recipe": "x"}')
    rc, _, err = run_cli(capsys, "reproduce", "--table", tmp_path)
    assert rc == 2 and "not a row written by capsflow reproduce" in err



@pytest.mark.parametrize("text, message", [
    ("- a list\n- not a mapping\n", "a recipe is a mapping of name, row"),
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
     "g: [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n", "tiny.yaml"),
    ("name: x\nrow: y\n  bad indent: [\n", "tiny.yaml"),
])
def test_hostile_recipe_files_are_one_line(text, message, tmp_path, capsys):
    recipe = write_recipe(tmp_path, text)
    rc, _, err = run_cli(capsys, "reproduce", recipe, "--out", tmp_path / "run")
    assert rc == 2 and message in err and "\n" not in err, err


def test_the_gpu_sessions_default_recipes_are_shipped():
    """runners/gpu_session.sh names its default rows in bash; a renamed recipe would
    only show on a lent GPU, after its minutes were spent."""
    script = (REPO / "runners" / "gpu_session.sh").read_text()
    defaults = re.search(r"^default_recipes=\(([^)]*)\)", script, re.M)
    assert defaults, "gpu_session.sh no longer sets its default recipes as expected"
    names = defaults.group(1).split()
    assert names and set(names) <= set(recipe_names())


@needs_mnist
def test_sigterm_saves_the_run_and_writes_its_row(tmp_path):
    """A scheduler's or `timeout`'s SIGTERM mid-epoch is taken as Ctrl-C: the last
    completed step is saved and the row written (incomplete), with status 130."""
    import signal
    import subprocess
    import sys
    import time
    recipe, out_dir = write_recipe(tmp_path), tmp_path / "run"
    small = [str(a) for a in SMALL]
    small[small.index("--limit-train") + 1] = "4000"  # 200 steps an epoch: time to stop it
    proc = subprocess.Popen([sys.executable, "-m", "capsflow", "reproduce", str(recipe), *small,
                             "--out", str(out_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = out_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().strip()) and proc.poll() is None:
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    said, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, said
    assert "interrupted in epoch 1" in said
    row = json.loads((out_dir / "row.json").read_text())
    assert row["complete"] is False and row["epochs"] == 0
    assert (out_dir / "last.npz").is_file()
