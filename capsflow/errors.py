"""User-facing errors: one line that names the file, the node and what to change."""
from __future__ import annotations


class CapsflowError(Exception):
    """An error the user caused (bad spec, bad flag, missing data...).

    The CLI prints ``capsflow: error: <str(err)>`` and exits with status 2; it never
    shows a traceback for these.
    """


class SpecError(CapsflowError):
    """A problem in a YAML graph spec, located by file, line and node id."""

    def __init__(self, message: str, *, file: str | None = None,
                 line: int | None = None, node: str | None = None):
        self.file, self.line, self.node, self.message = file, line, node, message
        super().__init__(self._format())

    def _format(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "") + ": "
        who = f"node '{self.node}': " if self.node else ""
        return _one_line(f"{where}{who}{self.message}")


def _one_line(text: str, limit: int = 2000) -> str:
    """A message quotes names and values from the spec, which may hold newlines, control
    characters or lone surrogates, or be megabytes long: keep it one printable line."""
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text) - limit:,} more characters)"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class BackendError(CapsflowError):
    """The requested array backend is not usable here (e.g. CuPy without a GPU)."""
