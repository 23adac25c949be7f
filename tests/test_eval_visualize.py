"""`capsflow eval` and `capsflow visualize` on a tiny trained checkpoint, and the engine's
``feed`` (decode given capsules) that the perturbation picture relies on."""
from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
from conftest import CAPSNET, SHARED_DATA

import capsflow
from capsflow.cli import main as cli_main
from capsflow.errors import CapsflowError
from capsflow.runners.data import load_split, one_hot
from capsflow.runners.evaluate import confusion_matrix, predict
from capsflow.runners.training import (TrainConfig, Trainer, evaluate_split, load_data,
                                       load_model)
from capsflow.runners.visualize import DELTAS, perturbed_capsules

needs_mnist = pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(),
                                 reason=f"real MNIST not found in {SHARED_DATA / 'mnist'}")
OVERRIDES = {"routing_iters": 1}


@pytest.fixture(scope="module")
def graph():
    return capsflow.compile(CAPSNET, OVERRIDES)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, graph):
    """A 1-epoch run on 20 images through the Trainer API: last.npz + metrics.jsonl."""
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(batch_size=10, num_epochs=1, limit_train=20, limit_test=20,
                         data_dir=str(SHARED_DATA))
    trainer = Trainer(graph, load_data(config), config, out, log=lambda line: None,
                      progress_bar=False)
    assert len(trainer.fit()) == 1
    return out


# ------------------------------------------------------------------------ feed


def test_feed_replaces_a_node_and_skips_what_only_it_needs(graph):
    params = graph.init_params(0)
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    y = one_hot(np.array([1, 4, 9]))
    plain = graph.run(params, {"x": x, "y": y}, outputs=["recon", "digitcaps"])
    v = plain["digitcaps"]
    same = graph.run(params, {"x": x, "y": y}, outputs=["recon"], feed={"routing/v": v})
    assert np.array_equal(same["recon"], plain["recon"])

    node = graph.spec.aliases["routing/v"]
    steps = graph.plan({"x", "y"}, ["recon"], fed=frozenset({node})).steps
    assert "conv1" not in steps and "u_hat" not in steps and node not in steps
    assert "fc1" in steps and "recon" in steps

    shifted = v.copy()
    shifted[:, :, 0] += 0.25
    moved = graph.run(params, {"x": x, "y": y}, outputs=["recon"], feed={node: shifted})
    assert not np.array_equal(moved["recon"], plain["recon"])


@pytest.mark.parametrize("feed, message", [
    ({"no_such_node": np.zeros((3, 10, 16))}, "cannot feed 'no_such_node'"),
    ({"x": np.zeros((3, 1, 28, 28))}, "cannot feed 'x'"),
    ({"routing/v": np.zeros((3, 5, 16))}, "expects (N, 10, 16)"),
])
def test_bad_feed_is_one_clear_error(graph, feed, message):
    params = graph.init_params(0)
    inputs = {"x": np.zeros((3, 1, 28, 28), np.float32)}
    with pytest.raises(CapsflowError, match=message.replace("(", r"\(").replace(")", r"\)")):
        graph.run(params, inputs, outputs=["recon"], feed=feed)


def test_perturbed_capsules_shift_one_dimension_of_one_capsule():
    v = np.random.default_rng(1).normal(size=(10, 16)).astype(np.float32)
    caps = perturbed_capsules(v, cls=3)
    assert DELTAS.size == 11 and DELTAS[0] == -0.25 and DELTAS[-1] == 0.25
    assert caps.shape == (16 * 11, 10, 16)
    diff = (caps - v).reshape(16, 11, 10, 16)
    for d in range(16):
        for k, delta in enumerate(DELTAS):
            changed = np.argwhere(diff[d, k] != 0)
            if delta == 0:
                assert changed.size == 0
            else:
                assert changed.tolist() == [[3, d]]
                assert diff[d, k, 3, d] == pytest.approx(delta, abs=1e-6)


# ------------------------------------------------------------------------ eval


