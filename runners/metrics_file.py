"""Reading a run's metrics.jsonl: one JSON object per line, as the Trainer writes them.

The file is input like any other (`visualize --metrics FILE`, a resumed run's folder,
`reproduce --table DIR`): it may be truncated, edited by hand or not a metrics file at
all. Each line is checked here, once, so that what the plots and tables read is whole:
a line that is not UTF-8, not a JSON object, or a "train"/"epoch" record with a field
missing or of the wrong type is one error naming the file and line. Records of other
kinds pass through unchecked (no reader uses them).
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Optional

from capsflow.errors import CapsflowError
from capsflow.training.json_fields import hint_name, json_type_name, matches_hint, shown

MAX_LINE_BYTES = 1 << 20  # a record is a few hundred bytes: a longer line is not one

# The fields each kind of record must have (ints >= 0, finite numbers), as
# Trainer._log_window and Trainer._finish_epoch write them.
RECORD_FIELDS = {
    "train": {"epoch": int, "iteration": int, "loss": float, "acc": float, "lr": float},
    "epoch": {"epoch": int, "iteration": int, "train_loss": float, "train_acc": float,
              "test_loss": Optional[float], "test_acc": Optional[float], "lr": float,
              "seconds": float},
}
ACCURACIES = ("acc", "train_acc", "test_acc")  # fractions of the examples


def read_metrics(path: str | Path, drop_unfinished: bool = False) -> list:
    """The records of a metrics.jsonl file, each checked (module docstring).
    ``drop_unfinished``: a last line without its newline (a run killed while appending
    it) is dropped instead of checked, as a resumed run does."""
    path = Path(path)
    mode = os.stat(path).st_mode  # a missing file is the caller's OSError
    if not stat.S_ISREG(mode):  # a FIFO would block, /dev/zero never end
        raise CapsflowError(f"{path}: not a regular file (a metrics.jsonl is expected)")
    records = []
    with path.open("rb") as f:
        for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            where = f"{path}:{number}"
            if len(raw) > MAX_LINE_BYTES:
                raise CapsflowError(f"{where}: a line of more than {MAX_LINE_BYTES} bytes, "
                                    f"not a metrics record")
            if drop_unfinished and not raw.endswith(b"\n"):
                break  # only the last line can lack its newline
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CapsflowError(f"{where}: not UTF-8 text (not a metrics.jsonl "
                                    f"file?)") from None
            if line.strip():
                records.append(_record(line, where))
    return records


def _record(line: str, where: str) -> dict:
    """One line's record, or one error saying what is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CapsflowError(f"{where}: not a JSON record ({exc.msg})") from None
    except ValueError:  # an integer of more than 4,300 digits (Python's conversion limit)
        raise CapsflowError(f"{where}: not a metrics record (a number too long)") from None
    except RecursionError:  # [[[[... nested past Python's stack
        raise CapsflowError(f"{where}: not a metrics record (nested too deeply)") from None
    if not isinstance(record, dict):
        raise CapsflowError(f"{where}: {json_type_name(record)}, not a metrics record "
                            f"(a JSON object)")
    kind = record.get("kind")
    fields = RECORD_FIELDS.get(kind, {}) if isinstance(kind, str) else {}
    for name, hint in fields.items():
        if name not in record:
            raise CapsflowError(f"{where}: a {record['kind']!r} record without "
                                f"'{name}'")
        if not matches_hint(record[name], hint):
            raise CapsflowError(f"{where}: '{name}' is {json_type_name(record[name])} "
                                f"{shown(record[name])}, expected "
                                f"{hint_name(hint)}")
        if name in ACCURACIES and record[name] is not None and not 0 <= record[name] <= 1:
            raise CapsflowError(f"{where}: '{name}' is {record[name]}, not a fraction in "
                                f"[0, 1]")
    if kind == "epoch" and (record["test_loss"] is None) != (record["test_acc"] is None):
        # an epoch is validated or not: the trainer writes both or neither
        raise CapsflowError(f"{where}: 'test_loss' and 'test_acc' must be both null (an "
                            f"epoch not validated) or both numbers")
    scheduled = record.get("scheduled", {}) if fields else {}
    if not (isinstance(scheduled, dict)
            and all(matches_hint(v, float) for v in scheduled.values())):
        raise CapsflowError(f"{where}: 'scheduled' is not an object of finite numbers")
    return record
