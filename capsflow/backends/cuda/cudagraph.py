"""CUDA graphs: a function's GPU work recorded once and replayed with one launch.

A CapsNet training step on CuPy is a few hundred kernel launches, most of them small,
and Python plus CuPy take longer to queue them than the GPU takes to run them.
Captured as a CUDA graph, the step's GPU work stays and the queueing goes: one
``replay()`` runs every kernel of the step, on the same device addresses, reading its
inputs from the same buffers.

What that asks of the captured function, and how it is met here:

* no host synchronisation inside (the executor and the ops never read a device value);
* no call that CuPy refuses while capturing: CuPy will not call cuBLAS then, so every
  GEMM goes through capsflow.backends.cuda.gemm, which calls cuBLAS itself;
* every address it touches stays valid and private between replays: the capture
  allocates from a memory pool of its own that nothing else draws from, so blocks
  freed and reused during the capture are reused the same way at each replay, and the
  arrays it returns (``result``) stay alive with the object;
* inputs that change between replays are written into the same buffers before each
  replay (capsflow.training.train_step does that for the batch and Adam's per-step numbers).

NumPy has no graphs: ``Replayed`` runs the function again at each replay and copies its
results into the first run's arrays, so that the code around it (static buffers,
replay order) runs, and is tested, on the CPU as well.
"""
from __future__ import annotations

from typing import Any, Callable

from capsflow.backends import on_gpu


class CaptureError(RuntimeError):
    """The function could not be captured as a CUDA graph (the caller runs it eagerly)."""


class Captured:
    """``fn``'s CUDA work, captured on CuPy but not yet run. ``result`` is what ``fn``
    returned at capture; each ``replay()`` runs the work, recomputing it in place."""

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
            raise CaptureError(f"{type(exc).__name__}: {exc}") from exc

    def replay(self) -> None:
        """Run the captured work on the current stream (after what was queued before)."""
        self._graph.launch()

    def device_bytes(self) -> int:
        """Device memory held by the capture's private pool."""
        return int(self._pool.total_bytes())


class Replayed:
    """The stand-in on NumPy: each ``replay()`` runs ``fn`` and copies what it returns
    into the arrays of the first run, as a replayed graph would update them. (The first
    run happens at construction, to have those arrays; the first replay is that run.)"""

    def __init__(self, xp: Any, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self.result = fn()
        self._ran_at_capture = True

    def replay(self) -> None:
        if self._ran_at_capture:
            self._ran_at_capture = False
            return
        _copy_into(self.result, self._fn())

    def device_bytes(self) -> int:
        return 0


def _copy_into(dst: Any, src: Any) -> None:
    """Copy the arrays of ``src`` into those of ``dst`` (same nesting of dicts and
    tuples); a NumPy scalar, which cannot be written, is replaced in its dict."""
    if isinstance(dst, dict):
        for k in dst:
            if hasattr(dst[k], "__setitem__"):
                _copy_into(dst[k], src[k])
            else:
                dst[k] = src[k]
    elif isinstance(dst, (list, tuple)):
        for d, s in zip(dst, src):
            _copy_into(d, s)
    elif dst is not None and src is not None:
        dst[...] = src


def capture(xp: Any, fn: Callable[[], Any]):
    """``Captured`` on CuPy, ``Replayed`` on NumPy; call ``replay()`` to run it."""
    if on_gpu(xp):
        return Captured(xp, fn)
    return Replayed(xp, fn)
