"""Graph spec: YAML -> variables substituted -> repeat blocks unrolled -> a flat list of
named nodes. Plain data in, plain data out; the compiler turns it into a DAG.

See docs/spec.md for the language; capsflow/lang/compose.py handles ``extends``, ``replace``
and ``include``. In short::

    vars:    {routing_iters: 3}               # ${routing_iters}, overridable with --set
    inputs:  {x: {shape: [N, 1, 28, 28]}, y: {shape: [N, 10], optional: true}}
    params:  {W: {shape: [1152, 10, 16, 8], init: {normal: 0.01}}}
    nodes:
      - {id: u_hat, op: einsum, in: [W, u], attrs: {eq: "ijdk,nik->nijd"}}
      - id: routing                           # unrolled: routing/0/c, routing/1/c, ...
        repeat: ${routing_iters}
        carry: {b: {init: b0, next: b_next}}
        body: [...]
    outputs: {loss: loss}
"""
from __future__ import annotations

import math
import os
import re
from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsflow.core.shapes import MAX_DIM, MAX_NDIM
from capsflow.errors import SpecError
from capsflow.lang.compose import VAR as _VAR
from capsflow.lang.compose import Document, Instance, compose, expression_value, fill_text
from capsflow.lang.compose import check_keys as _check_keys
from capsflow.lang.expr import is_number
from capsflow.lang.limits import Budget, Limits, measure, plain_data_problem, show, value_children
from capsflow.lang.yamlio import LocDict

NODE_KEYS = {"id", "op", "in", "attrs", "when", "doc"}
REPEAT_KEYS = {"id", "repeat", "carry", "body", "doc"}
STAGE_KEYS = {"stage", "nodes", "doc"}
WHEN = ("always", "first", "not_first", "last", "not_last")
INIT_KINDS = ("zeros", "ones", "normal", "uniform", "uniform_fan_in", "constant")
LOOP_NAMES = ("iteration", "iterations")   # inside a repeat body: this iteration, how many
#: A graph's name names folders (runs/<name>, compare's --out/<name>): one plain file name.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


@dataclass
class InputSpec:
    name: str
    shape: tuple
    optional: bool = False
    line: int | None = None


@dataclass(frozen=True)
class EpochSchedule:
    """A value that moves by ``per_epoch`` each epoch from its start, up or down to
    ``until`` and no further: how a ``trainable: false`` parameter with a ``schedule``
    changes during training (EM routing's spread-loss margin, 0.2 -> 0.9)."""
    per_epoch: float
    until: float

    def value_at(self, start: float, epoch: int) -> float:
        """The value during epoch ``epoch`` (0 = the first), from ``start`` at epoch 0."""
        if self.per_epoch == 0:
            return start
        value = start + self.per_epoch * epoch
        return min(value, self.until) if self.per_epoch > 0 else max(value, self.until)


@dataclass
class ParamSpec:
    name: str
    shape: tuple
    init: tuple  # (kind, argument), e.g. ("normal", 0.01)
    trainable: bool = True
    line: int | None = None
    file: str | None = None   # where it was declared: the graph, a base or a fragment
    schedule: EpochSchedule | None = None  # set by the trainer at each epoch's start

    def scheduled_value(self, epoch: int) -> float:
        """The value the trainer gives this (scheduled) parameter during ``epoch``."""
        return self.schedule.value_at(constant_init_value(self.init), epoch)


@dataclass
class NodeSpec:
    id: str
    op: str
    inputs: list
    attrs: dict
    file: str | None = None
    line: int | None = None
    stage: str | None = None
    block: str | None = None       # id of the repeat block this node was unrolled from
    iteration: int | None = None   # which unrolled iteration
    context: str | None = None     # "in instance 'c3' of FRAGMENT, included at FILE:LINE"


@dataclass
class Spec:
    name: str
    file: str
    vars: dict
    inputs: dict
    params: dict
    nodes: list
    outputs: dict
    aliases: dict = field(default_factory=dict)   # 'routing/v' -> 'routing/2/v'
    blocks: dict = field(default_factory=dict)    # repeat block id -> iteration count
    description: str = ""
    sources: list = field(default_factory=list)   # files read: the graph, its bases, fragments


