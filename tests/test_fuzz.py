"""Property-based fuzzing of the graph language (issue 17), with hypothesis.

Each case takes the project's own graphs (graphs/*.yaml, graphs/routing/*.yaml) and
mutates one or two of them:

* as YAML data: keys dropped, duplicated and renamed; values swapped for another type
  (int, str, list, mapping, null, NaN, infinities, huge numbers); numbers changed (0, -1,
  2**63, 1e308, 1.5...); ops, input references, carries and outputs pointed at other
  names or garbage; values nested deeper (past Limits.max_depth too); repeat blocks added
  or changed, with large and nested counts; ``${}`` variables injected, made to refer to
  themselves or to expand exponentially; YAML aliases shared, made recursive or built
  into alias bombs; includes and extends pointed at loops, fan-outs, FIFOs, /dev/zero,
  folders, files outside the graph's folder and missing files; sections, shapes and
  attributes replaced;
* as bytes: flipped, inserted, deleted and repeated bytes, lines duplicated (duplicate
  keys), swapped and re-indented, YAML tokens (tags, anchors, directives, flow brackets),
  NUL, BOMs and invalid UTF-8;

together with ``--set NAME=VALUE`` strings, overrides passed from Python, other seeds and
dtypes, and tighter ``capsflow.Limits``. The files are written into a scratch copy of
graphs/ (routing/ beside them, so includes resolve), which also holds the hostile files
the mutations point at, and the case is fed to ``capsflow.compile(path, overrides,
limits)``, then ``graph.init_params()`` and, when the graph is small, ``graph.run()`` and
``graph.value_and_grad()`` on a batch of 2 (outputs and gradients must have the shapes
the compiler inferred); or, for a fifth of the cases, to
``capsflow --debug check --quiet PATH --set=...`` in-process.

The invariant: a case ends in success or in a ``capsflow.CapsflowError`` whose message
is one line (through the CLI: exit status 0, or 2 with one line on stderr), within
``--fuzz-timeout`` seconds (10), with at most MEMORY_BUDGET (500 MB) more resident
memory up to the end of init_params (a run then takes what the graph needs, CapsNet's
size at most, and meets the child's RLIMIT_AS beyond).

Isolation. Each case runs in a child process started by multiprocessing's fork server
(a clean process that imported capsflow and this module once, so a case costs a fork):

* a hang is killed at the timeout without killing pytest: ``signal.alarm`` in-process
  cannot interrupt a long C call (a NumPy allocation, an einsum), and leaves the
  interpreter in an unknown state when it does interrupt;
* a memory blow-up meets ``RLIMIT_AS`` (the child's address space at its start plus
  MEMORY_LIMIT, 1 GiB) in the child alone, as a MemoryError the child reports: the limit
  is per process, so set in pytest it would bound every other test too, and tracemalloc
  can only measure an allocation after the machine has made it. The child's peak
  resident memory (VmHWM, reset at its start) is checked against MEMORY_BUDGET;
* the child is forked from the clean fork server, not from pytest, whose earlier tests
  may have started thread pools (the CPU backend's): a pool forked without its threads
  deadlocks at its first use.

Runs. CI runs a fixed, derandomized set of CI_EXAMPLES cases, well under a minute::

    pytest tests/test_fuzz.py

Before a release, tens of thousands of cases with fresh seeds, each distinct finding
recorded under --fuzz-findings instead of stopping at the first (docs/errors.md,
"Fuzzing")::

    pytest tests/test_fuzz.py --fuzz-examples 5000 --fuzz-seed 1 --fuzz-findings /tmp/fuzz

Options (tests/conftest.py): --fuzz-examples N, --fuzz-seed S (random instead of
derandomized), --fuzz-findings DIR, --fuzz-timeout SECONDS. With ``-s`` the test prints
how the cases ended (ok after run or init_params, capsflow error at which stage, the CLI's
exit status), the slowest case and the most memory one took.
"""
from __future__ import annotations

import copy
import io
import json
import math
import multiprocessing
import multiprocessing.forkserver
import os
import re
import resource
import string
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, note, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from capsflow.core.opdef import OPS, get_op  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GRAPHS = REPO / "graphs"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="runs each case in a child with Linux resource limits")

CI_EXAMPLES = 150
MEMORY_LIMIT = 1 << 30        # RLIMIT_AS headroom of a child: a larger allocation fails
MEMORY_BUDGET = 500 << 20     # resident memory reading, compiling and init may add (issue 17)
PARAM_BYTES = 64 << 20        # Limits.max_param_bytes of the fuzz: init stays cheap
RUN_MAX_PARAMS = 16_000_000   # run graphs with at most this many parameter values...
RUN_MAX_VALUES = 12_000_000   # ...and values in all (inputs, params, op outputs, batch 2)
BATCH = 2                     # the size of every batch symbol (N) in a run

# -- the corpus: the project's graphs, as text and as data ---------------------------------
CORPUS = {p.relative_to(GRAPHS).as_posix(): p.read_bytes()
          for p in sorted(GRAPHS.glob("*.yaml")) + sorted(GRAPHS.glob("routing/*.yaml"))}
DATA = {name: yaml.safe_load(text) for name, text in CORPUS.items()}
TOP = sorted(n for n in CORPUS if "/" not in n)
FRAGMENTS = sorted(n for n in CORPUS if "/" in n)


def _dicts(value):
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            yield v
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def _vocabulary():
    keys, ids, variables, attrs, strings = set(), set(), set(), set(), set()
    for doc in DATA.values():
        for d in _dicts(doc):
            keys.update(d)
            if isinstance(d.get("id"), str):
                ids.add(d["id"])
            for section in ("inputs", "params", "carry"):
                if isinstance(d.get(section), dict):
                    ids.update(d[section])
            if isinstance(d.get("vars"), dict):
                variables.update(d["vars"])
            if isinstance(d.get("attrs"), dict):
                attrs.update(d["attrs"])
            strings.update(v for v in d.values() if isinstance(v, str) and len(v) < 40)
    ids.update(["routing/v", "routing/b", "routing/c", "routing/0/c", "routing/2/v",
                "routing/9/v", "routing/0", "routing/", "/v"])
    return sorted(keys), sorted(ids), sorted(variables), sorted(attrs), sorted(strings)


