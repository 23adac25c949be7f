"""One training step in two halves, ``gradients`` (forward and backward) and ``update``
(the optimizer), run op by op or recorded once and replayed.

``update`` never applies a step whose loss is not finite (the trainer then stops,
without saving that state), and it checks that without making the host wait for the
loss: so ``gradients``, ``update``, and then reading the loss, queues the whole step on
a device before the host waits once. With ``Options.replay_steps`` and Adam, on a
backend that registers a variant of ``record_step`` (CuPy), each half is recorded once
and then replayed: the batch is copied into the same device buffers, Adam's per-step
numbers into a small device array, and one launch runs all the work of that half. The
update's recording starts by setting a flag from the forward's loss, and the fused
Adam update changes nothing where the flag is 0. (The step count still advances on
the host; training stops at such a step anyway.) Op-by-op updates check the loss on
the host.

The first step of a run is op by op, so that everything is compiled before the
recording; batches of another shape (an epoch's last, shorter batch) run op by op too.
If the recording fails, the step says so once on stderr and stays op by op.

``RecordedForward`` does the same for the forward pass alone (evaluation), and
``device_to_host`` lets the host read a step's numbers later, while the device runs
the next step (runners/training.py reads each step's loss one step late).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import numpy as np

from capsflow.backends import get_backend, to_numpy
from capsflow.core.routine import Routine
from capsflow.training.optim import Adam


class RecordError(RuntimeError):
    """The step could not be recorded for replay (the caller runs it op by op)."""


class Replayed:
    """The reference recording, on any backend: each ``replay()`` runs ``fn`` again and
    copies what it returns into the arrays of the first run, as a replayed recording
    would update them. (The first run happens at construction, to have those arrays;
    the first replay is that run.) It lets the code around a recording (static
    buffers, replay order) run, and be tested, on the CPU."""

    def __init__(self, xp: Any, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self.result = fn()
        self._ran_at_record = True

    def replay(self) -> None:
        if self._ran_at_record:
            self._ran_at_record = False
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


#: ``record_step(be, fn)``: ``fn``'s work recorded once, an object with ``result``
#: (what ``fn`` returned), ``replay()`` and ``device_bytes()``; raises RecordError.
record_step = Routine("record_step", Replayed)


class _Assign:
    """The reference writer of ``dst``: a plain assignment (see HostToDevice on CuPy)."""

    def __init__(self, xp: Any, dst: Any) -> None:
        self.dst, self._xp = dst, xp

    def write(self, values: Any) -> None:
        self.dst[...] = self._xp.asarray(np.asarray(values, dtype=self.dst.dtype))


#: ``host_to_device(be, dst)``: an object whose ``write(values)`` puts host values into
#: the device array ``dst`` every step (on CuPy without making the host wait).
host_to_device = Routine("host_to_device", _Assign)


class _ReadNow:
    """The reference reader: ``start`` copies the values to the host at once, waiting
    for the device (see DeviceToHost on CuPy)."""

    def __init__(self, xp: Any, shape: tuple, dtype: Any) -> None:
        self.dtype = np.dtype(dtype)

    def start(self, src: Any) -> Callable[[], np.ndarray]:
        values = np.array(to_numpy(src), dtype=self.dtype)  # a copy: ``src`` may be rewritten
        return lambda: values


#: ``device_to_host(be, shape, dtype)``: a reader of small device arrays of that shape.
#: ``start(src)`` begins copying ``src`` to the host and returns a function that gives
#: the host values; on CuPy that function waits for this copy alone, not for the work
#: queued after it. Read a copy before starting the second one after it.
device_to_host = Routine("device_to_host", _ReadNow)


class _StaticInputs:
    """The device buffers a recording reads, one per input, refilled before each replay:
    a host array through ``host_to_device`` (on CuPy from pinned memory, without making
    the host wait), an array already on the device by a device copy."""

    def __init__(self, backend: Any, inputs: dict, dtype: Any) -> None:
        xp = backend.xp
        self.buffers = {k: xp.empty(v.shape, dtype=dtype) for k, v in inputs.items()}
        self._writers = {k: host_to_device(backend, buf) for k, buf in self.buffers.items()}

    def load(self, inputs: dict) -> None:
        for k, buf in self.buffers.items():
            value = inputs[k]
            if isinstance(value, (np.ndarray, np.generic)):
                self._writers[k].write(value)
            else:
                buf[...] = value


def _finite_or_absent(loss: Any) -> bool:
    """Whether a step with this loss may be applied (on the host: it waits for the loss)."""
    return loss is None or bool(np.isfinite(float(to_numpy(loss))))


def can_replay(options: Any, simulate: bool = False) -> bool:
    """Whether work run with ``options`` may be recorded once and replayed: asked for
    (``replay_steps``), on the fast paths (the references' GEMMs, CuPy's own, cannot be
    recorded), on a backend that registers a variant of ``record_step`` (CuPy).
    ``simulate`` records even where only the reference recording exists (NumPy), so
    that the tests run the replay machinery."""
    return bool(options.replay_steps and options.fast_paths
                and (record_step.has_variant(options) or simulate))


def draws_dropout_masks(graph: Any) -> bool:
    """Whether some dropout op of ``graph`` has a seed input (draws a mask per step)."""
    return any(d.get("op") == "dropout" and len(d["inputs"]) > 1
               for _, d in graph.dag.nodes(data=True))


class TrainStep:
    """``gradients(inputs)`` then ``update(lr)``, for ``graph`` with ``params`` updated
    in place by ``optimizer`` (whose state is ``opt_state``, made for the trainable
    parameters alone: ``optimizer.init_state(graph.trainable(params))``)."""

    def __init__(self, graph: Any, params: dict, optimizer: Any, opt_state: dict,
                 backend: Any = "numpy", outputs: Optional[list] = None,
                 simulate: bool = False) -> None:
        self.graph, self.params = graph, params
        self.trainable = graph.trainable(params)  # what the optimizer updates (frozen ones not)
        self.optimizer, self.opt_state = optimizer, opt_state
        self.backend = get_backend(backend)
        self.outputs = outputs
        # A dropout op fed a seed reads the seed's value on the host to draw its mask: a
        # recording would replay the mask of the step it was recorded at. Those graphs
        # run every step op by op.
        self.replay_wanted = (can_replay(self.backend.options, simulate)
                              and isinstance(optimizer, Adam)
                              and not draws_dropout_masks(graph))
        self._grads: Optional[dict] = None
        self._loss = None         # the last gradients() call's loss (eager), for update()
        self._from_graph = False
        self._eager_steps = 0
        self._shape_key: Optional[tuple] = None
        self._inputs: Optional[_StaticInputs] = None  # the buffers the recording reads
        self.last_inputs: dict = {}  # the device arrays the last gradients() call read
        self._hyper = None        # static (step_size, sqrt(1 - b2^t), go) for Adam's kernel
        self._hyper_in = None     # host_to_device's writer of the first two of those
        self._forward = None      # the recorded gradients half
        self._update = None       # the recorded update half

    @property
    def mode(self) -> str:
        """'replay' once the step replays its recordings, else 'eager'."""
        return "replay" if self._forward is not None else "eager"

    def device_bytes(self) -> int:
        """Device memory held by the recordings' private pools."""
        return sum(c.device_bytes() for c in (self._forward, self._update) if c is not None)

    # -- the two halves ------------------------------------------------------------------
    def gradients(self, inputs: dict) -> dict:
        """Forward and backward on ``inputs``; returns the graph's outputs (on the device;
        with graphs, arrays that the next step overwrites)."""
        inputs = {k: v for k, v in inputs.items() if v is not None}
        key = tuple(sorted((k, tuple(v.shape)) for k, v in inputs.items()))
        if self.replay_wanted and self._eager_steps >= 1 and key == self._shape_key:
            try:
                return self._graphed_gradients(inputs)
            except RecordError as exc:
                self._stop_replay(exc)
        if self._shape_key is None:
            self._shape_key = key
        # On the device once, as value_and_grad would put them, and kept for the caller.
        dtype = next(iter(self.params.values())).dtype
        self.last_inputs = {k: self.backend.asarray(v, dtype=dtype) for k, v in inputs.items()}
        outputs, self._grads = self.graph.value_and_grad(
            self.params, self.last_inputs, backend=self.backend, outputs=self.outputs)
        self._loss = outputs.get("loss")
        self._from_graph = False
        return outputs

    def update(self, lr: Optional[float] = None) -> None:
        """Apply the optimizer to the gradients of the last ``gradients`` call, unless
        its loss (when the outputs include it) is not finite."""
        if self._from_graph:
            hyper = self.optimizer.advance(self.opt_state, lr)
            self._hyper_in.write(hyper)
            try:
                if self._update is None:
                    # The guard once, eagerly, on the same arrays: the eager steps check
                    # the loss on the host, so its two kernels would otherwise be
                    # compiled and loaded first inside the recording.
                    self._set_go()
                    self._update = record_step(self.backend, self._guarded_update)
                self._update.replay()
            except RecordError as exc:  # apply this step op by op, from the recorded gradients
                outputs, grads = self._forward.result
                self._stop_replay(exc)
                if _finite_or_absent(outputs.get("loss")):
                    self.optimizer.apply(self.trainable, grads, self.opt_state, hyper, self.backend)
        else:
            if self._grads is None:
                raise RuntimeError("update() needs a gradients() call first")
            if _finite_or_absent(self._loss):
                self.optimizer.step(self.trainable, self._grads, self.opt_state, lr=lr,
                                    backend=self.backend)
                self._eager_steps += 1
        self._grads = self._loss = None
        self._from_graph = False

    # -- record and replay -----------------------------------------------------------------
    def _stop_replay(self, exc: RecordError) -> None:
        """Say once that recording failed, and run every later step op by op."""
        print(f"capsflow: recording the training step failed, running it op by op ({exc})",
              file=sys.stderr)
        self.replay_wanted = False
        self._forward = self._update = None

    def _set_go(self) -> None:
        """go = isfinite(loss) on the device, in Adam's per-step numbers."""
        loss = self._forward.result[0].get("loss")
        if loss is not None:
            self.backend.xp.copyto(self._hyper[2:], self.backend.xp.isfinite(loss))

    def _guarded_update(self) -> None:
        """The update half as recorded: go = isfinite(loss), then Adam, which reads it."""
        self._set_go()
        self.optimizer.apply(self.trainable, self._forward.result[1], self.opt_state, self._hyper,
                             self.backend)

    def _graphed_gradients(self, inputs: dict) -> dict:
        xp = self.backend.xp
        if self._forward is None:
            dtype = next(iter(self.params.values())).dtype
            self._inputs = _StaticInputs(self.backend, inputs, dtype)
            self._hyper = xp.ones(3, dtype=xp.float64)
            self._hyper_in = host_to_device(self.backend, self._hyper[:2])
            self._inputs.load(inputs)
            self._forward = record_step(self.backend, lambda: self.graph.value_and_grad(
                self.params, self._inputs.buffers, backend=self.backend, outputs=self.outputs))
        else:
            self._inputs.load(inputs)
        self.last_inputs = self._inputs.buffers
        self._forward.replay()
        self._from_graph = True
        return self._forward.result[0]