def load_spec(path: str | Path, overrides: dict | None = None,
              limits: Limits | None = None) -> Spec:
    """Read a YAML graph spec (following ``extends`` and ``include``), apply variable
    overrides and unroll repeats, within ``limits`` (default: ``Limits()``)."""
    path = _check_path(path)
    limits = limits or Limits()
    overrides = _check_overrides(overrides, limits)
    budget = Budget(limits)
    doc = compose(path, overrides, budget)
    variables = _resolve_vars(doc, overrides, path, budget)
    body = {"name": doc.name, "description": doc.description, "inputs": doc.inputs,
            "params": doc.params, "nodes": doc.nodes, "outputs": doc.outputs}
    body = _substitute(body, variables, (path, None), budget)
    for key in ("nodes", "outputs"):
        if not body.get(key):
            raise SpecError(f"the spec has no '{key}' section", file=path)
    for key in ("name", "description"):
        if not isinstance(body[key], (str, type(None))):
            raise SpecError(f"'{key}' must be a string, got {show(body[key])}", file=path)
    if body["name"] is not None and not NAME_PATTERN.fullmatch(body["name"]):
        raise SpecError(f"'name' must be a plain file name (letters, digits, '_', '.', '-'; "
                        f"at most 100; not starting with '.' or '-'), got {show(body['name'])}: "
                        f"it names the run's folder", file=path)
    builder = _Expander(path, budget)
    builder.expand(body["nodes"], prefix="", scope={}, stage=None, block=None)
    builder.resolve_inputs()
    return Spec(
        name=body["name"] or Path(path).stem, file=path, vars=dict(variables),
        inputs=_parse_inputs(body.get("inputs") or {}, path),
        params=_merge_params(_parse_params(body.get("params") or {}, path),
                             _parse_params(builder.params, path)),
        nodes=builder.nodes, outputs=_parse_outputs(body["outputs"], path),
        aliases=builder.aliases, blocks=builder.blocks,
        description=body["description"] or "", sources=doc.sources)


def _check_path(path: Any) -> str:
    try:
        path = os.fspath(path)
    except TypeError:
        path = None
    if not isinstance(path, str) or not path:
        raise SpecError("the graph must be given as a file path (a str or pathlib.Path)")
    return path


