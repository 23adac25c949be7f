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

Paths: an ``extends`` may name a graph file (``.yaml`` or ``.yml``) anywhere, so that a
variant kept in another folder can extend the project's graphs; an ``include`` may not
leave the folder tree of the graph file it belongs to (the graph whose node list, or
whose fragments' node lists, hold it). Both read regular files only.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from capsflow.errors import SpecError
from capsflow.lang.expr import ExprError, evaluate, names_in
from capsflow.lang.limits import Budget, show
from capsflow.lang.yamlio import LocDict, load_yaml

GRAPH_KEYS = {"name", "description", "vars", "inputs", "params", "nodes", "outputs",
              "extends", "replace"}
FRAGMENT_KEYS = {"description", "vars", "params", "nodes"}
INCLUDE_KEYS = {"include", "doc", "as", "bind", "vars"}
INSTANCE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
SECTIONS = ("inputs", "params", "outputs")   # merged by name; ``name: null`` removes one
VAR = re.compile(r"\$\{([^{}]*)\}")   # ${name} or ${expression} (capsflow/lang/expr.py)
GRAPH_SUFFIXES = (".yaml", ".yml")
MAX_PATH = 4096   # PATH_MAX: a longer include or extends is not a path
SCALARS = (str, int, float, bool, type(None))


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
    defaults: dict = field(default_factory=dict)  # name -> (value a file gives, (file, line))
    sources: list = field(default_factory=list)   # the graph, its bases, the fragments used


class Instance(LocDict):
    """An include with ``as: NAME``: the fragment's ``nodes`` under the id prefix NAME/,
    with its own ``bind`` (fragment name -> outer name), pinned ``vars``, var
    ``defaults`` and ``params`` (declared as NAME/param). YAML never makes one: only
    an include does, so spec.py can tell it from a node."""


@dataclass(eq=False)
class _Fragment:
    """An included file. Its vars are defaults and its params are declared only while
    some of its entries are still in the graph after every ``replace``."""
    path: str
    vars: LocDict
    params: LocDict
    at: tuple = (None, None)   # (file, line) of the include


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


def compose(path: str, overrides: dict, budget: Budget) -> Document:
    """Read ``path``, follow ``extends``, apply ``replace``s and splice ``include``s."""
    chain = _load_chain(path, budget)
    variables, origins = _chain_vars(chain, overrides)
    defaults = {n: (v, (doc.file, doc["vars"].key_line(n))) for doc in chain
                if isinstance(doc.get("vars"), dict) for n, v in doc["vars"].items()}
    composer = _Composer(variables, origins, budget)
    nodes = composer.splice(chain[0].get("nodes"), chain[0].file, {})
    for doc in chain[1:]:
        replace = doc.get("replace") or {}
        if not isinstance(replace, dict):
            raise SpecError("'replace' must map node or block ids to new entries",
                            file=doc.file, line=doc.key_line("replace"))
        if replace:
            nodes = composer.replace_all(nodes, replace, doc)
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
        declared=set(defaults) | set(composer.fragment_vars),
        defaults={**composer.fragment_vars, **defaults},
        sources=[d.file for d in reversed(chain)] + [f.path for f in fragments])


# -- paths --------------------------------------------------------------------------------
def _follow(ref: str, file: str, what: str, line: int | None) -> tuple[Path, Path]:
    """(``ref`` relative to the folder of ``file``, the same with every symlink followed)."""
    if "\0" in ref or len(ref) > MAX_PATH:
        raise SpecError(f"{what} {show(ref)} is not a usable path", file=file, line=line)
    path = Path(file).parent / ref
    try:
        return path, path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        reason = getattr(exc, "strerror", None) or "symbolic links go round in a circle"
        raise SpecError(f"{what} '{ref}': cannot follow {path}: {reason}", file=file,
                        line=line) from None


def _not_a_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as a graph file: 'missing', another reason, or None."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None if stat.S_ISREG(mode) else "is not a regular file"


