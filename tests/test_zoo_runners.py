"""Graphs that are not CapsNet in the runners: class scores come from the output `scores`
when a graph declares it, else `lengths` (runners.training.class_scores); a graph with
neither is one line; a graph without a decoder (no `recon`) is trained, evaluated,
visualized (curves only) and compared. The baseline CNN (graphs/baseline-cnn.yaml) runs
here at small sizes (--set), the same layers with fewer maps and units."""
from __future__ import annotations

import csv

import matplotlib.image
import numpy as np
import pytest
from conftest import CAPSNET, REPO, SHARED_DATA

import capsflow
from capsflow.cli import main as cli_main
from capsflow.core.graph import Graph
from capsflow.errors import CapsflowError
from capsflow.runners.evaluate import predict
from capsflow.training.train_step import TrainStep
from capsflow.runners.training import (DROPOUT_SEED, Data, TrainConfig, Trainer, class_scores,
                                       evaluate_split, read_metrics)

BASELINE = REPO / "graphs" / "baseline-cnn.yaml"
SMALL = {"conv1_maps": 8, "conv2_maps": 8, "conv3_maps": 4, "fc1_units": 16, "fc2_units": 12}
SMALL_FLAGS = [w for k, v in SMALL.items() for w in ("--set", f"{k}={v}")]
needs_mnist = pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(),
                                 reason=f"real MNIST not found in {SHARED_DATA / 'mnist'}")

# A linear classifier whose outputs are chosen per test: both score outputs (opposite
# signs, so they predict differently), one of them, or neither.
LINEAR = """\
name: {name}
description: a linear classifier for the runner tests
inputs:
  x: {{shape: [N, 1, 28, 28]}}
  y: {{shape: [N, 10], optional: true}}
params:
  w: {{shape: [784, 10], init: {{normal: 0.05}}}}
nodes:
  - {{id: flat, op: reshape, in: [x], attrs: {{shape: [-1, 784]}}}}
  - {{id: logits, op: linear, in: [flat, w]}}
  - {{id: flipped, op: scale, in: [logits], attrs: {{by: -1.0}}}}
  - {{id: xent, op: softmax_cross_entropy, in: [logits, y]}}
  - {{id: loss, op: mean, in: [xent]}}
outputs:
{outputs}
"""


def linear_graph(tmp_path, outputs: dict, name: str = "linear"):
    path = tmp_path / f"{name}.yaml"
    body = "\n".join(f"  {k}: {v}" for k, v in outputs.items())
    path.write_text(LINEAR.format(name=name, outputs=body))
    return path


def synthetic_data(n_train: int = 12, n_test: int = 8) -> Data:
    rng = np.random.default_rng(0)
    images = rng.random((n_train + n_test, 1, 28, 28), dtype=np.float32)
    labels = rng.integers(0, 10, n_train + n_test)
    return Data(images[:n_train], labels[:n_train], images[n_train:], labels[n_train:])


# -- which output holds the class scores ---------------------------------------------------
def test_scores_is_preferred_to_lengths_and_lengths_still_works(tmp_path):
    both = capsflow.compile(linear_graph(tmp_path, {"loss": "loss", "scores": "logits",
                                                    "lengths": "flipped"}))
    assert class_scores(both) == "scores"
    assert class_scores(capsflow.compile(CAPSNET)) == "lengths"
    assert class_scores(capsflow.compile(BASELINE, SMALL)) == "scores"
    # evaluate_split predicts from 'scores', not from the (opposite) 'lengths'
    data = synthetic_data()
    params = both.init_params(0)
    result = evaluate_split(both, params, data.test_images, data.test_labels, batch_size=3)
    logits = both.run(params, {"x": data.test_images}, outputs=["scores"])["scores"]
    assert np.array_equal(result["pred"], logits.argmax(axis=1))
    assert not np.array_equal(result["pred"], (-logits).argmax(axis=1))


