"""The GPU check (``bash runners/gpu_check.sh``): one command, on a bare GPU machine,
well under 4 minutes.

1. every op's VJP on CuPy against finite differences (float64, the cases of the CPU tests);
2. the whole CapsNet on CuPy against NumPy: outputs and every parameter gradient, in
   float64 and float32, and a whole-graph finite-difference check on CuPy; then the fast
   paths against the plain ones on CuPy: this package's variants (CUDA kernels, own
   cuBLAS call, ...) and the factored outer-product gradients against every op's
   reference, conv2d's variant on a batch too large for its window budget (taken in
   chunks), and Adam steps replayed as CUDA graphs against op-by-op plain ones;
3. optionally (a data root) a short MNIST training run on CuPy, with its test accuracy;
4. last, a table: a training step (batch 100, float32) of capsflow on CuPy against the
   PyTorch CUDA reference in the same run, fp32 and tf32 as CUDA graphs, fp32 with the
   outer-product gradients made one by one, then fp32 op by op with and without the
   variants, with ms/step, ratio and peak device memory.

Each comparison is between two ``Options``: ``FAST`` (the defaults on CuPy) and the
same with fast paths switched off.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from capsflow.options import Options, option_arguments

CAPSNET = Path(__file__).resolve().parents[3] / "graphs" / "capsnet.yaml"
OP_TOLERANCE = 1e-6
#: What training runs on CuPy: every fast path on.
FAST = Options(backend="cupy")
#: The ops' reference code on CuPy, outer-product gradients made one by one (fusion as
#: in FAST): what the variants and the factored gradients are checked against.
PLAIN = FAST.replace(fast_paths=False, factored_grads=False)
#: The timing table's rows: (label, capsflow's options).
BENCH_ROWS = (("fp32", FAST),
              ("tf32", FAST.replace(precision="tf32")),
              ("fp32, unfactored", FAST.replace(factored_grads=False)),
              ("fp32, eager", FAST.replace(replay_steps=False)),
              ("fp32, eager, xp only", PLAIN.replace(replay_steps=False)))


def check_ops() -> bool:
    from capsflow.core.gradcases import CASES
    from capsflow.core.gradcheck import op_gradcheck
    worst, failures = 0.0, []
    for name, args, attrs in CASES:
        for err in op_gradcheck(name, args, attrs, backend=FAST):
            if err is not None:
                worst = max(worst, err)
                if err > OP_TOLERANCE:
                    failures.append(f"{name}{attrs}: {err:.2e}")
    print(f"[1] op VJPs on CuPy vs finite differences (float64, {len(CASES)} cases): "
          f"worst {worst:.2e} -> {'ok' if not failures else 'FAILED: ' + '; '.join(failures)}")
    return not failures


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _worst(got: dict, want: dict) -> tuple:
    """(name, relative error) of the array of ``got`` farthest from its ``want``."""
    errs = {k: _rel(got[k], want[k]) for k in want}
    name = max(errs, key=errs.get)
    return name, errs[name]


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
        arrays = {}
        for backend in ("numpy", FAST):
            out, grads = graph.value_and_grad(params, batch, backend=backend)
            arrays[backend] = {**{k: to_numpy(v) for k, v in out.items()},
                               **{f"d{k}": to_numpy(g) for k, g in grads.items()}}
        name, err = _worst(arrays[FAST], arrays["numpy"])
        good = err <= tol
        ok &= good
        print(f"[2] CapsNet CuPy vs NumPy, {dtype}: worst relative error {err:.2e} "
              f"({name}; tolerance {tol:g}) -> {'ok' if good else 'FAILED'}")
    report = graph_gradcheck(graph, graph.init_params(seed=1, dtype="float64"),
                             random_batch(graph, 2, seed=1), backend=FAST, directions=1)
    name = max(report, key=report.get)
    good = report[name] <= DEFAULT_TOLERANCE
    print(f"[2] CapsNet on CuPy vs finite differences: worst {report[name]:.2e} ({name}) "
          f"-> {'ok' if good else 'FAILED'}")
    return ok and good


def check_kernels() -> bool:
    """The variants (CUDA kernels, own cuBLAS call, ...) and the factored outer-product
    gradients against the ops' reference code, on CuPy in float64: a whole CapsNet
    step's outputs and gradients, then three Adam updates (the fused kernel against the
    reference arithmetic)."""
    import capsflow
    from capsflow.backends import get_backend, to_numpy
    from capsflow.runners.gradcheck import random_batch
    from capsflow.training.optim import Adam
    graph = capsflow.compile(CAPSNET)

    def train(options: Options) -> dict:
        be = get_backend(options)
        params = {k: be.asarray(v) for k, v in graph.init_params(seed=3, dtype="float64").items()}
        opt = Adam(1e-3)
        state = opt.init_state(params)
        for k in range(3):
            out, grads = graph.value_and_grad(params, random_batch(graph, 4, seed=k), backend=be)
            opt.step(params, grads, state, lr=1e-3 * 0.5 ** k, backend=be)
        arrays = {f"d{k}": g for k, g in grads.items()}
        arrays.update(out)
        arrays.update(params)
        return {k: to_numpy(v) for k, v in arrays.items()}

    name, err = _worst(train(FAST), train(PLAIN))
    good = err <= 1e-10
    print(f"[2] CUDA kernels and factored gradients vs the ops' xp code on CuPy, float64, 3 Adam "
          f"steps (outputs, gradients, parameters): worst {err:.2e} ({name}) -> "
          f"{'ok' if good else 'FAILED'}")
    return good


#: PrimaryCaps' convolution (x, w shapes and stride) at a batch of 400, whose windows
#: (1.2 GB in float32) exceed the conv2d variant's budget: it takes them in chunks.
LARGE_CONV = ((400, 256, 20, 20), (256, 256, 9, 9), 2)


def check_conv_chunks(shapes: tuple = LARGE_CONV) -> bool:
    """conv2d's variant on a batch it takes in chunks of images, against the reference
    on CuPy, float32: the output and the gradients of input, weights and bias."""
    from capsflow.backends import get_backend, to_numpy
    from capsflow.backends.cuda import conv
    from capsflow.core.opdef import get_op
    be = get_backend(FAST)
    (x_shape, w_shape, stride), xp = shapes, be.xp
    rng = np.random.default_rng(5)
    x, w, b = (xp.asarray(rng.standard_normal(s).astype(np.float32))
               for s in (x_shape, w_shape, w_shape[:1]))
    per_chunk = conv._images_per_chunk(x, w, stride, 0)
    out, extras = conv.gpu_conv2d.forward_fn(be, x, w, b, stride=stride, padding=0)
    g = xp.asarray(rng.standard_normal(out.shape).astype(np.float32))
    needs = (True, True, True)
    got = [out, *conv.gpu_conv2d.vjp_fn(be, {**extras, "x": x, "w": w}, g, needs,
                                       stride=stride, padding=0)]
    op = get_op("conv2d")
    want = [op.forward_fn(xp, x, w, b, stride=stride, padding=0),
            *op.vjp_fn(xp, {"x": x, "w": w}, g, needs, stride=stride, padding=0)]
    errors = {name: _rel(to_numpy(a), to_numpy(e)) for name, a, e in zip(("out", "dx", "dw", "db"),
                                                                        got, want)}
    name = max(errors, key=errors.get)
    good = errors[name] <= 1e-5 and per_chunk < x_shape[0]
    print(f"[2] conv2d of {x_shape[0]} images in chunks of {per_chunk} vs the reference on "
          f"CuPy, float32: worst {errors[name]:.2e} ({name}) -> {'ok' if good else 'FAILED'}")
    return good


def check_graphs() -> bool:
    """Five Adam steps replayed as CUDA graphs (new batch and learning rate each step)
    against five op-by-op steps through the plain reference, float64."""
    import capsflow
    from capsflow.backends import get_backend, to_numpy
    from capsflow.backends.cuda import gemm
    from capsflow.runners.gradcheck import random_batch
    from capsflow.training.optim import Adam
    from capsflow.training.train_step import TrainStep
    graph = capsflow.compile(CAPSNET)
    own_gemm = gemm.cublas(get_backend(FAST).xp) is not None
    print(f"[2] GEMMs through capsflow's own cuBLAS call (capturable): "
          f"{'yes' if own_gemm else 'NO, CuPy matmul (graphs cannot capture it)'}")

    def train(options: Options) -> tuple:
        be = get_backend(options)
        p = {k: be.asarray(v) for k, v in graph.init_params(seed=4, dtype="float64").items()}
        opt = Adam(1e-3)
        step = TrainStep(graph, p, opt, opt.init_state(p), backend=be, outputs=["loss"])
        losses = []
        for k in range(5):
            out = step.gradients(random_batch(graph, 8, seed=10 + k))
            losses.append(float(to_numpy(out["loss"])))
            step.update(lr=1e-3 * 0.5 ** k)
        arrays = {k: to_numpy(v) for k, v in p.items()}
        return {**arrays, "loss": np.array(losses)}, step.mode

    replayed, mode = train(FAST)
    name, err = _worst(replayed, train(FAST.plain)[0])
    good = err <= 1e-10 and mode == "replay"
    print(f"[2] 5 Adam steps as CUDA graphs (mode: {mode}) vs eager plain xp, float64: "
          f"worst {err:.2e} ({name}) -> {'ok' if good else 'FAILED'}")
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


def bench_args(options: Options, repeats: int) -> argparse.Namespace:
    """``capsflow bench``'s arguments for one row: batch 100 with ``options``' flags."""
    from capsflow.runners import bench
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args([str(CAPSNET), "--bs", "100", "--repeats", str(repeats),
                              "--warmup", "3", *option_arguments(options)])


def bench_table(repeats: int) -> None:
    """The table, each row printed as soon as it is measured (a run stopped part way
    keeps the rows measured before; a row that raises is one FAILED line)."""
    from capsflow.runners.bench import run_bench
    header = False
    for label, options in BENCH_ROWS:
        try:
            fig = run_bench(bench_args(options, repeats))
        except Exception as exc:  # the rows after it still run
            _say_failed(f"{label:<20}", exc)
            continue
        cf, pt = fig["frameworks"]["capsflow"], fig["frameworks"]["pytorch"]
        if not header:
            header = True
            print(f"\n[4] training step, batch 100, float32 inputs ({fig['machine']}; "
                  f"{cf['info']}; {pt['info']})")
            print(f"{'precision':<20} {'capsflow ms':>12} {'pytorch ms':>11} {'ratio':>6} "
                  f"{'capsflow peak MB':>17} {'pytorch peak MB':>16}", flush=True)
        print(f"{label:<20} {cf['median'] * 1e3:>12.2f} {pt['median'] * 1e3:>11.2f} "
              f"{fig['ratio_median']:>6.2f} {_mb(cf.get('device_peak')):>17} "
              f"{_mb(pt.get('device_peak')):>16}", flush=True)
    print("ratio = capsflow / PyTorch eager, medians; target <= 0.5 (fp32). capsflow replays "
          "CUDA graphs except in 'eager' rows (--no-replay); 'unfactored': outer-product "
          "gradients made one by one (--no-factored-grads); 'xp only': that and every op's "
          "reference code (--no-fast-paths)")


def _say_failed(label: str, exc: BaseException) -> None:
    """The traceback of ``exc``, then 'LABEL FAILED: Type: message' on one line (the log
    keeps both)."""
    traceback.print_exception(exc, file=sys.stdout)
    first = f"{type(exc).__name__}: {exc}".splitlines()[0]
    print(f"{label} FAILED: {first}", flush=True)


def guarded(check) -> bool:
    """``check()``, or False with a FAILED line when it raises: one check's error (an API
    the emulator did not know) must not lose the checks and the table after it."""
    try:
        return check()
    except Exception as exc:
        _say_failed(f"[{check.__name__}]", exc)
        return False


def _mb(value) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def cupy_or_say_why(program: str) -> bool:
    """Whether CuPy and a GPU are there; if not, one line on stderr says why."""
    from capsflow.backends import get_backend
    from capsflow.errors import BackendError
    try:
        get_backend(FAST)
    except BackendError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return False
    return True


def run(data_dir: str | None = None, repeats: int = 20) -> int:
    """Every check, then the table; the exit status (1 if a check failed, 2 without a GPU)."""
    if not cupy_or_say_why("gpu_check"):
        return 2
    ok = True
    for check in (check_ops, check_parity, check_kernels, check_conv_chunks, check_graphs):
        ok &= guarded(check)
    if data_dir:
        train_run(data_dir)
    bench_table(repeats)
    print(f"\ngpu_check: {'all correctness checks passed' if ok else 'SOME CHECKS FAILED'}")
    return 0 if ok else 1
