"""Composition in the graph language: extends, replace, appended nodes, include.

Small graphs written to tmp_path keep these fast; the CapsNet variants themselves are
tested in test_variants.py.
"""
import textwrap

import numpy as np
import pytest

import capsflow
from capsflow.cli import main
from capsflow.errors import SpecError
from conftest import CAPSNET

BASE = """
name: base
description: the base graph
vars: {k: 2.0, iters: 2, block: plain}
inputs: {x: {shape: [N, 3]}}
params:
  w: {shape: [3], init: {constant: 0.5}}
  unused: {shape: [2], init: zeros}
nodes:
  - stage: Body
    nodes:
      - {id: a, op: mul, in: [x, w]}
      - {include: "parts/${block}.yaml"}
      - id: loop
        repeat: ${iters}
        carry: {h: {init: a, next: h_next}}
        body:
          - {id: t, op: scale, in: [h], attrs: {by: 0.5}}
          - {id: h_next, op: add, in: [h, t], when: not_last}
          - {id: h_next, op: sub, in: [h, t], when: last}
  - {id: total, op: sum, in: [loop/h_next], attrs: {axis: null}}
  - {id: loss, op: scale, in: [total], attrs: {by: "${k}"}}
outputs: {loss: loss, a: a}
"""

PLAIN = """
description: a plain part
vars: {gain: 3.0}
nodes:
  - {id: part, op: scale, in: [a], attrs: {by: "${gain}"}}
"""

LEARNED = """
description: a part with its own parameter and a nested include
vars: {gain: 4.0}
params:
  part.p: {shape: [3], init: ones}
nodes:
  - {id: part_raw, op: mul, in: [a, part.p]}
  - {include: "more/finish.yaml"}
"""

FINISH = """
nodes:
  - {id: part, op: scale, in: [part_raw], attrs: {by: "${gain}"}}
"""


def write(folder, name, text):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def base(tmp_path):
    write(tmp_path, "parts/plain.yaml", PLAIN)
    write(tmp_path, "parts/learned.yaml", LEARNED)
    write(tmp_path, "parts/more/finish.yaml", FINISH)
    return write(tmp_path, "base.yaml", BASE)


def variant(base, text, name="variant.yaml"):
    return write(base.parent, name, "extends: base.yaml\n" + textwrap.dedent(text))


def node(graph, name):
    return graph.dag.nodes[name]


def check_error(path, *expected, overrides=None):
    with pytest.raises(SpecError) as info:
        capsflow.compile(path, overrides)
    for text in expected:
        assert text in str(info.value), str(info.value)
    return str(info.value)


# -- include ------------------------------------------------------------------------------
def test_include_splices_a_fragment_chosen_by_a_variable(base):
    graph = capsflow.compile(base)
    assert node(graph, "part")["op"] == "scale" and node(graph, "part")["attrs"]["by"] == 3.0
    assert node(graph, "part")["file"] == str(base.parent / "parts/plain.yaml")
    assert node(graph, "part")["stage"] == "Body"        # included nodes join the stage
    assert graph.spec.vars["gain"] == 3.0                 # fragment vars join the graph's
    learned = capsflow.compile(base, {"block": "learned"})
    assert "part.p" in learned.spec.params and node(learned, "part_raw")["op"] == "mul"
    assert node(learned, "part")["file"] == str(base.parent / "parts/more/finish.yaml")
    assert learned.spec.vars["gain"] == 4.0
    assert learned.spec.sources == [str(base), str(base.parent / "parts/learned.yaml"),
                                    str(base.parent / "parts/more/finish.yaml")]


def test_fragment_vars_are_defaults_that_graphs_and_set_override(base):
    assert capsflow.compile(base, {"gain": 7.0}).dag.nodes["part"]["attrs"]["by"] == 7.0
    mine = variant(base, "vars: {gain: 5.0}\n")
    assert capsflow.compile(mine).dag.nodes["part"]["attrs"]["by"] == 5.0
    assert capsflow.compile(mine, {"gain": 6.0}).dag.nodes["part"]["attrs"]["by"] == 6.0


def test_set_chooses_the_routing_block_of_capsnet():
    graph = capsflow.compile(CAPSNET, {"routing": "leaky", "routing_iters": 2})
    assert [n for n, d in graph.dag.nodes(data=True) if d.get("op") == "leaky_softmax"] == \
        ["routing/0/c", "routing/1/c"]
    assert graph.spec.sources[-1].endswith("graphs/routing/leaky.yaml")


