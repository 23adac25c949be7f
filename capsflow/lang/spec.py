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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsflow.lang.compose import VAR as _VAR
from capsflow.lang.compose import Document, compose
from capsflow.lang.compose import check_keys as _check_keys
from capsflow.errors import SpecError
from capsflow.lang.yamlio import LocDict

NODE_KEYS = {"id", "op", "in", "attrs", "when", "doc"}
REPEAT_KEYS = {"id", "repeat", "carry", "body", "doc"}
STAGE_KEYS = {"stage", "nodes", "doc"}
WHEN = ("always", "first", "not_first", "last", "not_last")
INIT_KINDS = ("zeros", "ones", "normal", "uniform", "uniform_fan_in", "constant")


@dataclass
class InputSpec:
    name: str
    shape: tuple
    optional: bool = False
    line: int | None = None


@dataclass
class ParamSpec:
    name: str
    shape: tuple
    init: tuple  # (kind, argument), e.g. ("normal", 0.01)
    trainable: bool = True
    line: int | None = None
    file: str | None = None   # where it was declared: the graph, a base or a fragment


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


def load_spec(path: str | Path, overrides: dict | None = None) -> Spec:
    """Read a YAML graph spec (following ``extends`` and ``include``), apply variable
    overrides and unroll repeats."""
    path = str(path)
    overrides = overrides or {}
    doc = compose(path, overrides)
    variables = _resolve_vars(doc, overrides, path)
    body = {"name": doc.name, "description": doc.description, "inputs": doc.inputs,
            "params": doc.params, "nodes": doc.nodes, "outputs": doc.outputs}
    body = _substitute(body, variables, (path, None))
    for key in ("nodes", "outputs"):
        if not body.get(key):
            raise SpecError(f"the spec has no '{key}' section", file=path)
    builder = _Expander(path)
    builder.expand(body["nodes"], prefix="", scope={}, stage=None, block=None)
    return Spec(
        name=str(body.get("name") or Path(path).stem), file=path, vars=variables,
        inputs=_parse_inputs(body.get("inputs") or {}, path),
        params=_parse_params(body.get("params") or {}, path),
        nodes=builder.nodes, outputs=_parse_outputs(body["outputs"], path),
        aliases=builder.aliases, blocks=builder.blocks,
        description=str(body.get("description") or ""), sources=doc.sources)


# -- variables ---------------------------------------------------------------------
def _resolve_vars(doc: Document, overrides: dict, path: str) -> dict:
    """Values of all variables, with ``${}`` references between them substituted."""
    unknown = sorted(set(overrides) - doc.declared)
    if unknown:
        known = ", ".join(sorted(doc.declared)) or "none"
        raise SpecError(f"unknown variable '{unknown[0]}' in overrides; this spec defines: {known}",
                        file=path)
    values, origins = dict(doc.vars), doc.origins
    # Variables may refer to earlier variables.
    for name in list(values):
        values[name] = _substitute(values[name], values, origins.get(name, (path, None)))
    return values


def _substitute(obj: Any, variables: dict, loc: tuple) -> Any:
    """Replace ${name} everywhere; a string that is exactly '${name}' takes the value's type.
    ``loc`` is the (file, line) of the innermost mapping, for errors."""
    if isinstance(obj, dict):
        here = (getattr(obj, "file", None) or loc[0], getattr(obj, "line", None) or loc[1])
        out = LocDict((k, _substitute(v, variables, here)) for k, v in obj.items())
        out.file, out.line = here
        out.key_lines = dict(getattr(obj, "key_lines", {}))
        return out
    if isinstance(obj, list):
        return [_substitute(v, variables, loc) for v in obj]
    if not isinstance(obj, str) or "${" not in obj:
        return obj

    def lookup(name: str) -> Any:
        if name not in variables:
            known = ", ".join(sorted(variables)) or "none"
            raise SpecError(f"unknown variable '${{{name}}}'; defined: {known}",
                            file=loc[0], line=loc[1])
        return variables[name]

    whole = _VAR.fullmatch(obj)
    if whole:
        return lookup(whole.group(1))
    return _VAR.sub(lambda m: str(lookup(m.group(1))), obj)


# -- inputs, params, outputs -----------------------------------------------------------
def _shape(value: Any, what: str, path: str, line: int | None) -> tuple:
    if not isinstance(value, list) or not all(
            (isinstance(d, int) and d > 0) or (isinstance(d, str) and d.isidentifier())
            for d in value):
        raise SpecError(f"{what}: shape must be a list of positive integers or a batch "
                        f"symbol such as N, got {value!r}", file=path, line=line)
    return tuple(value)


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
        _check_keys(entry, {"shape", "optional", "doc"}, f"input '{name}'", file)
        inputs[name] = InputSpec(name, _shape(entry["shape"], f"input '{name}'", file, line),
                                 bool(entry.get("optional", False)), line)
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
        _check_keys(entry, {"shape", "init", "trainable", "doc"}, f"parameter '{name}'", file)
        shape = _shape(entry["shape"], f"parameter '{name}'", file, line)
        if any(isinstance(d, str) for d in shape):
            raise SpecError(f"parameter '{name}': shape must be all integers", file=file, line=line)
        params[name] = ParamSpec(name, shape, _parse_init(entry.get("init", "zeros"), name, file, line),
                                 bool(entry.get("trainable", True)), line, file)
    return params


def _parse_init(init: Any, name: str, path: str, line: int | None) -> tuple:
    if isinstance(init, str) and init in ("zeros", "ones"):
        return init, None
    if isinstance(init, dict) and len(init) == 1:
        kind, arg = next(iter(init.items()))
        if kind in INIT_KINDS and isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return kind, float(arg)
    raise SpecError(f"parameter '{name}': init {init!r} is not one of zeros, ones, "
                    "{normal: STD}, {uniform: BOUND}, {uniform_fan_in: FAN_IN}, {constant: VALUE}",
                    file=path, line=line)


