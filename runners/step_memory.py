"""Whether a batch fits in this machine's memory, checked before a run allocates it.

On a machine without swap, a NumPy run that asks for more memory than there is ends when
the kernel kills it (no message, nothing saved). So ``train``, ``compare``, ``reproduce``,
``bench``, ``eval``, ``predict`` and ``visualize`` check their batch first, in two stages:

1. **A lower bound, known without running anything**: for a training step, the
   activations its backward pass reads (``saved_for_backward_bytes``) or the largest
   value it makes, whichever is more (a huge product that is summed at once is saved by
   no VJP); for a forward pass, the largest value it makes. A batch whose bound exceeds memory could never run.
2. **A measurement, where the bound passes a tenth of memory** (smaller batches never
   pay for it): the same step or forward pass runs on zeros at two small batches under
   ``tracemalloc`` (which sees every NumPy allocation, op temporaries and workspaces
   included), and its peak is extrapolated along the line through them to the batch
   asked for. The estimate, raised by ``ESTIMATE_MARGIN`` (10%), plus what this process
   holds already and the parameters and optimizer state the run will make, must fit in
   the machine's memory.

Processes that train at once on one machine check against their share of its memory:
data-parallel ranks (LOCAL_WORLD_SIZE of them, which torchrun and --nproc set; each runs its
share of the batch) and the jobs of `compare --jobs N` (N of them, each the whole batch).

The estimate is exact where the peak grows linearly between the probes and beyond. The
probe batches are chosen to hold about ``PROBE_BYTES`` by the bound, large enough that
the batch-proportional memory dominates. For CapsNet it is close (measured on this CPU,
probes at 183 and 366, extrapolated to 1000: the step 1,651 MB against 1,697 MB traced,
the forward pass 1,131 MB against 1,131 MB). What bends the line is the CPU convolution's
window copy (capsflow/backends/cpu/conv.py): it grows with the batch up to
``CHUNK_BYTES``, stays about there, and grows again once a chunk is a single kernel row
(one row's windows over half of ``CHUNK_BYTES``). Probes in its flat part miss that last
growth (for CapsNet's PrimaryCaps, about a fifth of the step's memory per example);
probes before it see a steeper line and overestimate. CapsNet's PrimaryCaps copies one
row at a time from batch 76 on.

On a GPU, CuPy's own out-of-memory error says it (as a MemoryError: one line at the CLI).
"""
from __future__ import annotations

import math
import tracemalloc
from typing import Any, Callable, Optional

import numpy as np

from capsflow.core import memory
from capsflow.core.memory import (bytes_text, largest_value_bytes, proc_status,
                                  saved_for_backward_bytes)
from capsflow.core.shapes import at_batch
from capsflow.errors import CapsflowError

#: Measure when the lower bound passes this share of the machine's memory.
MEASURE_ABOVE = 0.1
#: The smaller probe batch holds about this much by the lower bound (the larger, twice it).
PROBE_BYTES = 96 * 2**20
#: The estimate is raised by this factor before it is compared: CapsNet's resident peak
#: (what the kernel counts) ran 6 to 9% above the traced line at batches 1000 and 3000
#: (allocator overhead, non-NumPy memory).
ESTIMATE_MARGIN = 1.1


def _to_stdout(line: str) -> None:
    """Where a check says it is measuring, by default: stdout, with the command's other
    progress (stderr holds the one line of an error alone)."""
    print(line, flush=True)


def check_step_fits(graph: Any, options: Any, batch: int, dtype: str,
                    scores: Optional[str] = None, log: Callable[[str], None] = _to_stdout,
                    processes_here: int = 1) -> None:
    """One line, before a NumPy training step of ``batch`` examples (computing ``loss``,
    and ``scores`` where given) is run, when it cannot fit in this machine's memory, or
    in its share of it when ``processes_here`` processes train at once on this machine
    (data-parallel ranks, `compare --jobs`). ``log`` gets a line when the step is
    measured (a few seconds)."""
    if options.backend != "numpy" or "loss" not in graph.spec.outputs:
        return
    outputs = ["loss"] + ([scores] if scores else [])
    dag, plan = _lowered_plan(graph, options, set(graph.spec.inputs), outputs, "loss")
    itemsize = np.dtype(dtype).itemsize

    def bound(b: int) -> int:
        return max(saved_for_backward_bytes(dag, plan, b, itemsize),
                   largest_value_bytes(dag, plan, b, itemsize))

    def kept(b: int) -> str:
        saved = saved_for_backward_bytes(dag, plan, b, itemsize)
        return ("of activations for its backward pass"
                if saved >= largest_value_bytes(dag, plan, b, itemsize)
                else "in its largest value")

    def measure(b: int, params: dict) -> int:
        inputs = _zero_inputs(graph, b, list(graph.spec.inputs), dtype)
        return _traced_peak(lambda: graph.value_and_grad(params, inputs, options,
                                                         outputs=outputs))

    def probe_params() -> tuple:
        # Not made yet: the run will hold them, and an optimizer's state of at most
        # twice their size (Adam's two moments).
        params = graph.init_params(0, dtype)
        return params, 3 * sum(p.nbytes for p in params.values())

    _check(f"training step of {graph.spec.name}", kept, batch, bound, measure, probe_params,
           log, processes_here)


