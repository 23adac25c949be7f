"""CUDA graphs: a function's GPU work recorded once and replayed with one launch.

A CapsNet training step on CuPy is a few hundred kernel launches, most of them small,
and Python plus CuPy take longer to queue them than the GPU takes to run them.
Captured as a CUDA graph, the step's GPU work stays and the queueing goes: one
``replay()`` runs every kernel of the step, on the same device addresses, reading its
inputs from the same buffers. This is the CuPy variant of
``capsflow.training.train_step.record_step`` (registered in routines.py).

What that asks of the captured function, and how it is met here:

* no host synchronisation inside (the executor and the variants never read a device
  value);
* no call that CuPy refuses while capturing: CuPy will not call cuBLAS then, so every
  GEMM goes through gemm.py, which calls cuBLAS itself;
* every address it touches stays valid and private between replays: the capture
  allocates from a memory pool of its own that nothing else draws from, so blocks
  freed and reused during the capture are reused the same way at each replay, and the
  arrays it returns (``result``) stay alive with the object;
* inputs that change between replays are written into the same buffers before each
  replay (capsflow.training.train_step does that for the batch and Adam's per-step numbers).
"""
from __future__ import annotations

from typing import Any, Callable

from capsflow.training.train_step import RecordError


class Captured:
    """``fn``'s CUDA work, captured on CuPy but not yet run. ``result`` is what ``fn``
    returned at capture; each ``replay()`` runs the work, recomputing it in place.
    Raises RecordError when the capture fails."""

    def __init__(self, xp: Any, fn: Callable[[], Any]) -> None:
        cuda = xp.cuda
        self._pool = cuda.MemoryPool()                 # private: nothing else reuses its blocks
        self._stream = cuda.Stream(non_blocking=True)  # capture needs a stream of its own
        # Relaxed mode: the private pool may cudaMalloc while the capture is open.
        mode = getattr(cuda.runtime, "streamCaptureModeRelaxed", None)
        try:
            with cuda.using_allocator(self._pool.malloc), self._stream:
                self._stream.begin_capture(*([] if mode is None else [mode]))
                try:
                    self.result = fn()
                finally:
                    self._graph = self._stream.end_capture()
        except Exception as exc:
            raise RecordError(f"CUDA graph capture: {type(exc).__name__}: {exc}") from exc

    def replay(self) -> None:
        """Run the captured work on the current stream (after what was queued before)."""
        self._graph.launch()

    def device_bytes(self) -> int:
        """Device memory held by the capture's private pool."""
        return int(self._pool.total_bytes())
