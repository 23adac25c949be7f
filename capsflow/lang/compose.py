"""Composition of graph specs: ``extends``, ``replace`` and ``include``.

A variant is a few lines on top of a base graph::

    extends: capsnet.yaml                  # path relative to this file
    vars: {routing: leaky}                 # merged over the base's vars
    replace:                               # swap a node, a repeat block or a body node
      u: {id: u, op: squash_exp, in: [primary_caps]}
      routing/c: {id: c, op: sigmoid, in: [b]}
    nodes: [...]                           # appended after the base's nodes

and any node list can splice in a fragment file (its vars, params and nodes)::

    - {include: "routing/${routing}.yaml"}

Everything here works on the raw YAML mappings (``LocDict``), which keep the file and
line they were read from, so a later error points at the variant or fragment that wrote
the entry. The result is one flat ``Document`` that spec.py substitutes and unrolls.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsflow.errors import SpecError
from capsflow.lang.yamlio import LocDict, load_yaml

GRAPH_KEYS = {"name", "description", "vars", "inputs", "params", "nodes", "outputs",
              "extends", "replace"}
FRAGMENT_KEYS = {"description", "vars", "params", "nodes"}
INCLUDE_KEYS = {"include", "doc"}
SECTIONS = ("inputs", "params", "outputs")   # merged by name; ``name: null`` removes one
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class Document:
    """A graph with its ``extends`` chain merged and its includes spliced in.

    ``vars`` holds raw values (``${}`` not yet substituted); ``origins`` says where each
    value was set, as (file, line), or (None, None) for a ``--set`` override.
    """
    file: str
    name: str | None
    description: str
    vars: dict
    origins: dict
    inputs: LocDict
    params: LocDict
    outputs: LocDict
    nodes: list
    declared: set = field(default_factory=set)    # names some file declares (not just --set)
    sources: list = field(default_factory=list)   # the graph, its bases, the fragments used


@dataclass(eq=False)
class _Fragment:
    """An included file. Its vars are defaults and its params are declared only while
    some of its entries are still in the graph after every ``replace``."""
    path: str
    vars: LocDict
    params: LocDict


@dataclass(eq=False)
class _Group:
    """The entries an include spliced in, kept together until the replaces are done.
    The fragment still counts while one of its own top-level entries is in ``entries``."""
    entries: list
    fragment: _Fragment
    original: list = field(default_factory=list)

    def __post_init__(self):
        self.original = list(self.entries)

    def survives(self) -> bool:
        return any(e is o for e in self.entries for o in self.original)


def compose(path: str, overrides: dict) -> Document:
    """Read ``path``, follow ``extends``, apply ``replace``s and splice ``include``s."""
    chain = _load_chain(path)
    variables, origins = _chain_vars(chain, overrides)
    declared = {n for doc in chain if isinstance(doc.get("vars"), dict) for n in doc["vars"]}
    composer = _Composer(variables, origins)
    nodes = composer.splice(chain[0].get("nodes"), chain[0].file, {})
    for doc in chain[1:]:
        replace = doc.get("replace") or {}
        if not isinstance(replace, dict):
            raise SpecError("'replace' must map node or block ids to new entries",
                            file=doc.file, line=doc.key_line("replace"))
        for target in replace:
            composer.replace(nodes, target, replace, doc)
        if doc.get("nodes") is not None:
            added = composer.splice(doc["nodes"], doc.file, {})
            if not isinstance(added, list):
                raise SpecError("'nodes' must be a list of nodes", file=doc.file,
                                line=doc.key_line("nodes"))
            nodes = (nodes if isinstance(nodes, list) else []) + added
    fragments: list[_Fragment] = []
    nodes = _flatten(nodes, fragments)
    variables, origins = _fragment_vars(fragments, variables, origins, path)
    params = _merge_sections(chain, "params")
    _add_fragment_params(params, fragments)
    top = chain[-1]
    return Document(
        file=path, name=top.get("name"), description=top.get("description") or "",
        vars=variables, origins=origins, inputs=_merge_sections(chain, "inputs"),
        params=params, outputs=_merge_sections(chain, "outputs"), nodes=nodes,
        declared=declared | {n for f in fragments for n in f.vars},
        sources=[d.file for d in reversed(chain)] + [f.path for f in fragments])


# -- extends ----------------------------------------------------------------------------
def _load_chain(path: str) -> list:
    """The graph and the graphs it extends, root base first."""
    chain: list[LocDict] = []
    seen: list[str] = []
    while True:
        raw = load_yaml(path)
        if not isinstance(raw, dict):
            raise SpecError("a graph spec must be a YAML mapping with 'nodes' and 'outputs'",
                            file=path)
        check_keys(raw, GRAPH_KEYS, "top level")
        chain.append(raw)
        seen.append(str(Path(path).resolve()))
        base = raw.get("extends")
        if base is None:
            if "replace" in raw:
                raise SpecError("'replace' needs 'extends': there is no base graph to "
                                "replace nodes in", file=path, line=raw.key_line("replace"))
            break
        if not isinstance(base, str) or not base:
            raise SpecError(f"'extends' must be the path of a graph spec, got {base!r}",
                            file=path, line=raw.key_line("extends"))
        base_path = Path(path).parent / base
        if str(base_path.resolve()) in seen:
            loop = " -> ".join([Path(p).name for p in seen] + [base_path.name])
            raise SpecError(f"'extends' goes round in a circle: {loop}", file=path,
                            line=raw.key_line("extends"))
        if not base_path.is_file():
            raise SpecError(f"extends '{base}': no such graph spec {base_path}", file=path,
                            line=raw.key_line("extends"))
        path = str(base_path)
    return chain[::-1]


def _chain_vars(chain: list, overrides: dict) -> tuple[dict, dict]:
    """Vars of the whole chain (an extending file wins), then the overrides."""
    values: dict = {}
    origins: dict = {}
    for doc in chain:
        declared = doc.get("vars")
        if declared is None:
            continue
        if not isinstance(declared, dict):
            raise SpecError("'vars' must be a mapping of name: value", file=doc.file,
                            line=doc.key_line("vars"))
        for name, value in declared.items():
            values[name] = value
            origins[name] = (doc.file, declared.key_line(name))
    for name, value in overrides.items():
        values[name] = value
        origins[name] = (None, None)
    return values, origins


def _merge_sections(chain: list, key: str) -> LocDict:
    """``inputs``, ``params`` or ``outputs`` of the chain merged by name."""
    merged = LocDict()
    merged.key_lines = {}
    for doc in chain:
        section = doc.get(key)
        if section is None:
            continue
        if not isinstance(section, dict):
            merged = section  # spec.py reports the malformed section with its file
            continue
        merged.file, merged.line = section.file, section.line
        for name, value in section.items():
            if value is None:
                if name not in merged:
                    raise SpecError(f"{key}: '{name}: null' removes nothing; the base has no "
                                    f"'{name}'", file=doc.file, line=section.key_line(name))
                del merged[name]
            else:
                merged[name] = value
                merged.key_lines[name] = section.key_line(name)
    return merged


# -- include and replace ------------------------------------------------------------------
class _Composer:
    """Splices includes (as ``_Group``s) and applies replaces to the raw node tree."""

    def __init__(self, variables: dict, origins: dict):
        self.variables = variables
        self.origins = origins
        self.stack: list[str] = []   # resolved paths of the fragments being spliced

    def splice(self, entries: Any, file: str, scope: dict) -> Any:
        """``entries`` with each ``{include: PATH}`` replaced by the fragment's nodes.
        ``scope`` holds the vars of the fragments that enclose these entries."""
        if not isinstance(entries, list):
            return entries  # the expander reports a malformed list
        out = []
        for entry in entries:
            if isinstance(entry, dict) and "include" in entry:
                out.append(self.include(entry, scope))
                continue
            if isinstance(entry, dict):
                key = "nodes" if "stage" in entry else "body" if "repeat" in entry else None
                if key and key in entry:
                    entry[key] = self.splice(entry[key], getattr(entry, "file", file), scope)
            out.append(entry)
        return out

    def include(self, entry: LocDict, scope: dict) -> _Group:
        check_keys(entry, INCLUDE_KEYS, "include")
        ref = entry["include"]
        if not isinstance(ref, str) or not ref:
            raise SpecError(f"include must be the path of a YAML fragment, got {ref!r}",
                            file=entry.file, line=entry.line)
        resolved = self._interpolate(ref, scope, entry)
        path = Path(entry.file).parent / resolved
        if not path.is_file():
            raise self._missing(ref, path, entry, scope)
        key = str(path.resolve())
        if key in self.stack:
            loop = " -> ".join(Path(p).name for p in self.stack + [key])
            raise SpecError(f"include goes round in a circle: {loop}", file=entry.file,
                            line=entry.line)
        raw = load_yaml(path)
        if not isinstance(raw, dict):
            raise SpecError("an included fragment must be a YAML mapping with 'nodes'",
                            file=str(path))
        check_keys(raw, FRAGMENT_KEYS, "included fragment")
        if not isinstance(raw.get("nodes"), list):
            raise SpecError("an included fragment needs a 'nodes' list", file=str(path))
        fragment = _Fragment(str(path), _section(raw, "vars"), _section(raw, "params"))
        inner = dict(scope)
        for name, value in fragment.vars.items():
            inner.setdefault(name, (value, (fragment.path, fragment.vars.key_line(name))))
        self.stack.append(key)
        try:
            return _Group(self.splice(raw["nodes"], str(path), inner), fragment)
        finally:
            self.stack.pop()

    def _lookup(self, name: str, scope: dict) -> tuple[Any, tuple] | None:
        if name in self.variables:
            return self.variables[name], self.origins[name]
        return scope.get(name)

    def _interpolate(self, text: str, scope: dict, entry: LocDict, depth: int = 0) -> str:
        def value(match: re.Match) -> str:
            found = self._lookup(match.group(1), scope)
            if found is None:
                known = ", ".join(sorted(set(self.variables) | set(scope))) or "none"
                raise SpecError(f"include: unknown variable '${{{match.group(1)}}}'; "
                                f"defined: {known}", file=entry.file, line=entry.line)
            return str(found[0])
        out = VAR.sub(value, text)
        if "${" in out and depth < 20:  # a variable whose value names another variable
            return self._interpolate(out, scope, entry, depth + 1)
        return out

    def _missing(self, ref: str, path: Path, entry: LocDict, scope: dict) -> SpecError:
        """'no such fragment', pointing at the line that chose it when a variable did."""
        there = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        choices = f"; {path.parent} has: {', '.join(there)}" if there else ""
        names = VAR.findall(ref)
        if not names:
            return SpecError(f"include '{ref}': no such file {path}{choices}",
                             file=entry.file, line=entry.line)
        name = names[0]
        value, (file, line) = self._lookup(name, scope)
        where = f"included at {entry.file}:{entry.line}"
        if file is None:
            return SpecError(f"--set {name}={value}: there is no {path} ({where}){choices}")
        return SpecError(f"{name}: {value!r} names no fragment: there is no {path} ({where})"
                         f"{choices}", file=file, line=line)

    def replace(self, nodes: Any, target: Any, section: LocDict, doc: LocDict) -> None:
        line = section.key_line(target)
        if not isinstance(target, str) or not isinstance(nodes, list):
            raise SpecError(f"replace: '{target}' must name a node or repeat block id",
                            file=doc.file, line=line)
        matches = _locate(nodes, target)
        if not matches:
            close = difflib.get_close_matches(target, _all_ids(nodes), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else \
                " (inside a repeat block write BLOCK/ID, e.g. routing/c)"
            raise SpecError(f"replace: the base graph has no node or repeat block '{target}'"
                            + hint, file=doc.file, line=line)
        new = section[target]
        entries = [] if new is None else new if isinstance(new, list) else [new]
        if not all(isinstance(e, dict) for e in entries):
            raise SpecError(f"replace '{target}': give a node, a repeat block, an include or "
                            "a list of them (an empty list removes it)", file=doc.file, line=line)
        entries = self.splice(entries, doc.file, {})
        first_list, first = matches[0]
        for entries_list, k in reversed(matches[1:]):
            del entries_list[k]  # the same id defined twice (e.g. with when: last / not_last)
        first_list[first:first + 1] = entries


def _locate(entries: Any, target: str, prefix: str = "") -> list:
    """(list, index) of every entry whose full id is ``target``; ids inside repeat
    blocks are written BLOCK/ID, as in the aliases (``routing/v``)."""
    found: list = []
    if not isinstance(entries, list):
        return found
    for k, e in enumerate(entries):
        if isinstance(e, _Group):
            found += _locate(e.entries, target, prefix)
        elif isinstance(e, dict) and "stage" in e:
            found += _locate(e.get("nodes"), target, prefix)
        elif isinstance(e, dict):
            full = f"{prefix}{e.get('id')}"
            if full == target:
                found.append((entries, k))
            elif "repeat" in e:
                found += _locate(e.get("body"), target, full + "/")
    return found


def _all_ids(entries: Any, prefix: str = "") -> list:
    ids: list = []
    if not isinstance(entries, list):
        return ids
    for e in entries:
        if isinstance(e, _Group):
            ids += _all_ids(e.entries, prefix)
        elif isinstance(e, dict) and "stage" in e:
            ids += _all_ids(e.get("nodes"), prefix)
        elif isinstance(e, dict):
            ids.append(f"{prefix}{e.get('id')}")
            if "repeat" in e:
                ids += _all_ids(e.get("body"), f"{prefix}{e.get('id')}/")
    return ids


def _flatten(entries: Any, fragments: list) -> Any:
    """Splice each group's entries in place, noting the fragments that are still used
    (a fragment whose every entry was replaced brings no vars or params)."""
    if not isinstance(entries, list):
        return entries
    out = []
    for e in entries:
        if isinstance(e, _Group):
            if e.survives() and e.fragment not in fragments:
                fragments.append(e.fragment)
            out.extend(_flatten(e.entries, fragments))
            continue
        if isinstance(e, dict):
            key = "nodes" if "stage" in e else "body" if "repeat" in e else None
            if key and key in e:
                e[key] = _flatten(e[key], fragments)
        out.append(e)
    return out


# -- what fragments bring -----------------------------------------------------------------
def _fragment_vars(fragments: list, variables: dict, origins: dict,
                   path: str) -> tuple[dict, dict]:
    """Fragment vars are defaults: the graph files and --set win over them."""
    values, where = dict(variables), dict(origins)
    chosen: dict = {}
    for fragment in fragments:
        for name, value in fragment.vars.items():
            if name in variables:
                continue
            if name in chosen and values[name] != value:
                raise SpecError(f"variable '{name}' defaults to {values[name]!r} in "
                                f"{chosen[name]} and to {value!r} in {fragment.path}; "
                                f"set it in the graph's vars", file=path)
            chosen[name] = fragment.path
            values[name] = value
            where[name] = (fragment.path, fragment.vars.key_line(name))
    return values, where


def _add_fragment_params(params: Any, fragments: list) -> None:
    """Fragment params join the graph's; a graph file's own declaration wins."""
    if not isinstance(params, dict):
        return
    declared_by_graph = set(params)
    owner: dict = {}
    for fragment in fragments:
        for name, value in fragment.params.items():
            if name in declared_by_graph:
                continue
            if name in owner:
                raise SpecError(f"parameter '{name}' is declared by both {owner[name]} and "
                                f"{fragment.path}", file=fragment.path,
                                line=fragment.params.key_line(name))
            owner[name] = fragment.path
            params[name] = value
            params.key_lines[name] = fragment.params.key_line(name)


def _section(raw: LocDict, key: str) -> LocDict:
    section = raw.get(key)
    if section is None:
        empty = LocDict()
        empty.key_lines, empty.file = {}, raw.file
        return empty
    if not isinstance(section, dict):
        raise SpecError(f"'{key}' must be a mapping", file=raw.file, line=raw.key_line(key))
    return section


def check_keys(entry: dict, allowed: set, what: str, path: str | None = None) -> None:
    """One line naming the first key of ``entry`` that is not ``allowed``, at its line."""
    unknown = sorted(set(entry) - allowed)
    if unknown:
        line = entry.key_line(unknown[0]) if isinstance(entry, LocDict) else None
        raise SpecError(f"{what}: unknown key '{unknown[0]}' "
                        f"(allowed: {', '.join(sorted(allowed))})",
                        file=getattr(entry, "file", None) or path, line=line)
