"""Hostile graph specs: whatever the input, reading, composing, unrolling, compiling and
initialising end with one capsflow error line (file, line and node where known) or
succeed, within the limits of capsflow/lang/limits.py; never a traceback, hang or
memory blow-up. One test per class of failure found by mutating graphs/ (issue 17)."""
import math
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import capsflow
from capsflow import Limits
from capsflow.cli import main
from capsflow.errors import CapsflowError, SpecError
from capsflow.lang.yamlio import parse_override
from conftest import CAPSNET, REPO

HEAD = """\
inputs: {x: {shape: [N, 4]}}
params: {w: {shape: [4, 3], init: {normal: 0.1}}}
"""


def graph(body: str, head: str = HEAD) -> str:
    """A graph of ``head`` and the node list ``body`` whose output is node ``h``."""
    nodes = "".join(f"  {line}\n" for line in textwrap.dedent(body).splitlines())
    return f"{head}nodes:\n{nodes}outputs: {{h: h}}\n"


def aliases(levels: int, indent: str = "") -> str:
    """A billion laughs: a{k} is nine copies of a{k-1}, 9 ** (levels + 1) values in all."""
    lines = [f"a0: &a0 [{', '.join(['x'] * 9)}]"]
    lines += [f"a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * 9)}]" for k in range(1, levels + 1)]
    return "".join(f"{indent}{line}\n" for line in lines)


def write(folder, name, data):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


