"""The compiled graph: what ``capsflow.compile`` returns."""
from __future__ import annotations

import math
import numbers
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from capsflow.backends import get_backend
from capsflow.core.compiler import build_dag, topological_order
from capsflow.errors import CapsflowError, SpecError
from capsflow.core.executor import RunResult, execute
from capsflow.core.memory import LiveBytes
from capsflow.core.schedule import Plan, make_plan, unavailable_nodes
from capsflow.core.shapes import split_dim
from capsflow.lang.limits import Limits
from capsflow.lang.spec import ParamSpec, Spec, load_spec

DTYPES = ("float32", "float64")


@dataclass
class Graph:
    spec: Spec
    dag: nx.DiGraph
    order: list
    limits: Limits = field(default_factory=Limits)

    # -- parameters ------------------------------------------------------------------
    @property
    def param_specs(self) -> dict:
        return self.spec.params

    def trainable(self, params: dict) -> dict:
        """The entries of ``params`` that the spec does not mark ``trainable: false``
        (the same arrays: an optimizer's in-place updates land in ``params``); only these
        get gradients."""
        return {k: params[k] for k, p in self.spec.params.items() if p.trainable}

    def scheduled_values(self, epoch: int) -> dict:
        """{name: value} of the parameters with a ``schedule`` (docs/spec.md) during
        ``epoch`` (0 = the first); the trainer sets them at each epoch's start."""
        return {k: p.scheduled_value(epoch) for k, p in self.spec.params.items() if p.schedule}

    def param_count(self, names: list | None = None) -> int:
        """Number of parameter values (a Python int: it never overflows)."""
        chosen = None if names is None else set(names)
        return sum(math.prod(p.shape) for p in self.spec.params.values()
                   if chosen is None or p.name in chosen)

    def init_params(self, seed: int = 0, dtype: str = "float32") -> dict:
        """Fresh parameters as NumPy arrays. Each parameter draws from its own stream
        (seeded by ``seed`` and its name), so adding a parameter changes no other.
        The bytes the shapes need are checked against ``Limits.max_param_bytes`` first."""
        _check_dtype(dtype)
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
            raise CapsflowError(f"seed must be a whole number >= 0, got {seed!r:.40}")
        needed = self.param_count() * np.dtype(dtype).itemsize
        if needed > self.limits.max_param_bytes:
            raise SpecError(f"the parameters need {needed:,} bytes as {dtype}, more than "
                            f"{self.limits.max_param_bytes:,} (Limits.max_param_bytes)",
                            file=self.spec.file)
        params = {}
        for p in self.spec.params.values():
            rng = np.random.default_rng([seed, zlib.crc32(p.name.encode())])
            params[p.name] = _initialise(rng, p, dtype)
        return params

    def check_params(self, params: dict) -> None:
        """One clear line if ``params`` do not match the spec (names or shapes)."""
        missing = [n for n in self.spec.params if n not in params]
        if missing:
            raise CapsflowError(f"parameter '{missing[0]}' is missing "
                                f"({len(missing)} of {len(self.spec.params)} missing)")
        for name, p in self.spec.params.items():
            if tuple(params[name].shape) != p.shape:
                raise CapsflowError(f"parameter '{name}' has shape {tuple(params[name].shape)}, "
                                    f"the spec says {p.shape}")

    # -- running ---------------------------------------------------------------------
    def plan(self, given: set, outputs: list | None = None, loss: str | None = None,
             wrt: list | None = None, fed: frozenset = frozenset()) -> Plan:
        chosen = self._choose_outputs(given, outputs)
        return make_plan(self.dag, self.order, given, chosen,
                         self.spec.outputs[loss] if loss else None, wrt, fed, loss)

    def run(self, params: dict, inputs: dict, backend: Any = "numpy",
            outputs: list | None = None, return_peak: bool = False,
            feed: dict | None = None) -> Any:
        """Forward pass -> {output name: backend array}. ``outputs=None``: every output
        computable from the given inputs (``loss`` needs ``y``).

        ``feed`` maps op node ids (or aliases such as ``routing/v``) to values used
        instead of computing them, e.g. perturbed digit capsules (N, 10, 16) to decode;
        nodes needed only by fed ones do not run. Required inputs must still be given.

        ``backend`` is a name ("numpy", "cupy") or a ``capsflow.Options`` (which also
        chooses fast paths and precision)."""
        result = self._execute(params, inputs, backend, outputs, loss=None, feed=feed,
                               track_memory=return_peak)
        return (result.outputs, result.peak_bytes) if return_peak else result.outputs

    def value_and_grad(self, params: dict, inputs: dict, backend: Any = "numpy",
                       loss: str = "loss", outputs: list | None = None,
                       return_peak: bool = False, grad_hook: Any = None) -> Any:
        """Forward + reverse pass -> (outputs, {param name: gradient}).

        ``grad_hook(consumer, value, slot, gradient)`` sees each gradient contribution
        (one per DAG edge of the reverse plan); see executor.execute. Only the
        graph's trainable parameters get gradients."""
        if loss not in self.spec.outputs:
            raise CapsflowError(f"the graph has no output '{loss}' to differentiate; "
                                f"outputs: {', '.join(self.spec.outputs)}")
        result = self._execute(params, inputs, backend, outputs, loss=loss, grad_hook=grad_hook,
                               track_memory=return_peak)
        xp = get_backend(backend).xp
        grads = {n: g if g is not None else xp.zeros_like(_value(params[n], xp))
                 for n, g in result.grads.items()}
        return (result.outputs, grads, result.peak_bytes) if return_peak else (result.outputs, grads)

    def _execute(self, params, inputs, backend, outputs, loss, grad_hook=None,
                 feed=None, track_memory=False) -> RunResult:
        be = get_backend(backend)
        self.check_params(params)
        unknown = sorted(set(inputs) - set(self.spec.inputs))
        if unknown:
            raise CapsflowError(f"unknown input '{unknown[0]}'; the graph's inputs are "
                                f"{', '.join(self.spec.inputs)}")
        given = {k for k, v in inputs.items() if v is not None}
        fed = {self._fed_node(k): v for k, v in (feed or {}).items()}
        plan = self.plan(given, outputs, loss, fed=frozenset(fed))
        dtype = self._run_dtype(params, be.xp)
        values = {n: be.asarray(params[n], dtype=dtype) for n in self.spec.params}
        sizes: dict = {}   # batch symbol -> (size, the input that set it)
        for name in sorted(given, key=list(self.spec.inputs).index):
            values[name] = be.asarray(inputs[name], dtype=dtype)
            self._check_input(name, values[name].shape, sizes)
        for node, value in fed.items():
            values[node] = be.asarray(value, dtype=dtype)
            _check_shape(f"fed value '{node}'", self.dag.nodes[node]["shape"], values[node].shape)
            _check_fed_sizes(node, self.dag.nodes[node]["shape"], values[node].shape, sizes)
        # Counting live bytes costs a little at every op: only when asked.
        return execute(self.dag, plan, values, be, LiveBytes() if track_memory else None,
                       grad_hook)

    def _run_dtype(self, params: dict, xp: Any) -> Any:
        """The run's dtype: the spec's own parameters' (an extra entry in ``params``, such
        as a step counter, is ignored and must not make the run int64); float32 without
        parameters."""
        dtype = None
        for name in self.spec.params:
            this = _value(params[name], xp).dtype
            if str(this) not in DTYPES:
                raise CapsflowError(f"parameter '{name}' has dtype {this}, the graph runs in "
                                    f"{' or '.join(DTYPES)}")
            dtype = dtype or this
        return dtype or np.float32

    def _choose_outputs(self, given: set, outputs: list | None) -> dict:
        names = list(self.spec.outputs) if outputs is None else list(outputs)
        for n in names:
            if n not in self.spec.outputs:
                raise CapsflowError(f"unknown output '{n}'; the graph's outputs are "
                                    f"{', '.join(self.spec.outputs)}")
        chosen = {n: self.spec.outputs[n] for n in names}
        if outputs is None:  # drop outputs whose required inputs were not given
            absent = {n for n, d in self.dag.nodes(data=True)
                      if d["kind"] == "input" and n not in given and d["optional"]}
            unavailable = unavailable_nodes(self.dag, self.order, absent)
            chosen = {k: v for k, v in chosen.items() if v not in unavailable}
        return chosen

    def _check_input(self, name: str, shape: tuple, sizes: dict) -> None:
        """``shape`` must match the declaration, and a symbol (N) has one size in all inputs."""
        declared = self.spec.inputs[name].shape
        _check_shape(f"input '{name}'", declared, shape)
        for d, s in zip(declared, shape):
            if isinstance(d, str):
                if s == 0:  # max, argmax and softmax have no value over nothing; a mean is NaN
                    raise CapsflowError(f"input '{name}' has shape {tuple(shape)}: {d} is 0, "
                                        "and the graph needs at least one")
                size, first = sizes.setdefault(d, (s, name))
                if size != s:
                    raise CapsflowError(f"input '{name}' has shape {tuple(shape)}: {d} is {s} "
                                        f"here but {size} in input '{first}'")

    def _fed_node(self, name: str) -> str:
        """A ``feed`` key -> the op node id it names (aliases resolved)."""
        node = self.spec.aliases.get(name, name)
        if node not in self.dag or self.dag.nodes[node]["kind"] != "op":
            raise CapsflowError(f"cannot feed '{name}': it is not an op node of the graph "
                                f"(inputs and parameters are passed as inputs and params)")
        return node