KEYS, IDS, VARS, ATTRS, SEEN_STRINGS = _vocabulary()
LANGUAGE_KEYS = ["name", "description", "vars", "inputs", "params", "nodes", "outputs",
                 "extends", "replace", "include", "doc", "id", "op", "in", "attrs", "when",
                 "repeat", "carry", "body", "stage", "init", "next", "shape", "optional",
                 "trainable"]
get_op("relu")   # registers the op library
OP_NAMES = sorted(OPS)
ATTR_NAMES = sorted(set(ATTRS) | {a for op in OPS.values() for a in op.attrs})

# -- hostile values -------------------------------------------------------------------------
NUMBERS = [0, 1, -1, 2, 3, 10, 1152, 2 ** 31, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, -2 ** 63 - 1,
           2 ** 64, 10 ** 30, 10 ** 400, 0.0, -0.0, 0.5, 1.5, -2.5, 1e-320, 1e308, -1e308,
           math.inf, -math.inf, math.nan]
PATHS = ["routing/paper.yaml", "routing/leaky.yaml", "routing/efficient.yaml",
         "routing/${routing}.yaml", "routing/nope.yaml", "routing/fifo.yaml", "routing/loop.yaml",
         "routing/zero.yaml", "routing/dir.yaml", "routing/outside.yaml", "routing/big.yaml",
         "routing/binary.yaml", "routing/self.yaml", "routing/ping.yaml", "routing/fan0.yaml",
         "routing/deep0.yaml", "routing", "routing/", ".", "", "capsnet.yaml",
         "capsnet-leaky.yaml", "capsnet-efficient.yaml", "../outside.yaml",
         "../graphs/routing/paper.yaml", "routing/../routing/paper.yaml", "/dev/zero",
         "/dev/null", "/etc/passwd", "/proc/self/status", "/nonexistent/x.yaml",
         "routing/paper.yaml\x00x", "a" * 5000, "~/x.yaml", "${nope}.yaml",
         "routing/${routing_iters}.yaml", "routing/${squash_eps}.yaml", "paper.yaml"]
GARBAGE = ["", " ", "-", "*", "N", "M", "N*2", "N*N", "-1", "1e3", "0x10", "yes", "null", "~",
           "${", "}", "${}", "${ routing }", "$${routing}", "${routing}${routing}", "${nope}",
           "${routing_iters}", "${squash_eps}", "${recon_weight}x", "\x00", "\t", "é", "\u202e",
           "𝔵", "a" * 300, "x" * 5000, "ij,jk->ik", "->", "...", "nijd,njd->nij",
           "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ->", "a,b->c", "i,i,i->",
           "not_last", "last", "first", "not_first", "always", "never", "zeros", "ones",
           "routing/v", "x", "y", "u_hat", "loss", "conv1.w"]
CHARS = list(string.printable) + ["\x00", "\x01", "\x1b", "\x7f", "\x85", "\xa0", "é", "ß",
                                  "Ω", "\u2028", "\u202e", "\ufeff", "中", "𝔵", "😀"]

numbers = st.one_of(st.sampled_from(NUMBERS), st.integers(-2 ** 70, 2 ** 70), st.floats())
texts = st.text(st.sampled_from(CHARS), max_size=24)   # no charmap: nothing in .hypothesis/
strings = st.one_of(st.sampled_from(GARBAGE + IDS + VARS + OP_NAMES + LANGUAGE_KEYS + PATHS
                                    + SEEN_STRINGS), texts)
