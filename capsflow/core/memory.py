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
    """Tracks the peak of distinct array bytes the executor holds, counted as it goes:
    ``add`` when a container takes an array, ``remove`` when it lets go, ``sample`` at the
    points where the peak is read. Each array counts at the array that owns its memory
    (a view does not count twice), once however many containers hold it. Walking every
    held array at each op instead made a long graph's metering quadratic in its length
    (a 2,000-node chain: 52 s for a 0.27 s step); ``walk`` is that count, which tests
    compare this one with."""

    def __init__(self) -> None:
        self.peak = 0
        self.current = 0
        self._held: dict = {}   # id(owner) -> [references, bytes, owner]

    def add(self, obj: Any) -> None:
        """Every array in ``obj`` (an array, a dict, list or tuple of them, or None) is now
        held once more."""
        for a in _arrays(obj):
            root = _root(a)
            entry = self._held.get(id(root))
            if entry is None:  # kept with the owner, so that its id is not reused meanwhile
                nbytes = getattr(root, "nbytes", a.nbytes)
                self._held[id(root)] = [1, nbytes, root]
                self.current += nbytes
            else:
                entry[0] += 1

    def remove(self, obj: Any) -> None:
        """Every array in ``obj`` is held once less (as many times as it was added)."""
        for a in _arrays(obj):
            key = id(_root(a))
            entry = self._held[key]
            entry[0] -= 1
            if entry[0] == 0:
                del self._held[key]
                self.current -= entry[1]

    def sample(self, *containers: Any) -> int:
        """The peak so far, including now. ``containers``: what the executor holds at
        this point, unused here (a checking meter may ``walk`` them)."""
        self.peak = max(self.peak, self.current)
        return self.current

    @staticmethod
    def walk(*containers: Any) -> int:
        """Distinct array bytes in ``containers``, counted by visiting every array."""
        seen: dict = {}
        for c in containers:
            for a in _arrays(c):
                root = _root(a)
                seen[id(root)] = getattr(root, "nbytes", a.nbytes)
        return sum(seen.values())


#: Ops whose output is (in NumPy and CuPy, usually) a view of their input's memory.
VIEW_OPS = ("reshape", "transpose", "expand_dims", "stop_gradient")


def _owner(dag: Any, ref: str) -> str:
    """The value whose memory ``ref`` looks into: back through view ops."""
    while dag.nodes[ref]["kind"] == "op" and dag.nodes[ref]["op"] in VIEW_OPS:
        ref = dag.nodes[ref]["inputs"][0]
    return ref


def saved_for_backward_bytes(dag: Any, plan: Any, batch: int, itemsize: int) -> int:
    """Bytes of the op values that ``plan``'s reverse pass reads (each op's declared
    ``saves``: inputs, ``out``, or ``operands``, every input of a variadic op such as
    einsum), with every batch symbol (``N``) set to ``batch``, each
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
            if key == "out":
                refs = [name]
            elif key in slots:
                refs = [node["inputs"][slots.index(key)]]
            elif key == "operands":  # einsum's forward saves all its inputs under one name
                refs = node["inputs"]
            else:
                refs = []
            for ref in refs:
                owner = _owner(dag, ref)
                if dag.nodes[owner]["kind"] == "op":
                    kept.add(owner)
    return sum(value_bytes(dag, ref, batch, itemsize) for ref in kept)


def largest_value_bytes(dag: Any, plan: Any, batch: int, itemsize: int) -> int:
    """Bytes of the largest value one of ``plan``'s steps makes, the batch symbols set
    to ``batch``: a pass holds it at least once, saved for the backward pass or not."""
    return max((value_bytes(dag, name, batch, itemsize) for name in plan.steps), default=0)


def value_bytes(dag: Any, ref: str, batch: int, itemsize: int) -> int:
    """Bytes of value ``ref`` with every batch symbol (``N``) set to ``batch``."""
    symbols, factor = split_dim(prod(dag.nodes[ref].get("shape") or ()))  # N*36 too
    return itemsize * factor * batch ** sum(symbols.values())
