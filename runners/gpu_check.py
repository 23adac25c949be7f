"""The GPU check: one command, on a bare GPU machine, well under 4 minutes.

    bash runners/gpu_check.sh [--data-dir ROOT]

1. every op's VJP on CuPy against finite differences (float64, the cases of the CPU tests);
2. the whole CapsNet on CuPy against NumPy: outputs and every parameter gradient, in float64
   and float32, and a whole-graph finite-difference check on CuPy; then the fast paths
   against the plain one on CuPy: the CUDA kernels (capsflow/backends/cuda/kernels.py) and the
   factored outer-product gradients (capsflow/core/gradients.py) against the ops' ``xp``
   code, and Adam steps replayed as CUDA graphs against eager ones;
3. optionally (--data-dir) a short MNIST training run on CuPy, with its test accuracy;
4. last, a table: a training step (batch 100, float32) of capsflow on CuPy against the
   PyTorch CUDA reference in the same run, fp32 and tf32 as CUDA graphs, fp32 with the
   outer-product gradients made one by one, then fp32 eager with and without the CUDA
   kernels, with ms/step, ratio and peak device memory.
Exits 1 if a correctness check fails.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CAPSNET = REPO / "graphs" / "capsnet.yaml"
OP_TOLERANCE = 1e-6


def check_ops() -> bool:
    from capsflow.core.gradcases import CASES
    from capsflow.core.gradcheck import op_gradcheck
    worst, failures = 0.0, []
    for name, args, attrs in CASES:
        for err in op_gradcheck(name, args, attrs, backend="cupy"):
            if err is not None:
                worst = max(worst, err)
                if err > OP_TOLERANCE:
                    failures.append(f"{name}{attrs}: {err:.2e}")
    print(f"[1] op VJPs on CuPy vs finite differences (float64, {len(CASES)} cases): "
          f"worst {worst:.2e} -> {'ok' if not failures else 'FAILED: ' + '; '.join(failures)}")
    return not failures


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def check_parity() -> bool:
    import capsflow
    from capsflow.backends import to_numpy
    from capsflow.core.gradcheck import graph_gradcheck
    from capsflow.runners.gradcheck import DEFAULT_TOLERANCE, random_batch
    graph = capsflow.compile(CAPSNET)
    ok = True
    for dtype, tol in (("float64", 1e-10), ("float32", 1e-4)):
        params = graph.init_params(seed=2, dtype=dtype)
        batch = {k: v.astype(dtype) for k, v in random_batch(graph, 4, seed=2).items()}
        out_np, g_np = graph.value_and_grad(params, batch, backend="numpy")
        out_cp, g_cp = graph.value_and_grad(params, batch, backend="cupy")
        errs = {k: _rel(to_numpy(out_cp[k]), out_np[k]) for k in out_np}
        errs.update({f"d{k}": _rel(to_numpy(g_cp[k]), g_np[k]) for k in g_np})
        name = max(errs, key=errs.get)
        good = errs[name] <= tol
        ok &= good
        print(f"[2] CapsNet CuPy vs NumPy, {dtype}: worst relative error {errs[name]:.2e} "
              f"({name}; tolerance {tol:g}) -> {'ok' if good else 'FAILED'}")
    report = graph_gradcheck(graph, graph.init_params(seed=1, dtype="float64"),
                             random_batch(graph, 2, seed=1), backend="cupy", directions=1)
    name = max(report, key=report.get)
    good = report[name] <= DEFAULT_TOLERANCE
    print(f"[2] CapsNet on CuPy vs finite differences: worst {report[name]:.2e} ({name}) "
          f"-> {'ok' if good else 'FAILED'}")
    return ok and good


@contextlib.contextmanager
def plain_xp_path():
    """Every op through its plain xp code: no CUDA kernels, no factored gradients."""
    from capsflow.backends.cuda import kernels as cuda_kernels
    from capsflow.core import gradients as outer_grads
    with cuda_kernels.disabled(), outer_grads.disabled():
        yield


def check_kernels() -> bool:
    """The CUDA kernels (capsflow/backends/cuda/kernels.py) and the factored outer-product
    gradients (capsflow/core/gradients.py) against the ops' plain xp code, on CuPy in
    float64: a whole CapsNet step's outputs and gradients, then three Adam updates (the
    fused kernel against the xp arithmetic)."""
    import capsflow
    from capsflow.backends import get_backend, to_numpy
    from capsflow.training.optim import Adam
    from capsflow.runners.gradcheck import random_batch
    graph = capsflow.compile(CAPSNET)
    be = get_backend("cupy")

    def train(kernels: bool):
        params = {k: be.asarray(v) for k, v in graph.init_params(seed=3, dtype="float64").items()}
        opt = Adam(1e-3)
        state = opt.init_state(params)
        with contextlib.nullcontext() if kernels else plain_xp_path():
            for k in range(3):
                out, grads = graph.value_and_grad(params, random_batch(graph, 4, seed=k),
                                                  backend="cupy")
                opt.step(params, grads, state, lr=1e-3 * 0.5 ** k)
        arrays = {f"d{k}": g for k, g in grads.items()}
        arrays.update(out)
        arrays.update(params)
        return {k: to_numpy(v) for k, v in arrays.items()}

    fused, plain = train(kernels=True), train(kernels=False)
    errs = {k: _rel(fused[k], plain[k]) for k in plain}
    name = max(errs, key=errs.get)
    good = errs[name] <= 1e-10
    print(f"[2] CUDA kernels and factored gradients vs the ops' xp code on CuPy, float64, 3 Adam steps (outputs, "
          f"gradients, parameters): worst {errs[name]:.2e} ({name}) -> {'ok' if good else 'FAILED'}")
    return good


def check_graphs() -> bool:
    """Five Adam steps replayed as CUDA graphs (new batch and learning rate each step)
    against five eager steps through the plain xp code, float64."""
    import capsflow
    from capsflow.backends.cuda import gemm
    from capsflow.backends import get_backend, to_numpy
    from capsflow.training.optim import Adam
    from capsflow.runners.gradcheck import random_batch
    from capsflow.training.train_step import TrainStep
    graph = capsflow.compile(CAPSNET)
    be = get_backend("cupy")
    own_gemm = be.name != "cupy" or gemm._cublas(be.xp) is not None
    print(f"[2] GEMMs through capsflow's own cuBLAS call (capturable): "
          f"{'yes' if own_gemm else 'NO, CuPy matmul (graphs cannot capture it)'}")

    def train(cuda_graph: bool, kernels: bool):
        p = {k: be.asarray(v) for k, v in graph.init_params(seed=4, dtype="float64").items()}
        opt = Adam(1e-3)
        step = TrainStep(graph, p, opt, opt.init_state(p), backend="cupy", outputs=["loss"],
                         cuda_graph=cuda_graph)
        losses = []
        with contextlib.nullcontext() if kernels else plain_xp_path():
            for k in range(5):
                out = step.gradients(random_batch(graph, 8, seed=10 + k))
                losses.append(float(to_numpy(out["loss"])))
                step.update(lr=1e-3 * 0.5 ** k)
        return {k: to_numpy(v) for k, v in p.items()}, losses, step.mode

    p_graph, l_graph, mode = train(cuda_graph=True, kernels=True)
    p_eager, l_eager, _ = train(cuda_graph=False, kernels=False)
    errs = {k: _rel(p_graph[k], p_eager[k]) for k in p_eager}
    errs["loss"] = _rel(np.array(l_graph), np.array(l_eager))
    name = max(errs, key=errs.get)
    good = errs[name] <= 1e-10 and mode == "cuda graph"
    print(f"[2] 5 Adam steps as CUDA graphs (mode: {mode}) vs eager plain xp, float64: "
          f"worst {errs[name]:.2e} ({name}) -> {'ok' if good else 'FAILED'}")
    return good


def train_run(data_dir: str) -> None:
    out = Path("/tmp/capsflow-gpu-check-train")
    cmd = [sys.executable, "-m", "capsflow.cli", "train", str(CAPSNET), "--backend", "cupy",
           "--data-dir", data_dir, "--limit-train", "10000", "--limit-test", "2000",
           "--num_epochs", "1", "--no-progress", "--save_dir", str(out)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = (done.stdout + done.stderr).strip().splitlines()
    epoch = [ln for ln in lines if "test acc" in ln]
    print(f"[3] MNIST, 10,000 training images, 1 epoch on CuPy ({time.perf_counter() - start:.0f} s): "
          + (epoch[-1].strip() if epoch else "FAILED: " + " | ".join(lines[-3:])))


def bench_table(repeats: int) -> None:
    from capsflow.runners.bench import run_bench
    rows = []
    # (label, precision, CUDA graphs, environment of the bench workers, read when they
    # import capsflow): the last two rows switch off this session's and the earlier fast paths.
    for label, precision, graphs, env in (
            ("fp32", "fp32", True, {}),
            ("tf32", "tf32", True, {}),
            ("fp32, unfactored", "fp32", True, {"CAPSFLOW_OUTER_GRADS": "0"}),
            ("fp32, eager", "fp32", False, {}),
            ("fp32, eager, xp only", "fp32", False,
             {"CAPSFLOW_CUDA_KERNELS": "0", "CAPSFLOW_OUTER_GRADS": "0"})):
        args = argparse.Namespace(graph=str(CAPSNET), overrides=[], bs=100, repeats=repeats,
                                  warmup=3, backend="cupy", precision=precision, no_torch=False,
                                  profile=False, top=12, seed=0, lr=1e-3, json=None,
                                  no_cuda_graph=not graphs)
        os.environ.update(env)
        try:
            fig = run_bench(args)
        finally:
            for key in env:
                os.environ.pop(key, None)
        cf, pt = fig["frameworks"]["capsflow"], fig["frameworks"]["pytorch"]
        rows.append((label, cf, pt, fig))
    print(f"\n[4] training step, batch 100, float32 inputs ({rows[0][3]['machine']}; "
          f"{rows[0][1]['info']}; {rows[0][2]['info']})")
    print(f"{'precision':<20} {'capsflow ms':>12} {'pytorch ms':>11} {'ratio':>6} "
          f"{'capsflow peak MB':>17} {'pytorch peak MB':>16}")
    for precision, cf, pt, fig in rows:
        print(f"{precision:<20} {cf['median'] * 1e3:>12.2f} {pt['median'] * 1e3:>11.2f} "
              f"{fig['ratio_median']:>6.2f} {_mb(cf.get('device_peak')):>17} "
              f"{_mb(pt.get('device_peak')):>16}")
    print("ratio = capsflow / PyTorch eager, medians; target <= 0.5 (fp32). capsflow replays "
          "CUDA graphs except in 'eager' rows (--no-cuda-graph); 'unfactored': outer-product "
          "gradients made one by one (CAPSFLOW_OUTER_GRADS=0); 'xp only': that and no CUDA "
          "kernels (CAPSFLOW_CUDA_KERNELS=0)")


def _mb(value) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def cupy_or_say_why(program: str) -> bool:
    """Whether CuPy and a GPU are there; if not, one line on stderr says why."""
    from capsflow.backends import get_backend
    from capsflow.errors import BackendError
    try:
        get_backend("cupy")
    except BackendError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return False
    return True


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="data root with mnist/ for the short training run")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per framework (20)")
    args = parser.parse_args(argv)
    if not cupy_or_say_why("gpu_check"):
        return 2
    ok = check_ops()
    ok &= check_parity()
    ok &= check_kernels()
    ok &= check_graphs()
    if args.data_dir:
        train_run(args.data_dir)
    bench_table(args.repeats)
    print(f"\ngpu_check: {'all correctness checks passed' if ok else 'SOME CHECKS FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