scalars = st.one_of(numbers, st.booleans(), st.none(), strings)
names = st.one_of(st.sampled_from(sorted(set(KEYS) | set(LANGUAGE_KEYS) | set(IDS) | set(VARS)
                                         | set(ATTR_NAMES))), texts,
                  st.sampled_from([0, 1, -1, None, True, 1.5, 2 ** 64]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(names, inner, max_size=4), max_leaves=8)
COUNTS = [0, -1, 1, 2, 3, 50, 999, 1000, 1001, 10 ** 6, 2 ** 63, 10 ** 30, 1.5, 3.0, "3", "",
          "${routing_iters}", "${routing_iters}${routing_iters}", "${squash_eps}", None, True,
          [3], {"n": 3}, math.nan, math.inf]


# -- structural mutations of YAML data ----------------------------------------------------
def _slots(root) -> list:
    """(container, key, path) of every value under the holder ``root``; shared and
    recursive containers (YAML aliases) are walked once."""
    out, seen, stack = [], set(), [(root, ())]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        keys = list(node) if isinstance(node, dict) else range(len(node))
        for k in keys:
            out.append((node, k, path + (k,)))
            if isinstance(node[k], (dict, list)):
                stack.append((node[k], path + (k,)))
    return out


def _index(draw, n: int) -> int:
    """An index below ``n``, about uniform: hypothesis draws the ends of a range (and small
    numbers) far more often, which would mutate the first key of every file."""
    return draw(st.integers(0, 2 ** 32 - 1)) % n


def _pick(draw, root, where=None):
    """One slot, among those ``where`` accepts when there are any."""
    slots = _slots(root)
    if not slots:   # the document itself was dropped
        root["root"] = None
        slots = _slots(root)
    inner = slots[1:] or slots   # the whole document only through m_section, or by chance
    chosen = [s for s in inner if where(s)] if where else inner
    chosen = chosen or inner
    return chosen[_index(draw, len(chosen))]


def _last(path, *keys):
    return bool(path) and path[-1] in keys


def _under(path, key, depth=1):
    return len(path) > depth and path[-1 - depth] == key


def _node_lists(root):
    return [(p, k, path) for p, k, path in _slots(root)
            if isinstance(p[k], list) and _last(path, "nodes", "body")]


def _top(root) -> dict:
    """The document's top-level mapping (made one if a mutation replaced it)."""
    if not isinstance(root.get("root"), dict):
        root["root"] = {}
    return root["root"]


def m_drop(draw, root):
    parent, key, path = _pick(draw, root)
    del parent[key]
    return f"drop {path}"


def m_duplicate(draw, root):
    parent, key, path = _pick(draw, root)
    if isinstance(parent, list):
        parent.insert(key + 1, copy.deepcopy(parent[key]))
        return f"duplicate item {path}"
    new = draw(names)
    parent[new] = copy.deepcopy(parent[key])
    return f"copy {path} to key {new!r}"


def m_rename(draw, root):
    parent, key, path = _pick(draw, root, lambda s: isinstance(s[0], dict) and s[2] != ("root",))
    if not isinstance(parent, dict) or path == ("root",):
        return "rename: nothing to rename"
    new = draw(st.one_of(st.sampled_from(LANGUAGE_KEYS + ATTR_NAMES), names))
    items = [(new if k == key else k, v) for k, v in parent.items()]
    parent.clear()
    parent.update(items)
    return f"rename {path} to {new!r}"


def m_retype(draw, root):
    parent, key, path = _pick(draw, root)
    parent[key] = draw(values)
    return f"{path} = {parent[key]!r:.80}"


def m_number(draw, root):
    parent, key, path = _pick(draw, root, lambda s: isinstance(s[0][s[1]], (int, float)))
    old = parent[key]
    near = []
    if isinstance(old, (int, float)) and not isinstance(old, bool):
        third = old // 3 if isinstance(old, int) else old / 3
        near = [old + 1, old - 1, -old, old * 1000, third, str(old), [old]]
    parent[key] = draw(st.one_of(st.sampled_from(NUMBERS + near), numbers))
    return f"{path} = {parent[key]!r:.80}"


def m_op(draw, root):
    parent, key, path = _pick(draw, root, lambda s: _last(s[2], "op"))
    parent[key] = draw(st.one_of(st.sampled_from(OP_NAMES), strings, values))
    return f"{path} = {parent[key]!r:.80}"


def m_reference(draw, root):
    """An input reference, carry, output or replace target pointed elsewhere."""
    def ref(s):
        p = s[2]
        return (_under(p, "in") or _last(p, "in", "init", "next") or _under(p, "outputs")
                or _under(p, "replace", 0) or (_last(p, "id") and isinstance(s[0][s[1]], str)))
    parent, key, path = _pick(draw, root, ref)
    parent[key] = draw(st.one_of(st.sampled_from(IDS), strings,
                                 st.lists(st.sampled_from(IDS), max_size=4)))
    return f"{path} = {parent[key]!r:.80}"


def m_nest(draw, root):
    parent, key, path = _pick(draw, root)
    levels = draw(st.one_of(st.integers(1, 3), st.integers(60, 140)))
    how = draw(st.sampled_from(["list", "dict", "stage", "repeat"]))
    value = parent[key]
    for k in range(levels):
        if how == "list":
            value = [value]
        elif how == "dict":
            value = {"k": value}
        elif how == "stage":
            value = {"stage": f"S{k}", "nodes": [value]}
        else:
            value = {"id": f"r{k}", "repeat": 1, "body": [value]}
    parent[key] = value
    return f"nest {path} in {levels} x {how}"


def m_repeat(draw, root):
    """A repeat block added around copies of some nodes, or an existing count changed."""
    if draw(st.booleans()):
        parent, key, path = _pick(draw, root, lambda s: _last(s[2], "repeat"))
        parent[key] = draw(st.one_of(st.sampled_from(COUNTS), numbers))
        return f"{path} = {parent[key]!r:.40}"
    lists = _node_lists(root)
    if not lists:
        return "repeat: no node list"
    parent, key, path = lists[_index(draw, len(lists))]
    nodes = parent[key]
    start = draw(st.integers(0, len(nodes)))
    stop = draw(st.integers(start, len(nodes)))
    body = copy.deepcopy(nodes[start:stop]) or [{"id": "n", "op": "relu", "in": ["x"]}]
    count = draw(st.one_of(st.sampled_from(COUNTS), numbers))
    if draw(st.booleans()):   # a repeat inside a repeat: count x inner count copies
        body = [{"id": "inner", "repeat": draw(st.sampled_from(COUNTS)), "body": body}]
    block = {"id": draw(st.one_of(st.sampled_from(["rep", "routing", "u", ""]), strings)),
             "repeat": count, "body": body}
    if draw(st.booleans()):
        block["carry"] = draw(st.one_of(
            st.just({"b": {"init": "b0", "next": "b_next"}}),
            st.dictionaries(st.sampled_from(IDS), st.dictionaries(
                st.sampled_from(["init", "next", "x"]), st.sampled_from(IDS + GARBAGE),
                max_size=3), max_size=2), values))
    nodes.insert(draw(st.integers(0, len(nodes))), block)
    return f"repeat {count!r:.30} of {path}[{start}:{stop}]"


EXPRESSION_TOKENS = ["+", "-", "*", "/", "//", "%", "**", "(", ")", "(", ")", ",", "min(",
                     "max(", "0", "1", "3", "0.5", "1e308", "99999999999", "iteration", "nope",
                     "abs(", ";", "'"]


def m_variable(draw, root):
    """``${}`` references injected; variables that refer to themselves, that expand
    exponentially, whose value is a list or mapping, or arithmetic (random tokens, and
    numbers squared over and over)."""
    top = _top(root)
    how = draw(st.sampled_from(["inject", "inject", "chain", "self", "value", "arithmetic",
                                "arithmetic", "power"]))
    if not isinstance(top.get("vars"), dict):
        top["vars"] = {}
    variables = top["vars"]
    if how == "value":
        name = draw(st.sampled_from(VARS + ["nope"]))
        variables[name] = draw(values)
        return f"vars.{name} = {variables[name]!r:.60}"
    if how == "self":
        a, b = draw(st.sampled_from(VARS)), draw(st.sampled_from(VARS + ["other"]))
        variables[a], variables[b] = "${%s}" % b, "${%s}x" % a
        name = a
    elif how == "arithmetic":   # tokens of the expression grammar, in any order
        tokens = draw(st.lists(st.sampled_from(EXPRESSION_TOKENS + VARS), min_size=1, max_size=12))
        name = " ".join(tokens)
    elif how == "power":   # v_k = v_{k-1} ** 2: 2**(2**depth) unless stopped
        depth = draw(st.integers(2, 64))
        variables["v0"] = draw(st.sampled_from([2, 3.5, -7, "${routing}"]))
        for k in range(1, depth + 1):
            variables[f"v{k}"] = "${v%d ** 2 * v%d}" % (k - 1, k - 1)
        name = f"v{depth}"
    elif how == "chain":   # v_k = v_{k-1} twice: 2**depth copies of v0
        depth = draw(st.integers(2, 64))
        variables["v0"] = draw(st.sampled_from(["xx", "${routing}", "1"]))
        for k in range(1, depth + 1):
            variables[f"v{k}"] = "${v%d}${v%d}" % (k - 1, k - 1)
        name = f"v{depth}"
    else:
        name = draw(st.sampled_from(VARS + ["nope", "v0"]))
    parent, key, path = _pick(draw, root, lambda s: isinstance(s[0][s[1]], str))
    old = parent[key] if isinstance(parent[key], str) else ""
    ref = "${%s}" % name
    parent[key] = draw(st.sampled_from([ref, old + ref, ref + old, ref + ref, "${" + ref + "}"]))
    return f"{how}: {path} = {parent[key]!r:.60}"


def m_alias(draw, root):
    """A YAML alias: one value shared at two places (yaml.dump writes an anchor and an
    alias), possibly inside itself, or a billion-laughs bomb of shared lists."""
    if draw(st.booleans()):
        source = _pick(draw, root)
        parent, key, path = _pick(draw, root)
        parent[key] = source[0][source[1]]
        return f"alias {source[2]} at {path}"
    width, depth = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    bomb = ["lol"] * width
    for _ in range(depth):
        bomb = [bomb] * width
    if draw(st.booleans()):
        top = _top(root)
        if not isinstance(top.get("vars"), dict):
            top["vars"] = {}
        top["vars"]["bomb"] = bomb
        parent, key, path = _pick(draw, root, lambda s: isinstance(s[0][s[1]], str))
        parent[key] = "${bomb}"
        return f"bomb {width}**{depth} in vars, used at {path}"
    parent, key, path = _pick(draw, root)
    parent[key] = bomb
    return f"bomb {width}**{depth} at {path}"


def m_include(draw, root):
    """includes and extends pointed at other files, loops, fan-outs, special files."""
    how = draw(st.sampled_from(["retarget", "insert", "fan", "extends"]))
    path_strategy = st.one_of(st.sampled_from(PATHS), strings)
    if how == "retarget":
        parent, key, path = _pick(draw, root, lambda s: _last(s[2], "include", "extends"))
        parent[key] = draw(path_strategy)
        return f"{path} = {parent[key]!r:.60}"
    if how == "extends":
        top = _top(root)
        top["extends"] = draw(st.one_of(st.sampled_from(TOP + PATHS), strings))
        return f"extends = {top['extends']!r:.60}"
    lists = _node_lists(root)
    if not lists:
        return "include: no node list"
    parent, key, path = lists[_index(draw, len(lists))]
    entry = {"include": draw(path_strategy)}
    copies = draw(st.integers(2, 300)) if how == "fan" else 1
    shared = draw(st.booleans())
    for _ in range(copies):
        parent[key].insert(0, entry if shared else dict(entry))
    return f"{copies} x include {entry['include']!r:.60} in {path}"


def m_section(draw, root):
    top = _top(root)
    section = draw(st.sampled_from(["name", "description", "vars", "inputs", "params",
                                    "nodes", "outputs", "extends", "replace"]))
    top[section] = draw(st.one_of(values, st.sampled_from([None, [], {}, "", 0])))
    return f"{section} = {top[section]!r:.60}"


def m_shape(draw, root):
    parent, key, path = _pick(draw, root, lambda s: _last(s[2], "shape") or _under(s[2], "shape"))
    dims = st.one_of(st.sampled_from(NUMBERS + ["N", "M", "N*2", "2*N", "", "N N", "-1"]), numbers)
    if isinstance(parent[key], list) and draw(st.booleans()):
        parent[key] = parent[key] + draw(st.lists(dims, min_size=1, max_size=40))
    else:
        parent[key] = draw(st.one_of(dims, st.lists(dims, max_size=6), values))
    return f"{path} = {parent[key]!r:.60}"


def m_attribute(draw, root):
    attr_values = st.one_of(numbers, strings, st.lists(numbers, max_size=40), values,
                            st.sampled_from([[0, 1, 2], [0, 2, 1], [-1, 8, 1152], [-1, -1],
                                             [0, 0], list(range(40)), [1.5], "ijdk,nik->nijd"]))
    if draw(st.booleans()):
        parent, key, path = _pick(draw, root, lambda s: _under(s[2], "attrs"))
        parent[key] = draw(attr_values)
        return f"{path} = {parent[key]!r:.60}"
    parent, key, path = _pick(draw, root, lambda s: isinstance(s[0][s[1]], dict)
                              and "op" in s[0][s[1]])
    node = parent[key]
    if not isinstance(node, dict):
        return "attribute: no node"
    if not isinstance(node.get("attrs"), dict):
        node["attrs"] = {}
    name = draw(st.sampled_from(ATTR_NAMES))
    node["attrs"][name] = draw(attr_values)
    return f"{path}.attrs.{name} = {node['attrs'][name]!r:.60}"


MUTATIONS = {f.__name__[2:]: f for f in (
    m_drop, m_duplicate, m_rename, m_retype, m_number, m_op, m_reference, m_nest, m_repeat,
    m_variable, m_alias, m_include, m_section, m_shape, m_attribute)}
# Weights: the mutations that go deeper than the parser come up more often.
MUTATION_CHOICES = sorted(MUTATIONS) + ["reference", "op", "number", "attribute", "shape",
                                        "repeat", "variable", "include"]


def _dump(draw, data) -> bytes:
    style = draw(st.sampled_from([False, None, True]))
    unicode = draw(st.booleans())
    width = draw(st.sampled_from([80, 20, 10 ** 6]))
    for dumper in (yaml.CSafeDumper, yaml.SafeDumper):
        try:
            text = yaml.dump(data, Dumper=dumper, sort_keys=False, default_flow_style=style,
                             allow_unicode=unicode, width=width)
            return text.encode("utf-8", "surrogatepass")
        except Exception:   # noqa: BLE001 (what PyYAML cannot write, the other dumper may)
            continue
    return b"{}\n"


# -- byte mutations of YAML text ------------------------------------------------------------
TOKENS = [b": ", b"- ", b"&a ", b"*a", b"&a [*a, *a]", b"<<: *a\n", b"!!binary aGk= ",
          b"!!python/object/apply:os.system ['true'] ", b"!!set {a}", b"!!omap [a: 1]",
          b"!!timestamp 2001-01-01", b"!!int x", b"!!float y", b"!!str ", b"!foo ", b"{", b"}",
          b"[", b"]", b"'", b'"', b'"\\uD800"', b'"\\x00"', b'"\\UFFFFFFFF"', b"%YAML 1.1\n",
          b"%TAG ! tag:x,2000:\n", b"---\n", b"...\n", b"? ", b"|\n", b">-\n", b"\t", b"\x00",
          b"\xff\xfe", b"\xef\xbb\xbf", b"\xc3", b"\xed\xa0\x80", b"\r", b"\r\n", b"\xc2\x85",
          b"\xe2\x80\xa8", b"#", b"${", b"${routing}", b"${nope}", b"0x_", b"0b2", b"1e999",
          b".nan", b"-.inf", b"9" * 5000, b"~", b"null", b"  ", b"\x1b[2J",
          b"\n  - {include: ../outside.yaml}\n", b"\n  - {include: routing/fan0.yaml}\n",
          b"\nextends: capsnet.yaml\n", b"\nvars: {routing_iters: 100000}\n"]


def _mutate_bytes(draw, text: bytes, log: list) -> bytes:
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "token", "token", "insert", "delete", "line",
                                    "line", "swap", "truncate", "indent", "repeat"]))
        pos = draw(st.integers(0, len(text)))
        lines = text.split(b"\n")
        k = draw(st.integers(0, max(len(lines) - 1, 0)))
        if how == "flip" and text:
            pos = min(pos, len(text) - 1)
            text = text[:pos] + bytes([text[pos] ^ draw(st.integers(1, 255))]) + text[pos + 1:]
        elif how == "token":
            text = text[:pos] + draw(st.sampled_from(TOKENS)) + text[pos:]
        elif how == "insert":
            text = text[:pos] + draw(st.binary(min_size=1, max_size=16)) + text[pos:]
        elif how == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 200)):]
        elif how == "line":     # duplicate keys, duplicate nodes
            text = b"\n".join(lines[:k + 1] + [lines[k]] + lines[k + 1:])
        elif how == "swap":
            j = draw(st.integers(0, max(len(lines) - 1, 0)))
            lines[k], lines[j] = lines[j], lines[k]
            text = b"\n".join(lines)
        elif how == "truncate":
            text = text[:pos]
        elif how == "indent":
            lines[k] = b" " * draw(st.integers(0, 12)) + lines[k].lstrip(b" ")
            text = b"\n".join(lines)
        else:                   # a line written many times: size, node count
            text = b"\n".join(lines[:k] + [lines[k]] * draw(st.integers(2, 5000)) + lines[k:])
        log.append(f"bytes: {how} at {pos}")
    return text


