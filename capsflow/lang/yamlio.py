"""YAML loading that remembers where each mapping came from (file and line), so that
errors in a spec, or in a spec it extends, point at the right place.

Graph files are untrusted input: only regular files are read, at most ``Limits.max_bytes``
in all; only plain data (mappings with string keys, lists, strings, numbers, booleans,
null) is accepted; nesting, size and alias expansion are bounded (capsflow/lang/limits.py).
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import yaml

from capsflow.errors import SpecError
from capsflow.lang.limits import Budget, Limits, measure, show

_TAG = "tag:yaml.org,2002:"
# Plain data only: no timestamps, sets, binary or ordered maps (the graph language has none).
_PLAIN_TAGS = {_TAG + t for t in ("null", "bool", "int", "float", "str", "seq", "map")}
# Numbers as people (and YAML 1.2, and Python) write them, where YAML 1.1 differs: an
# exponent with or without a dot or a sign is a float (1.0e7 was a string); an integer is
# decimal even with leading zeros (010 was 8) unless it says 0x, 0o or 0b, and 1:30 is text
# (it was 90, base 60).
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)"
                             r"[eE][-+]?[0-9]+$")
_INT = re.compile(r"^[-+]?(?:0b[01_]+|0o[0-7_]+|0x[0-9a-fA-F_]+|[0-9][0-9_]*)$")
_NUMBER_START = "-+0123456789."


class LocDict(dict):
    """A dict that knows the file and 1-based line of the YAML mapping it came from,
    and the line of each key (``key_lines``), so errors can name the exact line."""
    file: str | None = None
    line: int | None = None
    key_lines: dict = {}  # replaced per instance by the loader; read-only default
    included_at: tuple | None = None   # (file, line) of the include that spliced it in

    def key_line(self, key) -> int | None:
        """The line of ``key`` if known, else the mapping's own line."""
        return self.key_lines.get(key, self.line)


class _Loader(yaml.SafeLoader):
    """SafeLoader that counts and bounds what it composes and names the line of every
    value it cannot construct."""

    # A date-like scalar stays a string (no timestamp tag); numbers as above.
    yaml_implicit_resolvers = {
        first: [(_TAG + "int", _INT)] * bool(first and first in _NUMBER_START[:-1])
        + [(_TAG + "float", _EXPONENT_FLOAT)] * bool(first and first in _NUMBER_START)
        + [(tag, rx) for tag, rx in resolvers if tag not in (_TAG + "timestamp", _TAG + "int")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_yaml_int(self, node):
        """An integer as ``_INT`` reads it: decimal unless 0x, 0o or 0b (YAML 1.1's
        constructor reads a leading 0 as octal and a ':' as base 60)."""
        text = self.construct_scalar(node).replace("_", "")
        sign = -1 if text.startswith("-") else 1
        digits = text.lstrip("+-")
        base = {"0b": 2, "0o": 8, "0x": 16}.get(digits[:2].lower(), 10)
        return sign * int(digits[2:] if base != 10 else digits, base)

    def __init__(self, text: str, name: str, budget: Budget):
        super().__init__(text)
        self.name, self.budget = name, budget
        self.depth = self.composed = 0

    def compose_node(self, parent, index):
        self.depth += 1
        self.composed += 1
        try:
            limits = self.budget.limits
            if self.depth > limits.max_depth:
                raise self.error(f"YAML nested more than {limits.max_depth} levels deep "
                                 "(Limits.max_depth)", self.peek_event().start_mark)
            if self.composed > self.budget.remaining_nodes():
                raise self.error(f"the file makes the graph larger than "
                                 f"{limits.max_document_nodes:,} YAML values "
                                 "(Limits.max_document_nodes)", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node, deep=False):
        if node.tag not in _PLAIN_TAGS:
            raise self.error(f"YAML tag '{node.tag}' is not part of the graph language (plain "
                             "mappings, lists, strings, numbers, booleans and null)", node.start_mark)
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:  # e.g. !!int 'x', 0b_, 5000-digit numbers
            raise self.error(f"cannot read {show(node.value)} as {node.tag[len(_TAG):]}: {exc}",
                             node.start_mark) from None

    def error(self, message: str, mark) -> SpecError:
        return SpecError(message, file=self.name, line=mark.line + 1 if mark else None)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode):
    """A generator, as PyYAML's own constructors: the mapping first, its values filled
    in later from construct_document's loop, so that construction never recurses."""
    out = LocDict()
    out.key_lines = {}
    out.file = loader.name
    out.line = node.start_mark.line + 1
    yield out
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, str):
            raise loader.error(_key_problem(key_node, key), key_node.start_mark)
        if key in out:
            raise loader.error(f"key '{key}' appears twice in one mapping", key_node.start_mark)
        out[key] = loader.construct_object(value_node)
        out.key_lines[key] = key_node.start_mark.line + 1


