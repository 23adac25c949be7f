"""The graph language's arithmetic (capsflow/lang/expr.py), ${iteration} in repeat bodies,
fragment instances (include ... as:), --set values read as the graph declares them, and
CapsNet's sizes derived from its input vars."""
import textwrap

import numpy as np
import pytest
import yaml

import capsflow
from capsflow.cli import main
from capsflow.core.gradcheck import graph_gradcheck
from capsflow.errors import SpecError
from capsflow.lang.expr import ExprError, evaluate, names_in
from capsflow.lang.yamlio import parse_override
from conftest import CAPSNET, REPO

GRAPHS = REPO / "graphs"

VARS = {"a": 7, "b": 2, "f": 0.5, "word": "paper", "flag": True}


def ev(text):
    return evaluate(text, VARS.__getitem__)


@pytest.mark.parametrize("text,value", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("a // b", 3), ("a / b", 3.5), ("a % b", 1),
    ("-a ** 2", -49), ("2 ** -1", 0.5), ("2 ** 3 ** 2", 512), ("min(a, b, 3)", 2),
    ("max(a * f, 1)", 3.5), ("1e-3 * 2", 0.002), ("1_000 + 1", 1001), ("word", "paper"),
    ("  a  ", 7), ("+a - -b", 9), ("(a - 8 - 9) // 2 + 1", -4), (".5 + 1.", 1.5),
])
def test_arithmetic_follows_python(text, value):
    result = ev(text)
    assert result == value and type(result) is type(value)


@pytest.mark.parametrize("text,message", [
    ("a / 0", "division by zero"), ("a // (b - 2)", "division by zero"), ("a % 0", "division by zero"),
    ("0 ** -1", "division by zero"), ("2 ** 100", "larger than 2**63"),
    ("2 ** 10 ** 10", "larger than 2**63"), ("99999999999999999999", "larger than 2**63"),
    ("1e308 * 10", "too large for a float"), ("(-8) ** 0.5", "not a real number"),
    ("word + 1", "'+' needs numbers, got 'paper'"), ("flag * 2", "needs numbers, got True"),
    ("a +", "ends too soon"), ("(a", "expected ')'"), ("a b", "unexpected 'b'"),
    ("a ; b", "unexpected character ';'"), ("__import__(a)", "unknown function '__import__'"),
    ("", "empty"), ("(" * 100 + "1" + ")" * 100, "nested more than"), ("1" * 3000, "longer than"),
    ("min()", "unexpected ')'"),
])
def test_bad_expressions_are_one_clear_message(text, message):
    with pytest.raises(ExprError, match=None) as err:
        ev(text)
    assert message in str(err.value)


def test_names_in_lists_variables_not_functions():
    assert names_in("max(height, width) // 2 + k") == {"height", "width", "k"}


def _write(tmp_path, files):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path / "g.yaml"