# -- whole cases ----------------------------------------------------------------------------
SPECIAL_TARGETS = ["routing/fifo.yaml", "routing/loop.yaml", "routing/zero.yaml",
                   "routing/dir.yaml", "routing/outside.yaml", "routing/big.yaml",
                   "routing/binary.yaml", "routing/fan0.yaml", "nope.yaml", "routing", ""]
SET_VALUES = ["1", "0", "-1", "3", "1000", "1001", "1000000", "9223372036854775808", "1e308",
              "1e999", ".nan", "nan", ".inf", "inf", "1.5", "leaky", "efficient", "paper",
              "seed", "nope", "../capsnet", "../../outside", "/etc/passwd", "fifo", "zero",
              "loop", "dir", "fan0", "deep0", "self", "[1, 2]", "{a: 1}", "&a [*a]", "!!int x",
              "!!binary aGk=", "!!python/name:os.system", "0x_", "${routing}",
              "${routing_iters}", "", " ", "'", "\x00", "[[[[[[[[[[", "[" * 100 + "]" * 100,
              "a" * 3000, "9" * 5000, "true", "null", "~"]
set_strings = st.one_of(
    *[st.builds("{}={}".format, st.sampled_from(VARS * 3 + ["nope", "", " ", "a b", "="]),
                st.one_of(st.sampled_from(SET_VALUES), st.sampled_from(SET_VALUES), texts))] * 4,
    texts)


