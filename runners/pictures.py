"""Pictures written whole: matplotlib figures and PIL images go through
``atomic_file`` (a temporary file renamed over the name), so a killed run never leaves
half a PNG, and a symbolic link at the name is replaced, never written through (an
output folder holding a link must not overwrite the file it points to)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from capsflow.training.checkpoint import atomic_file


def save_figure(fig: Any, path: str | Path, dpi: int) -> Path:
    """Write a matplotlib figure in the format its suffix names (.png, .svg, .pdf)."""
    path = Path(path)
    with atomic_file(path) as f:
        fig.savefig(f, dpi=dpi, format=path.suffix.lstrip(".").lower() or "png")
    return path


def save_image(image: Any, path: str | Path) -> Path:
    """Write a PIL image as PNG."""
    path = Path(path)
    with atomic_file(path) as f:
        image.save(f, format="PNG")
    return path
