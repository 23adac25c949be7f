"""One framework's training step in a process of its own, driven by ``capsflow bench``.

``capsflow bench`` starts one worker per framework (capsflow, and the PyTorch reference)
so that each one's memory high-water mark is its own, then drives them in lockstep over
a line protocol: the parent writes a command line to the worker's stdin, the worker
answers with one line ``@@bench {json}`` on stdout (anything else a library prints is
ignored). Commands::

    step          one timed training step -> {"seconds": wall clock, "cpu": CPU time of
                  all the worker's threads}
    memory        one step between a reset and a read of the peak-RSS high-water mark
                  -> {"rss_peak": bytes above the RSS before the step, ...}
    profile K     K steps with per-op profiling (capsflow only) -> {"by_op": rows, ...}
    quit

A training step is forward + backward + Adam update in float32 on a fixed random batch,
with the same initial weights in both frameworks (graph.init_params(seed)).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import time
import traceback
from typing import Any, Callable

import numpy as np

from capsflow.core.memory import proc_status
from capsflow.options import Options

PREFIX = "@@bench "


# -- memory probes (Linux /proc; None elsewhere) ----------------------------------------
def reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc malloc_trim), so
    the RSS measured before a step holds live data only, in both frameworks alike."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def blas_info() -> str:
    """'openblas 0.3.x SkylakeX, 2 threads' for the BLAS that NumPy loaded."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    parts = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture', '')}".strip()
             + f", {i.get('num_threads')} threads"
             for i in threadpool_info() if i.get("user_api") == "blas"]
    return "; ".join(parts) or "none found"


# -- the two frameworks ----------------------------------------------------------------
class Setup:
    """What a worker needs: a step function, optional extras, and a description."""

    def __init__(self, step: Callable[[], float], info: "str | Callable[[], str]",
                 live_peak_step: Callable[[], int] | None = None,
                 device_pool: Any = None, profile: Callable[[int], dict] | None = None):
        self.step = step                        # runs one step, returns the loss
        self.info = info                        # a string, or a callable read after warm-up
        self.live_peak_step = live_peak_step    # one step returning capsflow's live-bytes peak
        self.device_pool = device_pool          # (reset(), peak()) for device memory, or None
        self.profile = profile


def _options(cfg: dict) -> Options:
    """The parent's Options, sent as a dict of their fields."""
    return Options(**cfg["options"])


def _graph_and_batch(cfg: dict):
    from capsflow.cli import compile_from_args
    from capsflow.runners.gradcheck import random_batch
    graph = compile_from_args(argparse.Namespace(graph=cfg["graph"], overrides=cfg["overrides"]))
    params = graph.init_params(cfg["seed"], dtype="float32")
    batch = random_batch(graph, cfg["bs"], cfg["seed"])
    batch = {k: v.astype(np.float32) for k, v in batch.items()}
    return graph, params, batch


def setup_capsflow(cfg: dict) -> Setup:
    from capsflow.backends import get_backend, to_numpy
    from capsflow.training.optim import Adam
    from capsflow.core.profile import profiling
    from capsflow.training.train_step import TrainStep
    graph, params_np, batch_np = _graph_and_batch(cfg)
    be = get_backend(_options(cfg))
    params = {k: be.asarray(v) for k, v in params_np.items()}
    inputs = {k: be.asarray(v) for k, v in batch_np.items()}
    opt = Adam(lr=cfg["lr"])
    state = opt.init_state(graph.trainable(params))
    # The trainer's step: both halves, then the loss read (the update skips itself when
    # the loss is not finite); recorded and replayed where the backend can, unless --no-replay.
    train_step = TrainStep(graph, params, opt, state, backend=be, outputs=["loss"])

    def step() -> float:
        out = train_step.gradients(inputs)
        train_step.update()
        loss = float(to_numpy(out["loss"]))
        be.synchronize()
        return loss

    def eager_step(return_peak: bool = False):
        result = graph.value_and_grad(params, inputs, backend=be, return_peak=return_peak)
        opt.step(graph.trainable(params), result[1], state, backend=be)
        be.synchronize()
        return result

    def live_peak_step() -> int:
        return int(eager_step(return_peak=True)[2])

    def profile(k: int) -> dict:
        with profiling(be.synchronize) as prof:
            for _ in range(k):
                eager_step()
        return {"by_op": prof.rows("op"), "by_node": prof.rows("node")}

    pool = None
    if be.name == "cupy":
        mempool = be.xp.get_default_memory_pool()
        # A step's device memory: the default pool's growth, plus the private pools of
        # the captured graphs (which keep their step's intermediate arrays for good).
        pool = (lambda: (mempool.free_all_blocks(), mempool.used_bytes())[1],
                lambda: mempool.total_bytes() + train_step.device_bytes())
        devices = be.xp.cuda.runtime.getDeviceCount()

        def info() -> str:
            return f"capsflow on CuPy {be.xp.__version__}, {devices} device(s), {train_step.mode}"
    else:
        def info() -> str:
            return f"capsflow on NumPy {np.__version__}, BLAS {blas_info()}"
    # The live-bytes figure needs an eager step; a replayed step has none to give.
    return Setup(step, info, None if train_step.replay_wanted else live_peak_step, pool, profile)


