"""The data-parallel check: N ranks against one process, on GPUs (NCCL) or CPUs (gloo).

    python -m capsflow.runners.dist_check --backend cupy --data-dir ROOT [--ranks 1]

Trains the same short run twice with ``capsflow train``: once as one plain process (on
CuPy its steps are recorded and replayed), once as ``--ranks`` ranks under the launcher's
environment (each rank op by op, its gradients all-reduced through torch.distributed:
NCCL for CuPy, gloo for NumPy). With one rank (a one-GPU machine) the all-reduce is the
real collective over a world of one. Then compares the parameters and Adam's moments in
the two last.npz files (to float32 round-off: each array within ``--tol`` of its largest
magnitude) and prints each run's epoch time. Exit status 0 when they match, 1 when not, 2
for a run that failed or outlasted ``--timeout``.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from capsflow.runners.training import read_metrics

CAPSNET = Path(__file__).resolve().parent.parent / "graphs" / "capsnet.yaml"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT")


def worst_difference(a: Path, b: Path) -> tuple:
    """(name, relative difference) of the parameter or optimizer array of two
    checkpoints that differs most, relative to the array's largest magnitude."""
    x, y = np.load(a), np.load(b)
    keys = sorted(k for k in x.files if k.startswith(("param/", "optim/")))
    other = sorted(k for k in y.files if k.startswith(("param/", "optim/")))
    if not keys or keys != other:
        return "the arrays saved", float("inf")
    worst = (keys[0], 0.0)
    for k in keys:
        scale = max(float(np.abs(x[k]).max()), 1e-30)
        rel = float(np.abs(x[k].astype(np.float64) - y[k]).max()) / scale
        worst = max(worst, (k, rel), key=lambda kv: kv[1])
    return worst


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(argv: list, save_dir: Path, ranks: int | None, timeout: float) -> tuple:
    """``capsflow train ARGV`` as one process (``ranks`` None) or as ``ranks`` ranks.
    Returns (completed process, the epoch's seconds from its metrics: its steps, their
    recording and the test batch). A run past ``timeout`` seconds is killed and comes
    back with exit status 124 and what it printed."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    cmd = [sys.executable, "-m", "capsflow", "train", *argv, "--save_dir", str(save_dir)]
    if ranks == 1:  # a world of one, as torchrun would set it up
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    elif ranks:
        cmd += ["--nproc", str(ranks)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:  # its output comes as bytes, whatever text=
        printed = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                   for x in (exc.stdout, exc.stderr)]
        done = subprocess.CompletedProcess(cmd, 124, *printed)
        done.stderr += f"\nkilled after {timeout:g} s (--timeout)"
    seconds = None
    if done.returncode == 0:
        epoch = [r for r in read_metrics(save_dir / "metrics.jsonl") if r["kind"] == "epoch"][-1]
        seconds = epoch["seconds"]
    return done, seconds


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = parser.add_argument
    a("--backend", default="cupy", choices=("numpy", "cupy"))
    a("--data-dir", required=True, help="data root with mnist/")
    a("--ranks", type=int, default=1, help="ranks of the data-parallel run (default 1)")
    a("--bs", type=int, default=100, help="global batch (default 100)")
    a("--limit-train", type=int, default=2000, help="training images: steps = this / bs")
    a("--set", dest="overrides", action="append", default=[], metavar="VAR=VALUE")
    a("--tol", type=float, default=1e-5, help="relative tolerance (default 1e-5)")
    a("--timeout", type=float, default=600,
      help="seconds each run may take before it is killed (default 600)")
    args = parser.parse_args(argv)
    common = [str(CAPSNET), "--backend", args.backend, "--data-dir", args.data_dir,
              "--limit-train", str(args.limit_train), "--limit-test", str(args.bs),
              "--bs", str(args.bs), "--num_epochs", "1", "--no-progress",
              *[w for o in args.overrides for w in ("--set", o)]]
    with tempfile.TemporaryDirectory(prefix="capsflow-dist-check-") as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "ranks"
        started = time.perf_counter()
        runs = []
        # Each run's outcome is printed as soon as it ends: a run that hangs or fails
        # still leaves the other's line in the log.
        for name, folder, ranks in (("one process", one, None),
                                    (f"{args.ranks} rank(s)", many, args.ranks)):
            done, seconds = train(common, folder, ranks, args.timeout)
            if done.returncode != 0:
                tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
                print(f"dist_check: the {name} run failed (exit {done.returncode}): {tail}")
                return 2
            print(f"dist_check: {name} trained ({seconds:.2f} s for the epoch)")
            runs.append((done, seconds))
        name, rel = worst_difference(one / "last.npz", many / "last.npz")
    (_, single_seconds), (ranked, ranked_seconds) = runs
    steps = args.limit_train // args.bs
    comm = "nccl" if args.backend == "cupy" else "gloo"
    if f"{args.ranks} ranks ({comm})" not in ranked.stdout:  # else the check proves nothing
        print(f"dist_check: the data-parallel run did not say it trained on {args.ranks} "
              f"rank(s) over {comm}: {ranked.stdout.strip().splitlines()[:1]}")
        return 2
    good = rel <= args.tol
    # The epoch's seconds include recording the steps (one process, on CuPy) and the
    # test batch: with 20 steps they are no step-time benchmark (capsflow bench is).
    print(f"dist_check: {steps} Adam steps of batch {args.bs} on {args.backend}: one process "
          f"{single_seconds:.2f} s, {args.ranks} rank(s) over {comm} {ranked_seconds:.2f} s "
          f"for the epoch (set-up and test batch included); worst difference {rel:.2e} of "
          f"the array's largest value ({name}) -> {'match' if good else 'MISMATCH'} "
          f"(tolerance {args.tol:g}; {time.perf_counter() - started:.0f} s)")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
