"""Type checks for values read from JSON or YAML against a dataclass field's type hint.

Checkpoint metadata and recipe files are untrusted input: each value is checked against
the field it fills before it reaches the code, and a mismatch is named in words.
"""
from __future__ import annotations

import json
import math
import typing
from typing import Any

_LARGEST_FLOAT = 1.7976931348623157e308


def matches_hint(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as JSON gives it) fits ``hint`` (int, float, str, bool, dict,
    None or an Optional/Union of them). Integers must be >= 0, numbers finite."""
    if typing.get_origin(hint) is typing.Union:
        return any(matches_hint(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if isinstance(value, bool) or hint is bool:  # bool is an int to Python, not to JSON
        return isinstance(value, bool) and hint is bool
    if hint is int:
        return isinstance(value, int) and value >= 0
    if hint is float:  # an integer past float's range (1e309 written out) is no float either
        return isinstance(value, (int, float)) and abs(value) <= _LARGEST_FLOAT \
            and math.isfinite(value)
    return isinstance(value, typing.get_origin(hint) or hint)


def hint_name(hint: Any) -> str:
    """What ``hint`` accepts, in words: 'an integer >= 0 or null'."""
    names = {int: "an integer >= 0", float: "a finite number", str: "a string",
             bool: "true or false", dict: "an object", type(None): "null"}
    if typing.get_origin(hint) is typing.Union:
        return " or ".join(hint_name(h) for h in typing.get_args(hint))
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def shown(value: Any, width: int = 40) -> str:
    """``value`` as JSON, cut to ``width`` characters with '...' where it is longer (a
    401-digit integer must not read as a 40-digit one)."""
    text = json.dumps(value)
    return text if len(text) <= width else text[:width] + "..."


def json_type_name(value: Any) -> str:
    """The JSON type of ``value`` in words: 'a boolean', 'a list', 'null'."""
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"),
                       (str, "a string"), (list, "a list"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__
