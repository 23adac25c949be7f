"""``trainable: false`` end to end: `capsflow train` leaves a frozen parameter as it was
initialised, saves it, resumes and evaluates, and `capsflow bench` times its step; on a
tiny graph and synthetic IDX data."""
from __future__ import annotations

import re

import numpy as np
import pytest
from test_data import _make_dataset

import capsflow
from capsflow.cli import main as cli_main
from capsflow.runners.training import read_checkpoint

# lengths = sigmoid(gain * (x W + b)): the frozen gain lies on the way to the loss, so
# training would change it if it were trainable.
GRAPH = """\
name: frozen
inputs:
  x: {shape: [N, 1, 28, 28]}
  y: {shape: [N, 10], optional: true}
params:
  w: {shape: [784, 10], init: {uniform_fan_in: 784}}
  b: {shape: [10], init: zeros}
  gain: {shape: [10], init: {normal: 1.0}, trainable: false}
  dec.w: {shape: [10, 784], init: {uniform_fan_in: 10}}
  dec.b: {shape: [784], init: zeros}
nodes:
  - {id: x_flat, op: reshape, in: [x], attrs: {shape: [-1, 784]}}
  - {id: logits, op: linear, in: [x_flat, w, b]}
  - {id: gained, op: mul, in: [logits, gain]}
  - {id: lengths, op: sigmoid, in: [gained]}
  - {id: dec, op: linear, in: [lengths, dec.w, dec.b]}
  - {id: recon, op: sigmoid, in: [dec]}
  - {id: margin, op: margin_loss, in: [lengths, y], attrs: {m_plus: 0.9, m_minus: 0.1, down_weight: 0.5}}
  - {id: sse, op: sum_squared_error, in: [recon, x_flat]}
  - {id: recon_term, op: scale, in: [sse], attrs: {by: 0.0005}}
  - {id: per_example, op: add, in: [margin, recon_term]}
  - {id: loss, op: mean, in: [per_example]}
outputs:
  loss: loss
  lengths: lengths
  recon: recon
"""

pytestmark = pytest.mark.usefixtures("no_user_data")


@pytest.fixture
def setup(tmp_path):
    """(graph file, the train command's first words) with 40 train / 20 test images."""
    graph = tmp_path / "frozen.yaml"
    graph.write_text(GRAPH)
    _make_dataset(tmp_path / "data" / "mnist", compress=False, n_train=40, n_test=20)
    return graph, ["train", str(graph), "--data-dir", str(tmp_path / "data"), "--bs", "10",
                   "--lr", "0.01", "--no-progress", "--save_dir", str(tmp_path / "run")]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_frozen_parameter_stays_as_initialised(setup, tmp_path, optimizer):
    graph_file, train = setup
    assert cli_main([*train, "--num_epochs", "1", "--opt", optimizer]) == 0
    initial = capsflow.compile(graph_file).init_params(seed=0)
    ckpt = read_checkpoint(tmp_path / "run" / "last.npz")
    assert set(ckpt.params) == set(initial)                   # every parameter is saved
    assert np.array_equal(ckpt.params["gain"], initial["gain"])
    for name in ("w", "b", "dec.w", "dec.b"):
        assert not np.array_equal(ckpt.params[name], initial[name]), name
    slots = {key.partition("/")[2] for key in ckpt.optim if key != "t"}
    assert slots == {"w", "b", "dec.w", "dec.b"}              # no optimizer state for gain


def test_resume_and_eval_keep_the_frozen_parameter(setup, tmp_path, capsys):
    graph_file, train = setup
    last = tmp_path / "run" / "last.npz"
    assert cli_main([*train, "--num_epochs", "1"]) == 0
    first = read_checkpoint(last)
    assert cli_main([*train, "--num_epochs", "2", "--resume", str(last)]) == 0
    second = read_checkpoint(last)
    assert second.epoch == 2 and second.meta["progress"]["iteration"] == 8
    assert int(second.optim["t"]) == 8
    assert np.array_equal(second.params["gain"], first.params["gain"])
    assert not np.array_equal(second.params["w"], first.params["w"])

    capsys.readouterr()
    assert cli_main(["eval", str(graph_file), "--checkpoint", str(last),
                     "--data-dir", str(tmp_path / "data")]) == 0
    assert "test accuracy:" in capsys.readouterr().out


def test_unfreezing_a_parameter_and_resuming_says_so(setup, tmp_path, capsys):
    """It was "damaged training state ('gain')": the file is fine, the graph changed."""
    graph_file, train = setup
    last = tmp_path / "run" / "last.npz"
    assert cli_main([*train, "--num_epochs", "1"]) == 0
    graph_file.write_text(GRAPH.replace(", trainable: false", ""))
    capsys.readouterr()
    assert cli_main([*train, "--num_epochs", "2", "--resume", str(last)]) == 2
    err = capsys.readouterr().err
    assert f"parameter 'gain' is trainable in {graph_file} but has no optimizer state in " \
           f"{last}" in err and "damaged" not in err


def test_a_graph_with_nothing_to_train_is_one_line(setup, capsys):
    graph_file, train = setup
    graph_file.write_text(re.sub(r"^(  [\w.]+: .*init: (?!.*trainable).*)\}$",
                                 r"\1, trainable: false}", GRAPH, flags=re.M))
    assert cli_main([*train, "--num_epochs", "1"]) == 2
    assert "has no trainable parameter" in capsys.readouterr().err


def test_bench_times_a_graph_with_a_frozen_parameter(setup, capsys):
    graph_file, _ = setup
    assert cli_main(["bench", str(graph_file), "--no-torch", "--bs", "4", "--repeats", "1",
                     "--warmup", "1"]) == 0, capsys.readouterr().err