def _parse_outputs(section: Any, path: str) -> dict:
    if not isinstance(section, dict):
        raise SpecError("'outputs' must map output names to node ids, e.g. {loss: loss}",
                        file=getattr(section, "file", None) or path)
    for name, ref in section.items():
        if not isinstance(ref, str):
            file, line = _where(section, name, ref, path)
            raise SpecError(f"output '{name}' must name a node id, got {ref!r}", file=file,
                            line=line)
    return dict(section)


# -- node expansion ----------------------------------------------------------------------
class _Expander:
    """Flattens stage groups and unrolls repeat blocks into NodeSpecs with stable ids."""

    def __init__(self, path: str):
        self.path = path
        self.nodes: list[NodeSpec] = []
        self.aliases: dict[str, str] = {}
        self.blocks: dict[str, int] = {}
        self.seen: set[str] = set()

    def error(self, message: str, entry: Any, node: str | None = None) -> SpecError:
        return SpecError(message, file=getattr(entry, "file", None) or self.path,
                         line=getattr(entry, "line", None), node=node)

    def expand(self, entries: Any, prefix: str, scope: dict, stage: str | None,
               block: tuple | None) -> None:
        """Append the nodes of ``entries``; ``scope`` maps local names to resolved ids."""
        if not isinstance(entries, list):
            raise self.error("'nodes' (and a repeat's 'body') must be a list of nodes", entries)
        for entry in entries:
            if not isinstance(entry, dict):
                raise self.error(f"each node must be a mapping with id and op, got {entry!r}", entries)
            if "stage" in entry:
                _check_keys(entry, STAGE_KEYS, f"stage '{entry['stage']}'", self.path)
                self.expand(entry.get("nodes") or [], prefix, scope, str(entry["stage"]), block)
            elif "repeat" in entry:
                self.expand_repeat(entry, prefix, scope, stage)
            else:
                self.add_node(entry, prefix, scope, stage, block)

    def add_node(self, entry: dict, prefix: str, scope: dict, stage: str | None,
                 block: tuple | None) -> None:
        node_id = entry.get("id")
        if not isinstance(node_id, str) or not node_id:
            raise self.error("node without an 'id'", entry)
        full_id = prefix + node_id
        _check_keys(entry, NODE_KEYS, f"node '{full_id}'", self.path)
        if "op" not in entry:
            raise self.error("missing 'op'", entry, full_id)
        inputs = entry.get("in", [])
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise self.error(f"'in' must be a list of names, got {inputs!r}", entry, full_id)
        attrs = entry.get("attrs") or {}
        if not isinstance(attrs, dict):
            raise self.error(f"'attrs' must be a mapping, got {attrs!r}", entry, full_id)
        if full_id in self.seen:
            raise self.error(f"duplicate id '{full_id}'", entry, full_id)
        self.seen.add(full_id)
        scope[node_id] = full_id
        self.nodes.append(NodeSpec(
            full_id, str(entry["op"]), [scope.get(i, i) for i in inputs], dict(attrs),
            getattr(entry, "file", None) or self.path, getattr(entry, "line", None), stage,
            block[0] if block else None, block[1] if block else None))

    def expand_repeat(self, entry: dict, prefix: str, scope: dict, stage: str | None) -> None:
        block_id = entry.get("id")
        if not isinstance(block_id, str) or not block_id:
            raise self.error("repeat block without an 'id'", entry)
        _check_keys(entry, REPEAT_KEYS, f"repeat block '{block_id}'", self.path)
        count = entry["repeat"]
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise self.error(f"repeat must be a whole number >= 1, got {count!r}", entry, block_id)
        carry = entry.get("carry") or {}
        if not isinstance(carry, dict) or not all(
                isinstance(c, dict) and set(c) == {"init", "next"} for c in carry.values()):
            raise self.error("carry must map names to {init: OUTER_NAME, next: BODY_NODE_ID}",
                             entry, block_id)
        body = entry.get("body")
        full_block = prefix + block_id
        self.blocks[full_block] = count
        previous: dict = {}
        for k in range(count):
            local = dict(scope)
            for name, c in carry.items():
                local[name] = scope.get(c["init"], c["init"]) if k == 0 else previous[c["next"]]
            kept = [e for e in (body or []) if self._runs(e, k, count, entry, block_id)]
            self.expand(kept, f"{full_block}/{k}/", local, stage, (full_block, k))
            for name, c in carry.items():
                if c["next"] not in local or local[c["next"]] == scope.get(c["next"]):
                    if k < count - 1:
                        raise self.error(f"carry '{name}': next '{c['next']}' is not a node of "
                                         "the body", entry, block_id)
            previous = {n: local[n] for n in local if local[n].startswith(f"{full_block}/{k}/")}
            for name, full in previous.items():
                self.aliases[f"{full_block}/{name}"] = full  # outer names see the last iteration
        for name, c in carry.items():  # the carried value after the last iteration
            if c["next"] in previous:
                self.aliases.setdefault(f"{full_block}/{name}", previous[c["next"]])
        scope.update({k: v for k, v in self.aliases.items() if k.startswith(full_block + "/")})

    def _runs(self, entry: Any, k: int, count: int, block: dict, block_id: str) -> bool:
        when = entry.get("when", "always") if isinstance(entry, dict) else "always"
        if when not in WHEN:
            raise self.error(f"when must be one of {', '.join(WHEN)}, got {when!r}", entry, block_id)
        last, first = k == count - 1, k == 0
        return {"always": True, "first": first, "not_first": not first,
                "last": last, "not_last": not last}[when]
