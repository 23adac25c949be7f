"""Op definitions: each op declares inputs, typed attributes, a shape rule, a forward
and a vector-Jacobian product, registered right under its definition (the JAX idiom)::

    squash = defop("squash", inputs=("s",), attrs={"axis": -1, "eps": 1e-7}, saves=("s", "out"))

    @squash.shape
    def _(s, *, axis, eps): return s

    @squash.forward
    def _(xp, s, *, axis, eps): ...                 # returns the output array

    @squash.vjp
    def _(xp, saved, g, needs, *, axis, eps): ...   # one gradient (or None) per input

``saves`` names what the VJP may read: input names, ``"out"``, or extra arrays that the
forward returns as ``(out, {"name": array})``. Everything else is freed after its
last forward use. ``needs[k]`` tells the VJP whether input k wants a gradient, so
expensive gradients nobody uses (the image's) are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

REQUIRED = object()


@dataclass(frozen=True)
class Attr:
    """An attribute's type and default (``REQUIRED`` when it has none)."""
    type: Any
    default: Any = REQUIRED


def _as_attr(value: Any) -> Attr:
    if isinstance(value, Attr):
        return value
    kind = type(value)
    return Attr(float if kind is float else kind, value)


@dataclass
class OpDef:
    name: str
    inputs: tuple[str, ...]
    attrs: dict[str, Attr]
    saves: tuple[str, ...] = ()
    doc: str = ""
    nondiff: tuple[str, ...] = ()  # inputs that never receive a gradient
    shape_fn: Callable | None = None
    forward_fn: Callable | None = None
    vjp_fn: Callable | None = None
    extra: dict = field(default_factory=dict)

    # -- registration decorators -------------------------------------------------
    def shape(self, fn: Callable) -> Callable:
        self.shape_fn = fn
        return fn

    def forward(self, fn: Callable) -> Callable:
        self.forward_fn = fn
        return fn

    def vjp(self, fn: Callable) -> Callable:
        self.vjp_fn = fn
        return fn

    # -- introspection used by the compiler ----------------------------------------
    @property
    def variadic(self) -> bool:
        return bool(self.inputs) and self.inputs[-1].endswith("*")

    def input_names(self, count: int) -> list[str]:
        """Names of the ``count`` inputs a node passes (variadic ones numbered)."""
        if self.variadic:
            base = self.inputs[-1].rstrip("*")
            fixed = [n.rstrip("?") for n in self.inputs[:-1]]
            return fixed + [f"{base}{k}" for k in range(count - len(fixed))]
        return [n.rstrip("?") for n in self.inputs[:count]]

    def arity(self) -> tuple[int, float]:
        """(minimum, maximum) number of inputs."""
        required = sum(1 for n in self.inputs if not n.endswith(("?", "*")))
        maximum = float("inf") if self.variadic else len(self.inputs)
        return required, maximum

    def differentiable(self, position: int, count: int) -> bool:
        return self.input_names(count)[position] not in self.nondiff


OPS: dict[str, OpDef] = {}


def defop(name: str, *, inputs: tuple[str, ...], attrs: dict[str, Any] | None = None,
          saves: tuple[str, ...] = (), nondiff: tuple[str, ...] = (), doc: str = "") -> OpDef:
    """Declare an op and register it under ``name``."""
    if name in OPS:
        raise ValueError(f"op '{name}' is defined twice")
    op = OpDef(name, tuple(inputs), {k: _as_attr(v) for k, v in (attrs or {}).items()},
               tuple(saves), doc, tuple(nondiff))
    OPS[name] = op
    return op


def get_op(name: str) -> OpDef:
    _load_ops()
    return OPS[name]


def _load_ops() -> None:
    # Importing the package registers every op module (ops/ is installed as capsflow.ops).
    import capsflow.ops  # noqa: F401