def _recursive_list():
    value = [1]
    value.append(value)
    return value


python_overrides = st.one_of(
    st.dictionaries(st.sampled_from(VARS + ["nope"]), values, max_size=3),
    st.sampled_from([{"routing_iters": 10 ** 6}, {"routing_iters": 2 ** 63},
                     {"routing": "../../outside"}, {"routing": "paper\x00"},
                     {"routing": (1, 2)}, {"routing": b"paper"}, {"routing": {1, 2}},
                     {"routing": 1j}, {"routing_iters": _recursive_list()},
                     {"squash_eps": math.nan}, {1: 2}, [("routing", "leaky")],
                     "routing=leaky", {"routing_iters": 3.0}]))
LIMIT_FIELDS = ["max_files", "max_bytes", "max_depth", "max_document_nodes",
                "max_include_depth", "max_repeat", "max_nodes", "max_param_bytes"]
limits = st.one_of(
    st.fixed_dictionaries({}, optional={
        "max_files": st.integers(1, 30), "max_bytes": st.integers(1, 1 << 21),
        "max_depth": st.integers(1, 64), "max_document_nodes": st.integers(1, 20_000),
        "max_include_depth": st.integers(1, 16), "max_repeat": st.integers(1, 100),
        "max_nodes": st.integers(1, 2000), "max_param_bytes": st.integers(1, PARAM_BYTES)}),
    st.dictionaries(st.sampled_from(LIMIT_FIELDS),
                    st.sampled_from([0, -1, True, 1.5, "3", None, 2 ** 64]), min_size=1,
                    max_size=2))


