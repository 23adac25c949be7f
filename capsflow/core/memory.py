"""Memory: this machine's, the array memory the executor holds at each step, and a lower
bound on a training step's activations known before it runs."""
from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Tuple

from capsflow.core.shapes import prod, split_dim


def physical_memory() -> Optional[int]:
    """This machine's memory in bytes (None where the system does not say). Every check
    of a size against memory calls it here (tests pretend a smaller machine by replacing
    it)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def available_memory() -> Optional[int]:
    """The memory free for new allocations now (Linux's MemAvailable), or None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_room() -> Optional[Tuple[int, str]]:
    """What one load may take, and the words for it: this machine's memory, or what is
    free now when that is less (a file that would unpack to 22 GiB on a 24 GiB machine
    with 4 GiB free must be refused). None where the system does not say."""
    total = physical_memory()
    if total is None:
        return None
    free = available_memory()
    if free is None or free >= total:
        return total, f"this machine's {bytes_text(total)} of memory"
    return free, (f"the {bytes_text(free)} of memory free now (of this machine's "
                  f"{bytes_text(total)})")


def proc_status(field: str) -> int | None:
    """A ``/proc/self/status`` figure of this process in bytes (VmRSS, VmHWM), or None
    off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def bytes_text(count: int) -> str:
    """1288490188 -> '1.2 GiB'; below a GiB in MiB."""
    return f"{count / 2**30:,.1f} GiB" if count >= 2**30 else f"{count / 2**20:,.1f} MiB"


def _root(a: Any) -> Any:
    """The array that owns the memory a view looks into (views must not count twice)."""
    while getattr(a, "base", None) is not None and hasattr(a.base, "nbytes"):
        a = a.base
    return a


def _arrays(obj: Any) -> Iterable[Any]:
    if hasattr(obj, "nbytes") and hasattr(obj, "shape"):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _arrays(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _arrays(v)
    elif hasattr(obj, "arrays"):  # a gradient still being summed (outer_grads)
        yield from _arrays(list(obj.arrays()))


class LiveBytes:
    """Tracks the peak of distinct array bytes held in the given containers."""

    def __init__(self) -> None:
        self.peak = 0
        self.current = 0

    def sample(self, *containers: Any) -> int:
        seen: dict = {}
        for c in containers:
            for a in _arrays(c):
                root = _root(a)
                seen[id(root)] = getattr(root, "nbytes", a.nbytes)
        self.current = sum(seen.values())
        self.peak = max(self.peak, self.current)
        return self.current


#: Ops whose output is (in NumPy and CuPy, usually) a view of their input's memory.
VIEW_OPS = ("reshape", "transpose", "expand_dims", "stop_gradient")


def _owner(dag: Any, ref: str) -> str:
    """The value whose memory ``ref`` looks into: back through view ops."""
    while dag.nodes[ref]["kind"] == "op" and dag.nodes[ref]["op"] in VIEW_OPS:
        ref = dag.nodes[ref]["inputs"][0]
    return ref


def saved_for_backward_bytes(dag: Any, plan: Any, batch: int, itemsize: int) -> int:
    """Bytes of the op values that ``plan``'s reverse pass reads (each op's declared
    ``saves``: inputs or ``out``), with every batch symbol (``N``) set to ``batch``, each
    counted once at the value that owns its memory (a reshape or transpose of a saved value
    is a view of it; a graph input or parameter is not counted). The forward pass keeps
    them all until the reverse pass reaches them, so this is a lower bound on a training
    step's peak memory, known before anything runs."""
    from capsflow.core.opdef import OPS
    kept = set()
    for name in plan.needs:
        node = dag.nodes[name]
        op = OPS[node["op"]]
        slots = op.input_names(len(node["inputs"]))
        for key in op.saves:
            ref = name if key == "out" else (
                node["inputs"][slots.index(key)] if key in slots else None)
            if ref is not None:
                owner = _owner(dag, ref)
                if dag.nodes[owner]["kind"] == "op":
                    kept.add(owner)
    return sum(value_bytes(dag, ref, batch, itemsize) for ref in kept)


def value_bytes(dag: Any, ref: str, batch: int, itemsize: int) -> int:
    """Bytes of value ``ref`` with every batch symbol (``N``) set to ``batch``."""
    symbols, factor = split_dim(prod(dag.nodes[ref].get("shape") or ()))  # N*36 too
    return itemsize * factor * batch ** sum(symbols.values())
