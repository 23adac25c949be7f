"""Data-parallel training (runners/distributed.py) with 2 gloo ranks on the CPU.

2 ranks on a global batch give the parameters and optimizer state of one process on the
same batch, to float32 round-off, including an epoch's last, short batch that splits
unevenly (85 examples in batches of 20: the last 5 go 3 + 2); a run resumes with another
number of ranks; a killed rank ends the job with a nonzero status within a bound; misuse
is one line with exit status 2. Every subprocess runs under a timeout: nothing hangs.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import pytest
from conftest import CAPSNET, REPO, SHARED_DATA, process_runs

from capsflow.cli import main as cli_main
from capsflow.errors import CapsflowError
from capsflow.runners.dist_check import LAUNCHER_VARS, worst_difference
from capsflow.runners.dist_check import main as dist_check
from capsflow.runners.distributed import (DistributedError, World, env_config, share,
                                          strip_nproc, torch_stream_of)
from capsflow.runners.training import read_checkpoint, read_metrics

pytest.importorskip("torch.distributed")
needs_mnist = pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(),
                                 reason=f"real MNIST not found in {SHARED_DATA / 'mnist'}")

SMALL = ["--data-dir", str(SHARED_DATA), "--limit-train", "85", "--limit-test", "40",
         "--bs", "20", "--set", "routing_iters=1", "--set", "conv1_maps=16",
         "--set", "primary_types=4", "--disp", "1", "--no-progress", "--dist-timeout", "30"]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.pop("CAPSFLOW_DATA", None)
    return env


def run(*flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m capsflow train CAPSNET SMALL flags`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "capsflow", "train", str(CAPSNET), *SMALL,
                           *flags], capture_output=True, text=True, timeout=timeout,
                          env=clean_env(), cwd=REPO)


def in_process(*flags: str) -> int:
    return cli_main(["train", str(CAPSNET), *SMALL, *flags])


@contextlib.contextmanager
def running(cmd: list) -> Iterator[subprocess.Popen]:
    """``cmd`` started (output piped), killed on the way out if it still runs."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(), cwd=REPO)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def children_when(proc: subprocess.Popen, ready: Callable[[], bool], seconds: float,
                  what: str) -> list:
    """Wait (at most ``seconds``) until ``ready()`` while ``proc`` runs; -> its children's pids."""
    deadline = time.monotonic() + seconds
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()


def has_records(path: Path) -> bool:
    return path.is_file() and bool(path.read_text().strip())


