"""``capsflow predict``: image files through a trained checkpoint, reconstructions, and the
one-line errors of bad images, folders and mismatched checkpoints."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CAPSNET, run_cli
from test_data import _make_dataset
from test_formats import _png

from capsflow.cli import main as cli_main
from capsflow.runners import predict
from capsflow.runners.data import DataDescription
from capsflow.runners.training import read_checkpoint, write_checkpoint

TINY = ["--bs", "20", "--set", "routing_iters=1", "--no-progress", "--num_epochs", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch capsnet run on 40 synthetic MNIST-format digits: its folder."""
    root = tmp_path_factory.mktemp("predict")
    _make_dataset(root / "data" / "mnist", compress=False, n_train=40, n_test=20)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        mp.delenv("CAPSFLOW_DATA", raising=False)
        assert cli_main(["train", str(CAPSNET), "--data-dir", str(root / "data"), *TINY,
                         "--save_dir", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture
def images(tmp_path) -> Path:
    """Two grey 28x28 PNGs and, in a sub-folder, a colour 50x40 JPEG."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    for name in ("a.png", "b.png"):
        _png(folder / name, rng.integers(0, 256, size=(28, 28), dtype=np.uint8))
    _png(folder / "more" / "c.jpg", rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8))
    return folder


cli = run_cli


def one_line(capsys, *argv) -> str:
    rc, _, err = cli(capsys, "predict", *argv)
    assert rc == 2, err
    assert err.startswith("capsflow predict: error: ") and "\n" not in err, err
    return err


def test_predicts_a_class_per_file(run, images, capsys):
    rc, out, err = cli(capsys, "predict", CAPSNET, "--checkpoint", run / "last.npz", images,
                       "--set", "routing_iters=1")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert "trained on MNIST: 1x28x28, 10 classes; 3 image(s)" in lines[0]
    files = [images / "a.png", images / "b.png", images / "more" / "c.jpg"]
    for line, file in zip(lines[1:], files):
        head, scores = line.split("  |  ")
        assert head.startswith(f"{file}: ") and head.split(": ")[1].split(" ")[0] in "0123456789"
        assert scores.startswith("lengths: 0 ") and len(scores.split(", ")) == 10
    # one file, the three highest lengths, highest first
    rc, out, _ = cli(capsys, "predict", CAPSNET, "--checkpoint", run / "last.npz",
                     images / "a.png", "--top", "3")
    shown = [float(s.split(" ")[1]) for s in out.splitlines()[1].split("lengths: ")[1].split(", ")]
    assert rc == 0 and len(shown) == 3 and shown == sorted(shown, reverse=True)


def test_reconstructions_are_written(run, images, tmp_path, capsys):
    out_dir = tmp_path / "recon"
    rc, out, err = cli(capsys, "predict", CAPSNET, "--checkpoint", run / "last.npz",
                       images / "a.png", images / "more", "--recon", out_dir)
    assert rc == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.recon.png", "c.recon.png"]
    from PIL import Image
    with Image.open(out_dir / "c.recon.png") as im:
        assert im.size == (28, 28) and im.mode == "L"
    assert f"wrote 2 reconstruction(s) to {out_dir}" in out


def test_reconstruction_names_never_collide_nor_go_through_links(run, images, tmp_path,
                                                                  capsys):
    """d1/a.png, d2/a.png and d1/a-1.png get three files (a-1 was written twice); a link
    where a picture goes is replaced, its target untouched; a file name with a newline
    stays one output line."""
    for folder, name in (("d1", "a.png"), ("d2", "a.png"), ("d1", "a-1.png")):
        (tmp_path / folder).mkdir(exist_ok=True)
        shutil.copy(images / "a.png", tmp_path / folder / name)
    out_dir = tmp_path / "recon"
    out_dir.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("keep")
    (out_dir / "a-1.recon.png").symlink_to(precious)
    rc, out, err = cli(capsys, "predict", CAPSNET, "--checkpoint", run / "last.npz",
                       tmp_path / "d1" / "a-1.png", tmp_path / "d1" / "a.png",
                       tmp_path / "d2" / "a.png", "--recon", out_dir)
    assert rc == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "a-1-1.recon.png", "a-1.recon.png", "a-2.recon.png"]
    assert precious.read_text() == "keep" and not (out_dir / "a-1.recon.png").is_symlink()
    assert predict._stems([Path("x/a.png"), Path("y/a.png"), Path("a-1.png"),
                           Path("a-1-1.png")]) == ["a-0", "a-1-1-1", "a-1", "a-1-1"]
    odd = tmp_path / "new\nline\x1b[31m.png"
    shutil.copy(images / "a.png", odd)
    rc, out, err = cli(capsys, "predict", CAPSNET, "--checkpoint", run / "last.npz", odd)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2 and "new\\nline\\x1b[31m.png: " in lines[1]


def test_images_are_made_like_the_training_data(images):
    grey = DataDescription("mnist", "MNIST", list("0123456789"), (1, 28, 28))
    x, files = predict.prepare_images([images], grey)
    assert x.shape == (3, 1, 28, 28) and x.dtype == np.float32 and files[2].name == "c.jpg"
    inverted, _ = predict.prepare_images([images / "a.png"], grey, invert=True)
    np.testing.assert_allclose(inverted, 1.0 - x[:1])
    colour = DataDescription("folder", "image folder", ["a", "b"], (3, 16, 16), 1,
                             {"size": [20, 20], "crop": [16, 16], "channels": 3})
    x, _ = predict.prepare_images([images / "more" / "c.jpg"], colour)
    assert x.shape == (1, 3, 16, 16)
    stereo = DataDescription("smallnorb", "smallNORB", list("abcde"), (2, 32, 32), 1,
                             {"size": [48, 48], "crop": [32, 32]})
    x, _ = predict.prepare_images([images / "a.png"], stereo)
    assert x.shape == (1, 2, 32, 32) and np.array_equal(x[:, 0], x[:, 1])


def _with_record(run: Path, folder: Path, record: dict) -> Path:
    """A copy of the run's checkpoint whose meta carries ``record`` as its data record."""
    ckpt = read_checkpoint(run / "last.npz")
    path = folder / "recorded.npz"
    write_checkpoint(path, ckpt.params, ckpt.optim, dict(ckpt.meta, data=record), ckpt.sources)
    return path


def test_the_checkpoints_data_record_names_the_classes(run, images, tmp_path, capsys):
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    record = DataDescription("folder", "image folder", names, (1, 28, 28), 1,
                             {"channels": 1}).to_json()
    path = _with_record(run, tmp_path, record)
    rc, out, err = cli(capsys, "predict", CAPSNET, "--checkpoint", path, images / "a.png")
    assert rc == 0, err
    predicted = out.splitlines()[1].split(": ")[1].split(" ")[0]
    assert predicted in names and "lengths: zero " in out

    # a MultiMNIST-style record: the two longest capsules, and a picture of each
    path = _with_record(run, tmp_path, dict(record, labels_per_example=2))
    rc, out, err = cli(capsys, "predict", CAPSNET, "--checkpoint", path, images / "a.png",
                       "--recon", tmp_path / "pairs")
    assert rc == 0, err
    pair = out.splitlines()[1].split(": ")[1].split(" ")[0].split("+")
    assert len(pair) == 2 and set(pair) <= set(names)
    written = sorted(p.name for p in (tmp_path / "pairs").iterdir())
    assert written == sorted(["a.recon.png"] + [f"a.recon-{n}.png" for n in pair])


def test_mismatched_checkpoints_are_one_line(run, images, tmp_path, capsys):
    ckpt = run / "last.npz"
    shutil.copytree(CAPSNET.parent, tmp_path / "graphs")  # the fragments it includes
    other = tmp_path / "graphs" / "other.yaml"
    other.write_text(CAPSNET.read_text().replace("name: capsnet", "name: other"))
    err = one_line(capsys, other, "--checkpoint", ckpt, images)
    assert "checkpoint of graph 'capsnet', not of 'other'" in err
    record = DataDescription("cifar10", "CIFAR-10", list("abcdefghij"), (3, 32, 32)).to_json()
    err = one_line(capsys, CAPSNET, "--checkpoint", _with_record(run, tmp_path, record), images)
    assert "trained on CIFAR-10: 3x32x32, 10 classes images" in err and "1x28x28" in err
    record = DataDescription("mnist", "MNIST", list("0123456789"), (1, 28, 28)).to_json()
    err = one_line(capsys, CAPSNET, "--checkpoint", _with_record(run, tmp_path, record), images,
                   "--set", "height=32")
    assert "--set height=32 contradicts" in err and "(height 28)" in err
    err = one_line(capsys, CAPSNET, "--checkpoint", _with_record(run, tmp_path, {"shape": 3}),
                   images)
    assert "damaged checkpoint metadata" in err


def test_bad_images_are_one_line(run, images, tmp_path, capsys):
    ckpt = run / "last.npz"
    (tmp_path / "notes.png").write_text("not an image")
    err = one_line(capsys, CAPSNET, "--checkpoint", ckpt, tmp_path / "notes.png")
    assert f"{tmp_path / 'notes.png'}: unreadable image" in err
    (tmp_path / "empty").mkdir()
    err = one_line(capsys, CAPSNET, "--checkpoint", ckpt, images, tmp_path / "empty")
    assert f"{tmp_path / 'empty'}: holds no image files" in err
    err = one_line(capsys, CAPSNET, "--checkpoint", ckpt, tmp_path / "missing.png")
    assert "missing.png: no such image file" in err
    err = one_line(capsys, CAPSNET, "--checkpoint", tmp_path / "notes.png", images)
    assert "notes.png" in err
    err = one_line(capsys, CAPSNET, "--checkpoint", ckpt, images, "--recon", tmp_path / "notes.png")
    assert "--recon" in err


def _colour_png(path: Path, channel: int, size: tuple, rng) -> Path:
    """Noise with a bright square in one colour channel (0 red, 1 green, 2 blue)."""
    h, w = size
    img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    img[h // 4:3 * h // 4, w // 4:3 * w // 4, channel] = 250
    return _png(path, img)


def test_train_on_a_colour_folder_then_predict_new_files(tmp_path, capsys, monkeypatch):
    """The issue's "done when": 32x32 colour PNGs in three class folders; the graph adapts
    to 3x32x32 and 3 classes; predict classifies new files (of another size)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    root = tmp_path / "shapes"
    colours = {"blue": 2, "green": 1, "red": 0}
    for split, n in (("train", 8), ("test", 3)):
        for name, channel in colours.items():
            for i in range(n):
                _colour_png(root / split / name / f"{i}.png", channel, (32, 32), rng)
    run = tmp_path / "run"
    rc, out, err = cli(capsys, "train", CAPSNET, "--dataset", "folder", "--data-dir", root,
                       "--bs", "6", "--num_epochs", "4", "--set", "routing_iters=1",
                       "--set", "conv1_maps=16", "--set", "primary_types=4", "--no-progress",
                       "--save_dir", run)
    assert rc == 0, err
    assert "(3,842,912 parameters;" in out and "channels=3 height=32 width=32 classes=3" in out
    assert "on image folder: 3x32x32, 3 classes: 24 train / 9 test examples" in out
    ckpt = read_checkpoint(run / "last.npz")
    assert {k: ckpt.overrides[k] for k in ("channels", "height", "width", "classes")} == {
        "channels": 3, "height": 32, "width": 32, "classes": 3}
    assert ckpt.meta["data"] == {"dataset": "folder", "title": "image folder",
                                 "classes": ["blue", "green", "red"], "shape": [3, 32, 32],
                                 "labels_per_example": 1, "options": {"channels": 3}}

    new = tmp_path / "new"
    for name, channel in colours.items():
        _colour_png(new / f"{name}.png", channel, (48, 40), rng)
    rc, out, err = cli(capsys, "predict", CAPSNET, "--checkpoint", run / "last.npz", new,
                       "--recon", tmp_path / "recon")
    assert rc == 0, err
    lines = out.splitlines()
    assert "trained on image folder: 3x32x32, 3 classes; 3 image(s)" in lines[0]
    for line, name in zip(lines[1:4], sorted(colours)):
        assert line.startswith(f"{new / (name + '.png')}: {name} (")
    from PIL import Image
    with Image.open(tmp_path / "recon" / "red.recon.png") as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    # the checkpoint's data are not MNIST's: evaluating it there is one line
    _make_dataset(tmp_path / "mnist", compress=False, n_train=10, n_test=10)
    err = one_line_cmd(capsys, "eval", CAPSNET, "--checkpoint", run / "last.npz",
                       "--dataset", "mnist", "--data-dir", tmp_path)
    assert "takes 3x32x32 images and scores 3 classes (trained on folder)" in err


def one_line_cmd(capsys, command, *argv) -> str:
    rc, _, err = cli(capsys, command, *argv)
    assert rc == 2, err
    assert err.startswith(f"capsflow {command}: error: ") and "\n" not in err, err
    return err
