"""An on/off setting with a block that turns it off: how the fast paths (fusion, CUDA
kernels) are switched off to check them against the plain path."""
from __future__ import annotations

import contextlib
from typing import Iterator


class Switch:
    def __init__(self, on: bool = True) -> None:
        self.on = on

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Off inside the block, back to what it was after."""
        previous, self.on = self.on, False
        try:
            yield
        finally:
            self.on = previous