class RecordedForward:
    """``graph.run(params, inputs, outputs)`` (a forward pass, e.g. evaluation's),
    recorded and replayed as TrainStep's gradients half is: where a training step would
    replay (``Options.replay_steps`` and the fast paths, a backend with a variant of
    ``record_step``, or ``simulate``), the first batch runs op by op, the next batch of
    the same shape is recorded, and every later one of that shape replays it; a batch of
    another shape (a last, shorter one) runs op by op. Each call returns the outputs on
    the device; replayed, they are arrays that the next call overwrites. ``params`` are
    read where they are: updating them in place (as the optimizer does) is seen by the
    next replay."""

    def __init__(self, graph: Any, params: dict, backend: Any, outputs: list,
                 simulate: bool = False) -> None:
        self.graph, self.params, self.outputs = graph, params, list(outputs)
        self.backend = get_backend(backend)
        self.replay_wanted = can_replay(self.backend.options, simulate)
        self._shape_key: Optional[tuple] = None
        self._inputs: Optional[_StaticInputs] = None
        self._recording = None

    @property
    def mode(self) -> str:
        """'replay' once the forward pass replays its recording, else 'eager'."""
        return "replay" if self._recording is not None else "eager"

    def __call__(self, inputs: dict) -> dict:
        inputs = {k: v for k, v in inputs.items() if v is not None}
        key = tuple(sorted((k, tuple(v.shape)) for k, v in inputs.items()))
        if self.replay_wanted and key == self._shape_key:
            try:
                return self._replayed(inputs)
            except RecordError as exc:
                print(f"capsflow: recording the forward pass failed, running it op by op "
                      f"({exc})", file=sys.stderr)
                self.replay_wanted, self._recording = False, None
        if self._shape_key is None:
            self._shape_key = key
        return self.graph.run(self.params, inputs, backend=self.backend, outputs=self.outputs)

    def _replayed(self, inputs: dict) -> dict:
        if self._recording is None:
            dtype = next(iter(self.params.values())).dtype
            self._inputs = _StaticInputs(self.backend, inputs, dtype)
            self._inputs.load(inputs)
            self._recording = record_step(self.backend, lambda: self.graph.run(
                self.params, self._inputs.buffers, backend=self.backend, outputs=self.outputs))
        else:
            self._inputs.load(inputs)
        self._recording.replay()
        return self._recording.result