def assert_same_state(a: Path, b: Path, tol: float = 1e-5) -> None:
    """Parameters and optimizer moments equal to float32 round-off."""
    name, rel = worst_difference(a, b)
    assert rel <= tol, (name, rel)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process: folders after 1 and after 2 epochs."""
    out = tmp_path_factory.mktemp("single")
    saved_env = {k: os.environ.pop(k) for k in LAUNCHER_VARS if k in os.environ}
    try:
        assert in_process("--num_epochs", "1", "--save_dir", str(out / "e1")) == 0
        assert in_process("--num_epochs", "2", "--save_dir", str(out / "e2")) == 0
    finally:
        os.environ.update(saved_env)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """2 gloo ranks, 1 epoch (through --nproc 2)."""
    out = tmp_path_factory.mktemp("two") / "e1"
    started = time.monotonic()
    result = run("--num_epochs", "1", "--save_dir", str(out), "--nproc", "2")
    assert result.returncode == 0, result.stderr
    return out, result, time.monotonic() - started


def test_share_splits_contiguously():
    assert [share(20, r, 2) for r in range(2)] == [slice(0, 10), slice(10, 20)]
    assert [share(5, r, 2) for r in range(2)] == [slice(0, 3), slice(3, 5)]
    assert [share(1, r, 3) for r in range(3)] == [slice(0, 1), slice(1, 1), slice(1, 1)]
    assert strip_nproc(["train", "g", "--nproc", "2", "--bs", "4", "--nproc=3"]) == \
        ["train", "g", "--bs", "4"]


@needs_mnist
def test_two_ranks_equal_one_process(single, two_ranks):
    out, result, _ = two_ranks
    assert_same_state(single / "e1" / "last.npz", out / "last.npz")
    one = read_metrics(single / "e1" / "metrics.jsonl")
    two = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in two] == [r["iteration"] for r in one] == [1, 2, 3, 4, 5, 5]
    for r1, r2 in zip(one, two):
        for key in ("loss", "train_loss", "test_loss"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-5)
        for key in ("acc", "train_acc", "test_acc"):
            if key in r1:
                assert r2[key] == r1[key]
    # rank 0 alone reports: one description line, one epoch line
    assert result.stdout.count("epoch 1/1") == 1 and "2 ranks (gloo)" in result.stdout


@needs_mnist
def test_resume_with_another_number_of_ranks(single, two_ranks, tmp_path):
    # 2 ranks wrote epoch 1; one process continues to epoch 2 ...
    two = tmp_path / "two"
    shutil.copytree(two_ranks[0], two)
    assert in_process("--num_epochs", "2", "--resume", str(two / "last.npz")) == 0
    assert_same_state(single / "e2" / "last.npz", two / "last.npz")
    # ... and the other way round: one process wrote epoch 1, 2 ranks continue
    one = tmp_path / "one"
    shutil.copytree(single / "e1", one)
    result = run("--num_epochs", "2", "--resume", str(one / "last.npz"), "--nproc", "2")
    assert result.returncode == 0, result.stderr
    assert_same_state(single / "e2" / "last.npz", one / "last.npz")


@needs_mnist
def test_a_killed_rank_stops_the_job(tmp_path):
    """Rank 1 killed (SIGKILL) mid-training: the launcher ends nonzero well within the
    collective timeout, saying which rank died."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "capsflow", "train", str(CAPSNET), *SMALL,
           "--limit-train", "2000", "--num_epochs", "5", "--save_dir", str(out),
           "--nproc", "2"]
    with running(cmd) as launcher:
        children = children_when(launcher, lambda: has_records(out / "metrics.jsonl"), 60,
                                 "training never started")
        assert len(children) == 2
        killed = time.monotonic()
        os.kill(int(children[1]), 9)
        _, err = launcher.communicate(timeout=45)
        took = time.monotonic() - killed
    assert launcher.returncode == 128 + 9
    assert "rank 1 of 2 was killed by signal 9 (SIGKILL)" in err
    assert took < 30, took


