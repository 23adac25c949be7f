"""One training step in two halves, ``gradients`` (forward and backward) and ``update``
(the optimizer), run op by op or replayed as CUDA graphs.

``update`` never applies a step whose loss is not finite (the trainer then stops,
without saving that state), and it checks that without making the host wait for the
loss: so ``gradients``, ``update``, and then reading the loss, queues the whole step on
a GPU before the host waits once. On CuPy with Adam and ``cuda_graph=True`` each half is
captured once (capsflow/backends/cuda/cudagraph.py) and then replayed: the batch is copied into the
same device buffers, Adam's per-step numbers into a small device array (asynchronously,
from pinned memory), and one launch runs all the kernels of that half. The update's
graph starts by setting a flag from the forward graph's loss, and Adam's kernel updates
nothing where the flag is 0. (The step count still advances on the host; training stops
at such a step anyway.) Eager updates check the loss on the host.

The first step of a run is eager, so that every kernel is compiled before the capture;
batches of another shape (an epoch's last, shorter batch) run eagerly too. If the
capture fails, the step says so once on stderr and stays eager.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

import numpy as np

from capsflow.backends import HostToDevice, get_backend, to_numpy
from capsflow.backends.cuda.cudagraph import CaptureError, capture
from capsflow.training.optim import Adam


class TrainStep:
    """``gradients(inputs)`` then ``update(lr)``, for ``graph`` with ``params`` updated
    in place by ``optimizer`` (whose state is ``opt_state``)."""

    def __init__(self, graph: Any, params: dict, optimizer: Any, opt_state: dict,
                 backend: str = "numpy", outputs: Optional[list] = None,
                 cuda_graph: bool = True, simulate: bool = False) -> None:
        self.graph, self.params = graph, params
        self.optimizer, self.opt_state = optimizer, opt_state
        self.backend = get_backend(backend)
        self.outputs = outputs
        # ``simulate`` runs the graph machinery on NumPy (cudagraph.Replayed), for tests.
        self.graphs_wanted = bool(cuda_graph and isinstance(optimizer, Adam)
                                  and (self.backend.name == "cupy" or simulate))
        self._grads: Optional[dict] = None
        self._loss = None         # the last gradients() call's loss (eager), for update()
        self._from_graph = False
        self._eager_steps = 0
        self._shape_key: Optional[tuple] = None
        self._inputs: dict = {}   # the static device buffers the captured graph reads
        self._hyper = None        # static (step_size, sqrt(1 - b2^t), go) for Adam's kernel
        self._hyper_in = None     # HostToDevice writing the first two of those
        self._forward = None      # the captured gradients half
        self._update = None       # the captured update half

    @property
    def mode(self) -> str:
        """'cuda graph' once the step replays captured graphs, else 'eager'."""
        return "cuda graph" if self._forward is not None else "eager"

    def device_bytes(self) -> int:
        """Device memory held by the captured graphs' private pools."""
        return sum(c.device_bytes() for c in (self._forward, self._update) if c is not None)

    # -- the two halves ------------------------------------------------------------------
    def gradients(self, inputs: dict) -> dict:
        """Forward and backward on ``inputs``; returns the graph's outputs (on the device;
        with graphs, arrays that the next step overwrites)."""
        inputs = {k: v for k, v in inputs.items() if v is not None}
        key = tuple(sorted((k, tuple(v.shape)) for k, v in inputs.items()))
        if self.graphs_wanted and self._eager_steps >= 1 and key == self._shape_key:
            try:
                return self._graphed_gradients(inputs)
            except CaptureError as exc:
                print(f"capsflow: CUDA graph capture failed, running eagerly ({exc})",
                      file=sys.stderr)
                self.graphs_wanted = False
                self._forward = self._update = None
        if self._shape_key is None:
            self._shape_key = key
        outputs, self._grads = self.graph.value_and_grad(
            self.params, inputs, backend=self.backend.name, outputs=self.outputs)
        self._loss = outputs.get("loss")
        self._from_graph = False
        return outputs

    def update(self, lr: Optional[float] = None) -> None:
        """Apply the optimizer to the gradients of the last ``gradients`` call, unless
        its loss (when the outputs include it) is not finite."""
        if self._from_graph:
            self._hyper_in.write(self.optimizer.advance(self.opt_state, lr))
            if self._update is None:
                self._update = capture(self.backend.xp, self._guarded_update)
            self._update.replay()
        else:
            if self._grads is None:
                raise RuntimeError("update() needs a gradients() call first")
            if self._loss is None or np.isfinite(float(to_numpy(self._loss))):
                self.optimizer.step(self.params, self._grads, self.opt_state, lr=lr)
                self._eager_steps += 1
        self._grads = self._loss = None
        self._from_graph = False

    # -- capture and replay ----------------------------------------------------------------
    def _guarded_update(self) -> None:
        """The update half as captured: go = isfinite(loss), then Adam, which reads it."""
        xp = self.backend.xp
        loss = self._forward.result[0].get("loss")
        if loss is not None:
            xp.copyto(self._hyper[2:], xp.isfinite(loss))
        self.optimizer.apply(self.params, self._forward.result[1], self.opt_state, self._hyper)

    def _graphed_gradients(self, inputs: dict) -> dict:
        xp = self.backend.xp
        if self._forward is None:
            dtype = next(iter(self.params.values())).dtype
            self._inputs = {k: xp.empty(v.shape, dtype=dtype) for k, v in inputs.items()}
            self._hyper = xp.ones(3, dtype=xp.float64)
            self._hyper_in = HostToDevice(xp, self._hyper[:2])
            self._load(inputs)
            self._forward = capture(xp, lambda: self.graph.value_and_grad(
                self.params, self._inputs, backend=self.backend.name, outputs=self.outputs))
        else:
            self._load(inputs)
        self._forward.replay()
        self._from_graph = True
        return self._forward.result[0]

    def _load(self, inputs: dict) -> None:
        """Copy the batch into the static buffers the captured graph reads."""
        for k, buf in self._inputs.items():
            buf[...] = self.backend.asarray(inputs[k], dtype=buf.dtype)