def test_a_graph_without_class_scores_is_one_line(tmp_path, capsys, no_user_data):
    neither = linear_graph(tmp_path, {"loss": "loss", "logits": "logits"})
    with pytest.raises(CapsflowError, match=r"no class-score output: declare 'scores' .* its "
                                            r"outputs are loss, logits$"):
        class_scores(capsflow.compile(neither))
    # the commands stop on it before reading any data (none is given here)
    for argv in (["train", str(neither), "--save_dir", str(tmp_path / "run")],
                 ["compare", str(neither), "--steps", "1", "--out", str(tmp_path / "cmp")]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith(f"capsflow {argv[0]}: error: "), err
        assert "its outputs are loss, logits" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cmp").exists()


def test_class_scores_must_be_two_dimensional(tmp_path):
    flat = capsflow.compile(linear_graph(tmp_path, {"loss": "loss", "scores": "xent"}))
    with pytest.raises(CapsflowError, match=r"output 'scores' has shape \(N\); class scores "
                                            r"must be \(N, classes\)"):
        class_scores(flat)


# -- training and evaluating a graph with 'scores' -------------------------------------------
def test_the_trainer_counts_accuracy_from_scores_and_evaluation_feeds_no_seed(tmp_path,
                                                                              monkeypatch):
    graph = capsflow.compile(BASELINE, SMALL)
    seeded, trained = [], []   # per forward-only run / training step: was a seed fed?
    real_run, real_gradients = Graph.run, TrainStep.gradients

    def run(self, params, inputs, *args, **kwargs):
        seeded.append(inputs.get(DROPOUT_SEED) is not None)
        return real_run(self, params, inputs, *args, **kwargs)

    def gradients(self, inputs):
        trained.append(inputs.get(DROPOUT_SEED) is not None)
        return real_gradients(self, inputs)

    monkeypatch.setattr(Graph, "run", run)
    monkeypatch.setattr(TrainStep, "gradients", gradients)
    config = TrainConfig(batch_size=4, num_epochs=2, disp=1, seed=3)
    trainer = Trainer(graph, synthetic_data(), config, tmp_path, log=lambda line: None,
                      progress_bar=False)
    assert trainer.scores == "scores"
    records = trainer.fit()
    assert len(records) == 2 and all(np.isfinite(r["train_loss"]) for r in records)
    assert all(0 <= r["test_acc"] <= 1 for r in records)
    assert trained == [True] * 6            # training steps: dropout on
    assert seeded and not any(seeded)       # validation: dropout off
    # a step's accuracy is the argmax of 'scores' against the labels, counted per window
    steps = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert len(steps) == 6 and all(r["acc"] in (0, 0.25, 0.5, 0.75, 1) for r in steps)
    data = synthetic_data()
    test = evaluate_split(graph, trainer.params, data.test_images, data.test_labels, 3)
    assert test["acc"] == pytest.approx(records[-1]["test_acc"])
    pred, sse = predict(graph, trainer.params, data.test_images, 3, desc=None)
    assert sse is None and np.array_equal(pred, test["pred"])
    assert not any(seeded)


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    """`capsflow train` of the small baseline CNN on 40 real MNIST images."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"real MNIST not found in {SHARED_DATA / 'mnist'}")
    out = tmp_path_factory.mktemp("baseline")
    assert cli_main(["train", str(BASELINE), *SMALL_FLAGS, "--data-dir", str(SHARED_DATA),
                     "--limit-train", "40", "--limit-test", "20", "--bs", "10",
                     "--num_epochs", "1", "--disp", "1", "--no-progress",
                     "--save_dir", str(out)]) == 0
    return out


@needs_mnist
def test_eval_of_a_graph_without_decoder_reports_accuracy_and_a_note(baseline_run, capsys):
    rc = cli_main(["eval", str(BASELINE), "--checkpoint", str(baseline_run / "last.npz"),
                   "--data-dir", str(SHARED_DATA), "--limit-test", "20", "--bs", "7"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "note: baseline-cnn has no output 'recon' (no decoder)" in out
    assert "test accuracy:" in out and "/20)" in out and "reconstruction SSE" not in out
    matrix = out.split("predicted class):\n")[1].splitlines()[1:11]
    assert sum(int(c) for row in matrix for c in row.split()[1:]) == 20
    epochs = [r for r in read_metrics(baseline_run / "metrics.jsonl") if r["kind"] == "epoch"]
    line = next(s for s in out.splitlines() if s.startswith("test accuracy:"))
    assert f"{100 * epochs[-1]['test_acc']:.2f}%" in line   # the same 20 images, same model


@needs_mnist
def test_visualize_of_a_graph_without_decoder_draws_the_curves_only(baseline_run, tmp_path,
                                                                    capsys):
    out = tmp_path / "pics"
    rc = cli_main(["visualize", str(BASELINE), "--checkpoint", str(baseline_run / "last.npz"),
                   "--data-dir", str(SHARED_DATA), "--limit-test", "8", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "recon.png and perturbation.png skipped" in printed
    assert sorted(p.name for p in out.iterdir()) == ["curves.png"]
    assert matplotlib.image.imread(out / "curves.png")[..., :3].std() > 0.05
    # with no metrics to plot there is nothing to draw: one line, nothing written
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "last.npz").write_bytes((baseline_run / "last.npz").read_bytes())
    rc = cli_main(["visualize", str(BASELINE), "--checkpoint", str(alone / "last.npz"),
                   "--data-dir", str(SHARED_DATA), "--limit-test", "8",
                   "--out", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "nothing to draw: baseline-cnn has no decoder" in err
    assert not (tmp_path / "none").exists()


@needs_mnist
def test_compare_tabulates_a_cnn_beside_capsnet(tmp_path, capsys, no_user_data):
    cnn = tmp_path / "small-cnn.yaml"
    cnn.write_text(f"extends: {BASELINE}\nname: small-cnn\nvars:\n"
                   + "".join(f"  {k}: {v}\n" for k, v in SMALL.items()))
    caps = tmp_path / "caps1.yaml"
    caps.write_text(f"extends: {CAPSNET}\nname: caps1\nvars:\n  routing_iters: 1\n")
    out = tmp_path / "cmp"
    assert cli_main(["compare", str(cnn), str(caps), "--steps", "3", "--bs", "4",
                     "--data-dir", str(SHARED_DATA), "--limit-train", "8", "--limit-test", "6",
                     "--out", str(out), "--no-progress"]) == 0
    with (out / "compare.csv").open() as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"small-cnn", "caps1"}
    assert rows["small-cnn"]["routing_iterations"] == "" and rows["caps1"]["routing_iterations"] == "1"
    for r in rows.values():
        assert int(r["steps"]) == 3 and r["note"] == ""
        assert 0 <= float(r["test_acc"]) <= 1 and float(r["final_train_loss"]) > 0
    assert int(rows["small-cnn"]["parameters"]) == capsflow.compile(BASELINE, SMALL).param_count()
    md = (out / "compare.md").read_text()
    assert "| small-cnn | " in md and md.split("| small-cnn | ")[1].split("\n")[0].endswith("| - |")
