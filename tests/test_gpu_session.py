"""runners/gpu_session.sh, the one-call GPU session, on the CPU: its checks before
anything runs, and its steps and logs with a stand-in interpreter that records its
calls (the device machine's real run is in docs/gpu.md)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

IDX = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


@pytest.fixture
def tree(tmp_path):
    """A checkout with the script, the recipes, a carried gpu-data/ and a python that
    records its arguments in calls.txt."""
    repo = tmp_path / "main"
    (repo / "runners").mkdir(parents=True)
    shutil.copy(REPO / "runners" / "gpu_session.sh", repo / "runners")
    shutil.copytree(REPO / "graphs" / "recipes", repo / "graphs" / "recipes")
    for name in ("mnist", "fashion-mnist"):
        (repo / "gpu-data" / name).mkdir(parents=True)
        for file in IDX:
            (repo / "gpu-data" / name / file).write_bytes(b"")
    python = tmp_path / "python"
    python.write_text(f'#!/bin/bash\necho "$*" >> {tmp_path}/calls.txt\necho "ran $*"\n')
    python.chmod(0o755)
    return repo


def session(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(repo.parent / "python"),
           "OUT": str(repo.parent / "out")}
    return subprocess.run(["bash", "runners/gpu_session.sh", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120)


def calls(repo: Path) -> list:
    path = repo.parent / "calls.txt"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("args, said", [
    (["run", "9", "mnist-capsnet-per-epcoh"],
     "no recipe 'mnist-capsnet-per-epcoh' (graphs/recipes/mnist-capsnet-per-epcoh.yaml)"),
    (["run", "9", "mnist-capsnet", "mnist-r1-recon", "mnist-r3-norecon"],
     "at most two recipes fit a call, got 3: mnist-capsnet mnist-r1-recon mnist-r3-norecon"),
    (["run", "1"], "MINUTES must be a whole number >= 2, got '1'"),
    (["run", "nine"], "MINUTES must be a whole number >= 2, got 'nine'"),
    (["sing"], "usage: bash runners/gpu_session.sh prepare"),
])
def test_what_a_call_needs_is_checked_before_anything_runs(tree, args, said):
    done = session(tree, *args)
    assert done.returncode == 2 and done.stderr.strip().startswith(said), done.stderr
    assert calls(tree) == []            # not even the install


def test_data_not_carried_is_one_line_before_the_install(tree):
    shutil.rmtree(tree / "gpu-data")
    done = session(tree, "run", "9")
    assert done.returncode == 2 and calls(tree) == []
    assert "gpu-data/mnist/train-images-idx3-ubyte.gz not found: run 'bash runners/" \
        "gpu_session.sh prepare' here and carry [\"gpu-data\"]" in done.stderr


def test_prepare_without_the_data_says_where_it_looked(tree):
    done = session(tree, "prepare")     # no ../shared beside this checkout
    assert done.returncode == 2
    assert done.stderr.strip() == ("gpu_session prepare: ../shared/data/mnist/train-images-"
                                   "idx3-ubyte.gz not found; run this in a checkout beside "
                                   "../shared")


def test_a_run_calls_every_step_and_keeps_their_statuses(tree):
    """run 09 is nine minutes (not an octal error); the steps run in order with their
    flags, and session.log keeps each step's exit status (the reply keeps only the tail)."""
    done = session(tree, "run", "09")
    assert done.returncode == 0, done.stderr
    made = calls(tree)
    assert made[0].startswith("-m pip install")
    steps = [call.split()[1] for call in made[1:]]
    assert steps == ["capsflow.runners.gpu_check", "capsflow.runners.dist_check",
                     "capsflow", "capsflow", "capsflow"]
    assert "reproduce mnist-capsnet-per-epoch --backend cupy" in made[4]
    assert "reproduce fashion-mnist-capsnet-per-epoch --backend cupy" in made[5]
    log = (tree.parent / "out" / "session.log").read_text()
    for name in ("gpu_check", "dist_check", "epoch", "mnist-capsnet-per-epoch",
                 "fashion-mnist-capsnet-per-epoch"):
        assert f"== {name}: exit 0 after" in log
    assert "ran -m capsflow reproduce fashion-mnist-capsnet-per-epoch" in log
    assert sorted(p.name for p in (tree.parent / "out").iterdir()) == [
        "dist_check.log", "epoch.log", "fashion-mnist-capsnet-per-epoch", "gpu_check.log",
        "mnist-capsnet-per-epoch", "session.log"]