def _key_problem(key_node, key) -> str:
    if isinstance(key_node, yaml.ScalarNode):
        return (f"key {key_node.value} is read as {type(key).__name__} {key!r}; keys are "
                f"names: write it in quotes ('{key_node.value}')")
    return "a key must be a name, not a list or mapping"


_Loader.yaml_constructors = {tag: c for tag, c in yaml.SafeLoader.yaml_constructors.items()
                             if tag in _PLAIN_TAGS}
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(_TAG + "int", _Loader.construct_yaml_int)


def _yaml_children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def _parse(text: str, name: str, budget: Budget):
    """YAML text -> data, charged to ``budget``; yaml.YAMLError propagates."""
    loader = _Loader(text, name, budget)
    try:
        try:
            node = loader.get_single_node()
        except (ValueError, OverflowError):  # PyYAML's scanner calls chr() on "\UFFFFFFFF"
            raise yaml.scanner.ScannerError(
                "while scanning a double-quoted scalar", None,
                "an escape names no Unicode character (at most \\U0010FFFF)",
                loader.get_mark()) from None
        if node is None:
            return None
        try:  # what the document is when every alias is copied out
            size, depth = measure(node, _yaml_children, budget.remaining_nodes())
        except ValueError:
            raise SpecError("a YAML alias refers to a value that contains it", file=name) from None
        if depth > budget.limits.max_depth:
            raise SpecError(f"YAML nested more than {budget.limits.max_depth} levels deep, "
                            "counting what aliases refer to (Limits.max_depth)", file=name)
        budget.spend_nodes(size, "YAML aliases", file=name)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_text(path: Path, budget: Budget) -> str:
    """The text of a regular file (never a FIFO or device, which could block or never
    end), charged to ``budget``'s byte limit."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise SpecError(f"{path} is not a regular file")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise SpecError(f"no such graph spec: {path}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        reason = getattr(exc, "strerror", None) or str(exc)
        raise SpecError(f"cannot read graph spec {path}: {reason}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # swapped since the stat above
            raise SpecError(f"{path} is not a regular file")
        data = _read_at_most(f, budget.limits.max_bytes - budget.bytes + 1)
    budget.spend_bytes(len(data), "reading it", str(path))
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise SpecError(f"not a UTF-8 text file (byte 0x{data[exc.start]:02x}; binary data?)",
                        file=str(path), line=line) from None


def _read_at_most(f, limit: int) -> bytes:
    """Up to ``limit`` bytes, in chunks: a size from a file's stat may be wrong (/proc
    files say 0), and one read of ``limit`` bytes would allocate them all up front."""
    chunks, size = [], 0
    while size < limit:
        chunk = f.read(min(1 << 20, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def load_yaml(path: str | Path, budget: Budget | None = None):
    """Parse a YAML file; every problem becomes one SpecError line with file and line."""
    path = Path(path)
    budget = budget or Budget(Limits())
    budget.spend_file(str(path))
    text = read_text(path, budget)
    try:
        return _parse(text, str(path), budget)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise SpecError(f"not a YAML text file: character {chr(exc.character)!r} is not "
                        "allowed (binary data?)", file=str(path), line=line) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or "invalid YAML"
        raise SpecError(f"YAML syntax error: {problem}", file=str(path), line=line) from None


def parse_override(text: str) -> tuple[str, object]:
    """'routing_iters=1' -> ('routing_iters', 1); values are parsed as YAML scalars
    (text that is not YAML stays a string)."""
    name, sep, value = str(text).partition("=")
    if not sep or not name.strip():
        raise SpecError(f"--set expects NAME=VALUE, got {show(text)}")
    if not value.strip():
        return name.strip(), ""
    try:
        parsed = _parse(value, "--set", Budget(Limits()))
    except yaml.YAMLError:
        parsed = value
    except SpecError as exc:
        raise SpecError(f"--set {show(text)}: {exc.message}") from None
    return name.strip(), parsed