def _check_overrides(overrides: Any, limits: Limits) -> dict:
    """Overrides from Python are checked like --set values: names to plain data."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
        raise SpecError(f"overrides must map variable names to values, got {show(overrides)}")
    for name, value in overrides.items():
        problem = plain_data_problem(value, limits)
        if problem:
            raise SpecError(f"override '{name}': {problem}")
    return overrides


# -- variables ---------------------------------------------------------------------
def _resolve_vars(doc: Document, overrides: dict, path: str, budget: Budget) -> "_Scope":
    """All variables, each substituted when first read (a var may use any other)."""
    unknown = sorted(set(overrides) - doc.declared)
    if unknown:
        known = ", ".join(sorted(doc.declared)) or "none"
        raise SpecError(f"unknown variable '{unknown[0]}' in overrides; this spec defines: {known}",
                        file=path)
    for name in LOOP_NAMES:
        if name in doc.declared:
            file, line = doc.defaults[name][1]
            raise SpecError(f"variable '{name}' is reserved: inside a repeat body "
                            "${iteration} is the iteration number (from 0) and ${iterations} "
                            "their count", file=file, line=line)
    values = dict(doc.vars)
    for name, value in overrides.items():
        values[name] = _as_declared(name, value, *doc.defaults[name])
    scope = _Scope(values, doc.origins, budget, path)
    for name in values:
        scope[name]   # every variable is checked, used or not
    return scope


def _as_declared(name: str, value: Any, default: Any, where: tuple) -> Any:
    """An override read as the kind of value the file declares: a whole number, a
    number (an int becomes a float), true/false; other kinds are taken as given."""
    def wrong(kind: str, hint: str) -> SpecError:
        return SpecError(f"--set {name}={show(value)}: '{name}' is {kind} (it is "
                         f"{show(default)} in the graph); {hint}", file=where[0], line=where[1])

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise wrong("true or false", "give true or false")
    elif isinstance(default, int):
        if not (isinstance(value, int) and not isinstance(value, bool)):
            hint = "give a whole number, e.g. 3" + (
                "; a value with a dot or an exponent is a float" if is_number(value) else "")
            raise wrong("a whole number", hint)
    elif isinstance(default, float):
        if not is_number(value):
            raise wrong("a number", "give a number such as 1e-9 or 0.5")
        return float(value)
    elif isinstance(default, str) and (value is None or isinstance(value, bool)):
        # --set routing=no read as false (and then the file routing/False.yaml)
        raise wrong("text", "YAML reads yes, no, on, off, true and false as true or false, "
                    "and null or ~ as null: quote the word, e.g. --set \"NAME='no'\"")
    return value


class _Scope(Mapping):
    """Variables visible at one place. Each is substituted when first read, so vars may
    refer to each other in any order; a circle is an error. ``pinned`` values (an
    instance's own vars) come first, then ``parent`` (the graph's vars around an
    instance), then this scope's own (a fragment's defaults)."""

    def __init__(self, raw: dict, origins: dict, budget: Budget, path: str,
                 parent: Mapping | None = None, pinned: dict | None = None):
        self.raw, self.origins, self.budget, self.path = raw, origins, budget, path
        self.parent, self.pinned = parent, pinned or {}
        self.done: dict = {}
        self.active: list = []

    def __contains__(self, name: object) -> bool:
        return name in self.pinned or (self.parent is not None and name in self.parent) \
            or name in self.raw

    def __getitem__(self, name: str) -> Any:
        if name in self.pinned:
            return self.pinned[name]
        if self.parent is not None and name in self.parent:
            return self.parent[name]
        if name in self.done:
            return self.done[name]
        if name not in self.raw:
            raise KeyError(name)
        file, line = self.origins.get(name, (self.path, None))
        if name in self.active:
            loop = " -> ".join(self.active[self.active.index(name):] + [name])
            raise SpecError(f"variables refer to each other in a circle: {loop}",
                            file=file or self.path, line=line)
        self.active.append(name)
        try:
            value = _substitute(self.raw[name], self, (file or self.path, line), self.budget)
        finally:
            self.active.pop()
        self.done[name] = value
        return value

    def __iter__(self):
        parent = self.parent if self.parent is not None else ()
        return iter(dict.fromkeys([*self.pinned, *parent, *self.raw]))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Deferred(str):
    """Text whose ``${}`` uses ``iteration``: evaluated when its repeat block is unrolled,
    with the variables that were visible where it was written."""
    variables: Mapping
    loc: tuple


class _Defer(Exception):
    """An expression names ``iteration`` outside any repeat iteration: wait for one."""


def _substitute(obj: Any, variables: Mapping, loc: tuple, budget: Budget) -> Any:
    """Replace ${expression} everywhere; a string that is exactly '${...}' takes the
    value's type. ``loc`` is the (file, line) of the innermost mapping, for errors. What
    substitution copies in counts towards ``budget`` (an alias bomb in a variable is
    caught here). Text that uses ``${iteration}`` comes back as a ``Deferred``."""
    if isinstance(obj, Instance):
        return _substitute_instance(obj, variables, budget)
    if isinstance(obj, dict):
        here = (getattr(obj, "file", None) or loc[0], getattr(obj, "line", None) or loc[1])
        out = LocDict((k, _substitute(v, variables, here, budget)) for k, v in obj.items())
        out.file, out.line = here
        out.key_lines = dict(getattr(obj, "key_lines", {}))
        out.included_at = getattr(obj, "included_at", None)
        return out
    if isinstance(obj, list):
        return [_substitute(v, variables, loc, budget) for v in obj]
    if not isinstance(obj, str) or "${" not in obj:
        return obj
    try:
        return _fill(obj, variables, loc, budget)
    except _Defer:
        deferred = Deferred(obj)
        deferred.variables, deferred.loc = variables, loc
        return deferred


def _fill(text: str, variables: Mapping, loc: tuple, budget: Budget) -> Any:
    def error(message: str) -> SpecError:
        return SpecError(message, file=loc[0], line=loc[1])

    def lookup(name: str) -> Any:
        if name not in variables:
            if name in LOOP_NAMES:
                raise _Defer
            known = ", ".join(sorted(variables)) or "none"
            raise error(f"unknown variable '{name}'; defined: {known}")
        value = variables[name]
        if isinstance(value, Deferred):  # a variable that uses ${iteration} itself
            if LOOP_NAMES[0] not in variables:
                raise _Defer         # outside an iteration: this text waits for one too
            loop = {k: variables[k] for k in LOOP_NAMES if k in variables}
            return _fill(str(value), ChainMap(loop, value.variables), value.loc, budget)
        return value

    def value_of(expression: str) -> Any:
        return expression_value(expression, lookup, error)

    whole = _VAR.fullmatch(text)
    if whole:
        value = value_of(whole.group(1))
        if isinstance(value, (dict, list)):
            try:
                size, _ = measure(value, value_children, budget.remaining_nodes())
            except ValueError:  # only Python overrides can hold themselves; they are checked
                raise error(f"variable '{text}' contains itself") from None
            budget.spend_nodes(size, f"variable '{text}'", *loc)
        return value
    filled = fill_text(text, value_of, budget.limits.max_bytes - budget.bytes,
                       "what is left of Limits.max_bytes", error)
    budget.spend_bytes(len(filled), f"substituting variables into {show(text)}", *loc)
    return filled


def _substitute_instance(instance: Instance, variables: Mapping, budget: Budget) -> Instance:
    """An instance's entries substituted in its own scope: its ``vars`` (read where the
    include is), then the graph's vars, then the fragment's defaults."""
    here = (instance.file, instance.line)
    pinned = {name: _substitute(value, variables, here, budget)
              for name, value in instance["vars"].items()}
    defaults = instance["defaults"]
    origins = {name: (getattr(defaults, "file", None) or instance.fragment,
                      defaults.key_line(name)) for name in defaults}
    scope = _Scope(defaults, origins, budget, instance.fragment, variables, pinned)
    out = Instance(id=instance["id"], bind=instance["bind"],
                   nodes=_substitute(instance["nodes"], scope, here, budget),
                   params=_substitute(instance["params"], scope, (instance.fragment, None),
                                      budget))
    out.file, out.line, out.key_lines = instance.file, instance.line, instance.key_lines
    out.fragment = instance.fragment
    return out


# -- inputs, params, outputs -----------------------------------------------------------
def _shape(value: Any, what: str, path: str, line: int | None) -> tuple:
    if not isinstance(value, list) or len(value) > MAX_NDIM or not all(
            (_whole(d) and 0 < d <= MAX_DIM) or (isinstance(d, str) and d.isidentifier())
            for d in value):
        fractional = [d for d in value if isinstance(d, float)] if isinstance(value, list) else []
        hint = f" ({fractional[0]} is not a whole number: '//' divides to a whole number)" \
            if fractional else ""
        raise SpecError(f"{what}: shape must be a list of at most {MAX_NDIM} positive integers "
                        f"or batch symbols such as N, got {show(value)}{hint}", file=path, line=line)
    return tuple(value)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(entry: dict, key: str, default: bool, what: str, path: str, line: int | None) -> bool:
    """A true/false key (``optional``, ``trainable``): bool('no') would be True."""
    value = entry.get(key, default)
    if not isinstance(value, bool):
        raise SpecError(f"{what}: '{key}' must be true or false, got {show(value)}",
                        file=path, line=line)
    return value


def _where(section: Any, name: str, entry: Any, path: str) -> tuple:
    """(file, line) of one entry of a section; entries may come from a base or fragment."""
    if isinstance(entry, LocDict):
        return entry.file or path, entry.line
    line = section.key_line(name) if isinstance(section, LocDict) else None
    return getattr(section, "file", None) or path, line


def _parse_inputs(section: Any, path: str) -> dict:
    if not isinstance(section, dict):
        raise SpecError("'inputs' must map names to {shape: [...]}",
                        file=getattr(section, "file", None) or path)
    inputs = {}
    for name, entry in section.items():
        file, line = _where(section, name, entry, path)
        if not isinstance(entry, dict) or "shape" not in entry:
            raise SpecError(f"input '{name}' needs a shape, e.g. {{shape: [N, 1, 28, 28]}}",
                            file=file, line=line)
        what = f"input '{name}'"
        _check_keys(entry, {"shape", "optional", "doc"}, what, file)
        inputs[name] = InputSpec(name, _shape(entry["shape"], what, file, line),
                                 _flag(entry, "optional", False, what, file, line), line)
    return inputs


def _parse_params(section: Any, path: str) -> dict:
    if not isinstance(section, dict):
        raise SpecError("'params' must map names to {shape: [...], init: ...}",
                        file=getattr(section, "file", None) or path)
    params = {}
    for name, entry in section.items():
        file, line = _where(section, name, entry, path)
        if not isinstance(entry, dict) or "shape" not in entry:
            raise SpecError(f"parameter '{name}' needs a shape", file=file, line=line)
        what = f"parameter '{name}'"
        _check_keys(entry, {"shape", "init", "trainable", "schedule", "doc"}, what, file)
        shape = _shape(entry["shape"], what, file, line)
        if any(isinstance(d, str) for d in shape):
            raise SpecError(f"{what}: shape must be all integers", file=file, line=line)
        param = ParamSpec(name, shape, _parse_init(entry.get("init", "zeros"), name, file, line),
                          _flag(entry, "trainable", True, what, file, line), line, file)
        if "schedule" in entry:
            param.schedule = _parse_schedule(entry["schedule"], param, what)
        params[name] = param
    return params


SCHEDULE_FORM = "{per_epoch: STEP, until: LAST}"
CONSTANT_INITS = {"zeros": 0.0, "ones": 1.0, "constant": None}  # None: the init's argument


def constant_init_value(init: tuple) -> float:
    """The value of a constant init ("zeros", "ones", ("constant", V))."""
    kind, arg = init
    return float(arg) if kind == "constant" else CONSTANT_INITS[kind]


def _parse_schedule(value: Any, param: ParamSpec, what: str) -> EpochSchedule:
    """A parameter's ``schedule``: only for a ``trainable: false`` parameter with a constant
    init (the start value), and ``until`` on the side ``per_epoch`` moves towards."""
    file, line = param.file, param.line
    if not isinstance(value, dict) or set(value) != {"per_epoch", "until"}:
        raise SpecError(f"{what}: schedule must be {SCHEDULE_FORM}, got {show(value)}",
                        file=file, line=line)
    numbers = {}
    for key in ("per_epoch", "until"):
        number = _finite(value[key]) if is_number(value[key]) else None
        if number is None:
            raise SpecError(f"{what}: schedule's {key} must be a finite number, got "
                            f"{show(value[key])}", file=file, line=line)
        numbers[key] = number
    if param.trainable:
        raise SpecError(f"{what}: a schedule sets the value at each epoch, so the optimizer "
                        f"must not: add trainable: false", file=file, line=line)
    if param.init[0] not in CONSTANT_INITS:
        raise SpecError(f"{what}: a schedule starts from a constant init (zeros, ones or "
                        f"{{constant: VALUE}}), got {param.init[0]}", file=file, line=line)
    start, step, until = constant_init_value(param.init), numbers["per_epoch"], numbers["until"]
    if (until - start) * step < 0:
        direction = "up" if step > 0 else "down"
        raise SpecError(f"{what}: schedule's per_epoch {step:g} moves {direction} from the start "
                        f"{start:g}, away from until {until:g}", file=file, line=line)
    return EpochSchedule(step, until)


# What each init's number must be; numpy would fail later, or make NaN or infinite values.
INIT_RULES = {"zeros": ("any number", lambda a: True), "ones": ("any number", lambda a: True),
              "constant": ("any number", lambda a: True),
              "normal": ("a standard deviation >= 0", lambda a: a >= 0),
              "uniform": ("a bound >= 0", lambda a: a >= 0),
              "uniform_fan_in": ("a fan-in > 0", lambda a: a > 0)}


def _parse_init(init: Any, name: str, path: str, line: int | None) -> tuple:
    if isinstance(init, str) and init in ("zeros", "ones"):
        return init, None
    if isinstance(init, dict) and len(init) == 1:
        kind, arg = next(iter(init.items()))
        if kind in INIT_KINDS and isinstance(arg, (int, float)) and not isinstance(arg, bool):
            rule, ok = INIT_RULES[kind]
            value = _finite(arg)
            if value is None or not ok(value):
                raise SpecError(f"parameter '{name}': {kind} needs {rule} (finite), got "
                                f"{show(arg)}", file=path, line=line)
            return kind, value
    raise SpecError(f"parameter '{name}': init {show(init)} is not one of zeros, ones, "
                    "{normal: STD}, {uniform: BOUND}, {uniform_fan_in: FAN_IN}, {constant: VALUE}",
                    file=path, line=line)


def _finite(number: int | float) -> float | None:
    """``number`` as a finite float, or None (NaN, infinite, or too large for a float)."""
    try:
        value = float(number)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _merge_params(declared: dict, from_instances: dict) -> dict:
    """The graph's params and those its fragment instances declare (NAME/param)."""
    for name, param in from_instances.items():
        if name in declared:
            raise SpecError(f"parameter '{name}' is declared by the graph and by the fragment "
                            f"instance that names it", file=param.file, line=param.line)
    return {**declared, **from_instances}