# -- extends ----------------------------------------------------------------------------
def _load_chain(path: str, budget: Budget) -> list:
    """The graph and the graphs it extends, root base first."""
    chain: list[LocDict] = []
    seen: list[Path] = []
    while True:
        raw = load_yaml(path, budget)
        seen.append(Path(path).resolve())  # it could be read, so it resolves
        if not isinstance(raw, dict):
            raise SpecError("a graph spec must be a YAML mapping with 'nodes' and 'outputs'",
                            file=path)
        check_keys(raw, GRAPH_KEYS, "top level")
        chain.append(raw)
        base = raw.get("extends")
        line = raw.key_line("extends")
        if base is None:
            if "replace" in raw:
                raise SpecError("'replace' needs 'extends': there is no base graph to "
                                "replace nodes in", file=path, line=raw.key_line("replace"))
            break
        if not isinstance(base, str) or not base:
            raise SpecError(f"'extends' must be the path of a graph spec, got {show(base)}",
                            file=path, line=line)
        base_path, resolved = _follow(base, path, "extends", line)
        if resolved in seen:
            loop = " -> ".join([p.name for p in seen] + [resolved.name])
            raise SpecError(f"'extends' goes round in a circle: {loop}", file=path, line=line)
        problem = _not_a_file(resolved)
        if problem == "missing":
            raise SpecError(f"extends '{base}': no such graph spec {base_path}", file=path,
                            line=line)
        if problem:
            raise SpecError(f"extends '{base}': {base_path} {problem}", file=path, line=line)
        if resolved.suffix not in GRAPH_SUFFIXES:
            raise SpecError(f"extends '{base}': a graph spec is a .yaml or .yml file",
                            file=path, line=line)
        if len(chain) >= budget.limits.max_include_depth:
            raise SpecError(f"the 'extends' chain is longer than {budget.limits.max_include_depth} "
                            "files (Limits.max_include_depth)", file=path, line=line)
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
    where: tuple = (None, None)   # the file and line of a section that is not a mapping
    for doc in chain:
        section = doc.get(key)
        if section is None:
            continue
        if not isinstance(section, dict):
            # spec.py reports it, unless ${} substitution makes it a mapping
            merged, where = section, (doc.file, doc.key_line(key))
            continue
        if not isinstance(merged, dict):   # a base's section the names cannot be added to
            raise SpecError(f"'{key}' must map names to entries ({doc.file} adds to it by "
                            f"name), got {show(merged)}", file=where[0], line=where[1])
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


# -- variables in text --------------------------------------------------------------------
def expression_value(text: str, lookup: Callable[[str], Any],
                     error: Callable[[str], SpecError]) -> Any:
    """The value of one ``${text}``: a variable, or arithmetic over variables."""
    try:
        return evaluate(text, lookup)
    except ExprError as exc:
        raise error(f"${{{text}}}: {exc}") from None


def fill_text(text: str, value_of: Callable[[str], Any], limit: int, limit_name: str,
              error: Callable[[str], SpecError]) -> str:
    """``text`` with each ``${expression}`` replaced by the text of its value
    (``value_of(expression)``), which must be a string, number, boolean or null; an error
    past ``limit`` characters (checked as it grows, so a hostile text never gets built)."""
    parts: list[str] = []
    size = pos = 0
    for match in VAR.finditer(text):
        value = value_of(match.group(1))
        if not isinstance(value, SCALARS):
            kind = "mapping" if isinstance(value, dict) else type(value).__name__
            raise error(f"'${{{match.group(1)}}}' is a {kind}; only a string or number "
                        "can be part of a longer string")
        try:
            piece = str(value)
        except ValueError:  # an integer with more digits than Python prints
            raise error(f"'${{{match.group(1)}}}' is too large a number to write out") from None
        size += match.start() - pos + len(piece)
        if size > limit:
            raise error(f"substituting variables into {show(text)} makes a string longer "
                        f"than {limit:,} characters ({limit_name})")
        parts += [text[pos:match.start()], piece]
        pos = match.end()
    parts.append(text[pos:])
    return "".join(parts)