@dataclass
class Case:
    target: str                     # path relative to the scratch graphs/ folder
    files: dict = field(default_factory=dict)   # corpus name -> mutated bytes
    sets: list = field(default_factory=list)    # --set NAME=VALUE strings
    overrides: object = None        # overrides passed from Python
    limits: dict | None = None      # capsflow.Limits fields (None: the defaults)
    cli: bool = False               # through `capsflow check` instead of the API
    seed: object = 0
    dtype: object = "float32"
    log: list = field(default_factory=list)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={getattr(self, k)!r:.200}" for k in
                          ("target", "sets", "overrides", "limits", "cli", "seed", "dtype"))
        return f"Case({shown}, mutated={sorted(self.files)}, log={self.log})"


def _fragment_of(graph: str) -> str:
    """The routing fragment a graph of graphs/ includes."""
    routing = (DATA[graph].get("vars") or {}).get("routing", "paper")
    return f"routing/{routing}.yaml"


def _chance(draw, n: int) -> bool:
    """True in about one case in ``n`` (hypothesis draws the ends of a range more often)."""
    return draw(st.integers(0, n - 1)) == n // 2


@st.composite
def cases(draw) -> Case:
    kind = draw(st.sampled_from(["graph"] * 14 + ["fragment", "special"]))
    if kind == "graph":
        target = draw(st.sampled_from(["capsnet.yaml"] * 3 + TOP))
    else:   # a fragment or a hostile file given as the graph itself
        target = draw(st.sampled_from(FRAGMENTS if kind == "fragment" else SPECIAL_TARGETS))
    case = Case(target)
    mode = draw(st.sampled_from(["data"] * 6 + ["bytes"] * 2 + ["data+bytes", "none"]))
    # The file to mutate: the graph, its base or its routing fragment (a variant is four
    # lines; the structure is in capsnet.yaml and routing/*.yaml).
    family = [target, "capsnet.yaml", _fragment_of(target)] if target in TOP else [
        target if target in CORPUS else "capsnet.yaml"]
    chosen = [family[_index(draw, len(family))]]
    if _chance(draw, 4):   # and a second file
        chosen.append(draw(st.sampled_from(family + sorted(CORPUS))))
    if mode == "none":   # only overrides, limits, seed and dtype
        chosen = []
    for name in dict.fromkeys(chosen):
        text = CORPUS[name]
        if mode.startswith("data"):
            root = {"root": copy.deepcopy(DATA[name])}
            for _ in range(draw(st.integers(1, 4))):
                kind = draw(st.sampled_from(MUTATION_CHOICES))
                case.log.append(f"{name}: {MUTATIONS[kind](draw, root)}")
            text = _dump(draw, root["root"]) if "root" in root else b""   # dropped: empty
        if "bytes" in mode:
            text = _mutate_bytes(draw, text, case.log)
        case.files[name] = text
    # Each knob is hostile in few cases, so that many cases get through to init and run.
    if _chance(draw, 4):
        case.sets = draw(st.lists(set_strings, min_size=1, max_size=3))
    if _chance(draw, 8):
        case.overrides = draw(python_overrides)
    if _chance(draw, 6):
        case.limits = draw(limits)
    case.cli = _chance(draw, 5)
    if _chance(draw, 10):
        case.seed = draw(st.sampled_from([7, 2 ** 32, 2 ** 200, -1, True, 1.5, "0", None]))
    if _chance(draw, 10):
        case.dtype = draw(st.sampled_from(["float64", "int8", "nope", None, float]))
    return case


# -- the scratch graphs/ folder -------------------------------------------------------------
def make_scratch(root: Path) -> None:
    """graphs/ and graphs/routing/ as in the repository, with the hostile files that the
    mutations point at: a FIFO, a symlink loop, a symlink to /dev/zero, a folder named like
    a graph, a symlink out of the folder tree, a file past Limits.max_bytes, a binary
    file, fragments that include themselves or each other, and includes that fan out."""
    routing = root / "graphs" / "routing"
    routing.mkdir(parents=True)
    for name, text in CORPUS.items():
        (root / "graphs" / name).write_bytes(text)
    (root / "outside.yaml").write_bytes(CORPUS["routing/paper.yaml"])
    os.mkfifo(routing / "fifo.yaml")
    os.symlink("loop.yaml", routing / "loop.yaml")
    os.symlink("/dev/zero", routing / "zero.yaml")
    (routing / "dir.yaml").mkdir()
    os.symlink("../../outside.yaml", routing / "outside.yaml")
    (routing / "big.yaml").write_bytes(b"nodes: []\n" + b"# padding\n" * 300_000)
    (routing / "binary.yaml").write_bytes(bytes(range(256)) * 16)
    (routing / "self.yaml").write_text("nodes: [{include: self.yaml}]\n")
    (routing / "ping.yaml").write_text("nodes: [{include: pong.yaml}]\n")
    (routing / "pong.yaml").write_text("nodes: [{include: ping.yaml}]\n")
    for k in range(6):   # 8**6 includes without a loop
        (routing / f"fan{k}.yaml").write_text(
            "nodes:\n" + f"  - {{include: fan{k + 1}.yaml}}\n" * 8)
    (routing / "fan6.yaml").write_text("nodes: [{id: leaf, op: relu, in: [u_hat]}]\n")
    for k in range(40):  # includes nested 40 deep
        (routing / f"deep{k}.yaml").write_text(f"nodes: [{{include: deep{k + 1}.yaml}}]\n")
    (routing / "deep40.yaml").write_bytes(CORPUS["routing/paper.yaml"])


def write_case(root: Path, case: Case, on_disk: dict) -> None:
    """The corpus files as ``case`` has them (only those that changed are written)."""
    for name, original in CORPUS.items():
        text = case.files.get(name, original)
        if on_disk.get(name) != text:
            (root / "graphs" / name).write_bytes(text)
            on_disk[name] = text