def check_forward_fits(graph: Any, params: dict, options: Any, batch: int, outputs: list,
                       feeds: list, log: Callable[[str], None] = _to_stdout) -> None:
    """As ``check_step_fits``, for forward passes of ``graph`` on ``params`` (held
    already) over ``batch`` examples, computing ``outputs`` from the inputs ``feeds``
    (evaluation, prediction)."""
    if options.backend != "numpy" or not params:
        return
    dag, plan = _lowered_plan(graph, options, set(feeds), list(outputs), None)
    dtype = str(next(iter(params.values())).dtype)
    itemsize = np.dtype(dtype).itemsize

    def bound(b: int) -> int:  # the largest single value the pass makes
        return largest_value_bytes(dag, plan, b, itemsize)

    def measure(b: int, params: dict) -> int:
        inputs = _zero_inputs(graph, b, feeds, dtype)
        return _traced_peak(lambda: graph.run(params, inputs, options, outputs=list(outputs)))

    _check(f"forward pass of {graph.spec.name}", "in its largest value",
           batch, bound, measure, lambda: (params, 0), log)


def _check(what: str, kept: Any, batch: int, bound: Callable[[int], int],
           measure: Callable[[int, dict], int], probe_params: Callable[[], tuple],
           log: Callable[[str], None], processes_here: int = 1) -> None:
    """The two stages (module docstring). ``kept``: words for what the bound counts (or
    a function of the batch giving them); ``bound(b)``: the lower bound at batch b;
    ``measure(b, params)``: the traced peak of one run at batch b; ``probe_params()``:
    (the parameters to measure with, bytes the run will hold beyond this process's
    resident memory now)."""
    total = memory.physical_memory()
    if total is None:
        return
    have = total // processes_here
    room = (f"this machine's {bytes_text(total)} of memory" if processes_here == 1
            else f"{bytes_text(have)}, the share of each of the {processes_here} processes "
                 f"training on this machine of its {bytes_text(total)} of memory")
    need = bound(batch)
    kept = kept(batch) if callable(kept) else kept
    if need > have:
        raise CapsflowError(f"a {what} at batch {batch} keeps at least "
                            f"{bytes_text(need)} {kept}, more than {room}; use a "
                            f"smaller --bs or smaller --set values")
    if need <= MEASURE_ABOVE * have:
        return
    small = max(1, min(math.ceil(PROBE_BYTES / max(bound(1), 1)), batch // 2))
    large = min(2 * small, batch)
    if large <= small:
        return  # batch 1: the bound is all there is to go by
    # (Where memory is small, the larger probe may be the batch itself: then it is measured
    # whole, as running it would have done, but refused with one line.)
    log(f"measuring the memory of a {what} at batches {small} and {large}, to extrapolate "
        f"to batch {batch} (at least {bytes_text(need)} {kept})")
    resident = proc_status("VmRSS") or 0  # before the probe's own parameters and heap
    params, besides = probe_params()
    held = resident + besides
    estimate = ESTIMATE_MARGIN * extrapolate(small, measure(small, params),
                                             large, measure(large, params), batch)
    if estimate + held > have:
        raise CapsflowError(
            f"a {what} at batch {batch} needs about {bytes_text(int(estimate))} (measured at "
            f"batches {small} and {large}, extrapolated, with a {ESTIMATE_MARGIN - 1:.0%} "
            f"margin), and the run holds {bytes_text(held)} besides, more than {room}; use a "
            f"smaller --bs or smaller --set values")


def extrapolate(small: int, at_small: int, large: int, at_large: int, batch: int) -> float:
    """The peak at ``batch`` on the line through the peaks at two probe batches (never
    falling: a peak that did not grow is taken as flat)."""
    return at_large + max(at_large - at_small, 0) / (large - small) * (batch - large)


def _lowered_plan(graph: Any, options: Any, given: set, outputs: list,
                  loss: Optional[str]) -> tuple:
    """The dag and plan the executor runs for ``outputs`` from the inputs ``given`` (fused
    where ``options`` say)."""
    from capsflow.core import fusion
    plan = graph.plan(given, outputs, loss)
    dag = graph.dag
    if options.fusion:
        dag, plan = fusion.lower(dag, plan)
    return dag, plan


def _zero_inputs(graph: Any, batch: int, names: list, dtype: str) -> dict:
    """Zeros for each declared input in ``names``, the batch symbol set to ``batch``."""
    return {name: np.zeros(at_batch(graph.spec.inputs[name].shape, batch), dtype)
            for name in names if name in graph.spec.inputs}


def _traced_peak(run: Callable[[], Any]) -> int:
    """Peak bytes ``run`` allocates beyond what is allocated when it starts (tracemalloc;
    a trace already running, ``python -X tracemalloc``, is kept running)."""
    already = tracemalloc.is_tracing()
    if not already:
        tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        run()
        return max(tracemalloc.get_traced_memory()[1] - base, 0)
    finally:
        if not already:
            tracemalloc.stop()