@needs_mnist
def test_a_stopped_launcher_stops_every_rank_after_the_same_step(tmp_path):
    """SIGTERM to `capsflow train --nproc 2` (a scheduler's stop, `timeout`'s) mid-epoch:
    it reaches both ranks, which stop after the same step (no rank left waiting in a
    collective); rank 0 saves that step, status 130; the run resumes and counts every step
    once."""
    out = tmp_path / "run"
    flags = ["--limit-train", "2000", "--num_epochs", "1", "--nproc", "2"]
    with running([sys.executable, "-m", "capsflow", "train", str(CAPSNET), *SMALL, *flags,
                  "--save_dir", str(out)]) as launcher:
        children = children_when(launcher, lambda: has_records(out / "metrics.jsonl"), 60,
                                 "training never started")  # both ranks are stepping
        launcher.send_signal(signal.SIGTERM)
        stdout, stderr = launcher.communicate(timeout=60)
    said = f"stdout:\n{stdout[-2000:]}\nstderr:\n{stderr[-3000:]}"
    assert launcher.returncode == 130, said
    assert "while stopping" not in stderr and "was killed" not in stderr, said
    assert "interrupted in epoch 1" in stdout, said
    assert not any(process_runs(pid) for pid in children)  # no rank left behind
    saved = read_checkpoint(out / "last.npz").progress.iteration
    logged = [r["iteration"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert 0 < saved < 100 and logged[-1] == saved
    resumed = run(*flags, "--save_dir", str(out), "--resume", str(out / "last.npz"))
    assert resumed.returncode == 0, resumed.stderr
    logged = [r["iteration"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert logged == list(range(1, 101))


@needs_mnist
def test_a_stop_during_evaluation_ends_it_within_a_batch(tmp_path):
    """2 steps, then a long evaluation (4000 test images in rounds of 2 x 20): SIGTERM
    during it stops both ranks at the same round; rank 0 saves the 2 steps (the epoch
    not finished), and the resumed run evaluates and ends the epoch."""
    out = tmp_path / "run"
    flags = ["--limit-train", "40", "--limit-test", "4000", "--num_epochs", "1", "--nproc", "2"]
    with running([sys.executable, "-m", "capsflow", "train", str(CAPSNET), *SMALL, *flags,
                  "--save_dir", str(out)]) as launcher:
        metrics = out / "metrics.jsonl"
        children_when(launcher, lambda: has_records(metrics) and
                      len(metrics.read_text().splitlines()) == 2, 60, "never evaluated")
        launcher.send_signal(signal.SIGTERM)
        stdout, stderr = launcher.communicate(timeout=60)
    said = f"stdout:\n{stdout[-2000:]}\nstderr:\n{stderr[-3000:]}"
    assert launcher.returncode == 130 and "while stopping" not in stderr, said
    assert "interrupted in epoch 1 after iteration 2" in stdout, said
    assert [r["kind"] for r in read_metrics(metrics)] == ["train", "train"]
    resumed = run(*flags, "--save_dir", str(out), "--resume", str(out / "last.npz"))
    assert resumed.returncode == 0, resumed.stderr
    assert [r["kind"] for r in read_metrics(metrics)] == ["train", "train", "epoch"]


def test_batch_not_divisible_is_one_line(capsys, monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    assert in_process("--bs", "21", "--nproc", "2") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--bs 21 is the global batch" in err


def test_world_size_without_rendezvous_is_one_line(capsys, monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert in_process("--num_epochs", "1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MASTER_ADDR, MASTER_PORT are empty or not set" in err
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert in_process("--nproc", "2") == 2
    assert "drop --nproc" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(Exception, match="RANK=5 does not lie"):
        env_config()


def test_the_ranks_on_this_machine_come_from_local_world_size():
    """LOCAL_WORLD_SIZE (the ranks sharing this machine's memory) is read with the rest of
    the launcher's settings; absent, a rank counts as alone; outside 1..WORLD_SIZE, one
    line."""
    env = {"RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert env_config(env)["local_world_size"] == 1
    assert env_config({**env, "LOCAL_WORLD_SIZE": "2"})["local_world_size"] == 2
    for bad in ("0", "5", "two"):
        with pytest.raises(DistributedError, match=f"LOCAL_WORLD_SIZE={bad!r}"
                           if bad == "two" else f"LOCAL_WORLD_SIZE={bad} does not lie"):
            env_config({**env, "LOCAL_WORLD_SIZE": bad})


def test_no_launcher_no_world(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    assert env_config() is None


class _FakeCuda:
    """torch.cuda as far as the stream choice goes, with ExternalStream(0)'s bug
    (pytorch/pytorch#182960: a fresh pooled stream, not the null stream)."""

    def __init__(self, current: int = 0, has_from_external: bool = True):
        self.current, self.pooled = current, 0x7000
        if has_from_external:
            self.get_stream_from_external = lambda ptr: ("wrapped", ptr)

    def default_stream(self):
        return ("wrapped", 0)

    def ExternalStream(self, ptr):
        self.pooled += 1
        return ("wrapped", ptr or self.pooled)

    def stream(self, s):
        self.current = s[1]
        return contextlib.nullcontext()

    def current_stream(self):
        return SimpleNamespace(cuda_stream=self.current)


def test_nccl_is_ordered_on_cupys_own_stream(monkeypatch):
    """CuPy's null stream is torch's default stream, never ExternalStream(0); another
    stream is wrapped as it is; a collective that would run anywhere else is refused."""
    for has_from_external in (True, False):
        torch = SimpleNamespace(cuda=_FakeCuda(has_from_external=has_from_external))
        assert torch_stream_of(torch, 0) == ("wrapped", 0)
        assert torch_stream_of(torch, 0x1234) == ("wrapped", 0x1234)

    import torch as real_torch
    cupy = SimpleNamespace(cuda=SimpleNamespace(
        get_current_stream=lambda: SimpleNamespace(ptr=0)))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    world = World(rank=0, world_size=1, local_rank=0, backend="nccl", timeout=5)
    ran = []
    monkeypatch.setattr(real_torch, "cuda", _FakeCuda(current=0x55))
    world._collective(lambda: ran.append(real_torch.cuda.current_stream().cuda_stream),
                      "all-reduce", flat=[0.0])
    assert ran == [0]  # on the null stream, where CuPy queued the gradients
    # torch left on a stream of its own (as ExternalStream(0) would make it): refused
    real_torch.cuda.current = 0x55
    monkeypatch.setattr(real_torch.cuda, "stream", lambda s: contextlib.nullcontext())
    with pytest.raises(DistributedError, match="not on CuPy's 0x0; it would race"):
        world._collective(lambda: ran.append("raced"), "all-reduce", flat=[0.0])
    assert ran == [0]


def test_bench_nproc_reports_scaling(tmp_path):
    fig_path = tmp_path / "fig.json"
    result = subprocess.run(
        [sys.executable, "-m", "capsflow", "bench", str(CAPSNET), "--set", "routing_iters=1",
         "--set", "conv1_maps=16", "--set", "primary_types=4", "--bs", "8", "--repeats", "2",
         "--warmup", "1", "--nproc", "2", "--json", str(fig_path)],
        capture_output=True, text=True, timeout=120, env=clean_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "scaling efficiency" in result.stdout and "2 ranks" in result.stdout
    import json
    fig = json.loads(fig_path.read_text())
    assert fig["nproc"] == 2 and len(fig["runs"]["2"]["seconds"]) == 2
    assert fig["efficiency"] == pytest.approx(fig["median_1"] / fig["median_n"] / 2)


def test_a_stopped_bench_nproc_says_interrupted():
    """SIGTERM while `capsflow bench --nproc 2` times one process: the timing run is
    stopped with it, and the command says it was interrupted (status 130)."""
    with running([sys.executable, "-m", "capsflow", "bench", str(CAPSNET), "--set",
                  "routing_iters=1", "--bs", "8", "--repeats", "100000", "--nproc", "2",
                  "--no-torch"]) as bench:
        worker = children_when(bench, lambda: Path(
            f"/proc/{bench.pid}/task/{bench.pid}/children").read_text().strip() != "", 60,
            "the timing run never started")
        bench.send_signal(signal.SIGTERM)
        _, err = bench.communicate(timeout=60)
    assert bench.returncode == 130, err
    assert err.strip().endswith("interrupted") and "failed" not in err, err
    assert not process_runs(worker[0])  # stopped with it


def test_a_bench_nproc_stopped_while_the_ranks_time_says_interrupted():
    """SIGTERM once `capsflow bench --nproc 2` has started its two timing ranks (after
    the one-process run): both ranks stop with it, and the command says it was
    interrupted (status 130), not that a run failed."""
    def ranks_started():
        path = Path(f"/proc/{bench.pid}/task/{bench.pid}/children")
        return len(path.read_text().split()) == 2
    with running([sys.executable, "-m", "capsflow", "bench", str(CAPSNET), "--set",
                  "routing_iters=1", "--bs", "8", "--repeats", "20", "--nproc", "2",
                  "--no-torch"]) as bench:
        ranks = children_when(bench, ranks_started, 240, "the 2-rank timing run never started")
        time.sleep(1.0)  # into their start-up (torch's import, the rendezvous)
        bench.send_signal(signal.SIGTERM)
        _, err = bench.communicate(timeout=60)
    assert bench.returncode == 130, err
    assert err.strip().endswith("interrupted") and "failed" not in err, err
    assert "Traceback" not in err, err
    assert not any(process_runs(rank) for rank in ranks)


def test_nproc_and_its_abbreviations_are_stripped_for_the_ranks():
    """argparse accepts --npr for --nproc; the ranks must not see it (each would refuse
    --nproc under a launcher). --n is ambiguous (--num_epochs), so argparse refuses it."""
    argv = ["train", "g.yaml", "--npr", "2", "--np=2", "--nproc", "2", "--nproc=2",
            "--no-progress", "--n", "--num_epochs", "1"]
    assert strip_nproc(argv) == ["train", "g.yaml", "--no-progress", "--n", "--num_epochs", "1"]


@needs_mnist
def test_a_user_error_met_by_every_rank_is_said_once(tmp_path):
    """Each rank of `train --nproc 2` meets the same wrong dataset; rank 0 says it, rank 1
    and the launcher add nothing: one line, status 2."""
    from test_hostile_runtime import GRAPH
    graph = tmp_path / "tiny.yaml"
    graph.write_text(GRAPH.format(name="tiny"))
    result = subprocess.run([sys.executable, "-m", "capsflow", "train", str(graph),
                             "--data-dir", str(SHARED_DATA), "--dataset", "affine-mnist",
                             "--nproc", "2", "--limit-train", "8", "--limit-test", "8",
                             "--bs", "4", "--no-progress", "--save_dir", str(tmp_path / "run")],
                            capture_output=True, text=True, env=clean_env(), cwd=REPO,
                            timeout=240)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(
        "capsflow train: error: ") and "--dataset affine-mnist has 1x40x40" in result.stderr


@pytest.mark.parametrize("rank, local_rank, local_world_size, silent", [
    (0, 0, 2, False), (1, 1, 2, True),      # one machine, 2 ranks: rank 0 says it
    (2, 0, 2, False), (3, 1, 2, True),      # the second of two machines: its local rank 0
    (3, 0, 1, False), (3, 3, None, False),  # ranks that may be alone on their machine
])
def test_a_user_error_is_said_once_per_machine(monkeypatch, rank, local_rank,
                                               local_world_size, silent):
    """A user error every rank meets is said by local rank 0 of each machine (each
    machine's log shows why); a rank's own DistributedError always."""
    from capsflow.cli import _said_by_rank_zero
    env = {"RANK": rank, "WORLD_SIZE": 4, "LOCAL_RANK": local_rank,
           "LOCAL_WORLD_SIZE": local_world_size, "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": 29500}
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(value))
    assert _said_by_rank_zero(CapsflowError("--dataset x has 1x40x40 images")) is silent
    assert _said_by_rank_zero(DistributedError("rank 1: collective timed out")) is False


def test_bench_nproc_batch_not_divisible(capsys):
    assert cli_main(["bench", str(CAPSNET), "--set", "routing_iters=1", "--bs", "9",
                     "--nproc", "2"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@needs_mnist
def test_auto_resume_continues_from_save_dir(single, tmp_path, capsys, monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run"
    out.mkdir()  # a restart before the first last.npz finds only metrics (it starts afresh)
    (out / "metrics.jsonl").write_text('{"kind": "train"}\n')
    assert in_process("--num_epochs", "1", "--save_dir", str(out), "--auto-resume") == 0
    assert "resuming" not in capsys.readouterr().out             # nothing to resume: fresh
    assert in_process("--num_epochs", "2", "--save_dir", str(out), "--auto-resume") == 0
    assert "resuming" in capsys.readouterr().out
    assert_same_state(single / "e2" / "last.npz", out / "last.npz")
    assert in_process("--auto-resume", "--resume", str(out / "last.npz")) == 2
    assert in_process("--auto-resume") == 2
    assert "--auto-resume needs --save_dir" in capsys.readouterr().err


@needs_mnist
def test_torchrun_restart_resumes_after_a_killed_rank(tmp_path):
    """torchrun --max-restarts 1 with --auto-resume: rank 1 killed in epoch 2, torchrun
    restarts both ranks, which continue from epoch 1's checkpoint and finish."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--max-restarts", "1", "-m", "capsflow", "train", str(CAPSNET), *SMALL,
           "--limit-train", "1500", "--num_epochs", "3", "--save_dir", str(out),
           "--auto-resume"]
    with running(cmd) as agent:
        # last.npz is written (atomically) after epoch 1
        children = children_when(agent, (out / "last.npz").is_file, 180, "epoch 1 never ended")
        os.kill(int(children[-1]), 9)
        stdout, stderr = agent.communicate(timeout=240)
    said = f"stdout:\n{stdout[-2000:]}\nstderr:\n{stderr[-3000:]}"
    assert agent.returncode == 0, said
    assert "resuming" in stdout and "1 epoch(s)" in stdout, said
    epochs = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert [r["iteration"] for r in epochs] == [75, 150, 225]


@needs_mnist
def test_dist_check_runs_a_world_of_one_against_one_process(capsys):
    """The GPU machine's NCCL check (runners/dist_check.py), here over gloo: a world of one
    rank, with the real collectives, gives the single process's parameters."""
    rc = dist_check(["--backend", "numpy", "--data-dir", str(SHARED_DATA), "--bs", "20",
                     "--limit-train", "60", "--set", "routing_iters=1", "--set", "conv1_maps=16",
                     "--set", "primary_types=4", "--timeout", "120"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "3 Adam steps of batch 20 on numpy" in out and "1 rank(s) over gloo" in out
    assert "-> match" in out


@needs_mnist
def test_dist_check_stops_a_run_past_its_timeout(capsys):
    """A run that hangs (here: one that needs longer than its 1 s) is killed, named, and
    the check ends with status 2 instead of waiting."""
    rc = dist_check(["--backend", "numpy", "--data-dir", str(SHARED_DATA), "--bs", "20",
                     "--limit-train", "60", "--timeout", "1"])
    out = capsys.readouterr().out
    assert rc == 2, out
    assert "the one process run failed (exit 124)" in out and "killed after 1 s" in out


# -- from the distributed review -----------------------------------------------------------
@needs_mnist
def test_ranks_that_start_from_different_states_are_one_line(single, tmp_path):
    """Rank 0 resumed (its machine's --save_dir held last.npz), rank 1 started afresh: they
    trained together on different parameters and rank 0 saved the mixture. Now both stop
    at start-up, saying so."""
    from capsflow.runners.distributed import free_port
    resumed = tmp_path / "resumed"
    shutil.copytree(single / "e1", resumed)
    env = dict(clean_env(), WORLD_SIZE="2", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    cmd = [sys.executable, "-m", "capsflow", "train", str(CAPSNET), *SMALL, "--num_epochs", "2"]
    ranks = [subprocess.Popen([*cmd, "--resume", str(resumed / "last.npz")],
                              env=dict(env, RANK="0", LOCAL_RANK="0"), cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE),
             subprocess.Popen([*cmd, "--save_dir", str(tmp_path / "fresh")],
                              env=dict(env, RANK="1", LOCAL_RANK="0"), cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    try:
        errors = [p.communicate(timeout=120)[1] for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in ranks] == [2, 2], errors
    assert "rank 1 runs with other training state than rank 0 (epoch 0, iteration 0" in errors[0]
    assert "every rank must resume from the same checkpoint" in errors[0]
    assert read_checkpoint(resumed / "last.npz").progress.epoch == 1  # nothing saved over it


def test_each_rank_draws_its_own_dropout_masks():
    """One seed for all ranks gave rank r's share the masks of rank 0's rows."""
    from capsflow.runners.training import dropout_seed
    seeds = [int(dropout_seed(0, 7, rank)) for rank in range(4)]
    assert len(set(seeds)) == 4 and seeds[0] == int(dropout_seed(0, 7))  # rank 0: one process's


def test_launch_refuses_too_many_ranks_and_stops_those_started_when_one_cannot_start(
        monkeypatch):
    import errno

    from capsflow.runners import distributed
    started = []

    class Rank:
        def __init__(self, *args, **kwargs):
            if len(started) == 2:
                raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
            self.returncode = None
            started.append(self)

        def poll(self):
            return self.returncode

        def terminate(self):
            self.returncode = -15

        def wait(self, timeout=None):
            return self.returncode

        kill = terminate

    monkeypatch.setattr(distributed.subprocess, "Popen", Rank)
    with pytest.raises(DistributedError, match=r"--nproc 100000 is more than 4 ranks for each"):
        distributed.launch(["train"], 100_000)
    assert started == []
    with pytest.raises(DistributedError, match=r"could not start rank 2 of 3 \(Resource "
                                               r"temporarily unavailable\); the ranks started "
                                               r"were stopped"):
        distributed.launch(["train"], 3)
    assert [r.returncode for r in started] == [-15, -15]


@needs_mnist
def test_ranks_stop_when_their_launcher_is_killed(tmp_path):
    """SIGKILL to `capsflow train --nproc 2` left both ranks training as orphans."""
    out = tmp_path / "run"
    with running([sys.executable, "-m", "capsflow", "train", str(CAPSNET), *SMALL,
                  "--limit-train", "2000", "--num_epochs", "1", "--nproc", "2",
                  "--save_dir", str(out)]) as launcher:
        children = children_when(launcher, lambda: has_records(out / "metrics.jsonl"), 60,
                                 "training never started")
        launcher.kill()
        launcher.communicate()
    deadline = time.monotonic() + 60
    while any(process_runs(pid) for pid in children):
        assert time.monotonic() < deadline, "a rank outlived its launcher"
        time.sleep(0.2)
    assert read_checkpoint(out / "last.npz").progress.iteration > 0  # they stopped, saving


def test_ranks_with_other_settings_are_told_which_one():
    """The line named the two whole configs (460 characters); now the field."""
    import json

    from capsflow.runners.distributed import _difference
    rank0 = json.dumps([{"lr": 0.001, "options": {"backend": "numpy"}}, ["routing_iters=1"]])
    rank1 = json.dumps([{"lr": 0.01, "options": {"backend": "numpy"}}, ["routing_iters=1"]])
    assert _difference(rank1, rank0) == "[0].lr: 0.01 vs 0.001"
    other = json.dumps([{"lr": 0.001, "options": {"backend": "cupy"}}, []])
    assert _difference(other, rank0) == '[0].options.backend: "cupy" vs "numpy"'
    assert _difference("epoch 0", "epoch 1") == "epoch 0 vs epoch 1"


def test_a_rank_never_waits_forever_to_join(monkeypatch):
    """An address that does not resolve is one line at once (it was 22 s of torch's retries
    and 51 lines of traces); a join that torch never ends (its store client on a port whose
    listener never answers) is ended by a watchdog past the timeout."""
    import threading

    import torch.distributed as dist

    from capsflow.runners import distributed
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    env = {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "no.such.host.invalid",
           "MASTER_PORT": "29511"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    with pytest.raises(DistributedError, match=r"rank 1: could not join the process group at "
                                               r"no.such.host.invalid:29511 within 3 s "
                                               r"\(MASTER_ADDR 'no.such.host.invalid' does "
                                               r"not resolve"):
        World.from_env("numpy", timeout=3)
    assert time.monotonic() - started < 10

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    gave_up = threading.Event()
    said = []
    monkeypatch.setattr(distributed, "JOIN_MARGIN", 0.2)
    monkeypatch.setattr(distributed, "_give_up", lambda line: (said.append(line), gave_up.set()))
    monkeypatch.setattr(distributed, "_store", lambda env, timeout: None)

    def stuck(*args, **kwargs):  # torch's join, waiting on a store that never answers
        assert gave_up.wait(10), "the watchdog never fired"
        raise RuntimeError("stopped by the test")
    monkeypatch.setattr(dist, "init_process_group", stuck)
    with pytest.raises(DistributedError):
        World.from_env("numpy", timeout=0.1)
    assert said == ["rank 1: could not join the process group at 127.0.0.1:29511 within "
                    "0.1 s (no answer)"]