# -- include and replace ------------------------------------------------------------------
class _Composer:
    """Splices includes (as ``_Group``s) and applies replaces to the raw node tree."""

    def __init__(self, variables: dict, origins: dict, budget: Budget):
        self.variables = variables
        self.origins = origins
        self.budget = budget
        self.limits = budget.limits
        self.stack: list[Path] = []   # resolved paths of the fragments being spliced
        self.read: dict[Path, tuple] = {}   # resolved path -> (raw YAML, what it cost)
        self.targets: dict[tuple, tuple] = {}   # (file, include text, home) -> _target()
        self.fragment_vars: dict = {}   # name -> (default, (file, line)), every fragment read

    def splice(self, entries: Any, home: str, scope: dict, depth: int = 2) -> Any:
        """``entries`` with each ``{include: PATH}`` replaced by the fragment's nodes.
        ``home`` is the graph file the entries belong to (includes stay in its folder
        tree), ``scope`` holds the vars of the fragments that enclose these entries and
        ``depth`` is how deep the list is nested in the composed graph."""
        if not isinstance(entries, list):
            return entries  # the expander reports a malformed list
        if depth > self.limits.max_depth:
            where = entries[0] if entries else None
            raise SpecError(f"node lists (stages, repeat bodies) nested more than "
                            f"{self.limits.max_depth} levels deep in the composed graph "
                            "(Limits.max_depth)", file=getattr(where, "file", None) or home,
                            line=getattr(where, "line", None))
        out = []
        for entry in entries:
            if isinstance(entry, dict) and "include" in entry:
                out.append(self.include(entry, home, scope, depth))
                continue
            key = _inner_list(entry)
            if key:
                entry[key] = self.splice(entry[key], home, scope, depth + 2)
            out.append(entry)
        return out

    def include(self, entry: LocDict, home: str, scope: dict, depth: int) -> _Group:
        check_keys(entry, INCLUDE_KEYS, "include")
        ref = entry["include"]
        if not isinstance(ref, str) or not ref:
            raise SpecError(f"include must be the path of a YAML fragment, got {show(ref)}",
                            file=entry.file, line=entry.line)
        if "as" not in entry and ("bind" in entry or "vars" in entry):
            key = "bind" if "bind" in entry else "vars"
            raise SpecError(f"include '{ref}': '{key}' belongs to an instance; name it with "
                            "'as: NAME' (its nodes and params become NAME/...)",
                            file=entry.file, line=entry.key_line(key))
        path, resolved = self._target(ref, entry, home, scope)
        if resolved in self.stack:
            loop = " -> ".join(p.name for p in self.stack + [resolved])
            raise SpecError(f"include goes round in a circle: {loop}", file=entry.file,
                            line=entry.line)
        if len(self.stack) >= self.limits.max_include_depth:
            raise SpecError(f"includes nested more than {self.limits.max_include_depth} deep "
                            "(Limits.max_include_depth)", file=entry.file, line=entry.line)
        raw = self._load(path, resolved, entry)
        if not isinstance(raw, dict):
            raise SpecError("an included fragment must be a YAML mapping with 'nodes'",
                            file=str(path))
        check_keys(raw, FRAGMENT_KEYS, "included fragment")
        if not isinstance(raw.get("nodes"), list):
            raise SpecError("an included fragment needs a 'nodes' list", file=str(path))
        fragment = _Fragment(str(path), _section(raw, "vars"), _section(raw, "params"))
        inner = dict(scope)
        for name, value in fragment.vars.items():
            default = (value, (fragment.path, fragment.vars.key_line(name)))
            self.fragment_vars.setdefault(name, default)
            inner.setdefault(name, default)
        pinned = _instance_vars(entry) if "as" in entry else {}
        for name, value in pinned.items():   # an instance's own values win (see _lookup)
            inner[name] = (value, (entry.file, pinned.key_line(name)), "pinned")
        self.stack.append(resolved)
        try:
            nodes = self.splice(raw["nodes"], home, inner, depth)
        finally:
            self.stack.pop()
        if "as" not in entry:
            for node in nodes:   # so that a duplicate id can name the include that made it
                if isinstance(node, LocDict):
                    node.included_at = (entry.file, entry.line)
            fragment.at = (entry.file, entry.line)
            return _Group(nodes, fragment)
        _check_pinned(entry, pinned, fragment, nodes)
        instance = Instance(id=_instance_name(entry), nodes=nodes, bind=_bindings(entry),
                            vars=pinned, defaults=fragment.vars, params=fragment.params)
        instance.file, instance.line, instance.key_lines = entry.file, entry.line, {}
        instance.fragment = fragment.path
        return _Group([instance], _Fragment(fragment.path, _empty(raw), _empty(raw)))

    def _target(self, ref: str, entry: LocDict, home: str, scope: dict) -> tuple[Path, Path]:
        """(path, path with symlinks followed) of the fragment an include names, checked
        to be a regular file in the folder tree of ``home``; memoised, as a fan-out of
        includes asks for the same few files many times."""
        text = self._interpolate(ref, scope, entry)
        key = (entry.file, text, home)
        if key not in self.targets:
            path, resolved = _follow(text, entry.file, "include", entry.line)
            root = Path(home).parent
            if not resolved.is_relative_to(root.resolve()):
                raise SpecError(f"include '{ref}': {path} is outside {root}/, the folder of "
                                f"{home}; an include may not leave the folder tree of its graph",
                                file=entry.file, line=entry.line)
            problem = _not_a_file(resolved)
            if problem == "missing":
                raise self._missing(ref, path, resolved, entry, scope)
            if problem:
                raise SpecError(f"include '{ref}': {path} {problem}", file=entry.file,
                                line=entry.line)
            self.targets[key] = path, resolved
        return self.targets[key]

    def _load(self, path: Path, resolved: Path, entry: LocDict) -> Any:
        """A fragment's YAML, parsed once per compile: including a file many times (a
        fan-out of includes) costs a copy each time, which counts like a fresh read."""
        if resolved in self.read:
            raw, cost = self.read[resolved]
            self.budget.spend_nodes(cost, f"including {path} again", entry.file, entry.line)
        else:
            before = self.budget.nodes
            raw = load_yaml(path, self.budget)
            self.read[resolved] = raw, self.budget.nodes - before
        return _copy(raw)  # splicing changes what it is given

    def _lookup(self, name: str, scope: dict) -> tuple[Any, tuple] | None:
        """(value, (file, line)) of a variable where an include names its file: an
        instance's own ``vars`` first, then the graph's vars and --set, then the
        defaults of the fragments around the include."""
        found = scope.get(name)
        if found is not None and len(found) == 3:
            return found[:2]
        if name in self.variables:
            return self.variables[name], self.origins[name]
        return found

    def _interpolate(self, text: str, scope: dict, entry: LocDict) -> str:
        reading: list = []  # the variables being read, to name a circle

        def lookup(name: str) -> Any:
            found = self._lookup(name, scope)
            if found is None:
                known = ", ".join(sorted(set(self.variables) | set(scope))) or "none"
                raise error(f"unknown variable '{name}'; defined: {known}")
            value = found[0]
            whole = VAR.fullmatch(value) if isinstance(value, str) else None
            if whole:  # k: ${j}, read by arithmetic ("parts/n${k + 1}"): the value, typed
                if name in reading or len(reading) > 20:
                    raise error(f"variable '{name}' refers to itself through "
                                f"{' -> '.join(reading + [name])}")
                reading.append(name)
                try:
                    return expression_value(whole.group(1), lookup, error)
                finally:
                    reading.pop()
            return value

        def error(message: str) -> SpecError:
            return SpecError(f"include: {message}", file=entry.file, line=entry.line)

        for _ in range(20):  # a variable whose value names another variable
            if "${" not in text:
                break
            text = fill_text(text, lambda expr: expression_value(expr, lookup, error),
                             MAX_PATH, "the longest path", error)
        return text

    def _missing(self, ref: str, path: Path, resolved: Path, entry: LocDict,
                 scope: dict) -> SpecError:
        """'no such fragment', pointing at the line that chose it when a variable did.
        The files offered are those of the target's folder, which is inside the graph's."""
        folder = resolved.parent
        there = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        if len(there) > 30:
            there = there[:30] + ["..."]
        choices = f"; {path.parent} has: {', '.join(there)}" if there else ""
        names = sorted(n for expr in VAR.findall(ref) for n in names_in(expr)
                       if self._lookup(n, scope) is not None)
        if not names:
            return SpecError(f"include '{ref}': no such file {path}{choices}",
                             file=entry.file, line=entry.line)
        name = names[0]
        value, (file, line) = self._lookup(name, scope)
        where = f"included at {entry.file}:{entry.line}"
        if file is None:
            return SpecError(f"--set {name}={value}: there is no {path} ({where}){choices}")
        return SpecError(f"{name}: {show(value)} names no fragment: there is no {path} ({where})"
                         f"{choices}", file=file, line=line)

    def replace_all(self, nodes: Any, section: LocDict, doc: LocDict) -> list:
        """``nodes`` with every target of one file's ``replace`` swapped, in order (a
        later target may lie inside an earlier replacement)."""
        if not isinstance(nodes, list):
            raise SpecError("replace: the base graph has no node list to replace in",
                            file=doc.file, line=doc.key_line("replace"))
        nodes = _unshared(nodes)  # entries are found by identity: a YAML alias is a copy
        ids = _Ids(nodes)
        swaps: dict[int, tuple] = {}
        for target, new in section.items():
            line = section.key_line(target)
            matches = ids.pop(target)
            if not matches:
                close = difflib.get_close_matches(target, ids.names(), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else \
                    " (inside a repeat block write BLOCK/ID, e.g. routing/c)"
                raise SpecError(f"replace: the base graph has no node or repeat block '{target}'"
                                + hint, file=doc.file, line=line)
            entries = [] if new is None else new if isinstance(new, list) else [new]
            if not all(isinstance(e, dict) for e in entries):
                raise SpecError(f"replace '{target}': give a node, a repeat block, an include or "
                                "a list of them (an empty list removes it)", file=doc.file, line=line)
            (first, where), *others = matches
            entries = self.splice(entries, doc.file, {}, where[1])  # at the target's depth
            swaps[id(first)] = (first, entries)
            for entry, _ in others:  # the same id defined twice (e.g. with when: last / not_last)
                swaps[id(entry)] = (entry, [])
            ids.add(entries, *where)
        return _swap(nodes, swaps)


class _Ids:
    """Full ids of a node tree (``BLOCK/ID`` inside repeat blocks) -> their entries, kept
    up to date while replaces swap entries: one replace costs what it changes, not a walk
    of the whole graph (a long ``replace`` section would cost its length times the graph's)."""

    def __init__(self, entries: list):
        # full id -> {id(entry): (entry, (prefix of its id, depth of its list))}
        self.found: dict[str, dict[int, tuple]] = {}
        self.add(entries, "", 2)

    def add(self, entries: Any, prefix: str, depth: int) -> None:
        for entry, full, where in _walk(entries, prefix, depth):
            self.found.setdefault(full, {})[id(entry)] = (entry, where)

    def pop(self, target: str) -> list:
        """The entries with full id ``target``; they and what they hold leave the index."""
        matches = list(self.found.pop(target, {}).values())
        for entry, (_, depth) in matches:
            if "repeat" in entry or isinstance(entry, Instance):
                for inner, full, _ in _walk(entry.get(_inner_list(entry) or "body"),
                                            target + "/", depth + 2):
                    self.found.get(full, {}).pop(id(inner), None)
        return matches

    def names(self) -> list:
        return [name for name, entries in self.found.items() if entries]


def _copy(value: Any) -> Any:
    """A fresh copy of loaded YAML, LocDicts with their file and lines."""
    if isinstance(value, dict):
        out = LocDict((k, _copy(v)) for k, v in value.items())
        out.file, out.line = getattr(value, "file", None), getattr(value, "line", None)
        out.key_lines = dict(getattr(value, "key_lines", {}))
        return out
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _inner_list(entry: Any) -> str | None:
    """The key of the node list an entry holds: a stage's ``nodes``, a repeat's ``body``."""
    if isinstance(entry, Instance):
        return "nodes"
    if isinstance(entry, dict):
        key = "nodes" if "stage" in entry else "body" if "repeat" in entry else None
        return key if key in entry else None
    return None


def _walk(entries: Any, prefix: str, depth: int) -> Iterator[tuple]:
    """(entry, full id, (prefix, depth of its list)) of every entry with an id, in tree
    order; ``depth`` is that of ``entries`` in the composed graph, as in splice."""
    if not isinstance(entries, list):
        return
    for e in entries:
        if isinstance(e, _Group):
            yield from _walk(e.entries, prefix, depth)
        elif isinstance(e, dict) and "stage" in e:
            yield from _walk(e.get("nodes"), prefix, depth + 2)
        elif isinstance(e, dict) and isinstance(e.get("id"), str):
            full = prefix + e["id"]
            yield e, full, (prefix, depth)
            if "repeat" in e or isinstance(e, Instance):
                yield from _walk(e.get(_inner_list(e) or "body"), full + "/", depth + 2)


def _unshared(value: Any) -> Any:
    """``value`` with every mapping and list a separate object: YAML's aliases (``*body``)
    share one, and a replace of one copy, found by identity, changed every copy. (The
    limits counted aliases as copies already, so this allocates nothing they did not
    allow.) A group keeps track of which of its entries are its own."""
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    if isinstance(value, _Group):
        entries = [_unshared(e) for e in value.entries]
        mine = {id(old): new for old, new in zip(value.entries, entries)
                if any(old is o for o in value.original)}
        group = _Group(entries, value.fragment)
        group.original = [mine.get(id(o), o) for o in value.original]
        return group
    if isinstance(value, dict):
        out = copy.copy(value)  # its class and attributes: file, line, key lines
        for key, inner in value.items():
            out[key] = _unshared(inner)
        return out
    return value


def _swap(entries: Any, swaps: dict) -> Any:
    """``entries`` with each entry in ``swaps`` replaced by its replacement, at any depth."""
    if not swaps or not isinstance(entries, list):
        return entries
    out = []
    for e in entries:
        if id(e) in swaps and swaps[id(e)][0] is e:
            out.extend(_swap(swaps[id(e)][1], swaps))
            continue
        key = _inner_list(e)
        if isinstance(e, _Group):
            e.entries = _swap(e.entries, swaps)
        elif key:
            e[key] = _swap(e[key], swaps)
        out.append(e)
    return out


def _flatten(entries: Any, fragments: list) -> Any:
    """Splice each group's entries in place, noting the fragments that are still used
    (a fragment whose every entry was replaced brings no vars or params). Fragments
    spliced inside an instance belong to it: their vars and params join the instance's."""
    if not isinstance(entries, list):
        return entries
    out = []
    for e in entries:
        if isinstance(e, _Group):
            if e.survives() and e.fragment not in fragments:
                fragments.append(e.fragment)
            out.extend(_flatten(e.entries, fragments))
            continue
        key = _inner_list(e)
        if isinstance(e, Instance):
            inner: list = []
            e[key] = _flatten(e[key], inner)
            _adopt(e, inner)
            fragments.extend(_Fragment(f.path, _empty(e), _empty(e)) for f in inner)
        elif key:
            e[key] = _flatten(e[key], fragments)
        out.append(e)
    return out


def _adopt(instance: Instance, fragments: list) -> None:
    """The vars (as defaults) and params of fragments included inside an instance."""
    defaults, params = instance["defaults"], instance["params"]
    for fragment in fragments:
        for name, value in fragment.vars.items():
            if name not in defaults:
                defaults[name] = value
                defaults.key_lines[name] = fragment.vars.key_line(name)
        for name, value in fragment.params.items():
            if name in params:
                raise SpecError(f"parameter '{name}' is declared twice inside instance "
                                f"'{instance['id']}' ({fragment.path} declares it again)",
                                file=fragment.path, line=fragment.params.key_line(name))
            params[name] = value
            params.key_lines[name] = fragment.params.key_line(name)


# -- instances -----------------------------------------------------------------------------
def _instance_name(entry: LocDict) -> str:
    name = entry["as"]
    if not isinstance(name, str) or not INSTANCE_NAME.fullmatch(name):
        raise SpecError(f"include '{entry['include']}': 'as' must be a name (letters, digits, "
                        f"_ . -; no '/'), got {show(name)}", file=entry.file,
                        line=entry.key_line("as"))
    return name


def _bindings(entry: LocDict) -> dict:
    """``bind``: which outer value each free name of the fragment refers to."""
    bind = entry.get("bind") or {}
    if not isinstance(bind, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in bind.items()):
        raise SpecError(f"include '{entry['include']}': 'bind' must map the fragment's names "
                        f"to outer names, e.g. {{u_hat: caps1/u_hat}}, got {show(bind)}",
                        file=entry.file, line=entry.key_line("bind"))
    return bind


def _instance_vars(entry: LocDict) -> LocDict:
    """An instance's ``vars``: its own values for variables of the fragment."""
    pinned = entry.get("vars")
    if pinned is None:
        return _empty(entry)
    if not isinstance(pinned, dict):
        raise SpecError(f"include '{entry['include']}': 'vars' must be a mapping of name: "
                        f"value, got {show(pinned)}", file=entry.file,
                        line=entry.key_line("vars"))
    return pinned


def _check_pinned(entry: LocDict, pinned: LocDict, fragment: _Fragment, nodes: list) -> None:
    """Each of an instance's ``vars`` must be declared by the fragment or by a fragment
    it includes (outside nested instances, which have vars of their own)."""
    declared = set(fragment.vars)
    groups = [e for e in nodes if isinstance(e, _Group)]
    while groups:
        group = groups.pop()
        declared |= set(group.fragment.vars)
        groups += [e for e in _nested(group.entries) if isinstance(e, _Group)]
    for name in pinned:
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise SpecError(f"include '{entry['include']}': the fragment declares no variable "
                            f"'{name}' (it declares: {known})", file=entry.file,
                            line=pinned.key_line(name))


def _nested(entries: list) -> list:
    """``entries`` and what their stages and repeat bodies hold, not inside instances."""
    out = []
    for e in entries:
        out.append(e)
        key = _inner_list(e)
        if key and not isinstance(e, Instance) and isinstance(e.get(key), list):
            out += _nested(e[key])
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
                raise SpecError(f"variable '{name}' defaults to {show(values[name])} in "
                                f"{chosen[name]} and to {show(value)} in {fragment.path}; "
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
            if owner.get(name) == fragment.path:
                raise SpecError(f"parameter '{name}': {fragment.path} is included a second time; "
                                "give each include of it its own 'as: NAME' (its nodes and "
                                "params become NAME/...)", file=fragment.at[0], line=fragment.at[1])
            if name in owner:
                raise SpecError(f"parameter '{name}' is declared by both {owner[name]} and "
                                f"{fragment.path}", file=fragment.path,
                                line=fragment.params.key_line(name))
            owner[name] = fragment.path
            params[name] = value
            params.key_lines[name] = fragment.params.key_line(name)


def _empty(raw: LocDict) -> LocDict:
    empty = LocDict()
    empty.key_lines, empty.file = {}, raw.file
    return empty


def _section(raw: LocDict, key: str) -> LocDict:
    section = raw.get(key)
    if section is None:
        return _empty(raw)
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