def _check_shape(what: str, declared: tuple, shape: tuple) -> None:
    """``shape`` must match ``declared``, whose symbols (e.g. N) match any size."""
    ok = len(shape) == len(declared) and all(
        isinstance(d, str) or d == s for d, s in zip(declared, shape))
    if not ok:
        raise CapsflowError(f"{what} has shape {tuple(shape)}, the graph expects "
                            f"({', '.join(map(str, declared))})")


def _check_fed_sizes(node: str, declared: tuple, shape: tuple, sizes: dict) -> None:
    """A fed value's batch dims (``N``, or ``N*36`` after a reshape) must have the sizes
    the inputs gave their symbols: else the run meets them in a broadcast error."""
    for d, s in zip(declared, shape):
        if not isinstance(d, str):
            continue
        symbols, factor = split_dim(d)
        if list(symbols.values()) == [1] and factor == 1:  # a plain symbol no input set
            sizes.setdefault(d, (s, f"fed value '{node}'"))
        if any(sym not in sizes for sym in symbols):
            continue
        expected = factor * math.prod(sizes[sym][0] ** k for sym, k in symbols.items())
        if expected != s:
            sym = next(iter(symbols))
            size, first = sizes[sym]
            first = first if first.startswith("fed value") else f"input '{first}'"
            why = "" if d == sym else f" ({sym} is {size})"
            raise CapsflowError(f"fed value '{node}' has shape {tuple(shape)}: {d} is {s} "
                                f"here but {expected}{why} in {first}")