def _parse_outputs(section: Any, path: str) -> dict:
    if not isinstance(section, dict):
        raise SpecError("'outputs' must map output names to node ids, e.g. {loss: loss}",
                        file=getattr(section, "file", None) or path)
    for name, ref in section.items():
        if not isinstance(ref, str) or isinstance(ref, Deferred):
            file, line = _where(section, name, ref, path)
            why = (" (${iteration} exists only inside a repeat body)"
                   if isinstance(ref, Deferred) else "")
            raise SpecError(f"output '{name}' must name a node id, got {show(ref)}{why}",
                            file=file, line=line)
    return section if isinstance(section, LocDict) else dict(section)  # lines for errors


def output_location(spec: "Spec", name: str) -> tuple:
    """(file, line) where output ``name`` is declared (a base's or variant's file)."""
    return _where(spec.outputs, name, None, spec.file)


# -- node expansion ----------------------------------------------------------------------
class _NotInThisIteration(str):
    """In an iteration's scope: a body name that this iteration does not define."""

    def __new__(cls, block: str) -> "_NotInThisIteration":
        made = super().__new__(cls, f"<not in this iteration of {block}>")
        made.block = block
        return made


class _Expander:
    """Flattens stage groups and unrolls repeat blocks into NodeSpecs with stable ids.

    ``scope`` maps the names visible at a point (body ids, carried names, aliases) to
    resolved ids; an iteration's scope is a ChainMap over the enclosing one, so unrolling
    costs what the body holds, not what the graph holds so far."""

    def __init__(self, path: str, budget: Budget):
        self.path = path
        self.budget = budget
        self.limits = budget.limits
        self.nodes: list[NodeSpec] = []
        self.aliases: dict[str, str] = {}
        self.blocks: dict[str, int] = {}
        self.seen: set[str] = set()
        self.instances: set[str] = set()
        self.context: list[str] = []   # the instances being expanded, innermost last
        self.params = LocDict()   # params of fragment instances, by their full names
        self.params.key_lines = {}
        # Each node's inputs are looked up once everything is expanded, in the scope it was
        # written in: a body (or fragment) may use an id it defines further down, and that
        # id, not an outer node of the same name, is the one meant.
        self.unresolved: list[tuple[NodeSpec, Any]] = []

    def error(self, message: str, entry: Any, node: str | None = None) -> SpecError:
        return SpecError(message, file=getattr(entry, "file", None) or self.path,
                         line=getattr(entry, "line", None), node=node)

    def expand(self, entries: Any, prefix: str, scope: dict, stage: str | None,
               block: tuple | None) -> None:
        """Append the nodes of ``entries``; ``scope`` maps local names to resolved ids;
        ``block`` is (block id, iteration, count) inside a repeat body, else None."""
        if not isinstance(entries, list):
            raise self.error("'nodes' (and a repeat's 'body') must be a list of nodes", entries)
        for entry in entries:
            if not isinstance(entry, dict):
                raise self.error(f"each node must be a mapping with id and op, got {show(entry)}",
                                 entries)
            if isinstance(entry, Instance):
                self.expand_instance(entry, prefix, scope, stage, block)
            elif "stage" in entry:
                self.expand_stage(entry, prefix, scope, block)
            elif "repeat" in entry:
                self.expand_repeat(entry, prefix, scope, stage, block)
            elif self._runs(entry, block):
                self.add_node(entry, prefix, scope, stage, block)

    def expand_stage(self, entry: dict, prefix: str, scope: dict, block: tuple | None) -> None:
        name = entry["stage"]
        if not isinstance(name, str) or not name:
            raise self.error(f"a stage must be named by a string, got {show(name)}", entry)
        _check_keys(entry, STAGE_KEYS, f"stage '{name}'", self.path)
        if not isinstance(entry.get("nodes"), list):
            raise self.error(f"stage '{name}' needs a 'nodes' list", entry)
        self.expand(entry["nodes"], prefix, scope, name, block)

    def add_node(self, entry: dict, prefix: str, scope: dict, stage: str | None,
                 block: tuple | None) -> None:
        node_id = entry.get("id")
        if not isinstance(node_id, str) or not node_id:
            raise self.error("node without an 'id'", entry)
        full_id = prefix + node_id
        _check_keys(entry, NODE_KEYS, f"node '{full_id}'", self.path)
        if "op" not in entry:
            raise self.error("missing 'op'", entry, full_id)
        if not isinstance(entry["op"], str):
            raise self.error(f"'op' must name an op, got {show(entry['op'])}", entry, full_id)
        inputs = entry.get("in", [])
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise self.error(f"'in' must be a list of names, got {show(inputs)}", entry, full_id)
        for name in (node_id, *inputs):
            if isinstance(name, Deferred):  # it would stay the text '${iteration}'
                raise self.error(f"{show(str(name))}: ids and the names in 'in' are written "
                                 "out; ${iteration} goes in attributes (a body's ids are "
                                 "numbered by the block: BLOCK/K/ID)", entry, full_id)
        attrs = self.resolve(entry.get("attrs", {}), entry, block, full_id)
        if not isinstance(attrs, dict):
            empty = " (it is empty: give attributes or leave 'attrs' out)" if attrs is None else ""
            raise self.error(f"'attrs' must be a mapping, got {show(attrs)}{empty}", entry, full_id)
        if full_id in self.seen:
            raise self.duplicate(full_id, entry)
        if full_id in self.aliases:
            raise self.error(f"node '{full_id}' has the name of a repeat block's or fragment "
                             f"instance's value ({self.aliases[full_id]})", entry, full_id)
        if len(self.nodes) >= self.limits.max_nodes:
            raise self.error(f"the graph has more than {self.limits.max_nodes:,} nodes after "
                             "unrolling repeat blocks (Limits.max_nodes)", entry, full_id)
        self.seen.add(full_id)
        scope[node_id] = full_id
        node = NodeSpec(
            full_id, entry["op"], list(inputs), dict(attrs),
            getattr(entry, "file", None) or self.path, getattr(entry, "line", None), stage,
            block[0] if block else None, block[1] if block else None,
            self.context[-1] if self.context else None)
        self.nodes.append(node)
        self.unresolved.append((node, scope))

    def resolve_inputs(self) -> None:
        """Every node's input names as the ids they mean (see ``unresolved``)."""
        for node, scope in self.unresolved:
            resolved = [scope.get(i, i) for i in node.inputs]
            for name, target in zip(node.inputs, resolved):
                if isinstance(target, _NotInThisIteration):
                    raise SpecError(f"'{name}' is a node of repeat block '{target.block}' "
                                    f"only in some iterations (its 'when'), not in iteration "
                                    f"{node.iteration}, where '{node.id}' reads it",
                                    file=node.file, line=node.line, node=node.id)
            node.inputs = resolved
        self.unresolved = []

    def expand_repeat(self, entry: dict, prefix: str, scope: dict, stage: str | None,
                      block: tuple | None) -> None:
        block_id = entry.get("id")
        if not isinstance(block_id, str) or not block_id:
            raise self.error("repeat block without an 'id'", entry)
        _check_keys(entry, REPEAT_KEYS, f"repeat block '{block_id}'", self.path)
        if prefix + block_id in self.blocks:
            raise self.duplicate(prefix + block_id, entry)
        if prefix + block_id in self.instances or prefix + block_id in self.seen:
            raise self.error(f"repeat block '{prefix + block_id}' has the name of a fragment "
                             f"instance or a node: '{block_id}/...' would mean both",
                             entry, prefix + block_id)
        count = self.resolve(entry["repeat"], entry, block, prefix + block_id)
        if not _whole(count) or count < 1:
            raise self.error(f"repeat must be a whole number >= 1, got {show(count)}", entry, prefix + block_id)
        if count > self.limits.max_repeat:
            raise self.error(f"repeat {count:,} is more than {self.limits.max_repeat:,} "
                             "(Limits.max_repeat)", entry, prefix + block_id)
        carry = entry.get("carry", {})
        if not isinstance(carry, dict) or not all(
                isinstance(c, dict) and set(c) == {"init", "next"}
                and all(isinstance(v, str) for v in c.values()) for c in carry.values()):
            raise self.error("carry must map names to {init: OUTER_NAME, next: BODY_NODE_ID}",
                             entry, prefix + block_id)
        body = entry.get("body")
        if not isinstance(body, list) or not body:
            raise self.error(f"repeat block '{block_id}' needs a 'body': a list of nodes",
                             entry, prefix + block_id)
        full_block = prefix + block_id
        # Unrolling writes the body out ``count`` times: count the copies before making them.
        size, _ = measure(body, value_children, self.budget.remaining_nodes())
        self.budget.spend_nodes((count - 1) * size, f"unrolling '{full_block}' ({count:,} x "
                                f"{size:,} values)", getattr(entry, "file", None) or self.path,
                                getattr(entry, "line", None), full_block)
        self.blocks[full_block] = count
        made: dict = {}      # body name -> its node in the last iteration that has it
        previous: dict = {}
        iterations = []
        for k in range(count):
            local = ChainMap({}, scope)
            iterations.append(local)
            for name, c in carry.items():
                local[name] = scope.get(c["init"], c["init"]) if k == 0 else previous[c["next"]]
            self.expand(body, f"{full_block}/{k}/", local, stage, (full_block, k, count))
            # What this iteration defined: body ids and the aliases of blocks in the body.
            previous = {n: v for n, v in local.maps[0].items()
                        if v.startswith(f"{full_block}/{k}/")}
            for name, c in carry.items():
                if k < count - 1 and c["next"] not in previous:
                    raise self.error(f"carry '{name}': next '{c['next']}' is not a node of "
                                     "the body", entry, block_id)
            made.update(previous)
        # A carried name's value after the last iteration: its 'next' there, or, where the
        # last iteration makes none ('when: not_last', as routing's logits), the value it read.
        for name, c in carry.items():
            made.setdefault(name, previous.get(c["next"], iterations[-1].maps[0][name]))
        # A body name an iteration lacks ('when: first'): reading it there is a mistake,
        # not the outer node of that name.
        for local in iterations:
            for name in made.keys() - local.maps[0].keys() - carry.keys():
                local.maps[0][name] = _NotInThisIteration(full_block)
        # Outer names see the last iteration: BLOCK/NAME, relative to the enclosing body,
        # so a block nested in a body adds one name per name of its own, never a copy of
        # every alias inside it (which doubled with each level of nesting).
        for name, target in made.items():
            if f"{full_block}/{name}" in self.seen:
                raise self.error(f"node '{full_block}/{name}' has the name that repeat block "
                                 f"'{full_block}' gives its '{name}'", entry, full_block)
            self.aliases[f"{full_block}/{name}"] = target
            scope[f"{block_id}/{name}"] = target

    def duplicate(self, full_id: str, entry: Any) -> SpecError:
        """'duplicate id', at the include that spliced the fragment in a second time."""
        included = getattr(entry, "included_at", None)
        if included is None:
            return self.error(f"duplicate id '{full_id}'", entry, full_id)
        return SpecError(f"duplicate id '{full_id}': {getattr(entry, 'file', None)} is already "
                         "included; give each include of it its own 'as: NAME' (its nodes and "
                         "params become NAME/...)", file=included[0], line=included[1],
                         node=full_id)

    def resolve(self, value: Any, entry: Any, block: tuple | None, node: str) -> Any:
        """``value`` with its ``Deferred`` texts (those using ${iteration}) evaluated for
        this iteration of the enclosing repeat block."""
        if isinstance(value, Deferred):
            if block is None:
                raise self.error(f"{show(str(value))}: ${{iteration}} and ${{iterations}} exist "
                                 "only inside a repeat body", entry, node)
            _, k, count = block
            loop = ChainMap({"iteration": k, "iterations": count}, value.variables)
            return _fill(str(value), loop, value.loc, self.budget)
        if isinstance(value, dict):
            items = {key: self.resolve(v, entry, block, node) for key, v in value.items()}
            if all(items[key] is v for key, v in value.items()):
                return value   # nothing deferred: no copy for every node of every iteration
            out = LocDict(items)
            out.file, out.line = getattr(value, "file", None), getattr(value, "line", None)
            out.key_lines = getattr(value, "key_lines", {})
            return out
        if isinstance(value, list):
            items = [self.resolve(v, entry, block, node) for v in value]
            return value if all(a is b for a, b in zip(items, value)) else items
        return value

    def expand_instance(self, entry: Instance, prefix: str, scope: dict, stage: str | None,
                        block: tuple | None) -> None:
        """A fragment instance: its nodes and params under NAME/, its ``bind`` names
        pointing at outer values; the outer graph sees NAME/ID (like a repeat block)."""
        name = entry["id"]
        full = prefix + name
        if full in self.instances or full in self.blocks or full in self.seen:
            raise self.error(f"two fragment instances (or an instance and a node) are named "
                             f"'{full}'; give each include its own 'as:'", entry, full)
        self.instances.add(full)
        local = ChainMap({}, scope)
        for inner, outer in entry["bind"].items():
            local[inner] = scope.get(outer, outer)
        params = entry["params"]
        for param, declared in (params.items() if isinstance(params, dict) else ()):
            self.params[f"{full}/{param}"] = declared
            self.params.key_lines[f"{full}/{param}"] = params.key_line(param)
            local[param] = f"{full}/{param}"
        own = set(local.maps[0])
        context = f"in instance '{full}' of {entry.fragment}, included at {entry.file}:{entry.line}"
        self.context.append(context)
        try:
            self.expand(entry["nodes"], full + "/", local, stage, block)
        except SpecError as exc:
            if "(in instance" in exc.message:
                raise
            raise SpecError(f"{exc.message} ({context})", file=exc.file, line=exc.line,
                            node=exc.node) from None
        finally:
            self.context.pop()
        for inner, target in local.maps[0].items():
            if inner in own:
                continue
            if f"{full}/{inner}" != target:
                self.aliases[f"{full}/{inner}"] = target
            scope[f"{name}/{inner}"] = target

    def _runs(self, entry: dict, block: tuple | None) -> bool:
        """Whether a node exists in this iteration of the enclosing repeat block."""
        if "when" not in entry:
            return True
        when = entry["when"]
        node = entry.get("id") if isinstance(entry.get("id"), str) else None
        if block is None:
            raise self.error("'when' works only inside a repeat body", entry, node)
        if not isinstance(when, str) or when not in WHEN:
            raise self.error(f"when must be one of {', '.join(WHEN)}, got {show(when)}", entry,
                             block[0])
        _, k, count = block
        last, first = k == count - 1, k == 0
        return {"always": True, "first": first, "not_first": not first,
                "last": last, "not_last": not last}[when]