# -- running one case in a child ------------------------------------------------------------
def _proc_status(key: str) -> int:
    """A /proc/self/status field in bytes (VmSize, VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _concrete(shape) -> tuple:
    """A compiled shape with every batch symbol set to BATCH: 'N*36' -> 72."""
    from capsflow.core.shapes import split_dim
    out = []
    for d in shape:
        symbols, factor = split_dim(d)
        out.append(factor * BATCH ** sum(symbols.values()))
    return tuple(out)


def _small(graph) -> bool:
    if graph.param_count() > RUN_MAX_PARAMS:
        return False
    return sum(math.prod(_concrete(d["shape"])) for _, d in graph.dag.nodes(data=True)) \
        <= RUN_MAX_VALUES


def _run(graph, params) -> str | None:
    """Run ``graph`` on random inputs, forward and (with a loss) backward; what is wrong
    with the shapes of the outputs or gradients, if anything."""
    import numpy as np
    rng = np.random.default_rng(0)
    inputs = {name: rng.random(_concrete(spec.shape)) for name, spec in graph.spec.inputs.items()}
    outputs = graph.run(params, inputs)
    for name, value in outputs.items():
        expected = _concrete(graph.dag.nodes[graph.spec.outputs[name]]["shape"])
        if tuple(value.shape) != expected:
            return (f"output '{name}' has shape {tuple(value.shape)}, the compiler inferred "
                    f"{expected} (batch {BATCH})")
    if "loss" in graph.spec.outputs:   # and the reverse pass, whose VJPs see the same shapes
        _, grads = graph.value_and_grad(params, inputs)
        for name, grad in grads.items():
            if tuple(grad.shape) != graph.spec.params[name].shape:
                return (f"the gradient of '{name}' has shape {tuple(grad.shape)}, the "
                        f"parameter {graph.spec.params[name].shape}")
    return None


def child(case: Case, root: str, conn) -> None:
    """Run ``case`` and send its outcome; progress ('stage') is sent as it goes, so that
    the parent knows where a killed case was."""
    import capsflow
    from capsflow import cli
    from capsflow.errors import CapsflowError
    from capsflow.lang.yamlio import parse_override
    try:
        space = _proc_status("VmSize") + MEMORY_LIMIT
        resource.setrlimit(resource.RLIMIT_AS, (space, space))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # reset VmHWM, the peak resident memory
    except OSError:
        pass
    rss = _proc_status("VmRSS")
    start = time.perf_counter()
    path = os.path.join(root, "graphs", case.target)
    stage, before_run = "start", None

    def at(name: str) -> None:
        nonlocal stage
        stage = name
        conn.send({"stage": name})

    try:
        if case.cli:
            at("cli")
            argv = ["--debug", "check", "--quiet", path] + [f"--set={s}" for s in case.sets]
            out, err = io.StringIO(), io.StringIO()
            with redirect_stdout(out), redirect_stderr(err):
                try:
                    rc = cli.main(argv)
                except SystemExit as exc:   # argparse: usage and one error line
                    rc = exc.code
            result = {"outcome": "cli", "rc": rc, "stderr": err.getvalue()[-4000:]}
        else:
            at("--set")
            overrides = case.overrides
            if case.sets:
                overrides = dict(overrides) if isinstance(overrides, dict) else {}
                overrides.update(parse_override(s) for s in case.sets)
            limits = None
            if case.limits is not None:
                at("Limits")
                limits = capsflow.Limits(**{"max_param_bytes": PARAM_BYTES, **case.limits})
            at("compile")
            graph = capsflow.compile(path, overrides,
                                     limits or capsflow.Limits(max_param_bytes=PARAM_BYTES))
            at("init_params")
            params = graph.init_params(case.seed, case.dtype)
            result = {"outcome": "ok", "after": "init_params"}
            if _small(graph):
                before_run = _proc_status("VmHWM") - rss
                at("run")
                problem = _run(graph, params)
                result = {"outcome": "ok", "after": "run"}
                if problem:
                    result = {"outcome": "bug", "type": "wrong shape", "message": problem}
    except CapsflowError as exc:
        result = {"outcome": "error", "type": type(exc).__name__, "message": str(exc)[:10_000]}
    except BaseException as exc:   # noqa: BLE001 (the invariant: nothing else leaves)
        result = {"outcome": "bug", "type": type(exc).__name__, "message": str(exc)[:2000],
                  "traceback": traceback.format_exc()[-8000:]}
    # The budget bounds reading, compiling and init_params; a run of a graph small enough
    # to run (as large as CapsNet) takes what CapsNet takes, and meets RLIMIT_AS beyond.
    peak = _proc_status("VmHWM") - rss
    result.update(stage=stage, seconds=time.perf_counter() - start, run_memory=peak,
                  memory=peak if before_run is None else before_run)
    conn.send(result)
    conn.close()


_context = None


def run_case(case: Case, root: Path, timeout: float) -> dict:
    """Run ``case`` in a fresh child of the fork server; kill it after ``timeout`` s."""
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["capsflow", "capsflow.cli", "capsflow.runners.check",
                                        "hypothesis", __name__])
        # Before Python 3.12 the fork server preloads without the parent's sys.path, which
        # pytest gave this module's folder: without it, every child would import this
        # module (and hypothesis) afresh, 0.2 s a case.
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), old]))
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if old is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = old
        _context = context
    receive, send = _context.Pipe(duplex=False)
    proc = _context.Process(target=child, args=(case, str(root), send), daemon=True)
    proc.start()
    send.close()
    stage, result, deadline = "start", None, time.monotonic() + timeout
    try:
        while result is None:
            if not receive.poll(max(deadline - time.monotonic(), 0)):
                proc.kill()
                proc.join()
                return {"outcome": "hang", "stage": stage, "seconds": timeout}
            try:
                message = receive.recv()
            except EOFError:
                break
            if "outcome" in message:
                result = message
            else:
                stage = message["stage"]
    finally:
        receive.close()
    proc.join(timeout)
    if result is None:
        if proc.is_alive():
            proc.kill()
            proc.join()
        return {"outcome": "crash", "stage": stage, "exitcode": proc.exitcode}
    return result


def problem_with(result: dict) -> str | None:
    """What breaks the invariant in ``result``, or None."""
    outcome = result["outcome"]
    if outcome == "cli":
        rc, err = result["rc"], result["stderr"]
        if rc == 0:
            return None
        if rc != 2:
            return f"capsflow check exited {rc!r} (not 0 or 2): {err}"
        if "not enough memory" in err:  # the CLI's MemoryError line: a size no limit refused
            return f"capsflow check ran out of memory: {err}"
        if "Traceback" in err or len(err.strip().splitlines()) != 1:
            return f"capsflow check exited 2 with more than one line: {err}"
    elif outcome == "error":
        message = result["message"]
        if "\n" in message or "\r" in message or not message.isprintable() \
                or len(message) > 5000:
            return f"a {result['type']} that is not one printable line: {message[:3000]!r}"
    elif outcome != "ok":
        return f"{outcome} in stage {result['stage']}: {result.get('type', '')} " \
               f"{result.get('message', '')}\n{result.get('traceback', '')}"
    if result.get("memory", 0) > MEMORY_BUDGET:
        return f"the case used {result['memory']:,} bytes more memory (budget {MEMORY_BUDGET:,})"
    return None


def signature(result: dict) -> str:
    """What tells one finding from another: the outcome, the exception type and the
    innermost frame of capsflow's code, or the stage of a hang."""
    frames = re.findall(r'File "([^"]+)", line (\d+)', result.get("traceback", ""))
    inside = [(f, n) for f, n in frames if "capsflow" in f or "/ops/" in f] or frames
    where = f"{Path(inside[-1][0]).name}:{inside[-1][1]}" if inside else result.get("stage", "")
    if result["outcome"] == "cli":
        where = re.sub(r"[^A-Za-z]+", " ", result["stderr"])[:60]
    return f"{result['outcome']}-{result.get('type', '')}-{where}"