def _value(a: Any, xp: Any) -> Any:
    return a if hasattr(a, "dtype") else xp.asarray(a)


def _check_dtype(dtype: str) -> None:
    try:
        name = str(np.dtype(dtype))
    except TypeError:  # not a dtype at all
        name = None
    if name not in DTYPES:
        raise CapsflowError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r:.40}")


def _initialise(rng: np.random.Generator, p: ParamSpec, dtype: str) -> np.ndarray:
    """``p``'s initial values; values that numpy rejects or that ``dtype`` cannot hold
    (``{normal: 1e300}`` as float32) are an error at the parameter's line."""
    kind, arg = p.init
    try:
        with np.errstate(over="raise", invalid="raise"):
            values = _draw(rng, kind, arg, p.shape).astype(dtype)
    except (ValueError, OverflowError, FloatingPointError) as exc:
        raise SpecError(f"parameter '{p.name}': init {{{kind}: {arg}}} cannot make {dtype} "
                        f"values ({exc})", file=p.file, line=p.line) from None
    except MemoryError:
        raise SpecError(f"parameter '{p.name}': not enough memory for shape {p.shape}",
                        file=p.file, line=p.line) from None
    if not np.isfinite(values).all():
        raise SpecError(f"parameter '{p.name}': init {{{kind}: {arg}}} makes values too large "
                        f"for {dtype}", file=p.file, line=p.line)
    # A schedule's values lie between its start (the init, checked above) and ``until``.
    with np.errstate(over="ignore"):
        last = None if p.schedule is None else np.array(p.schedule.until, dtype=dtype)
    if last is not None and not np.isfinite(last):
        raise SpecError(f"parameter '{p.name}': schedule's until {p.schedule.until:g} is too "
                        f"large for {dtype}", file=p.file, line=p.line)
    return values


def _draw(rng: np.random.Generator, kind: str, arg: float | None, shape: tuple) -> np.ndarray:
    if kind == "zeros":
        return np.zeros(shape)
    if kind == "ones":
        return np.ones(shape)
    if kind == "constant":
        return np.full(shape, arg)
    if kind == "normal":
        return rng.normal(0.0, arg, size=shape)
    bound = arg if kind == "uniform" else 1.0 / np.sqrt(arg)
    return rng.uniform(-bound, bound, size=shape)


def compile(path: str | Path, overrides: dict | None = None,  # noqa: A001
            limits: Limits | None = None) -> Graph:
    """YAML spec -> checked, compiled Graph (``graph.dag`` is the networkx DiGraph).
    ``limits`` bounds what reading, compiling and ``init_params`` may cost
    (capsflow/lang/limits.py; default ``Limits()``)."""
    if limits is not None and not isinstance(limits, Limits):
        raise CapsflowError(f"limits must be a capsflow Limits, got {type(limits).__name__}")
    limits = limits or Limits()
    spec = load_spec(path, overrides, limits)
    dag = build_dag(spec)
    return Graph(spec, dag, topological_order(dag), limits)