@needs_mnist
def test_eval_decodes_the_predicted_class(run_dir):
    graph, params, ckpt = load_model(CAPSNET, run_dir / "last.npz")
    assert ckpt.overrides == OVERRIDES and graph.spec.blocks["routing"] == 1
    images, labels = load_split("mnist", "test", SHARED_DATA, limit=20)
    pred, sse = predict(graph, params, images, batch_size=8, desc=None)
    # The same predictions as the validation pass (which feeds y for the loss).
    assert np.array_equal(pred, evaluate_split(graph, params, images, labels, 8)["pred"])
    masked = graph.run(params, {"x": images, "y": one_hot(pred)}, outputs=["recon"])["recon"]
    expected = np.square(masked - images.reshape(20, -1), dtype=np.float64).sum() / 20
    assert sse == pytest.approx(expected, rel=1e-5)
    conf = confusion_matrix(labels, pred)
    assert conf.sum() == 20 and np.trace(conf) == (pred == labels).sum()
    assert conf[labels[0], pred[0]] >= 1


@needs_mnist
def test_eval_cli_prints_accuracy_per_class_and_confusion(run_dir, capsys):
    rc = cli_main(["eval", str(CAPSNET), "--checkpoint", str(run_dir / "last.npz"),
                   "--data-dir", str(SHARED_DATA), "--limit-test", "30", "--bs", "15"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "test accuracy:" in out and "/30)" in out
    assert "per-class accuracy:" in out and "confusion matrix" in out
    matrix = out.split("predicted class):\n")[1].splitlines()[1:11]
    counts = np.array([[int(c) for c in row.split()[1:]] for row in matrix])
    assert counts.shape == (10, 10) and counts.sum() == 30


@needs_mnist
def test_eval_uses_the_stored_spec_when_the_file_differs(run_dir, tmp_path, capsys):
    edited = tmp_path / "capsnet.yaml"
    edited.write_text(CAPSNET.read_text().replace("recon_weight: 0.0005", "recon_weight: 0.001"))
    (tmp_path / "routing").mkdir()
    (tmp_path / "routing" / "paper.yaml").write_text(
        (CAPSNET.parent / "routing" / "paper.yaml").read_text())
    lines = []
    graph, _, _ = load_model(edited, run_dir / "last.npz", log=lines.append)
    assert graph.spec.vars["recon_weight"] == 0.0005 and "using the stored spec" in lines[0]


def test_eval_errors_are_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    for argv in (["eval", str(CAPSNET), "--checkpoint", str(broken)],
                 ["eval", str(CAPSNET), "--checkpoint", str(tmp_path / "missing.npz")],
                 ["visualize", str(CAPSNET), "--checkpoint", str(broken), "--out",
                  str(tmp_path / "pics")]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"capsflow {argv[0]}: error: ") and "\n" not in err, err


# ------------------------------------------------------------------- visualize


@needs_mnist
def test_visualize_writes_the_three_pictures(run_dir, tmp_path, capsys):
    out = tmp_path / "pics"
    rc = cli_main(["visualize", str(CAPSNET), "--checkpoint", str(run_dir / "last.npz"),
                   "--data-dir", str(SHARED_DATA), "--limit-test", "16", "--count", "16",
                   "--index", "3", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    for name in ("recon.png", "perturbation.png", "curves.png"):
        picture = matplotlib.image.imread(out / name)
        assert picture.ndim == 3 and min(picture.shape[:2]) > 200, name
        assert picture[..., :3].std() > 0.05, f"{name} is blank"
    assert "wrote" in capsys.readouterr().out


def test_figures_are_written_whole_in_their_suffixs_format_and_replace_links(tmp_path):
    """runners/pictures.save_figure: through a temporary file renamed over the name (a
    link there is replaced, never written through), in the format of the suffix."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from capsflow.runners.pictures import save_figure
    fig = plt.figure(figsize=(1, 1))
    target = tmp_path / "notes.txt"
    target.write_text("keep")
    (tmp_path / "curves.png").symlink_to(target)
    save_figure(fig, tmp_path / "curves.png", dpi=20)
    save_figure(fig, tmp_path / "curves.svg", dpi=20)
    plt.close(fig)
    assert target.read_text() == "keep"
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert b"<svg" in (tmp_path / "curves.svg").read_bytes()[:400]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "curves.svg",
                                                          "notes.txt"]
