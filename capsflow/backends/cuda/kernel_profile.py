"""Where a CapsNet training step spends its GPU time, kernel by kernel
(``python -m capsflow.runners.gpu_kernels [--steps 5] [--top 30] [--timeline]``).

Runs capsflow's training step on CuPy (batch 100, float32, Adam) under PyTorch's
profiler, whose CUPTI tracing records every kernel the process launches, CuPy's and
cuBLAS' included, and prints the kernels by GPU time per step: once for steps run op
by op and once for steps replayed as CUDA graphs. capsflow's per-op profile
(``capsflow bench --profile``) times ops with a synchronisation around each, which on a
GPU mostly measures launch overhead; this table is the GPU's own account. With
``timeline`` it also lists one step's kernels in the order they ran (which of the many
copies is which), and how much of the step the GPU sat idle between kernels.
"""
from __future__ import annotations

import numpy as np

from capsflow.backends.cuda.check import CAPSNET, FAST, cupy_or_say_why
from capsflow.options import Options


def kernel_rows(events, steps: int) -> list:
    """[(kernel name, calls per step, ms per step)] from profiler averages, slowest first."""
    rows = []
    for e in events:
        total = getattr(e, "device_time_total", None)
        if total is None:  # older PyTorch
            total = getattr(e, "cuda_time_total", 0)
        if total:
            rows.append((e.key, e.count / steps, total / 1e3 / steps))
    return sorted(rows, key=lambda r: -r[2])


def format_rows(rows: list, top: int, title: str) -> str:
    total = sum(r[2] for r in rows)
    lines = [title, f"{'ms/step':>8} {'share':>6} {'calls':>6}  kernel"]
    for name, calls, ms in rows[:top]:
        lines.append(f"{ms:>8.3f} {100 * ms / max(total, 1e-12):>5.1f}% {calls:>6.0f}  {name[:90]}")
    lines.append(f"{total:>8.3f} {'':>6} {sum(r[1] for r in rows):>6.0f}  (all {len(rows)} kernels)")
    return "\n".join(lines)


def kernel_timeline(events) -> list:
    """[(start us, duration us, name)] of the GPU kernels among profiler ``events``, in
    the order they started."""
    rows = []
    for e in events:
        if "cuda" not in str(getattr(e, "device_type", "")).lower():
            continue
        span = e.time_range
        rows.append((span.start, span.elapsed_us(), e.name))
    return sorted(rows)


def format_timeline(rows: list, shortest_us: float, title: str) -> str:
    """The kernels of ``rows`` that took at least ``shortest_us``, then the step's span,
    busy and idle time."""
    lines = [title, f"{'start us':>9} {'us':>7}  kernel"]
    t0 = rows[0][0] if rows else 0
    for start, dur, name in rows:
        if dur >= shortest_us:
            lines.append(f"{start - t0:>9.1f} {dur:>7.1f}  {name[:90]}")
    if rows:
        span = max(s + d for s, d, _ in rows) - t0
        busy = sum(d for _, d, _ in rows)
        lines.append(f"{len(rows)} kernels over {span / 1e3:.3f} ms: busy {busy / 1e3:.3f} ms, "
                     f"idle {(span - busy) / 1e3:.3f} ms (shorter kernels not listed)")
    return "\n".join(lines)


def profile_steps(options: Options, steps: int, timeline: bool = False) -> tuple:
    """(kernel rows per step over ``steps`` profiled steps, and with ``timeline`` the
    kernel timeline of one more step, else None), from one set-up and warm-up."""
    import capsflow
    from torch.profiler import ProfilerActivity, profile
    from capsflow.backends import get_backend, to_numpy
    from capsflow.runners.gradcheck import random_batch
    from capsflow.training.optim import Adam
    from capsflow.training.train_step import TrainStep
    be = get_backend(options)
    graph = capsflow.compile(CAPSNET)
    params = {k: be.asarray(v) for k, v in graph.init_params(0, "float32").items()}
    batch = {k: be.asarray(v.astype(np.float32)) for k, v in random_batch(graph, 100, 0).items()}
    opt = Adam(1e-3)
    step = TrainStep(graph, params, opt, opt.init_state(params), backend=be, outputs=["loss"])

    def one() -> None:  # as the trainer runs a step
        out = step.gradients(batch)
        step.update()
        float(to_numpy(out["loss"]))

    def profiled(count: int):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(count):
                one()
            be.synchronize()
        return prof

    for _ in range(3):  # compile kernels, capture the graphs
        one()
    be.synchronize()
    rows = kernel_rows(profiled(steps).key_averages(), steps)
    return rows, kernel_timeline(profiled(1).events()) if timeline else None


def run(steps: int = 5, top: int = 30, timeline: bool = False) -> int:
    """Both tables (and timelines); the exit status (2 without a GPU)."""
    if not cupy_or_say_why("gpu_kernels"):
        return 2
    for options, mode in ((FAST.replace(replay_steps=False), "eager"),
                          (FAST, "replayed as CUDA graphs")):
        rows, one_step = profile_steps(options, steps, timeline)
        print(format_rows(rows, top,
                          f"\nGPU kernels of one training step ({mode}), batch 100, float32:"))
        if one_step is not None:
            print(format_timeline(one_step, 5.0,
                                  f"\nOne training step ({mode}), kernels of 5 us or more in order:"))
    return 0
