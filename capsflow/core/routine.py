"""Helpers outside the op library that backends may also speed up: the sum of factored
outer-product gradients (core/gradients.py) and the optimizers' update (training/optim.py).

A ``Routine`` is a reference function ``reference(xp, ...)`` plus variants registered
from a backend's package, tried in order exactly as op variants are (core/opdef.py): a
variant returns ``DECLINED`` where it does not apply, and the reference runs.
"""
from __future__ import annotations

from typing import Any, Callable

from capsflow.core.opdef import DECLINED, Variant


class Routine:
    def __init__(self, name: str, reference: Callable) -> None:
        self.name = name
        self.reference = reference
        self.variants: list = []

    def variant(self, backend: str, option: str = "fast_paths") -> Callable:
        """Decorator: ``fn(be, ...)`` as this routine's variant on ``backend``."""
        def register(fn: Callable) -> Callable:
            self.variants.append(Variant(self.name, backend, option, forward_fn=fn))
            return fn
        return register

    def has_variant(self, options: Any) -> bool:
        """Whether some variant applies under ``options`` (else only the reference runs)."""
        return any(v.applies(options) for v in self.variants)

    def __call__(self, be: Any, *args: Any, **kwargs: Any) -> Any:
        for v in self.variants:
            if v.applies(be.options):
                result = v.forward_fn(be, *args, **kwargs)
                if result is not DECLINED:
                    return result
        return self.reference(be.xp, *args, **kwargs)
