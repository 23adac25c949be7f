"""`capsflow compare` end to end on a tiny budget of real MNIST: the table, the CSV, the
curves, and that every graph sees the same seed, batches and budget."""
from __future__ import annotations

import csv

import pytest
from conftest import CAPSNET, REPO, SHARED_DATA

import capsflow
from capsflow.cli import main as cli_main
from capsflow.runners.training import read_metrics

pytestmark = [pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(),
                                reason=f"real MNIST not found in {SHARED_DATA / 'mnist'}"),
              pytest.mark.usefixtures("no_user_data")]

LEAKY = REPO / "graphs" / "capsnet-leaky.yaml"
TINY = ["--data-dir", str(SHARED_DATA), "--limit-train", "8", "--limit-test", "6", "--bs", "4",
        "--set", "routing_iters=1", "--no-progress"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """capsnet, a differently named twin of it, and the leaky variant: 3 steps each."""
    out = tmp_path_factory.mktemp("compare")
    twin = out / "twin.yaml"
    twin.write_text(f"extends: {CAPSNET}\nname: twin\n")
    code = cli_main(["compare", str(CAPSNET), str(twin), str(LEAKY), "--steps", "3",
                     "--out", str(out), "--precision", "tf32", *TINY])
    return code, out


def test_compare_writes_the_table_csv_and_curves(compared, capsys):
    code, out = compared
    assert code == 0
    with (out / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["capsnet", "twin", "capsnet-leaky"]
    params = capsflow.compile(CAPSNET).param_count()
    for r in rows:
        assert int(r["parameters"]) == params and r["routing_iterations"] == "1"
        assert int(r["steps"]) == 3 and float(r["ms_per_step"]) > 0
        assert 0 <= float(r["test_acc"]) <= 1 and float(r["final_train_loss"]) > 0
    md = (out / "compare.md").read_text()
    assert "| variant | parameters | ms/step | final train loss | test accuracy | routing " \
           "iterations |" in md
    assert "| capsnet-leaky | 8,215,568 |" in md and "--steps 3" in md
    assert "--precision tf32" in md               # the options given, in the command line
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*/*.npz"))          # checkpoints only with --keep-checkpoints


def test_every_graph_gets_the_same_seed_batches_and_budget(compared):
    _, out = compared
    runs = {name: read_metrics(out / name / "metrics.jsonl")
            for name in ("capsnet", "twin", "capsnet-leaky")}
    # 8 examples in batches of 4: 2 steps per epoch, so 3 steps end inside epoch 2,
    # and the test split is evaluated once, after the last step.
    for records in runs.values():
        epochs = [r for r in records if r["kind"] == "epoch"]
        assert [r["iteration"] for r in epochs] == [2, 3]
        assert epochs[0]["test_acc"] is None and epochs[1]["test_acc"] is not None
    strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in runs[n]]
             for n in ("capsnet", "twin")]
    assert strip[0] == strip[1]                    # same init, batches and shifts: same numbers
    leaky = [r["loss"] for r in runs["capsnet-leaky"] if r["kind"] == "train"]
    paper = [r["loss"] for r in runs["capsnet"] if r["kind"] == "train"]
    assert leaky != paper


def test_compare_errors_are_one_line(tmp_path, capsys):
    uniform = REPO / "graphs" / "capsnet-uniform.yaml"
    assert cli_main(["compare", str(CAPSNET), str(uniform), "--steps", "1",
                     "--out", str(tmp_path), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown variable 'routing_iters'" in err[0]
    assert str(uniform) in err[0]
    assert cli_main(["compare", str(CAPSNET), str(CAPSNET), "--steps", "1",
                     "--out", str(tmp_path), *TINY]) == 2
    assert "are both named 'capsnet'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # by argparse, before any work
        cli_main(["compare", str(CAPSNET), "--steps", "0", "--out", str(tmp_path), *TINY])
    assert refused.value.code == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
