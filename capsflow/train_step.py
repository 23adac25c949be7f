"""One training step in two halves, ``gradients`` (forward and backward) and ``update``
(the optimizer), run op by op or replayed as CUDA graphs.

The halves are apart so that the caller can look at the loss before the parameters
change (the trainer stops on a NaN loss without applying that step). On CuPy with Adam
and ``cuda_graph=True`` each half is captured once (capsflow/cudagraph.py) and then
replayed: the batch is copied into the same device buffers, Adam's per-step numbers
into a small device array, and one launch runs all the kernels of that half. The
first step of a run is eager, so that every kernel is compiled before the capture;
batches of another shape (an epoch's last, shorter batch) run eagerly too. If the
capture fails, the step says so once on stderr and stays eager.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

import numpy as np

from .backend import get_backend
from .cudagraph import CaptureError, capture
from .optim import Adam


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
        self._from_graph = False
        self._eager_steps = 0
        self._shape_key: Optional[tuple] = None
        self._inputs: dict = {}   # the static device buffers the captured graph reads
        self._hyper = None        # static (step_size, sqrt(1 - b2^t)) for Adam's kernel
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
        self._from_graph = False
        return outputs

    def update(self, lr: Optional[float] = None) -> None:
        """Apply the optimizer to the gradients of the last ``gradients`` call."""
        if self._from_graph:
            self._hyper[...] = self.backend.asarray(
                np.asarray(self.optimizer.advance(self.opt_state, lr), dtype=np.float64))
            if self._update is None:
                self._update = capture(self.backend.xp, lambda: self.optimizer.apply(
                    self.params, self._forward.result[1], self.opt_state, self._hyper))
            self._update.replay()
        else:
            if self._grads is None:
                raise RuntimeError("update() needs a gradients() call first")
            self.optimizer.step(self.params, self._grads, self.opt_state, lr=lr)
            self._eager_steps += 1
        self._grads = None
        self._from_graph = False

    # -- capture and replay ----------------------------------------------------------------
    def _graphed_gradients(self, inputs: dict) -> dict:
        xp = self.backend.xp
        if self._forward is None:
            dtype = next(iter(self.params.values())).dtype
            self._inputs = {k: xp.empty(v.shape, dtype=dtype) for k, v in inputs.items()}
            self._hyper = xp.zeros(2, dtype=xp.float64)
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
