"""Malformed specs: each gives one line naming file, line and node, and exit status 2."""
import textwrap

import pytest

from capsflow.cli import main

GOOD_HEAD = """
inputs: {x: {shape: [N, 4]}}
params: {w: {shape: [4, 3], init: {normal: 0.1}}}
"""

CASES = {
    "yaml_syntax": ("nodes: [ {id: a, op: relu\noutputs: {a: a}\n", "YAML syntax error"),
    "unknown_op": (GOOD_HEAD + "nodes:\n  - {id: h, op: reluu, in: [x]}\noutputs: {h: h}\n",
                   "node 'h': unknown op 'reluu' (did you mean 'relu'?)"),
    "unknown_name": (GOOD_HEAD + "nodes:\n  - {id: h, op: relu, in: [xx]}\noutputs: {h: h}\n",
                     "node 'h': input 'xx' is not an input, parameter or node id"),
    "duplicate_name": (GOOD_HEAD + "nodes:\n  - {id: h, op: relu, in: [x]}\n  - {id: h, op: relu, in: [x]}\n"
                       "outputs: {h: h}\n", "duplicate id 'h'"),
    "missing_attr": (GOOD_HEAD + "nodes:\n  - {id: h, op: reshape, in: [x]}\noutputs: {h: h}\n",
                     "node 'h': op 'reshape' needs attribute 'shape'"),
    "unknown_attr": (GOOD_HEAD + "nodes:\n  - {id: h, op: softmax, in: [x], attrs: {axes: 1}}\n"
                     "outputs: {h: h}\n", "op 'softmax' has no attribute 'axes'"),
    "wrong_attr_type": (GOOD_HEAD + "nodes:\n  - {id: h, op: softmax, in: [x], attrs: {axis: last}}\n"
                        "outputs: {h: h}\n", "attribute 'axis' must be int, got 'last'"),
    "cycle": (GOOD_HEAD + "nodes:\n  - {id: a, op: add, in: [x, b]}\n  - {id: b, op: relu, in: [a]}\n"
              "outputs: {b: b}\n", "cycle: "),
    "shape_mismatch": (GOOD_HEAD + "nodes:\n  - {id: h, op: matmul, in: [w, x]}\noutputs: {h: h}\n",
                       "node 'h': shape mismatch in matmul(w (4, 3), x (N, 4))"),
    "output_depends_on_nothing": (
        "inputs: {x: {shape: [N, 4]}}\nnodes:\n  - {id: h, op: relu, in: [x]}\n"
        "  - {id: z, op: einsum, in: [], attrs: {eq: '->'}}\noutputs: {h: h, z: z}\n",
        "output 'z' ('z') depends on no input or parameter"),
    "unknown_output": (GOOD_HEAD + "nodes:\n  - {id: h, op: relu, in: [x]}\noutputs: {loss: hh}\n",
                       "output 'loss' refers to unknown node 'hh'"),
    "wrong_arity": (GOOD_HEAD + "nodes:\n  - {id: h, op: add, in: [x]}\noutputs: {h: h}\n",
                    "op 'add' takes inputs (a, b), got 1"),
    "bad_repeat": (GOOD_HEAD + "nodes:\n  - id: r\n    repeat: 0\n    body: []\noutputs: {x: x}\n",
                   "repeat must be a whole number >= 1"),
    "unknown_node_key": (GOOD_HEAD + "nodes:\n  - {id: h, op: relu, inputs: [x]}\noutputs: {h: h}\n",
                         "unknown key 'inputs'"),
    "bad_param_init": ("inputs: {x: {shape: [N, 4]}}\nparams: {w: {shape: [4], init: gaussian}}\n"
                       "nodes:\n  - {id: h, op: mul, in: [x, w]}\noutputs: {h: h}\n",
                       "parameter 'w': init 'gaussian' is not one of"),
    "unknown_variable": ("vars: {k: 2}\n" + GOOD_HEAD + "nodes:\n  - {id: h, op: scale, in: [x], "
                         "attrs: {by: '${kk}'}}\noutputs: {h: h}\n", "unknown variable 'kk'"),
    "not_a_mapping": ("- just\n- a list\n", "a graph spec must be a YAML mapping"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_spec_gives_one_line_and_status_2(case, tmp_path, capsys):
    text, expected = CASES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(textwrap.dedent(text))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"capsflow check: error: {path}")
    assert expected in lines[0]
    assert "Traceback" not in err


def test_error_names_the_line(tmp_path, capsys):
    path = tmp_path / "g.yaml"
    path.write_text(GOOD_HEAD + "nodes:\n  - {id: ok, op: relu, in: [x]}\n  - {id: h, op: reluu, in: [x]}\n"
                    "outputs: {h: h}\n")
    assert main(["check", str(path)]) == 2
    assert f"{path}:6: node 'h'" in capsys.readouterr().err


def test_missing_file_and_bad_set(capsys):
    assert main(["check", "no/such.yaml"]) == 2
    assert "no such graph spec: no/such.yaml" in capsys.readouterr().err
    from conftest import CAPSNET
    assert main(["check", str(CAPSNET), "--set", "routing_iters"]) == 2
    assert "--set expects NAME=VALUE" in capsys.readouterr().err
    assert main(["check", str(CAPSNET), "--set", "routing_iters=0"]) == 2
    assert "repeat must be a whole number >= 1, got 0" in capsys.readouterr().err


def test_check_prints_table_and_totals(capsys):
    from conftest import CAPSNET
    assert main(["check", str(CAPSNET)]) == 0
    out = capsys.readouterr().out
    assert "routing/2/softmax" not in out and "routing/2/c" in out
    assert "primary.w" in out and "5,308,416" in out
    assert "parameters: 8,215,568 total, 6,804,224 without decoder" in out


def test_docs_ops_md_is_up_to_date(capsys):
    """docs/ops.md is `capsflow ops --markdown`; regenerate it when an op changes."""
    from conftest import REPO
    assert main(["ops", "--markdown"]) == 0
    assert capsys.readouterr().out == (REPO / "docs" / "ops.md").read_text(), \
        "run: capsflow ops --markdown > docs/ops.md"


@pytest.mark.parametrize("text,value", [("1e-9", 1e-9), ("-2E+3", -2000.0), ("1.0e-9", 1e-9),
                                        ("3", 3), ("1e", "1e"), ("2026-01-01", "2026-01-01")])
def test_numbers_are_read_as_users_mean_them(text, value):
    """An exponent without a dot is a float (YAML 1.1 would keep 1e-9 as a string), in
    --set values and in graph files alike."""
    from capsflow.lang.yamlio import parse_override
    assert parse_override(f"eps={text}") == ("eps", value)
    assert type(parse_override(f"eps={text}")[1]) is type(value)


def test_set_with_an_exponent_reaches_the_attribute(capsys):
    from conftest import CAPSNET
    assert main(["check", str(CAPSNET), "--set", "squash_eps=1e-9"]) == 0


@pytest.mark.parametrize("graph, var, op", [("capsnet.yaml", "squash_eps", "squash"),
                                            ("capsnet-efficient.yaml", "squash_exp_eps",
                                             "squash_exp")])
def test_a_negative_eps_under_a_square_root_is_refused_when_compiled(capsys, graph, var, op):
    """Found by the YAML fuzzer (seed 57): a negative eps made NaN of every small capsule
    and `bench` reported a NaN loss with status 0. It is one line at compile time now,
    for norm and layer_norm's eps too."""
    from conftest import REPO
    assert main(["check", str(REPO / "graphs" / graph), "--set", f"{var}=-1"]) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"node 'u': {op}: attribute 'eps' must be >= 0 (it is added under a "
                        f"square root), got -1.0\n"), err
    from capsflow.core.shapes import AttrValueError
    from capsflow.core.opdef import OPS
    for name, args in (("norm", ((2, 3),)), ("layer_norm", ((2, 3),))):
        with pytest.raises(AttrValueError, match=f"{name}: attribute 'eps' must be >= 0"):
            OPS[name].shape_fn(*args, axis=-1, eps=-1e-9)


def test_an_output_error_names_the_file_and_line_that_declare_it(tmp_path, capsys):
    """It named the top file with no line, also where a base declares the output."""
    base = tmp_path / "base.yaml"
    base.write_text(GOOD_HEAD + "nodes:\n  - {id: h, op: relu, in: [x]}\n"
                    "  - {id: m, op: relu, in: [h]}\noutputs:\n  h: h\n  out: m\n")
    variant = tmp_path / "variant.yaml"
    variant.write_text("extends: base.yaml\nreplace:\n  m: []\n")
    assert main(["check", str(variant)]) == 2
    assert f"{base}:9: output 'out' refers to unknown node 'm'" in capsys.readouterr().err
