"""Limits on what reading and compiling one graph may cost, so that no input, however
hostile (alias bombs, huge repeat counts, include fan-outs, /dev/zero as the graph),
can make ``capsflow check`` hang or exhaust memory.

The defaults are a hundred times what the graphs in graphs/ need; a larger graph passes
its own: ``capsflow.compile(path, overrides, limits=Limits(max_nodes=100_000))``.
docs/spec.md ("Limits") lists them.
"""
from __future__ import annotations

import reprlib
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable

from capsflow.errors import CapsflowError, SpecError


MAX_DEPTH = 128


@dataclass(frozen=True)
class Limits:
    """Upper bounds for one ``capsflow.compile`` and the graph's ``init_params``.

    - ``max_files``: YAML files read (a file included twice is read once);
    - ``max_bytes``: YAML text read, all files together, and text that ``${}`` substitution
      makes inside longer strings;
    - ``max_depth``: nesting of YAML lists and mappings in one file (through aliases too),
      and of node lists (stages, repeat bodies) in the composed graph; at most MAX_DEPTH;
    - ``max_document_nodes``: YAML values of the graph as if YAML aliases, ``${}`` variables,
      repeated includes and every iteration of a ``repeat`` body were written out in full;
    - ``max_include_depth``: files in one ``extends`` chain, and nested ``include`` levels;
    - ``max_repeat``: the count of one ``repeat`` block;
    - ``max_nodes``: op nodes after unrolling;
    - ``max_param_bytes``: memory ``init_params`` may allocate for the parameters.
    """
    max_files: int = 1000
    max_bytes: int = 2 << 20
    max_depth: int = 64
    max_document_nodes: int = 100_000
    max_include_depth: int = 16
    max_repeat: int = 1000
    max_nodes: int = 20_000
    max_param_bytes: int = 4 << 30

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CapsflowError(f"Limits.{f.name} must be a whole number >= 1, got {value!r}")
        if self.max_depth > MAX_DEPTH:  # the readers recurse once or twice per level
            raise CapsflowError(f"Limits.max_depth can be at most {MAX_DEPTH} (Python's "
                                f"recursion limit), got {self.max_depth}")


class Budget:
    """What one compile has used so far of its ``Limits`` (bytes read, document size)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.bytes = 0
        self.nodes = 0
        self.files = 0

    def spend_file(self, file: str) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise SpecError(f"the graph reads more than {self.limits.max_files:,} files "
                            "(Limits.max_files)", file=file)

    def spend_bytes(self, count: int, what: str, file: str | None = None,
                    line: int | None = None) -> None:
        """Count ``count`` more bytes (or characters) of text, read or made by ``what``."""
        self.bytes += count
        if self.bytes > self.limits.max_bytes:
            raise SpecError(f"{what} makes the graph's text longer than {self.limits.max_bytes:,} "
                            "bytes (Limits.max_bytes)", file=file, line=line)

    def spend_nodes(self, count: int, what: str, file: str | None = None,
                    line: int | None = None, node: str | None = None) -> None:
        """Count ``count`` more document values, made by ``what``."""
        self.nodes += count
        if self.nodes > self.limits.max_document_nodes:
            raise SpecError(f"{what} makes the graph larger than "
                            f"{self.limits.max_document_nodes:,} YAML values "
                            "(Limits.max_document_nodes)", file=file, line=line, node=node)

    def remaining_nodes(self) -> int:
        return self.limits.max_document_nodes - self.nodes


def measure(root: Any, children: Callable[[Any], Iterable], limit: int) -> tuple[int, int]:
    """(size, depth) of the tree under ``root``, with every shared subtree counted once
    per reference (YAML aliases, variables). Memoised, so a billion laughs costs its
    written size; sizes stop growing past ``limit``. Raises ValueError on a cycle (a YAML
    alias inside its own anchor) or whatever ``children`` raises."""
    done: dict[int, tuple[int, int]] = {}
    open_: set[int] = set()   # on the current path
    stack: list = [(root, False)]
    while stack:
        item, finished = stack.pop()
        key = id(item)
        if finished:
            open_.discard(key)
            below = [done[id(c)] for c in children(item)]
            done[key] = (min(1 + sum(s for s, _ in below), limit + 1),
                         1 + max((d for _, d in below), default=0))
            continue
        if key in done:
            continue
        open_.add(key)
        stack.append((item, True))
        for child in children(item):
            if id(child) in open_:
                raise ValueError("a value contains itself")
            if id(child) not in done:
                stack.append((child, False))
    return done[id(root)]


def value_children(value: Any) -> Iterable:
    """The children of a loaded YAML value (keys are strings, so only values)."""
    if isinstance(value, dict):
        return value.values()
    if isinstance(value, list):
        return value
    return ()


PLAIN = (str, int, float, bool, type(None))


def _plain_children(value: Any) -> Iterable:
    if isinstance(value, dict) and not all(isinstance(k, str) for k in value):
        raise ValueError("a mapping key is not a string")
    if isinstance(value, (dict, list, *PLAIN)):
        return value_children(value)
    raise ValueError(f"{type(value).__name__} is not plain data (strings, numbers, booleans, "
                     "null, lists and mappings)")


def plain_data_problem(value: Any, limits: Limits) -> str | None:
    """Why ``value`` (an override given from Python) is not what a YAML file could hold."""
    try:
        size, depth = measure(value, _plain_children, limits.max_document_nodes)
    except ValueError as exc:
        return str(exc)
    if depth > limits.max_depth:
        return f"nested more than {limits.max_depth} levels deep (Limits.max_depth)"
    if size > limits.max_document_nodes:
        return f"more than {limits.max_document_nodes:,} values (Limits.max_document_nodes)"
    return None


class _Short(reprlib.Repr):
    """``repr`` cut to a readable length; LocDict is shown like the dict it is."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxlist, self.maxdict, self.maxstring, self.maxother = 3, 8, 6, 60, 60

    def repr_LocDict(self, x, level):  # noqa: N802 (reprlib dispatches on the type name)
        return self.repr_dict(x, level)


show = _Short().repr
"""A value as it may appear in an error message: at most a line, whatever its size."""
