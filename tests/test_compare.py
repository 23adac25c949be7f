"""`capsflow compare` end to end on a tiny budget of real MNIST: the table, the CSV, the
curves, and that every graph sees the same seed, batches and budget."""
from __future__ import annotations

import csv
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CAPSNET, REPO, SHARED_DATA, process_runs

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


def _metrics_without_times(out, name):
    return [{k: v for k, v in r.items() if k != "seconds"}
            for r in read_metrics(out / name / "metrics.jsonl")]


def test_jobs_give_the_numbers_of_one_after_another(tmp_path, capfd):
    """--jobs 5 on two graphs runs them two at a time, each in its own process; with the
    same BLAS threads per job, every metrics record is that of the sequential run."""
    graphs = [str(CAPSNET), str(LEAKY)]
    seq, par = tmp_path / "seq", tmp_path / "par"
    assert cli_main(["compare", *graphs, "--steps", "3", "--out", str(seq),
                     "--threads-per-job", "1", *TINY]) == 0
    capfd.readouterr()
    assert cli_main(["compare", *graphs, "--steps", "3", "--out", str(par), "--jobs", "5",
                     "--threads-per-job", "1", *TINY]) == 0
    printed = capfd.readouterr().out.splitlines()
    for name in ("capsnet", "capsnet-leaky"):
        assert _metrics_without_times(seq, name) == _metrics_without_times(par, name)
        assert sum(line.startswith(f"[{name}] started (process ") for line in printed) == 1
        assert sum(line.startswith(f"[{name}] finished in ") for line in printed) == 1
    with (par / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["capsnet", "capsnet-leaky"]
    assert all(int(r["steps"]) == 3 and float(r["ms_per_step"]) > 0 for r in rows)
    md = (par / "compare.md").read_text()
    assert "trained 2 at a time (--jobs 5), each job with 1 BLAS thread(s)" in md
    assert "measured with 2 jobs sharing the machine" in md and "--jobs 5" in md


def test_a_failing_job_is_a_note_and_the_others_go_on(tmp_path, capfd):
    """A graph that compiles but that the trainer refuses (a capsflow error at run time)
    is its row's note; the other graph's row is complete; exit status 2 after the table."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {CAPSNET}\nname: bad\n"
                   f"inputs:\n  dropout_seed: {{shape: [2], optional: true}}\n")
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        assert cli_main(["compare", str(CAPSNET), str(bad), "--steps", "2", "--out", str(out),
                         "--jobs", jobs, *TINY]) == 2
        captured = capfd.readouterr()
        assert "1 of 2 graph(s) failed: bad" in captured.err
        assert "[bad] failed: graph input 'dropout_seed' has shape [2]" in captured.out
        with (out / "compare.csv").open() as f:
            rows = {r["variant"]: r for r in csv.DictReader(f)}
        assert rows["bad"]["note"].startswith("failed: graph input 'dropout_seed'")
        assert rows["bad"]["test_acc"] == "" and rows["capsnet"]["test_acc"] != ""
        assert int(rows["capsnet"]["steps"]) == 2 and rows["capsnet"]["note"] == ""


@pytest.mark.parametrize("jobs", ["0", "-1"])
def test_jobs_must_be_positive(tmp_path, capsys, jobs):
    with pytest.raises(SystemExit) as refused:
        cli_main(["compare", str(CAPSNET), "--jobs", jobs, "--out", str(tmp_path), *TINY])
    assert refused.value.code == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err


def test_an_earlier_compare_is_not_replaced_without_overwrite(tmp_path, capsys):
    """A second compare into the same --out replaced the first's metrics and deleted an
    interrupted graph's last.npz, without a word."""
    argv = ["compare", str(CAPSNET), "--steps", "2", "--out", str(tmp_path), *TINY]
    assert cli_main(argv) == 0
    before = (tmp_path / "capsnet" / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path} already holds a compare of capsnet" in err and "--overwrite" in err
    assert (tmp_path / "capsnet" / "metrics.jsonl").read_bytes() == before
    assert cli_main([*argv, "--overwrite"]) == 0


def test_merge_makes_one_table_of_separate_runs(tmp_path, capsys):
    """One run per graph (as one job-array task each), then --merge: one table, CSV and
    figure of both, each row as its own run wrote it."""
    for graph in (CAPSNET, LEAKY):
        assert cli_main(["compare", str(graph), "--steps", "2", "--out",
                         str(tmp_path / graph.stem), *TINY]) == 0
    merged = tmp_path / "all"
    assert cli_main(["compare", "--merge", str(tmp_path / "capsnet"),
                     str(tmp_path / "capsnet-leaky"), "--out", str(merged)]) == 0
    with (merged / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["capsnet", "capsnet-leaky"]
    for r in rows:
        with (tmp_path / r["variant"] / "compare.csv").open() as f:
            assert r == next(csv.DictReader(f))
    md = (merged / "compare.md").read_text()
    assert md.count("`capsflow compare ") == 2 and (merged / "compare.png").is_file()
    capsys.readouterr()
    assert cli_main(["compare", "--merge", str(tmp_path), "--out", str(merged)]) == 2
    assert "has no compare.csv" in capsys.readouterr().err
    # A damaged table is one line (they were a KeyError or ValueError traceback).
    table = tmp_path / "capsnet" / "compare.csv"
    good = table.read_text()
    header, row = good.splitlines()[:2]
    for text, said in (
            (good.replace("parameters", "params", 1), "no column 'parameters'"),
            (header + "\n" + row.replace("capsnet,", "../../etc,", 1) + "\n",
             ":2: not a row written by capsflow compare (variant '../../etc' is not a "
             "graph name)"),
            (good.replace(row.split(",")[2], "many", 1), ":2: not a row written by capsflow "
             "compare (invalid literal for int()")):
        table.write_text(text)
        assert cli_main(["compare", "--merge", str(tmp_path / "capsnet"), "--out",
                         str(tmp_path / "again")]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err


def test_sigterm_stops_the_jobs_and_keeps_their_work(tmp_path):
    """SIGTERM to `capsflow compare --jobs 2` (a scheduler's stop) while both jobs train:
    it is passed on to the jobs, each saves last.npz and answers; the table is written
    with both rows marked interrupted, status 130, and no job is left running."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "capsflow", "compare", str(CAPSNET),
                             str(LEAKY), "--steps", "100000", "--disp", "1", "--jobs", "2",
                             "--threads-per-job", "1", "--out", str(out), *TINY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        logs = [out / name / "metrics.jsonl" for name in ("capsnet", "capsnet-leaky")]
        while not all(log.is_file() and log.read_text().strip() for log in logs):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the jobs never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    with (out / "compare.csv").open() as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert {name: r["note"] for name, r in rows.items()} == \
        {"capsnet": "interrupted", "capsnet-leaky": "interrupted"}, stdout
    for name in rows:
        assert int(rows[name]["steps"]) > 0 and (out / name / "last.npz").is_file()
    jobs = re.findall(r"started \(process (\d+)\)", stdout)
    assert len(jobs) == 2 and not any(process_runs(pid) for pid in jobs)




def _wait_for_a_signal(ready) -> None:
    """A job process that has not yet installed its handlers: signals at their defaults."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ready.set()
    time.sleep(60)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_job_stopped_before_it_could_answer_is_interrupted_not_failed(signum):
    """A job still starting (spawn) when a stop comes dies by the signal without an answer:
    after a stop that is its interruption; without one it is a failure."""
    import multiprocessing as mp
    import os
    from capsflow.runners.compare import _collect
    graph = capsflow.compile(CAPSNET)
    ctx = mp.get_context("fork")
    notes = []
    for stopping in (True, False):
        receive, send = ctx.Pipe(duplex=False)
        ready = ctx.Event()
        process = ctx.Process(target=_wait_for_a_signal, args=(ready,), daemon=True)
        process.start()
        send.close()
        assert ready.wait(30)
        os.kill(process.pid, signum)
        notes.append(_collect((graph, process, receive, time.perf_counter()), stopping).note)
    assert notes[0] == "interrupted"
    assert notes[1] == ("failed: its process ended without an answer "
                        f"(killed by signal {int(signum)})")