# -- extends and replace --------------------------------------------------------------------
def test_extends_merges_sections_and_names_the_variant_after_itself(base):
    path = variant(base, """
        vars: {k: 3.0}
        params:
          unused: null                         # removed
          w: {shape: [3], init: {constant: 2.0}}
        outputs: {a: null, doubled: doubled}
        nodes:
          - {id: doubled, op: scale, in: [loop/h_next], attrs: {by: 2.0}}
        """)
    graph = capsflow.compile(path)
    assert graph.spec.name == "variant" and graph.spec.description == ""
    assert set(graph.spec.params) == {"w"} and graph.spec.params["w"].init == ("constant", 2.0)
    assert set(graph.spec.outputs) == {"loss", "doubled"}
    assert graph.order[-1] in ("doubled", "loss") and node(graph, "doubled")["file"] == str(path)
    x = np.array([[1.0, 2.0, 3.0]])
    out = graph.run(graph.init_params(dtype="float64"), {"x": x})
    # a = 2x; one add-iteration (h * 1.5), then the last sub-iteration (h * 0.5)
    np.testing.assert_allclose(out["loss"], 3.0 * (2 * x * 1.5 * 0.5).sum())
    assert graph.spec.sources[:2] == [str(path), str(base)]


def test_replace_a_node_a_body_node_and_a_block(base):
    path = variant(base, """
        replace:
          a: {id: a, op: add, in: [x, w]}
          loop/t: {id: t, op: scale, in: [h], attrs: {by: 0.25}}
        """)
    graph = capsflow.compile(path)
    assert node(graph, "a")["op"] == "add" and node(graph, "a")["line"] == 4
    assert node(graph, "a")["file"] == str(path)
    assert [node(graph, f"loop/{k}/t")["attrs"]["by"] for k in range(2)] == [0.25, 0.25]
    block = variant(base, """
        replace:
          loop:
            id: loop
            repeat: 3
            carry: {h: {init: a, next: h_next}}
            body:
              - {id: h_next, op: relu, in: [h]}
        """, name="block.yaml")
    graph = capsflow.compile(block)
    assert graph.spec.blocks == {"loop": 3}
    unrolled = [n for n in graph.order if n.startswith("loop/")]
    assert unrolled == [f"loop/{k}/h_next" for k in range(3)]


def test_replace_takes_every_definition_of_an_id_and_a_list_or_nothing(base):
    path = variant(base, """
        replace:
          loop/h_next:                          # was defined twice (when: not_last / last)
            - {id: h_next, op: mul, in: [h, t]}
          part: []                              # removed, and with it the fragment's vars
        """)
    graph = capsflow.compile(path)
    assert [node(graph, f"loop/{k}/h_next")["op"] for k in range(2)] == ["mul", "mul"]
    assert "part" not in graph.dag and "gain" not in graph.spec.vars
    assert not any(s.endswith("plain.yaml") for s in graph.spec.sources)


def test_a_variant_of_a_variant(base):
    first = variant(base, "vars: {k: 5.0}\nreplace:\n  a: {id: a, op: add, in: [x, w]}\n",
                    name="first.yaml")
    second = write(base.parent, "second.yaml",
                   "extends: first.yaml\nvars: {iters: 4}\n")
    graph = capsflow.compile(second)
    assert graph.spec.vars["k"] == 5.0 and graph.spec.blocks == {"loop": 4}
    assert node(graph, "a")["op"] == "add" and node(graph, "a")["file"] == str(first)


def test_a_capsnet_variant_is_a_few_lines(tmp_path):
    """The YAML-only variant of the docs: sigmoid gates instead of the routing softmax."""
    path = tmp_path / "capsnet-sigmoid.yaml"
    path.write_text(f"extends: {CAPSNET}\nreplace:\n"
                    "  routing/c: {id: c, op: sigmoid, in: [b]}\n")
    graph = capsflow.compile(path)
    assert [node(graph, f"routing/{k}/c")["op"] for k in range(3)] == ["sigmoid"] * 3
    assert node(graph, "routing/0/c")["file"] == str(path)
    assert graph.param_count() == capsflow.compile(CAPSNET).param_count()


# -- errors point at the file and line that wrote the mistake ------------------------------
def test_replace_of_an_unknown_id_names_the_variant_line(base):
    path = variant(base, "vars: {k: 1.0}\nreplace:\n  loop/tt: {id: t, op: relu, in: [h]}\n")
    check_error(path, f"{path}:4: replace: the base graph has no node or repeat block "
                      "'loop/tt' (did you mean 'loop/t'?)")


def test_a_missing_fragment_points_at_the_variable_that_chose_it(base):
    path = variant(base, "vars:\n  block: learnd\n")
    message = check_error(path, f"{path}:3: block: 'learnd' names no fragment",
                          "learned, plain")
    assert f"included at {base}:" in message
    check_error(base, "--set block=nope: there is no", overrides={"block": "nope"})