def check_line(capsys, path, *args) -> str:
    """``capsflow check`` fails with exit status 2 and one error line; that line."""
    assert main(["check", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def spec_error(path, *expected, **kwargs) -> str:
    with pytest.raises(SpecError) as info:
        capsflow.compile(path, **kwargs)
    message = str(info.value)
    for text in expected:
        assert text in message, message
    return message


# -- 1. every stage rejects bad input with one line, never a traceback ---------------------
TRACEBACKS = {
    # reading: binary and non-printable files, deep nesting, keys that are not names
    "binary": (bytes(range(256)) * 4, ":2: not a UTF-8 text file"),
    "control_character": (b"nodes: []\nname: \x07\n", ":2: not a YAML text file: character '\\x07'"),
    "nul": (b"nodes: [\x00]\n", ":1: not a YAML text file"),
    "deep_flow": (b"[" * 5000 + b"]" * 5000, ":1: YAML nested more than 64 levels deep"),
    "deep_block": ("".join("  " * i + "a:\n" for i in range(300)),
                   "YAML nested more than 64 levels deep (Limits.max_depth)"),
    "list_key": ("? [a]\n: 1\n", ":1: a key must be a name, not a list or mapping"),
    "number_key": ("1: x\n", ":1: key 1 is read as int 1; keys are names: write it in quotes"),
    "yaml_tag": (graph("- {id: h, op: relu, in: [x], doc: !!set {a}}"), ":4: YAML tag"),
    "bad_integer": (graph("- {id: h, op: softmax, in: [x], attrs: {axis: !!int 'x'}}"),
                    ":4: cannot read 'x' as int"),
    "huge_integer": (graph("- {id: h, op: softmax, in: [x], attrs: {axis: " + "9" * 5000 + "}}"),
                     ":4: cannot read"),
    # wrong types where the checks did not expect them
    "repeat_list": (graph("- {id: r, repeat: [1], body: [{id: h, op: relu, in: [x]}]}"),
                    "node 'r': repeat must be a whole number >= 1, got [1]"),
    "carry_list": (graph("- {id: r, repeat: 2, carry: {b: {init: [x], next: h}}, "
                         "body: [{id: h, op: relu, in: [b]}]}"), "node 'r': carry must map"),
    "carry_next_not_in_body": (graph("- {id: r, repeat: 3, carry: {b: {init: x, next: b}}, "
                                     "body: [{id: h, op: relu, in: [b]}]}"),
                               "carry 'b': next 'b' is not a node of the body"),
    "op_list": (graph("- {id: h, op: [relu], in: [x]}"), "node 'h': 'op' must name an op"),
    "stage_list": (graph("- {stage: [a], nodes: [{id: h, op: relu, in: [x]}]}"),
                   "a stage must be named by a string"),
    "name_list": ("name: [1, 2]\n" + graph("- {id: h, op: relu, in: [x]}"), "'name' must be a string"),
    # the name names the run's folder (runs/<name>, compare's --out/<name>): no path
    "name_path": ("name: ../../escaped\n" + graph("- {id: h, op: relu, in: [x]}"),
                  "'name' must be a plain file name"),
    "name_absolute": ("name: /tmp/escaped\n" + graph("- {id: h, op: relu, in: [x]}"),
                      "'name' must be a plain file name"),
    "name_dot_slash": ("name: twin/.\n" + graph("- {id: h, op: relu, in: [x]}"),
                       "'name' must be a plain file name"),
    "axis_string": (graph("- {id: h, op: sum, in: [x], attrs: {axis: [a]}}"),
                    "node 'h': shape mismatch in sum(x (N, 4)): an axis must be a whole number"),
    "transpose_mixed": (graph("- {id: h, op: transpose, in: [x], attrs: {axes: [1, null]}}"),
                        "is not a permutation of the 2 axes"),
    "zeros_dims": (graph("- {id: z, op: zeros, in: [x], attrs: {dims: [a]}}\n"
                         "- {id: h, op: add, in: [z, x]}"), "node 'z': shape mismatch in zeros"),
    "reshape_bool": (graph("- {id: h, op: reshape, in: [x], attrs: {shape: [true, -1]}}"),
                     "attribute shape must hold at most 32 integers"),
    "reshape_zero": (graph("- {id: h, op: reshape, in: [x], attrs: {shape: [0, -1]}}"),
                     "may hold sizes >= 1 and one -1, no 0"),
    "einsum_two_arrows": (graph("- {id: h, op: einsum, in: [x], attrs: {eq: 'ab->a->b'}}"),
                          "needs one explicit '->' output"),
    "linear_of_a_scalar": (graph("- {id: s, op: mean, in: [x]}\n- {id: h, op: linear, in: [s, w]}"),
                           "linear: input () does not fit weight (4, 3)"),
    "symbolic_kernel": ("inputs: {x: {shape: [N, 1, 8, 8]}, k: {shape: [2, 1, K, K]}}\n"
                        + graph("- {id: h, op: conv2d, in: [x, k]}", head=""),
                        "kernel size of (2, 1, K, K) must be known"),
    "nested_list_attr": (graph("- {id: h, op: sum, in: [x], attrs: {axis: [[1]]}}"),
                         "a list attribute holds plain values"),
    "a_variable_list_in_a_string": ("vars: {v: [1]}\n" + graph("- {id: h, op: relu, in: [x], "
                                                             "doc: 'a ${v}'}"),
                                    "'${v}' is a list; only a string or number"),
    # names and values that would break the one-line promise
    "newline_in_an_id": (graph('- {id: "a\\nb\\ud800", op: reluu, in: [x]}'),
                         "node 'a\\nb\\ud800': unknown op"),
    "nul_in_an_include": (graph('- {include: "a\\0b"}'), "include 'a\\x00b' is not a usable path"),
}


@pytest.mark.parametrize("case", sorted(TRACEBACKS))
def test_bad_input_is_one_line_at_every_stage(case, tmp_path, capsys):
    data, expected = TRACEBACKS[case]
    path = write(tmp_path, f"{case}.yaml", data)
    line = check_line(capsys, path)
    assert line.startswith(f"capsflow check: error: {path}") and expected in line, line


def test_a_bad_integer_in_set_is_one_line(capsys):
    line = check_line(capsys, CAPSNET, "--set", "routing_iters=0b_")
    assert "--set 'routing_iters=0b_': cannot read '0b_' as int" in line
    assert parse_override("routing=not: yaml: here") == ("routing", "not: yaml: here")


def test_reshape_of_a_zero_sized_dimension_is_a_shape_error(tmp_path):
    path = write(tmp_path, "g.yaml", graph("- {id: h, op: reshape, in: [x], attrs: {shape: [0]}}"))
    spec_error(path, ":4: node 'h': shape mismatch in reshape")


@pytest.mark.parametrize("init,expected", [
    ("{normal: -1}", "normal needs a standard deviation >= 0 (finite), got -1"),
    ("{normal: .nan}", "normal needs a standard deviation >= 0 (finite), got nan"),
    ("{uniform_fan_in: 0}", "uniform_fan_in needs a fan-in > 0"),
    ("{constant: .inf}", "constant needs any number (finite), got inf"),
    ("{constant: " + "9" * 400 + "}", "constant needs any number (finite)"),
])
def test_init_values_numpy_rejects_are_errors_at_the_parameter(tmp_path, init, expected):
    path = write(tmp_path, "g.yaml", graph("- {id: h, op: matmul, in: [x, w]}",
                                           head=HEAD.replace("{normal: 0.1}", init)))
    spec_error(path, f"{path}:2: parameter 'w': {expected}")


@pytest.mark.parametrize("init", ["{uniform: 1.0e+308}", "{constant: 1.0e+39}", "{normal: 1.0e+300}"])
def test_init_values_float32_cannot_hold_are_errors_of_init_params(tmp_path, init):
    path = write(tmp_path, "g.yaml", graph("- {id: h, op: matmul, in: [x, w]}",
                                           head=HEAD.replace("{normal: 0.1}", init)))
    g = capsflow.compile(path)
    with pytest.raises(SpecError, match=rf"{path}:2: parameter 'w': init .* (cannot make|too large)"):
        g.init_params(dtype="float32")


def test_init_params_and_compile_reject_bad_arguments():
    g = capsflow.compile(CAPSNET)
    for kwargs in ({"seed": -1}, {"seed": 1.5}, {"dtype": "nonsense"}, {"dtype": "int8"}):
        with pytest.raises(CapsflowError):
            g.init_params(**kwargs)
    cyclic: list = []
    cyclic.append(cyclic)
    for args, kwargs in [((5,), {}), (("",), {}), ((CAPSNET, [1]), {}),
                         ((CAPSNET, {"routing_iters": object()}), {}),
                         ((CAPSNET, {"routing_iters": cyclic}), {}),
                         ((CAPSNET,), {"limits": 5})]:
        with pytest.raises(CapsflowError):
            capsflow.compile(*args, **kwargs)
    with pytest.raises(CapsflowError, match="Limits.max_nodes must be a whole number"):
        Limits(max_nodes=0)


# -- 2. limits: no hang, no memory blow-up ---------------------------------------------------
LAUGHS = "".join(f"  l{i}: [" + ", ".join([f"'${{l{i - 1}}}'"] * 9) + "]\n" for i in range(1, 10))
BOMBS = {
    "yaml_alias_bomb": (aliases(9), "YAML aliases makes the graph larger than 100,000 YAML values"),
    "recursive_alias": ("a: &a [*a]\n", "a YAML alias refers to a value that contains it"),
    "alias_nesting_deeper": ("a: &a " + "[" * 60 + "]" * 60 + "\nb: [[[[[[*a]]]]]]\n",
                             "YAML nested more than 64 levels deep, counting what aliases refer to"),
    "merge_key_bomb": ("m0: &m0 {a: 1}\n" + "".join(
        f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}]}}\n" for i in range(1, 25)), "YAML aliases makes"),
    "variables_expanding_exponentially": (
        "vars:\n  l0: [a, a, a, a, a, a, a, a, a]\n" + LAUGHS
        + graph("- {id: h, op: relu, in: [x], doc: '${l9}'}"), "(Limits.max_document_nodes)"),
    "alias_bomb_copied_by_variables": (  # 66,000 values: only the copies go past the limit
        "vars:\n" + aliases(4, "  ") + graph("".join(
            f"- {{id: h{j}, op: relu, in: [x], doc: '${{a4}}'}}\n" for j in range(50))
            + "- {id: h, op: relu, in: [x]}"),
        "variable '${a4}' makes the graph larger than 100,000 YAML values"),
    "strings_doubling": ("vars:\n  s0: xxxxxxxxxxxxxxxx\n" + "".join(
        f"  s{i}: '${{s{i - 1}}}${{s{i - 1}}}'\n" for i in range(1, 60))
        + graph("- {id: h, op: relu, in: [x], doc: '${s59}'}"), "(what is left of Limits.max_bytes)"),
    "huge_repeat": (graph("- {id: r, repeat: 1000000000000, body: [{id: h, op: relu, in: [x]}]}"),
                    "node 'r': repeat 1,000,000,000,000 is more than 1,000 (Limits.max_repeat)"),
    "nested_repeats": (graph("""\
        - id: a
          repeat: 1000
          body:
            - id: b
              repeat: 1000
              body:
                - {id: c, repeat: 1000, body: [{id: h, op: relu, in: [x], when: first}]}
        - {id: h, op: relu, in: [x]}"""), "unrolling 'a/0/b/"),
    "long_einsum_equation": ("vars:\n  eq: " + "a" * 500_000 + "\n" + graph("".join(
        f"- {{id: h{j}, op: einsum, in: [x], attrs: {{eq: '${{eq}}'}}}}\n" for j in range(200))
        + "- {id: h, op: relu, in: [x]}"), "node 'h0': shape mismatch in einsum"),
    "symbols_multiplying": ("inputs: {x: {shape: [N]}}\n" + graph(
        "- {id: h0, op: relu, in: [x]}\n" + "".join(
            f"- {{id: o{j}, op: einsum, in: [h{j}, h{j}], attrs: {{eq: 'a,b->ab'}}}}\n"
            f"- {{id: h{j + 1}, op: reshape, in: [o{j}], attrs: {{shape: [-1]}}}}\n"
            for j in range(40)) + "- {id: h, op: relu, in: [h40]}", head=""),
        "multiplies more than 8 batch symbols"),
    "sizes_multiplying": ("inputs: {x: {shape: [N, 1000000000, 1000000000]}}\n" + graph(
        "- {id: a, op: reshape, in: [x], attrs: {shape: [-1]}}\n"
        "- {id: b, op: einsum, in: [x, x], attrs: {eq: 'nij,mkl->nmijkl'}}\n"
        "- {id: h, op: reshape, in: [b], attrs: {shape: [-1, 1]}}", head=""),
        "the result would have a dimension of size"),
}


