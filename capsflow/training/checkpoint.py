"""Parameters on disk: ``.npz`` files keyed by the YAML parameter names."""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from capsflow.backends import to_numpy
from capsflow.errors import CapsflowError


def save_npz_atomic(path: str | Path, arrays: dict) -> None:
    """Write ``arrays`` to ``path`` via a temporary file and a rename, so a crash never
    leaves a half-written file where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: to_numpy(v) for k, v in arrays.items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_npz(path: str | Path) -> dict:
    """Read every array of an .npz; a missing or corrupt file is one clear line."""
    path = Path(path)
    if not path.exists():
        raise CapsflowError(f"no such file: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CapsflowError(f"{path} is not a readable .npz file ({exc.__class__.__name__}: "
                            f"{exc}); was it truncated?") from None


def save_params(path: str | Path, params: dict) -> None:
    """Save parameters as .npz keyed by the YAML parameter names."""
    save_npz_atomic(path, params)


def load_params(path: str | Path) -> dict:
    """Load parameters saved by ``save_params`` (or a checkpoint's parameters)."""
    data = load_npz(path)
    prefix = "param/"
    if any(k.startswith(prefix) for k in data):  # a training checkpoint
        return {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
    return data
