"""Per-op timing of the executor: where a training step spends its time and memory.

Profiling is off unless a ``profiling()`` block is open; the executor then times every
op forward and every VJP call (synchronising the device before and after, so CuPy's
asynchronous kernels are charged to the op that queued them). With no block open the
executor takes its plain path, which costs nothing.

    with profiling(backend.synchronize) as prof:
        graph.value_and_grad(params, inputs)
    print(format_table(prof.rows()))
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

_active: "OpProfile | None" = None


def active() -> "OpProfile | None":
    """The profile that the executor should record into, or None (profiling off)."""
    return _active


def array_bytes(obj: Any) -> int:
    """Bytes of the distinct arrays (views counted once, by owner) in ``obj``."""
    from capsflow.core.memory import _arrays, _root
    seen: dict = {}
    for a in _arrays(obj):
        root = _root(a)
        seen[id(root)] = getattr(root, "nbytes", a.nbytes)
    return sum(seen.values())


@dataclass
class OpStat:
    """Totals for one (phase, op) pair or one (phase, node)."""
    calls: int = 0
    seconds: float = 0.0
    bytes: int = 0          # bytes of the arrays the calls returned
    seconds_min: float = field(default=float("inf"))


@dataclass
class OpProfile:
    """Accumulates time and result bytes of each op call, per op and per node.

    ``phase`` is "forward" or "vjp". Timings cover everything since the profile was
    opened; ``steps`` counts the executor passes so per-step figures can be derived.
    """
    synchronize: Callable[[], None] = lambda: None
    by_op: dict = field(default_factory=dict)
    by_node: dict = field(default_factory=dict)
    steps: int = 0

    def call(self, phase: str, node: str, op_name: str, fn: Callable, *args: Any,
             **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` timed, and record it under ``op_name`` and ``node``."""
        self.synchronize()
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.synchronize()
        elapsed = time.perf_counter() - start
        size = array_bytes(result[0] if phase == "forward" and isinstance(result, tuple)
                           else result)
        for table, key in ((self.by_op, (phase, op_name)), (self.by_node, (phase, node))):
            stat = table.setdefault(key, OpStat())
            stat.calls += 1
            stat.seconds += elapsed
            stat.bytes += size
        return result

    def reset(self) -> None:
        """Forget everything recorded so far (e.g. the warm-up steps)."""
        self.by_op.clear()
        self.by_node.clear()
        self.steps = 0

    def rows(self, per: str = "op", steps: int | None = None) -> list:
        """[(phase, name, calls per step, seconds per step, MB per step, share)], slowest
        first. ``per`` is "op" (summed over nodes of one op type) or "node"."""
        table = self.by_op if per == "op" else self.by_node
        steps = max(steps or self.steps, 1)
        total = sum(s.seconds for s in table.values()) or 1.0
        rows = [(phase, name, s.calls / steps, s.seconds / steps, s.bytes / steps / 2 ** 20,
                 s.seconds / total) for (phase, name), s in table.items()]
        return sorted(rows, key=lambda r: -r[3])


@contextlib.contextmanager
def profiling(synchronize: Callable[[], None] | None = None) -> Iterator[OpProfile]:
    """Open a profile: every executor pass inside the block records into it."""
    global _active
    if _active is not None:
        raise RuntimeError("a profiling block is already open")
    _active = OpProfile(synchronize or (lambda: None))
    try:
        yield _active
    finally:
        _active = None


def format_table(rows: list, limit: int | None = None, title: str = "") -> str:
    """Rows of ``OpProfile.rows`` as an aligned text table (forward and VJP apart)."""
    lines = [title] if title else []
    header = f"{'phase':<8} {'op':<28} {'calls':>6} {'ms/step':>10} {'MB/step':>10} {'share':>7}"
    for phase in ("forward", "vjp"):
        part = [r for r in rows if r[0] == phase][:limit]
        if not part:
            continue
        lines.append(header)
        for ph, name, calls, sec, mb, share in part:
            lines.append(f"{ph:<8} {name:<28} {calls:>6.0f} {sec * 1e3:>10.1f} {mb:>10.1f} "
                         f"{share * 100:>6.1f}%")
        total = sum(r[3] for r in rows if r[0] == phase)
        lines.append(f"{phase:<8} {'(total)':<28} {'':>6} {total * 1e3:>10.1f}")
        lines.append("")
    return "\n".join(lines).rstrip()