def test_shape_errors_in_replaced_nodes_name_the_variant(base):
    path = variant(base, "replace:\n  a: {id: a, op: matmul, in: [x, w]}\n")
    check_error(path, f"{path}:3: node 'a': shape mismatch in matmul")


def test_errors_inside_a_fragment_name_the_fragment(base):
    write(base.parent, "parts/broken.yaml", "nodes:\n  - {id: part, op: scale, input: [a]}\n")
    check_error(base, f"{base.parent / 'parts/broken.yaml'}:2: node 'part': unknown key 'input'",
                overrides={"block": "broken"})
    write(base.parent, "parts/extra.yaml", "nodes: []\noutputs: {a: a}\n")
    check_error(base, "parts/extra.yaml:2: included fragment: unknown key 'outputs'",
                overrides={"block": "extra"})


@pytest.mark.parametrize("text,expected", [
    ("replace: {a: {id: a, op: relu, in: [x]}}\n", "'replace' needs 'extends'"),
    ("extends: nowhere.yaml\n", "extends 'nowhere.yaml': no such graph spec"),
    ("extends: loop.yaml\n", "'extends' goes round in a circle: loop.yaml -> loop.yaml"),
])
def test_bad_extends(base, text, expected):
    path = write(base.parent, "loop.yaml", text + BASE)
    check_error(path, f"{path}:", expected)


def test_include_cycles_and_conflicting_defaults(base):
    write(base.parent, "parts/self.yaml", "nodes:\n  - {include: self.yaml}\n")
    check_error(base, "include goes round in a circle: self.yaml -> self.yaml",
                overrides={"block": "self"})
    path = variant(base, "nodes:\n  - {include: parts/learned.yaml}\n")
    check_error(path, "variable 'gain' defaults to 3.0 in", "and to 4.0 in",
                "set it in the graph's vars")
    both = variant(base, "vars: {gain: 1.0}\nnodes:\n  - {include: parts/learned.yaml}\n",
                   name="both.yaml")
    check_error(both, "duplicate id 'part'")   # plain's part and learned's part
    twice = variant(base, "replace:\n  part: {include: parts/learned.yaml}\n",
                    name="twice.yaml")
    graph = capsflow.compile(twice)            # plain.yaml's only entry was replaced
    assert graph.spec.vars["gain"] == 4.0 and "part.p" in graph.spec.params


def test_cli_prints_one_line_for_a_broken_variant(base, capsys):
    path = variant(base, "replace:\n  nothing: []\n")
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"capsflow check: error: {path}:3: replace:")


def test_replace_changes_one_copy_of_a_yaml_alias(tmp_path):
    """Two blocks sharing a body by a YAML anchor (&body / *body): replacing r1/c also
    replaced r2/c (the entries were one object, found by identity)."""
    (tmp_path / "base.yaml").write_text(textwrap.dedent("""
        inputs: {x: {shape: [N, 3]}}
        nodes:
          - id: r1
            repeat: 2
            carry: {h: {init: x, next: c}}
            body: &body
              - {id: c, op: scale, in: [h], attrs: {by: 2.0}}
          - id: r2
            repeat: 2
            carry: {h: {init: r1/c, next: c}}
            body: *body
        outputs: {y: r2/c}
    """))
    (tmp_path / "variant.yaml").write_text(
        "extends: base.yaml\nreplace:\n  r1/c: {id: c, op: sigmoid, in: [h]}\n")
    ops = {n.id: n.op for n in capsflow.compile(tmp_path / "variant.yaml").spec.nodes}
    assert ops == {"r1/0/c": "sigmoid", "r1/1/c": "sigmoid", "r2/0/c": "scale", "r2/1/c": "scale"}
    base = {n.id: n.op for n in capsflow.compile(tmp_path / "base.yaml").spec.nodes}
    assert set(base.values()) == {"scale"}


def test_an_include_path_may_compute_with_a_variable_that_names_another(tmp_path):
    """"parts/n${k + 1}.yaml" with k: ${j} was "'+' needs numbers, got '${j}'"."""
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "n2.yaml").write_text(
        "nodes:\n  - {id: pn, op: scale, in: [x], attrs: {by: 2.0}}\n")
    (tmp_path / "g.yaml").write_text(textwrap.dedent("""
        vars: {j: 1, k: "${j}"}
        inputs: {x: {shape: [N, 3]}}
        nodes:
          - {include: "parts/n${k + 1}.yaml"}
        outputs: {y: pn}
    """))
    assert [n.id for n in capsflow.compile(tmp_path / "g.yaml").spec.nodes] == ["pn"]
    (tmp_path / "g.yaml").write_text((tmp_path / "g.yaml").read_text().replace(
        'k: "${j}"', 'k: "${k}"'))
    with pytest.raises(SpecError, match="'k'"):
        capsflow.compile(tmp_path / "g.yaml")