@pytest.mark.parametrize("case", sorted(BOMBS))
def test_bombs_stop_at_a_limit_quickly(case, tmp_path, capsys):
    text, expected = BOMBS[case]
    path = write(tmp_path, f"{case}.yaml", text)
    start = time.perf_counter()
    line = check_line(capsys, path)
    assert expected in line, line
    assert time.perf_counter() - start < 5


def test_nested_repeat_blocks_make_one_alias_per_name(tmp_path):
    """Each level used to copy every alias below it: 2 ** 25 aliases from a 1 KB file."""
    body = "{id: h, op: relu, in: [x]}"
    for k in range(25):
        body = f"{{id: r{k}, repeat: 1, body: [{body}]}}"
    path = write(tmp_path, "g.yaml", f"{HEAD}nodes:\n  - {body}\n"
                                     f"outputs: {{h: {'/'.join(f'r{k}' for k in range(24, -1, -1))}/h}}\n")
    start = time.perf_counter()
    g = capsflow.compile(path)
    assert time.perf_counter() - start < 2 and len(g.spec.aliases) == 25
    assert g.spec.outputs["h"] == "/".join(f"r{k}/0" for k in range(24, -1, -1)) + "/h"


def test_a_nested_block_is_named_relative_to_the_enclosing_body(tmp_path):
    path = write(tmp_path, "g.yaml", graph("""\
        - id: outer
          repeat: 3
          carry: {c: {init: x, next: inner/v}}
          body:
            - id: inner
              repeat: 2
              carry: {b: {init: c, next: v}}
              body:
                - {id: v, op: relu, in: [b]}
            - {id: after, op: relu, in: [inner/v]}
        - {id: h, op: add, in: [outer/after, outer/inner/v]}"""))
    g = capsflow.compile(path)
    assert g.dag.nodes["outer/1/inner/0/v"]["inputs"] == ["outer/0/inner/1/v"]
    assert g.dag.nodes["h"]["inputs"] == ["outer/2/after", "outer/2/inner/1/v"]