def _check_fails(path, capsys, *args):
    """`capsflow check` on ``path`` exits 2 with one line; returns that line."""
    assert main(["check", str(path), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_vars_may_use_vars_declared_later_and_set_flows_through(tmp_path):
    path = _write(tmp_path, {"g.yaml": """
        vars:
          size: ${side * side}
          side: 3
        inputs: {x: {shape: [N, "${size}"]}}
        nodes: [{id: out, op: scale, in: [x], attrs: {by: "${size / 2}"}}]
        outputs: {out: out}
        """})
    spec = capsflow.compile(str(path)).spec
    assert spec.inputs["x"].shape == ("N", 9) and spec.nodes[0].attrs["by"] == 4.5
    spec = capsflow.compile(str(path), overrides={"side": 4}).spec
    assert spec.inputs["x"].shape == ("N", 16) and spec.vars["size"] == 16


@pytest.mark.parametrize("vars_text,shape,message", [
    ("{a: '${b}', b: '${a}'}", "[N, 2]", "g.yaml:2: variables refer to each other in a circle: a -> b -> a"),
    ("{a: 3}", "[N, '${a / 2}']", "g.yaml:3: input 'x': shape must be a list"),
    ("{a: 3}", "[N, '${a / 2}']", "1.5 is not a whole number"),
    ("{a: 3}", "[N, '${a // (a - 3)}']", "g.yaml:3: ${a // (a - 3)}: division by zero"),
    ("{a: 3}", "[N, '${a + nope}']", "g.yaml:3: unknown variable 'nope'; defined: a"),
    ("{iteration: 3}", "[N, 2]", "variable 'iteration' is reserved"),
])
def test_bad_arithmetic_in_a_graph_names_file_and_line(tmp_path, capsys, vars_text, shape, message):
    path = _write(tmp_path, {"g.yaml": f"""
        vars: {vars_text}
        inputs: {{x: {{shape: {shape}}}}}
        nodes: [{{id: out, op: scale, in: [x]}}]
        outputs: {{out: out}}
        """})
    line = _check_fails(path, capsys)
    assert message in line, line


def test_iteration_is_the_loop_index_inside_a_repeat_body(tmp_path, capsys):
    path = _write(tmp_path, {"g.yaml": """
        vars: {final: 0.01, schedule: "${final * (1 - 0.95 ** (iteration + 1))}",
               step: "${iteration + 1}", twice: "${step * 2}"}
        inputs: {x: {shape: [N, 3]}}
        nodes:
          - id: loop
            repeat: 3
            carry: {h: {init: x, next: h2}}
            body:
              - {id: h2, op: scale, in: [h], attrs: {by: "${schedule}"}}
              - {id: t, op: scale, in: [h], attrs: {by: "${iteration / iterations}"}}
              - {id: u, op: scale, in: [h], attrs: {by: "${twice}"}}
              - {id: v, op: scale, in: [h], attrs: {by: "${step * 10}"}}
          - {id: out, op: sum, in: [loop/h]}
        outputs: {out: out}
        """})
    attrs = {n.id: n.attrs["by"] for n in capsflow.compile(str(path)).spec.nodes if n.op == "scale"}
    for k in range(3):
        assert attrs[f"loop/{k}/h2"] == pytest.approx(0.01 * (1 - 0.95 ** (k + 1)), rel=1e-15)
        # a variable using one that uses the iteration ("'*' needs numbers, got '${...}'")
        assert (attrs[f"loop/{k}/u"], attrs[f"loop/{k}/v"]) == (2 * (k + 1), 10 * (k + 1))
        assert attrs[f"loop/{k}/t"] == k / 3
    (tmp_path / "g.yaml").write_text(textwrap.dedent("""
        inputs: {x: {shape: [N, 3]}}
        nodes: [{id: out, op: scale, in: [x], attrs: {by: "${iteration}"}}]
        outputs: {out: out}
        """))
    assert "exist only inside a repeat body" in _check_fails(tmp_path / "g.yaml", capsys)


# -- fragment instances -------------------------------------------------------------------
LAYER = """
    description: "a capsule layer: predictions u_hat = W u, then the routing fragment"
    vars: {in_caps: 8, in_dim: 4, out_caps: 3, out_dim: 5}
    params:
      W: {shape: ["${in_caps}", "${out_caps}", "${out_dim}", "${in_dim}"], init: {normal: 0.5}}
    nodes:
      - {id: u_hat, op: einsum, in: [W, u], attrs: {eq: "ijdk,nik->nijd"}}
      - {include: ../routing/paper.yaml}
    """

THREE_LAYERS = """
    vars: {squash_eps: 0.0, caps: 8}
    inputs: {x: {shape: [N, "${caps}", 4]}, y: {shape: [N, 2], optional: true}}
    nodes:
      - {id: u, op: squash, in: [x], attrs: {axis: -1}}
      - {include: layers/caps.yaml, as: caps2, vars: {in_caps: "${caps}"}}
      - {include: layers/caps.yaml, as: caps3, bind: {u: caps2/routing/v},
         vars: {in_caps: 3, in_dim: 5, out_caps: 2, out_dim: 6, routing_iters: 2}}
      - {id: lengths, op: norm, in: [caps3/routing/v], attrs: {axis: -1}}
      - {id: margin, op: margin_loss, in: [lengths, y], attrs: {m_plus: 0.0, m_minus: 0.0}}
      - {id: loss, op: mean, in: [margin]}
    outputs: {loss: loss, lengths: lengths, caps2: caps2/routing/v}
    """


@pytest.fixture
def three_layers(tmp_path):
    routing = (GRAPHS / "routing" / "paper.yaml").read_text()
    return _write(tmp_path, {"g.yaml": THREE_LAYERS, "layers/caps.yaml": LAYER,
                             "routing/paper.yaml": routing})


def test_one_fragment_twice_as_instances_with_own_params_vars_and_bindings(three_layers):
    graph = capsflow.compile(str(three_layers))
    spec = graph.spec
    assert {n: p.shape for n, p in spec.params.items()} == {
        "caps2/W": (8, 3, 5, 4), "caps3/W": (3, 2, 6, 5)}
    assert spec.blocks == {"caps2/routing": 3, "caps3/routing": 2}   # caps3 pins its iterations
    ids = {n.id: n for n in spec.nodes}
    assert ids["caps3/u_hat"].inputs == ["caps3/W", "caps2/routing/2/v"]   # bind: u
    assert ids["caps2/u_hat"].inputs == ["caps2/W", "u"]                   # free name: outer u
    assert spec.aliases["caps3/routing/v"] == "caps3/routing/1/v"
    assert graph.dag.nodes["lengths"]["shape"] == ("N", 2)
    # A --set reaches every instance that does not pin the variable itself.
    spec = capsflow.compile(str(three_layers), overrides={"routing_iters": 1}).spec
    assert spec.blocks == {"caps2/routing": 1, "caps3/routing": 2}


def test_a_three_layer_graph_passes_the_float64_gradient_check(three_layers):
    graph = capsflow.compile(str(three_layers))
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((2, 8, 4)), "y": np.eye(2)[[0, 1]]}
    errors = graph_gradcheck(graph, graph.init_params(seed=0, dtype="float64"), inputs, seed=0)
    assert set(errors) == {"caps2/W", "caps3/W"}
    assert max(errors.values()) < 1e-6, errors


def test_replace_reaches_inside_an_instance(three_layers, tmp_path):
    (tmp_path / "v.yaml").write_text(textwrap.dedent("""
        extends: g.yaml
        replace:
          caps3/routing/c: {id: c, op: sigmoid, in: [b]}
        """))
    spec = capsflow.compile(str(tmp_path / "v.yaml")).spec
    ops = {n.id: n.op for n in spec.nodes}
    assert ops["caps3/routing/0/c"] == "sigmoid" and ops["caps2/routing/0/c"] == "softmax"


@pytest.mark.parametrize("second,message", [
    ("{include: layers/caps.yaml, as: caps2}", "g.yaml:7: node 'caps2': two fragment instances"),
    ("{include: layers/caps.yaml, as: 'a/b'}", "g.yaml:7: include 'layers/caps.yaml': 'as' must be a name"),
    ("{include: layers/caps.yaml, bind: {u: x}}", "'bind' belongs to an instance; name it with 'as: NAME'"),
    ("{include: layers/caps.yaml, as: c3, bind: [u]}", "'bind' must map the fragment's names"),
    ("{include: layers/caps.yaml, as: c3, vars: {nope: 1}}",
     "the fragment declares no variable 'nope' (it declares: in_caps, in_dim, out_caps, out_dim, routing_iters)"),
    ("{include: layers/caps.yaml, as: c3, vars: {in_caps: '${1 / 0}'}}", "division by zero"),
    ("{include: layers/caps.yaml, as: c3, vars: {in_caps: 5}}",
     "node 'c3/u_hat': shape mismatch"),
    ("{include: layers/caps.yaml, as: c3, vars: {routing_iters: 0}}",
     "node 'c3/routing': repeat must be a whole number >= 1, got 0 (in instance 'c3' of "),
])
def test_malformed_instances_are_one_line_at_the_include(tmp_path, capsys, second, message):
    routing = (GRAPHS / "routing" / "paper.yaml").read_text()
    path = _write(tmp_path, {"g.yaml": f"""
        vars: {{squash_eps: 0.0}}
        inputs: {{x: {{shape: [N, 8, 4]}}}}
        nodes:
          - {{id: u, op: squash, in: [x]}}
          - {{include: layers/caps.yaml, as: caps2}}
          - {second}
        outputs: {{v: caps2/routing/v}}
        """, "layers/caps.yaml": LAYER, "routing/paper.yaml": routing})
    line = _check_fails(path, capsys)
    assert message in line, line


def test_a_fragment_with_params_included_twice_without_as_points_at_the_second(tmp_path, capsys):
    path = _write(tmp_path, {"g.yaml": """
        vars: {squash_eps: 0.0}
        inputs: {u: {shape: [N, 8, 4]}}
        nodes:
          - {include: layers/caps.yaml}
          - {include: layers/caps.yaml}
        outputs: {v: routing/v}
        """, "layers/caps.yaml": LAYER,
        "routing/paper.yaml": (GRAPHS / "routing" / "paper.yaml").read_text()})
    line = _check_fails(path, capsys)
    assert "g.yaml:6: parameter 'W': " in line and "its own 'as: NAME'" in line, line


def test_a_fragment_included_twice_without_as_points_at_the_second_include(tmp_path, capsys):
    path = _write(tmp_path, {"g.yaml": """
        vars: {squash_eps: 0.0}
        inputs: {u_hat: {shape: [N, 4, 3, 2]}}
        nodes:
          - {include: routing/paper.yaml}
          - {include: routing/paper.yaml}
        outputs: {v: routing/v}
        """, "routing/paper.yaml": (GRAPHS / "routing" / "paper.yaml").read_text()})
    line = _check_fails(path, capsys)
    assert "g.yaml:6: node 'b0': duplicate id 'b0'" in line and "its own 'as: NAME'" in line, line


# -- --set values ---------------------------------------------------------------------------
def _compiled(tmp_path, text: str):
    path = tmp_path / "g.yaml"
    path.write_text(textwrap.dedent(text))
    return capsflow.compile(path)


def test_a_body_id_used_before_its_line_is_the_bodys_own(tmp_path):
    """A body (or a fragment) may use an id it defines further down; it bound to the
    outer graph's node of that name instead."""
    graph = _compiled(tmp_path, """
        inputs: {x: {shape: [N, 3]}}
        nodes:
          - {id: b, op: scale, in: [x], attrs: {by: 100.0}}
          - id: r
            repeat: 2
            carry: {h: {init: x, next: a}}
            body:
              - {id: a, op: scale, in: [b], attrs: {by: 2.0}}
              - {id: b, op: scale, in: [h], attrs: {by: 3.0}}
        outputs: {y: r/a}
    """)
    inputs = {n.id: n.inputs for n in graph.spec.nodes}
    assert inputs["r/0/a"] == ["r/0/b"] and inputs["r/1/a"] == ["r/1/b"]
    assert inputs["r/1/b"] == ["r/0/a"]
    out = graph.run({}, {"x": np.ones((1, 3))})["y"]
    np.testing.assert_allclose(out, np.full((1, 3), 36.0))  # 2 * 3 * 2 * 3, no 100


def test_a_body_id_an_iteration_lacks_is_an_error_there(tmp_path):
    with pytest.raises(SpecError, match=r"'y' is a node of repeat block 'r' only in some "
                                        r"iterations \(its 'when'\), not in iteration 1"):
        _compiled(tmp_path, """
            inputs: {x: {shape: [N, 3]}}
            nodes:
              - {id: y, op: scale, in: [x], attrs: {by: 100.0}}
              - id: r
                repeat: 3
                body:
                  - {id: y, op: scale, in: [x], attrs: {by: 2.0}, when: first}
                  - {id: z, op: add, in: [x, y]}
            outputs: {z: r/z}
        """)


@pytest.mark.parametrize("iters, final", [(3, "routing/1/b_next"), (1, "b0")])
def test_a_carried_name_whose_next_skips_the_last_iteration_has_its_final_value(iters, final):
    """routing's logits (next: when not_last): BLOCK/NAME did not exist. Its final value
    is the one the last iteration read: the last b_next, or b0 with one iteration."""
    graph = capsflow.compile(CAPSNET, {"routing_iters": iters})
    assert graph.spec.aliases["routing/b"] == final


@pytest.mark.parametrize("clash", ["instance", "node"])
def test_a_repeat_block_may_not_share_a_name(tmp_path, clash):
    (tmp_path / "f.yaml").write_text("nodes:\n  - {id: y, op: scale, in: [u], attrs: {by: 3.0}}\n")
    first = ("- {include: f.yaml, as: A, bind: {u: x}}" if clash == "instance" else
             "- {id: A/y, op: scale, in: [x], attrs: {by: 3.0}}")
    with pytest.raises(SpecError, match="repeat block 'A'|has the name that repeat block"):
        _compiled(tmp_path, f"""
            inputs: {{x: {{shape: [N, 3]}}}}
            nodes:
              {first}
              - id: A
                repeat: 1
                body:
                  - {{id: y, op: scale, in: [x], attrs: {{by: 5.0}}}}
            outputs: {{y: A/y}}
        """)


@pytest.mark.parametrize("where", ["id", "in"])
def test_iteration_in_an_id_or_a_name_is_an_error(tmp_path, where):
    """It stayed the text: a node literally named 'z${iteration}'."""
    node = ('{id: "z${iteration}", op: scale, in: [x]}' if where == "id" else
            '{id: z, op: scale, in: ["x${iteration}"]}')
    with pytest.raises(SpecError, match=r"ids and the names in 'in' are written out"):
        _compiled(tmp_path, f"""
            inputs: {{x: {{shape: [N, 3]}}}}
            nodes:
              - id: r
                repeat: 2
                body:
                  - {node}
            outputs: {{y: r/z}}
        """)


def test_set_values_are_read_as_users_mean_them():
    assert parse_override("squash_eps=1e-9") == ("squash_eps", 1e-9)
    graph = capsflow.compile(CAPSNET, overrides={"squash_eps": 0, "recon_weight": 1})
    assert graph.spec.vars["squash_eps"] == 0.0 and type(graph.spec.vars["squash_eps"]) is float
    assert type(graph.spec.vars["recon_weight"]) is float


@pytest.mark.parametrize("text, value", [
    ("010", 10), ("-007", -7), ("0x10", 16), ("0o17", 15), ("0b101", 5), ("1_000", 1000),
    ("1:30", "1:30"), ("1.0e7", 1.0e7), ("2.5E3", 2500.0), ("1e-9", 1e-9), (".5e2", 50.0),
    ("1.5", 1.5)])
def test_numbers_read_the_way_people_write_them(text, value):
    """YAML 1.1 read 010 as 8 and 1:30 as 90 (base 60), and 1.0e7 as text; in a graph
    file as in --set."""
    assert parse_override(f"a={text}") == ("a", value)
    assert type(parse_override(f"a={text}")[1]) is type(value)


def test_a_word_yaml_reads_as_a_boolean_is_refused_for_a_text_variable(tmp_path, capsys):
    """--set eq=off gave the variable the value False."""
    path = tmp_path / "g.yaml"
    path.write_text('vars: {eq: "ni->n"}\ninputs: {x: {shape: [N, 3]}}\n'
                    'nodes:\n  - {id: s, op: einsum, in: [x], attrs: {eq: "${eq}"}}\n'
                    'outputs: {s: s}\n')
    assert main(["check", str(path), "--set", "eq=off"]) == 2
    assert "'eq' is text (it is 'ni->n' in the graph); YAML reads yes, no" in \
        capsys.readouterr().err


@pytest.mark.parametrize("setting,message", [
    ("routing_iters=abc", "paper.yaml:7: --set routing_iters='abc': 'routing_iters' is a whole number"),
    ("routing_iters=2.5", "a value with a dot or an exponent is a float"),
    ("squash_eps=small", "capsnet.yaml:11: --set squash_eps='small': 'squash_eps' is a number"),
    ("height=0", "input 'x': shape must be a list"),
    ("height=16", "parameter 'digit.W': shape must be a list"),
    ("nope=1", "unknown variable 'nope' in overrides"),
])
def test_bad_set_values_are_one_line_with_file_and_line(capsys, setting, message):
    line = _check_fails(CAPSNET, capsys, "--set", setting)
    assert message in line, line


# -- CapsNet's sizes come from its vars ---------------------------------------------------------
def test_capsnet_sizes_follow_from_the_input_vars():
    mnist = capsflow.compile(CAPSNET).spec
    assert mnist.params["digit.W"].shape == (1152, 10, 16, 8)
    assert mnist.params["fc3.w"].shape == (1024, 784) and mnist.params["fc1.w"].shape == (160, 512)
    assert mnist.params["primary.w"].shape == (256, 256, 9, 9)
    assert mnist.params["primary.b"].init == ("uniform_fan_in", 20736)
    cifar = capsflow.compile(str(GRAPHS / "capsnet-cifar10.yaml"))
    assert cifar.spec.params["digit.W"].shape == (2048, 10, 16, 8)   # 32 x 8 x 8 capsules
    assert cifar.spec.params["conv1.w"].shape == (256, 3, 9, 9)
    assert cifar.spec.params["conv1.w"].init == ("uniform_fan_in", 243)
    assert cifar.dag.nodes["recon"]["shape"] == ("N", 3072)
    # The CIFAR-10 graph is the MNIST graph with other vars, nothing else.
    text = yaml.safe_load((GRAPHS / "capsnet-cifar10.yaml").read_text())
    assert set(text) == {"name", "description", "extends", "vars"}
    assert set(text["vars"]) == {"channels", "height", "width"}


def test_another_input_shape_trains_a_step(tmp_path):
    graph = capsflow.compile(CAPSNET, overrides={"height": 24, "width": 20, "classes": 3})
    rng = np.random.default_rng(0)
    x = rng.random((2, 1, 24, 20))
    out = graph.run(graph.init_params(seed=0), {"x": x, "y": np.eye(3)[[0, 2]]},
                    outputs=["loss", "lengths", "recon"])
    assert out["lengths"].shape == (2, 3) and out["recon"].shape == (2, 480)
    assert np.isfinite(out["loss"])