def setup_torch(cfg: dict) -> Setup:
    import torch
    from capsflow.runners.torch_ref import TorchStep
    graph, params_np, batch_np = _graph_and_batch(cfg)
    options = _options(cfg)
    device = "cuda" if options.backend == "cupy" else "cpu"
    hp = {k: graph.spec.vars[k] for k in ("routing_iters", "squash_eps", "recon_weight")
          if k in graph.spec.vars}
    ts = TorchStep(params_np, device=device, dtype="float32", precision=options.precision,
                   optimizer="adam", lr=cfg["lr"], **hp)
    x = torch.as_tensor(batch_np["x"], device=device)
    y = torch.as_tensor(batch_np["y"], device=device)

    def step() -> float:
        loss = ts.step(x, y)
        ts.synchronize()
        return float(loss)

    pool = None
    if device == "cuda":
        def reset() -> int:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        pool = (reset, torch.cuda.max_memory_reserved)
        info = f"PyTorch {torch.__version__} on {torch.cuda.get_device_name()}, {options.precision}"
    else:
        info = (f"PyTorch {torch.__version__} on CPU, {torch.get_num_threads()} threads, "
                f"BLAS {'mkl' if torch.backends.mkl.is_available() else 'other'}, "
                f"oneDNN {'on' if torch.backends.mkldnn.is_available() else 'off'}")
    return Setup(step, info, device_pool=pool)


SETUPS = {"capsflow": setup_capsflow, "pytorch": setup_torch}


# -- the worker loop -------------------------------------------------------------------
def reply(obj: dict) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def measure_memory(setup: Setup) -> dict:
    """Peak RSS of one step above the RSS before it (and capsflow's live-bytes peak)."""
    release_free_memory()
    base = proc_status("VmRSS")
    pool_base = setup.device_pool[0]() if setup.device_pool else None
    ok = reset_rss_peak()
    live = setup.live_peak_step() if setup.live_peak_step else None
    if setup.live_peak_step is None:
        setup.step()
    hwm = proc_status("VmHWM")
    out = {"rss_base": base, "live_peak": live,
           "rss_peak": hwm - base if ok and hwm is not None and base is not None else None}
    if setup.device_pool:
        out["device_peak"] = setup.device_pool[1]() - pool_base
    return out


def serve(cfg: dict) -> None:
    setup = SETUPS[cfg["framework"]](cfg)
    first_loss = setup.step()
    for _ in range(cfg["warmup"] - 1):
        setup.step()
    info = setup.info() if callable(setup.info) else setup.info
    reply({"ready": True, "info": info, "first_loss": first_loss})
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        if command[0] == "step":
            start, cpu = time.perf_counter(), time.process_time()
            setup.step()
            reply({"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu})
        elif command[0] == "memory":
            reply(measure_memory(setup))
        elif command[0] == "profile" and setup.profile is not None:
            reply(setup.profile(int(command[1])))
        else:
            reply({"error": f"unknown command {line.strip()!r}"})


def main(argv: list) -> int:
    cfg = json.loads(argv[0])
    try:
        serve(cfg)
    except Exception as exc:  # reported to the parent as one line; details on stderr
        from capsflow.errors import CapsflowError
        if not isinstance(exc, CapsflowError):
            traceback.print_exc()
        reply({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
