"""Op definitions: each op declares inputs, typed attributes, a shape rule, a forward
and a vector-Jacobian product, registered right under its definition (the JAX idiom)::

    squash = defop("squash", inputs=("s",), attrs={"axis": -1, "eps": 0.0}, saves=("s",))

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

The functions above are the op's **reference**: one ``xp`` code path, the same on NumPy
and CuPy. A backend may register faster **variants** from its own package
(capsflow/backends/cpu, capsflow/backends/cuda)::

    fast = conv2d.variant("numpy")            # on by Options.fast_paths

    @fast.forward
    def _(be, x, w, b=None, *, stride, padding): ...   # be: the Backend (be.xp, be.options)

    @fast.vjp
    def _(be, saved, g, needs, *, stride, padding): ...

A variant returns ``DECLINED`` where it does not apply (another layout, dtype or size),
and then the next variant, finally the reference, runs. A variant's VJP runs only after
its own forward (it may read the extra arrays that forward saved); a variant with a VJP
alone reads what the reference's forward saves. tests/test_variants_match.py checks
every registered variant against the reference on every gradient case.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

REQUIRED = object()
#: What a variant returns where it does not apply: the next one (finally the reference) runs.
DECLINED = NotImplemented


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


def _register(slot: str) -> Callable:
    """A decorator method that stores the decorated function in ``slot``."""
    def decorator(self, fn: Callable) -> Callable:
        setattr(self, slot, fn)
        return fn
    return decorator


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
    variants: list = field(default_factory=list)
    _active: dict = field(default_factory=dict, repr=False)

    # -- registration decorators -------------------------------------------------
    shape = _register("shape_fn")
    forward = _register("forward_fn")
    vjp = _register("vjp_fn")

    def variant(self, backend: str, option: str = "fast_paths") -> "Variant":
        """A variant of this op for ``backend`` ("numpy", "cupy"; "*" for every
        backend), on while ``Options.<option>`` is; register its functions with the
        returned object's ``forward`` and ``vjp`` decorators."""
        found = Variant(self.name, backend, option)
        self.variants.append(found)
        self._active.clear()
        return found

    def active_variants(self, be: Any) -> tuple:
        """The variants that apply on backend ``be`` under its options, in order."""
        key = be.options
        if key not in self._active:
            self._active[key] = tuple(v for v in self.variants if v.applies(be.options))
        return self._active[key]

    def run_forward(self, be: Any, args: list, attrs: dict) -> tuple:
        """(result, variant that made it, or None for the reference)."""
        for v in self.active_variants(be):
            if v.forward_fn is not None:
                result = v.forward_fn(be, *args, **attrs)
                if result is not DECLINED:
                    return result, v
        return self.forward_fn(be.xp, *args, **attrs), None

    def compute(self, be: Any, *args: Any, **attrs: Any) -> Any:
        """The op's output alone (no saves) on backend ``be``."""
        result = self.run_forward(be, list(args), attrs)[0]
        return result[0] if isinstance(result, tuple) else result

    def run_vjp(self, be: Any, forward_variant: "Variant | None", saved: dict, g: Any,
                needs: tuple, attrs: dict) -> tuple:
        """The input gradients from the first variant, in registration order, whose VJP
        applies: the forward's own variant or one with a VJP alone; else the reference's."""
        for v in self.active_variants(be):
            if v.vjp_fn is not None and (v is forward_variant or v.forward_fn is None):
                result = v.vjp_fn(be, saved, g, needs, **attrs)
                if result is not DECLINED:
                    return result
        return self.vjp_fn(be.xp, saved, g, needs, **attrs)

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


@dataclass
class Variant:
    """A backend's faster implementation of an op (see the module docstring)."""
    op: str
    backend: str
    option: str = "fast_paths"
    forward_fn: Callable | None = None
    vjp_fn: Callable | None = None

    def applies(self, options: Any) -> bool:
        return self.backend in ("*", options.backend) and bool(getattr(options, self.option))

    forward = _register("forward_fn")
    vjp = _register("vjp_fn")


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
