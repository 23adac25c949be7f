"""YAML loading that remembers where each mapping came from (file and line), so that
errors in a spec, or in a spec it extends, point at the right place."""
from __future__ import annotations

from pathlib import Path

import yaml

from capsflow.errors import SpecError


class LocDict(dict):
    """A dict that knows the file and 1-based line of the YAML mapping it came from,
    and the line of each key (``key_lines``), so errors can name the exact line."""
    file: str | None = None
    line: int | None = None
    key_lines: dict = {}  # replaced per instance by the loader; read-only default

    def key_line(self, key) -> int | None:
        """The line of ``key`` if known, else the mapping's own line."""
        return self.key_lines.get(key, self.line)


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LocDict:
    loader.flatten_mapping(node)
    out = LocDict()
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise SpecError(f"key '{key}' appears twice in one mapping",
                            file=loader.name, line=key_node.start_mark.line + 1)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    out.file = loader.name
    out.line = node.start_mark.line + 1
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | Path):
    """Parse a YAML file; syntax errors become one SpecError line with file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"no such graph spec: {path}") from None
    except OSError as exc:
        raise SpecError(f"cannot read graph spec {path}: {exc.strerror}") from None
    loader = _Loader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise SpecError(f"YAML syntax error: {problem}", file=str(path), line=line) from None
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[str, object]:
    """'routing_iters=1' -> ('routing_iters', 1); values are parsed as YAML scalars."""
    if "=" not in text:
        raise SpecError(f"--set expects NAME=VALUE, got '{text}'")
    name, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return name.strip(), parsed