def test_huge_repeat_from_set(capsys):
    line = check_line(capsys, CAPSNET, "--set", "routing_iters=100000000")
    assert "routing/paper.yaml:11: node 'routing': repeat 100,000,000 is more than 1,000" in line


def test_include_fan_out_without_a_loop(tmp_path, capsys):
    for k in range(8):  # 10 ** 8 includes if nothing stopped it
        write(tmp_path, f"fan/f{k}.yaml",
              "nodes:\n" + f"  - {{include: f{k + 1}.yaml}}\n" * 10)
    write(tmp_path, "fan/f8.yaml", "nodes: []\n")
    path = write(tmp_path, "g.yaml", graph("- {include: fan/f0.yaml}\n- {id: h, op: relu, in: [x]}"))
    start = time.perf_counter()
    assert "again makes the graph larger than 100,000" in check_line(capsys, path)
    assert time.perf_counter() - start < 5
    for k in range(20):  # a chain of distinct files
        write(tmp_path, f"deep/f{k}.yaml", f"nodes:\n  - {{include: f{k + 1}.yaml}}\n")
    path = write(tmp_path, "deep.yaml", graph("- {include: deep/f0.yaml}\n- {id: h, op: relu, in: [x]}"))
    assert "includes nested more than 16 deep (Limits.max_include_depth)" in check_line(capsys, path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_or_device_is_never_read(tmp_path, capsys):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert f"{fifo} is not a regular file" in check_line(capsys, fifo)
    path = write(tmp_path, "g.yaml", graph("- {include: fifo.yaml}\n- {id: h, op: relu, in: [x]}"))
    assert f"include 'fifo.yaml': {fifo} is not a regular file" in check_line(capsys, path)
    if os.path.exists("/dev/zero"):
        assert "/dev/zero is not a regular file" in check_line(capsys, "/dev/zero")
        path = write(tmp_path, "e.yaml", "extends: /dev/zero\n")
        assert "extends '/dev/zero': /dev/zero is not a regular file" in check_line(capsys, path)


def test_the_file_size_limit(tmp_path):
    path = write(tmp_path, "g.yaml", graph("- {id: h, op: relu, in: [x], doc: '" + "x" * 5000 + "'}"))
    spec_error(path, "reading it makes the graph's text longer than 4,000 bytes (Limits.max_bytes)",
               limits=Limits(max_bytes=4000))


def test_parameters_too_large_to_allocate(tmp_path, capsys):
    path = write(tmp_path, "g.yaml", graph(
        "- {id: h, op: sum, in: [w]}",
        head="params: {w: {shape: [4611686018427387904, 4611686018427387904]}}\n"))
    g = capsflow.compile(path)   # compiling allocates nothing
    assert g.param_count() == 2 ** 124
    with pytest.raises(SpecError, match=f"{path}: the parameters need "
                                        "85,070,591,730,234,615,865,843,651,857,942,052,864 bytes "
                                        r"as float32, more than 4,294,967,296 \(Limits.max_param_bytes\)"):
        g.init_params()
    assert main(["check", str(path)]) == 0  # the count is a Python int: no int64 overflow
    assert "parameters: 21,267,647,932,558,653,966,460,912,964,485,513,216 total" in capsys.readouterr().out


def test_limits_are_overridable(tmp_path):
    path = write(tmp_path, "g.yaml", graph("- {id: r, repeat: 1500, body: [{id: h, op: relu, in: [x]}]}\n"
                                           "- {id: h, op: relu, in: [r/h]}"))
    spec_error(path, "repeat 1,500 is more than 1,000 (Limits.max_repeat)")
    assert len(capsflow.compile(path, limits=Limits(max_repeat=2000)).spec.nodes) == 1501
    spec_error(path, "more than 1,000 nodes after unrolling repeat blocks (Limits.max_nodes)",
               limits=Limits(max_repeat=2000, max_nodes=1000))
    g = capsflow.compile(CAPSNET, limits=Limits(max_param_bytes=1000))
    with pytest.raises(SpecError, match="the parameters need 32,862,272 bytes as float32"):
        g.init_params()
    spec_error(CAPSNET, "(Limits.max_depth)", limits=Limits(max_depth=5))
    spec_error(REPO / "graphs" / "capsnet-leaky.yaml", "the 'extends' chain is longer than 1 files",
               limits=Limits(max_include_depth=1))
    spec_error(CAPSNET, "the graph reads more than 1 files (Limits.max_files)",
               limits=Limits(max_files=1))
    huge = Limits(**{name: 10 ** 30 for name in ("max_files", "max_bytes", "max_document_nodes",
                                                  "max_include_depth", "max_repeat", "max_nodes",
                                                  "max_param_bytes")})
    assert capsflow.compile(CAPSNET, limits=huge).param_count() == 8_215_568
    with pytest.raises(CapsflowError, match="Limits.max_depth can be at most 128"):
        Limits(max_depth=129)  # deeper would meet Python's recursion limit


WORST = """
import contextlib, io, re, sys, time
from capsflow.cli import main
for path in sys.argv[1:]:
    # CPU seconds, not wall time: the work a file costs, whatever else the machine runs.
    start = time.process_time()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["check", path])
    print(code, time.process_time() - start)
# Peak MB of this process image: VmHWM (getrusage's ru_maxrss keeps the forking pytest's
# peak across exec, so it would measure the test runner).
status = open("/proc/self/status").read()
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) / 1024)
"""


def test_check_on_the_worst_inputs_ends_within_10_s_and_500_mb(tmp_path):
    """In a fresh process, each within 10 s of CPU: a file just under the document limit (the slowest to read), a
    repeat unrolled to near the node limit, and a bomb."""
    dense = write(tmp_path, "dense.yaml", graph(
        "".join(f"- {{id: h{j}, op: relu, in: [{'x' if j == 0 else f'h{j - 1}'}]}}\n"
                for j in range(10_500)) + "- {id: h, op: relu, in: [h10499]}"))
    unrolled = write(tmp_path, "unrolled.yaml", graph(
        "- id: r\n  repeat: 900\n  carry: {c: {init: x, next: n19}}\n  body:\n"
        + "".join(f"    - {{id: n{j}, op: relu, in: [{'c' if j == 0 else f'n{j - 1}'}]}}\n"
                  for j in range(20)) + "- {id: h, op: relu, in: [r/n19]}"))
    bomb = write(tmp_path, "bomb.yaml", BOMBS["variables_expanding_exponentially"][0])
    result = subprocess.run([sys.executable, "-c", WORST, str(dense), str(unrolled), str(bomb)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    *runs, peak_mb = result.stdout.split("\n")[:-1]
    assert [r.split()[0] for r in runs] == ["0", "0", "2"], result.stdout + result.stderr
    assert max(float(r.split()[1]) for r in runs) < 10, runs
    assert float(peak_mb) < 500


# -- 3. paths: include stays in the graph's folder tree, regular files, cycles named -------
@pytest.fixture
def tree(tmp_path):
    """graphs/ with a fragment, and a secret folder beside it."""
    write(tmp_path, "secret/hidden.yaml", "nodes: []\n")
    write(tmp_path, "graphs/parts/ok.yaml", "nodes:\n  - {id: h, op: relu, in: [x]}\n")
    return tmp_path


@pytest.mark.parametrize("ref", ["../secret/hidden.yaml", "{tmp}/secret/hidden.yaml",
                                 "link.yaml", "/proc/self/environ"])
def test_an_include_may_not_leave_the_graphs_folder_tree(tree, ref, capsys):
    os.symlink(tree / "secret" / "hidden.yaml", tree / "graphs" / "link.yaml")
    ref = ref.format(tmp=tree)
    path = write(tree, "graphs/g.yaml", graph(f"- {{include: '{ref}'}}"))
    line = check_line(capsys, path)
    assert f"{path}:4: include '{ref}':" in line
    assert f"is outside {tree / 'graphs'}/, the folder of {path}; an include may not leave" in line


def test_a_missing_include_outside_the_tree_lists_nothing_there(tree, capsys):
    path = write(tree, "graphs/g.yaml", "vars: {v: nope}\n" + graph(
        "- {include: '../secret/${v}.yaml'}"))
    line = check_line(capsys, path)
    assert "is outside" in line and "hidden" not in line
    path = write(tree, "graphs/h.yaml", "vars: {v: nope}\n" + graph("- {include: 'parts/${v}.yaml'}"))
    line = check_line(capsys, path)
    assert f"{path}:1: v: 'nope' names no fragment" in line and "parts has: ok" in line


def test_a_fragment_may_include_anything_in_the_graphs_tree(tree):
    write(tree, "graphs/parts/up.yaml", "nodes:\n  - {include: ../common.yaml}\n")
    write(tree, "graphs/common.yaml", "nodes:\n  - {id: h, op: relu, in: [x]}\n")
    path = write(tree, "graphs/g.yaml", graph("- {include: parts/up.yaml}"))
    assert "h" in capsflow.compile(path).dag
    base = write(tree, "graphs/base.yaml", graph("- {include: parts/ok.yaml}"))
    variant = write(tree, "elsewhere/variant.yaml", f"extends: {base}\nname: v\n")
    assert "h" in capsflow.compile(variant).dag   # a base's includes stay in the base's tree


def test_extends_reads_only_regular_yaml_files(tree, capsys):
    for target, expected in [("/etc/hosts", "a graph spec is a .yaml or .yml file"),
                             ("../secret", "is not a regular file"),
                             ("nowhere.yaml", "no such graph spec")]:
        path = write(tree, "graphs/v.yaml", f"extends: {target}\n")
        line = check_line(capsys, path)
        assert f"{path}:1: extends '{target}': " in line and expected in line, line


def test_symlink_loops_and_cycles_name_the_chain(tree, capsys):
    os.symlink(tree / "graphs" / "b.yaml", tree / "graphs" / "a.yaml")
    os.symlink(tree / "graphs" / "a.yaml", tree / "graphs" / "b.yaml")
    path = write(tree, "graphs/g.yaml", graph("- {include: a.yaml}"))
    assert "include 'a.yaml': cannot follow" in check_line(capsys, path)
    assert "cannot read graph spec" in check_line(capsys, tree / "graphs" / "a.yaml")
    write(tree, "graphs/c/one.yaml", "nodes:\n  - {include: two.yaml}\n")
    write(tree, "graphs/c/two.yaml", "nodes:\n  - {include: one.yaml}\n")
    path = write(tree, "graphs/h.yaml", graph("- {include: c/one.yaml}"))
    assert "include goes round in a circle: one.yaml -> two.yaml -> one.yaml" in check_line(capsys, path)
    write(tree, "graphs/e1.yaml", "extends: e2.yaml\n")
    write(tree, "graphs/e2.yaml", "extends: e1.yaml\n")
    line = check_line(capsys, tree / "graphs" / "e1.yaml")
    assert "'extends' goes round in a circle: e1.yaml -> e2.yaml -> e1.yaml" in line


# -- 4. values that used to be accepted although wrong ---------------------------------------
ACCEPTED = {
    "nan_attribute": (graph("- {id: h, op: scale, in: [x], attrs: {by: .nan}}"),
                      ":4: node 'h': attribute 'by': numbers must be finite"),
    "infinite_attribute": (graph("- {id: h, op: squash, in: [x], attrs: {eps: .inf}}"),
                           "attribute 'eps': numbers must be finite"),
    "nan_in_a_shape": ("inputs: {x: {shape: [N, .nan]}}\n" + graph("- {id: h, op: relu, in: [x]}", ""),
                       ":1: input 'x': shape must be a list of at most 32 positive integers"),
    "true_as_a_size": ("inputs: {x: {shape: [N, true]}}\n" + graph("- {id: h, op: relu, in: [x]}", ""),
                       "input 'x': shape must be a list"),
    "float_reduce_axis": (graph("- {id: h, op: sum, in: [x], attrs: {axis: [1.0]}}"),
                          "an axis must be a whole number, got 1.0"),
    "an_axis_twice": (graph("- {id: h, op: sum, in: [x], attrs: {axis: [1, -1]}}"),
                      "names an axis twice"),
    "when_outside_a_repeat": (graph("- {id: h, op: relu, in: [x], when: last}"),
                              ":4: node 'h': 'when' works only inside a repeat body"),
    "empty_attrs": (graph("- {id: h, op: relu, in: [x], attrs: }"),
                    "node 'h': 'attrs' must be a mapping, got None (it is empty"),
    "repeat_without_body": (graph("- {id: r, repeat: 2}\n- {id: h, op: relu, in: [x]}"),
                            "repeat block 'r' needs a 'body'"),
    "optional_as_a_string": ("inputs: {x: {shape: [N, 4], optional: 'no'}}\n"
                             + graph("- {id: h, op: relu, in: [x]}", ""),
                             "input 'x': 'optional' must be true or false, got 'no'"),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_wrong_values_are_errors(case, tmp_path, capsys):
    text, expected = ACCEPTED[case]
    path = write(tmp_path, f"{case}.yaml", text)
    assert expected in check_line(capsys, path)


def test_when_inside_a_stage_of_a_repeat_body_is_honoured(tmp_path):
    path = write(tmp_path, "g.yaml", graph("""\
        - id: r
          repeat: 3
          carry: {c: {init: x, next: n}}
          body:
            - stage: S
              nodes:
                - {id: n, op: relu, in: [c]}
                - {id: only_last, op: relu, in: [n], when: last}
        - {id: h, op: relu, in: [r/only_last]}"""))
    g = capsflow.compile(path)
    assert [n for n in g.dag if n.endswith("only_last")] == ["r/2/only_last"]


def test_an_input_used_with_another_batch_size_than_its_symbol(capsnet):
    params = capsnet.init_params(seed=0)
    x, y = np.zeros((2, 1, 28, 28)), np.eye(10)[[1, 2, 3]]
    with pytest.raises(CapsflowError, match=r"input 'y' has shape \(3, 10\): N is 3 here but 2 "
                                            r"in input 'x'"):
        capsnet.run(params, {"x": x, "y": y})


def test_the_param_count_is_exact(capsnet):
    assert capsnet.param_count() == sum(math.prod(p.shape) for p in capsnet.spec.params.values())
    assert isinstance(capsnet.param_count(), int)


# -- 5. found by tests/test_fuzz.py ------------------------------------------------------------
@pytest.mark.parametrize("escape", ["\\UFFFFFFFF", "\\U00110000", "\\UDEADBEEF"])
def test_a_yaml_escape_that_names_no_character(escape, tmp_path, capsys):
    """PyYAML's scanner calls chr() on the escape: OverflowError or ValueError, no YAMLError."""
    path = write(tmp_path, "g.yaml", graph(f'- {{id: h, op: relu, in: [x], doc: "a{escape}"}}'))
    line = check_line(capsys, path)
    assert f"{path}:4: YAML syntax error: an escape names no Unicode character" in line, line
    assert parse_override(f'routing="{escape}"') == ("routing", f'"{escape}"')  # stays text


@pytest.mark.parametrize("section", ["inputs", "params", "outputs"])
def test_a_variant_adding_to_a_base_section_that_is_not_a_mapping(section, tmp_path, capsys):
    """The base's section was kept for spec.py to report, and the variant's merged into it."""
    base = {"inputs": "{x: {shape: [N, 4]}}", "params": "{}", "outputs": "{h: h}", section: "[a, b]"}
    write(tmp_path, "base.yaml", "".join(f"{k}: {v}\n" for k, v in base.items())
          + "nodes: [{id: h, op: relu, in: [x]}]\n")
    entry = {"inputs": "y: {shape: [N, 4]}", "params": "v: {shape: [4]}", "outputs": "g: h"}[section]
    path = write(tmp_path, "variant.yaml", f"extends: base.yaml\n{section}:\n  {entry}\n")
    line = check_line(capsys, path)
    assert f"base.yaml:{list(base).index(section) + 1}: '{section}' must map names to entries " \
           f"({path} adds to it by name), got ['a', 'b']" in line, line