class Findings:
    """--fuzz-findings DIR: every distinct finding, its first cases, and a summary."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.count: dict[str, int] = {}
        self.errors: dict[str, int] = {}   # kinds of capsflow errors seen, with counts

    def add(self, case: Case, result: dict, problem: str) -> None:
        key = signature(result)
        self.count[key] = self.count.get(key, 0) + 1
        if self.count[key] > 3:
            return
        where = self.folder / f"{len(self.count):03d}-{re.sub(r'[^A-Za-z0-9.:-]+', '_', key)}" \
            / str(self.count[key])
        where.mkdir(parents=True, exist_ok=True)
        for name, text in case.files.items():
            (where / "graphs" / name).parent.mkdir(parents=True, exist_ok=True)
            (where / "graphs" / name).write_bytes(text)
        (where / "case.txt").write_text(f"{case!r}\n\n{problem}\n")
        (where / "result.json").write_text(json.dumps(result, indent=1, default=repr))

    def error(self, result: dict) -> None:
        """Count the capsflow error's kind: its message without file, values and names."""
        text = result.get("message") or result.get("stderr") or ""
        text = re.sub(r"^.*?\.ya?ml(:\d+)?: ", "", text.split(" error: ")[-1])
        text = re.sub(r"'[^']*'|\"[^\"]*\"|\S*\d\S*|\(.*?\)|\[.*?\]", "_", text)[:90]
        self.errors[text] = self.errors.get(text, 0) + 1

    def summary(self) -> str:
        return "\n".join(f"{n:6d}  {k}" for k, n in sorted(self.count.items(), key=lambda x: -x[1]))


def test_fuzz_graph_specs(request, tmp_path_factory):
    """Mutated graphs end in success or one capsflow error line, within the budgets."""
    examples = request.config.getoption("--fuzz-examples") or CI_EXAMPLES
    fuzz_seed = request.config.getoption("--fuzz-seed")
    folder = request.config.getoption("--fuzz-findings")
    timeout = request.config.getoption("--fuzz-timeout")
    findings = Findings(Path(folder)) if folder else None
    root = tmp_path_factory.mktemp("fuzz")
    make_scratch(root)
    on_disk = dict(CORPUS)
    totals = {"cases": 0, "slowest": 0.0, "most memory": 0}
    outcomes: dict[str, int] = {}

    @settings(max_examples=examples, derandomize=fuzz_seed is None, deadline=None,
              database=None, print_blob=False, suppress_health_check=list(HealthCheck),
              phases=[Phase.generate] if findings else list(Phase))
    @given(case=cases())
    def fuzz(case: Case) -> None:
        write_case(root, case, on_disk)
        started = time.perf_counter()
        result = run_case(case, root, timeout)
        totals["wall"] = totals.get("wall", 0) + time.perf_counter() - started
        totals["cases"] += 1
        if result.get("seconds", 0) > totals["slowest"]:
            totals["slowest"], totals["slowest case"] = result["seconds"], repr(case)[:1000]
        if result.get("memory", 0) > totals["most memory"]:
            totals["most memory"], totals["most memory case"] = result["memory"], repr(case)[:1000]
        how = f"{result['outcome']} " + (result.get("after") or f"at {result['stage']}"
                                         if result["outcome"] != "cli" else f"rc {result['rc']}")
        outcomes[how] = outcomes.get(how, 0) + 1
        if findings and result["outcome"] in ("error", "cli"):
            findings.error(result)
        problem = problem_with(result)
        if problem is None:
            return
        if findings:
            findings.add(case, result, problem)
            return
        for name, text in case.files.items():
            note(f"--- graphs/{name}\n{text[:4000].decode('utf-8', 'replace')}")
        raise AssertionError(problem)

    if fuzz_seed is not None:
        fuzz = hypothesis_seed(fuzz_seed)(fuzz)
    fuzz()
    print(f"fuzz: {totals['cases']} cases, slowest {totals['slowest']:.2f} s, "
          f"most memory {totals['most memory'] / 2 ** 20:.0f} MiB; "
          + ", ".join(f"{k}: {n}" for k, n in sorted(outcomes.items())))
    if findings:
        (findings.folder / "summary.txt").parent.mkdir(parents=True, exist_ok=True)
        (findings.folder / "summary.txt").write_text(
            f"{totals}\n{findings.summary()}\n")
        (findings.folder / "errors.txt").write_text("".join(
            f"{n:6d}  {k}\n" for k, n in sorted(findings.errors.items(), key=lambda x: -x[1])))
        assert not findings.count, f"findings in {findings.folder}:\n{findings.summary()}"
