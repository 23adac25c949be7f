"""runners/data.py's registry and ``load``: every dataset from fixtures written in its real
on-disk format (never downloaded), the generated sets, options, search and errors."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from conftest import run_cli
from test_data import _make_dataset, _write_idx
from test_formats import _cifar_fixture, _norb_bytes, _png

from capsflow.runners import data, formats
from capsflow.runners.data import (DATASETS, BatchIterator, DataArgumentError, DataDescription,
                                   DataError, DataNotFoundError, load, load_train_test, one_hot)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No user cache, env var or system folder leaks into (or out of) a test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CAPSFLOW_DATA", raising=False)
    monkeypatch.setattr(data, "SYSTEM_ROOT", tmp_path / "system")


def _digits(n: int, seed: int) -> tuple:
    """Blob 'digits' (uint8 (n, 28, 28)) of 10 classes, the blob's place set by the class."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) + seed) % 10
    for i, c in enumerate(labels):
        images[i, 6 + c:14 + c, 8:20] = rng.integers(100, 256, size=(8, 12))
    return images, labels.astype(np.uint8)


@pytest.fixture
def mnist_root(tmp_path):
    """ROOT/mnist/ with 60 train and 30 test digits (IDX, gzipped)."""
    root = tmp_path / "root"
    folder = root / "mnist"
    folder.mkdir(parents=True)
    for split, n, seed in (("train", 60, 0), ("test", 30, 1)):
        x, y = _digits(n, seed)
        _write_idx(folder / data.IDX_FILES[(split, "images")], x, compress=True)
        _write_idx(folder / data.IDX_FILES[(split, "labels")], y, compress=True)
    return root


# ------------------------------------------------------------------------ registry


def test_registry_describes_every_dataset():
    assert list(DATASETS) == ["mnist", "fashion-mnist", "kmnist", "emnist", "cifar10", "svhn",
                              "smallnorb", "folder", "multimnist", "affine-mnist", "affnist"]
    for name, info in DATASETS.items():
        assert info.name == name and info.title and info.offline
        if info.shape is not None:
            assert len(info.shape) == 3
        if info.classes is not None:
            assert len(set(info.classes)) == info.num_classes
        assert set(info.options) <= set(data.OPTIONS)
    assert DATASETS["cifar10"].classes[0] == "airplane"
    assert DATASETS["fashion-mnist"].classes[-1] == "Ankle boot"
    assert DATASETS["smallnorb"].num_classes == 5
    assert DATASETS["multimnist"].labels_per_example == 2
    assert data.class_names("emnist", "letters") == [chr(c) for c in range(97, 123)]
    assert len(data.class_names("emnist")) == 47  # balanced
    assert data.class_names("folder") is None
    # the datasets torchvision can fetch, and only those
    assert {n for n, i in DATASETS.items() if i.torchvision_class} == {
        "mnist", "fashion-mnist", "kmnist", "emnist", "cifar10", "svhn"}


@pytest.mark.parametrize("dataset, options, words", [
    ("mnist", {"size": 32}, "--image-size does not apply to mnist"),
    ("cifar10", {"emnist_split": "letters"}, "--emnist-split does not apply to cifar10"),
    ("emnist", {"emnist_split": "vowels"}, "unknown EMNIST split 'vowels'"),
    ("folder", {"channels": 2}, "--channels must be 1 (grey) or 3"),
    ("folder", {"size": 0}, "--image-size must be a positive size"),
    ("multimnist", {"count": 0}, "--multimnist-count must be a positive number"),
    ("mnist", {"colour": True}, "unknown data option 'colour'"),
])
def test_bad_options_are_one_line(tmp_path, dataset, options, words):
    with pytest.raises(DataArgumentError) as info:
        load(dataset, "train", tmp_path, **options)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_description_round_trips_and_refuses_damage():
    d = DataDescription("folder", "image folder", ["a", "b", "c"], (3, 32, 32), 1,
                        {"size": [32, 32], "channels": 3})
    again = DataDescription.from_json(json.loads(json.dumps(d.to_json())))
    assert again == d and again.describe() == "image folder: 3x32x32, 3 classes"
    for bad in ({}, {"dataset": "x", "classes": [], "shape": [1, 2, 3]},
                dict(d.to_json(), shape=[3, 32]), dict(d.to_json(), shape=[3, 32, -1]),
                dict(d.to_json(), labels_per_example=3), dict(d.to_json(), classes=[1, 2]),
                dict(d.to_json(), options={"size": [0, 3]}), dict(d.to_json(), options=[]),
                dict(d.to_json(), options={"size": [50, 50], "crop": [30, 30]}),
                dict(d.to_json(), options={"size": [32, 32], "channels": 1})):
        with pytest.raises(DataError, match="the data record"):
            DataDescription.from_json(bad)


# -------------------------------------------------------------------- IDX family


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist", "kmnist"])
def test_idx_datasets_and_their_classes(tmp_path, dataset):
    written = _make_dataset(tmp_path / dataset, compress=False)
    split = load(dataset, "test", tmp_path)
    assert split.images.shape == (20, 1, 28, 28) and split.labels.dtype == np.int64
    np.testing.assert_array_equal(split.labels, written["test"][1])
    assert split.info.classes == data.class_names(dataset)
    assert split.info.shape == (1, 28, 28) and split.info.dataset == dataset


def test_kmnist_in_torchvision_layout(tmp_path):
    written = _make_dataset(tmp_path / "KMNIST" / "raw", compress=True, seed=2)
    _, labels = data.load_split("kmnist", "train", tmp_path)
    np.testing.assert_array_equal(labels, written["train"][1])


def _emnist(folder, split_name, labels_by_split):
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, labels in labels_by_split.items():
        rng = np.random.default_rng(len(labels))
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        _write_idx(folder / f"emnist-{split_name}-{split}-images-idx3-ubyte", images, True)
        _write_idx(folder / f"emnist-{split_name}-{split}-labels-idx1-ubyte",
                   np.asarray(labels, dtype=np.uint8), True)
        written[split] = images
    return written


def test_emnist_splits_transpose_and_letters(tmp_path):
    written = _emnist(tmp_path / "emnist", "letters", {"train": [1, 26, 5], "test": [2, 3]})
    split = load("emnist", "train", tmp_path, emnist_split="letters")
    np.testing.assert_array_equal(split.labels, [0, 25, 4])  # 1..26 -> 0..25
    assert split.info.classes[0] == "a" and split.info.num_classes == 26
    assert split.info.options == {"emnist_split": "letters"}
    np.testing.assert_allclose(split.images[0, 0], written["train"][0].T / 255.0, rtol=1e-6)
    # balanced (the default) is another set of files: not there
    with pytest.raises(DataNotFoundError, match="emnist-balanced-train-images-idx3-ubyte"):
        load("emnist", "train", tmp_path)
    _emnist(tmp_path / "EMNIST" / "raw", "balanced", {"train": [0, 46], "test": [10]})
    split = load("emnist", "test", tmp_path)
    assert split.info.num_classes == 47 and split.info.classes[split.labels[0]] == "A"


# ------------------------------------------------------------------ other formats


def test_cifar10_from_a_data_root(tmp_path):
    written = _cifar_fixture(tmp_path / "cifar10", per_batch=2)
    train = load("cifar10", "train", tmp_path, verify=False)
    assert train.images.shape == (10, 3, 32, 32) and train.info.shape == (3, 32, 32)
    assert train.info.classes == list(formats.CIFAR10_CLASSES)
    np.testing.assert_array_equal(train.labels[:2], written["data_batch_1"][1])
    test = load("cifar10", "test", tmp_path / "cifar10" / "cifar-10-batches-py", verify=False)
    assert test.images.shape[0] == 2
    # the md5 sums are checked by default: the fixture is not the official file
    with pytest.raises(DataError, match="md5"):
        load("cifar10", "test", tmp_path)


def test_svhn_from_a_data_root(tmp_path):
    sio = pytest.importorskip("scipy.io")
    folder = tmp_path / "svhn"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 3)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8)
        sio.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
    split = load("svhn", "test", tmp_path, verify=False)
    assert split.images.shape == (3, 3, 32, 32) and split.labels.tolist() == [1, 2, 3]
    (folder / "train_32x32.mat").unlink()
    with pytest.raises(DataNotFoundError, match="lacks train_32x32.mat"):
        load("svhn", "test", tmp_path, verify=False)


def _norb_root(root, n=6):
    folder = root / "smallnorb"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for split, prefix in formats.SMALLNORB_PREFIX.items():
        dat = rng.integers(0, 256, size=(n, 2, 96, 96), dtype=np.uint8)
        cat = (np.arange(n) % 5).astype(np.int32)
        (folder / f"{prefix}-dat.mat").write_bytes(_norb_bytes(dat, formats.NORB_UINT8_MAGIC))
        (folder / f"{prefix}-cat.mat").write_bytes(_norb_bytes(cat, formats.NORB_INT32_MAGIC))
    return folder


def test_smallnorb_paper_recipe_and_options(tmp_path):
    _norb_root(tmp_path)
    train = load("smallnorb", "train", tmp_path, seed=4)
    assert train.images.shape == (6, 2, 32, 32) and train.info.shape == (2, 32, 32)
    assert train.info.classes == list(formats.SMALLNORB_CLASSES)
    assert train.info.options == {"size": [48, 48], "crop": [32, 32], "seed": 4}
    again = load("smallnorb", "train", tmp_path, seed=4)
    other = load("smallnorb", "train", tmp_path, seed=5)
    np.testing.assert_array_equal(train.images, again.images)  # crops from the seed
    assert not np.array_equal(train.images, other.images)
    test = load("smallnorb", "test", tmp_path)
    full = formats.read_smallnorb(tmp_path / "smallnorb", "test", size=48)[0]
    np.testing.assert_array_equal(test.images, full[:, :, 8:40, 8:40])  # the centre crop
    assert load("smallnorb", "test", tmp_path, size=24, crop=24).images.shape[1:] == (2, 24, 24)


def test_smallnorb_is_not_downloadable(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load("smallnorb", "train", download=True)
    assert "cannot download smallnorb" in str(info.value) and data.SMALLNORB_URL in str(info.value)


# ----------------------------------------------------------------- image folders


@pytest.fixture
def folder_root(tmp_path):
    """ROOT/{train,test}/{blue,green,red}/*.png: 32x32 colour images, 4 + 2 per class."""
    root = tmp_path / "shapes"
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for c, name in enumerate(("blue", "green", "red")):
            for i in range(n):
                img = rng.integers(0, 60, size=(32, 32, 3), dtype=np.uint8)
                img[8:24, 8:24, 2 - c] = 250
                _png(root / split / name / f"{i}.png", img)
    return root


def test_folder_dataset(folder_root):
    train, test = load_train_test("folder", folder_root, limit_train=6)
    assert train.images.shape == (6, 3, 32, 32) and test.images.shape == (6, 3, 32, 32)
    assert train.info.classes == ["blue", "green", "red"]
    assert train.labels.tolist() == [0, 1, 2, 0, 1, 2]  # a limit covers every class
    assert train.info.options == {"channels": 3}
    assert (train.images[train.labels == 2][:, 0, 12, 12] > 0.9).all()  # red is red
    grey = load("folder", "test", folder_root, size=16, channels=1)
    assert grey.images.shape == (6, 1, 16, 16)
    assert grey.info.options == {"size": [16, 16], "channels": 1}
    cropped = load("folder", "test", folder_root, size=20, crop=16)
    assert cropped.info.shape == (3, 16, 16)


def test_folder_errors(folder_root, tmp_path):
    with pytest.raises(DataArgumentError, match="pass --data-dir ROOT"):
        load("folder", "train")
    with pytest.raises(DataArgumentError, match="--download does not apply"):
        load("folder", "train", folder_root, download=True)
    # found by a review: a file given as the root was said not to exist; "32" was 3x2
    with pytest.raises(DataError, match=r"data directory .*notes\.txt is not a folder"):
        (tmp_path / "notes.txt").write_text("x")
        load("folder", "train", tmp_path / "notes.txt")
    with pytest.raises(DataArgumentError, match=r"must be a positive size .*got '32'"):
        load("folder", "train", folder_root, size="32")
    _png(folder_root / "test" / "red" / "big.png", np.zeros((40, 40, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="big.png.*pass a size"):
        load_train_test("folder", folder_root)
    (folder_root / "test" / "red" / "big.png").unlink()
    # the same size within each split, another between them: named, with the fix
    for path in (folder_root / "test").rglob("*.png"):
        _png(path, np.zeros((20, 20, 3), dtype=np.uint8))
    with pytest.raises(DataError) as info:
        load_train_test("folder", folder_root)
    message = str(info.value)
    assert "test images are 3x20x20 but the training images are 3x32x32" in message
    assert "--image-size" in message and "\n" not in message
    assert load_train_test("folder", folder_root, size=24)[1].info.shape == (3, 24, 24)
    for path in (folder_root / "test" / "green").iterdir():
        path.unlink()
    (folder_root / "test" / "green").rmdir()
    with pytest.raises(DataError, match="lacks class folder.*green"):
        load("folder", "train", folder_root)


# -------------------------------------------------------------- generated sets


def test_multimnist_from_the_mnist_files(mnist_root):
    a = load("multimnist", "train", mnist_root, limit=50, seed=3, keep_parts=True)
    assert a.images.shape == (50, 1, 36, 36) and a.labels.shape == (50, 2)
    assert (a.labels[:, 0] != a.labels[:, 1]).all()
    assert a.parts.shape == (50, 2, 1, 36, 36)
    np.testing.assert_array_equal(a.images, np.minimum(a.parts.sum(axis=1), 1.0))
    assert a.info.labels_per_example == 2 and a.info.shape == (1, 36, 36)
    assert a.info.options == {"seed": 3}
    b = load("multimnist", "train", mnist_root, limit=50, seed=3)
    assert a.images.tobytes() == b.images.tobytes() and b.parts is None  # same seed, bytes
    c = load("multimnist", "train", mnist_root, limit=50, seed=4)
    assert not np.array_equal(a.images, c.images)
    whole = load("multimnist", "train", mnist_root, seed=3)
    assert whole.images.shape[0] == 60  # one example per training digit by default
    np.testing.assert_array_equal(whole.images[:50], a.images)  # a limit is a prefix
    assert load("multimnist", "test", mnist_root, count=7).images.shape[0] == 7
    test = load("multimnist", "test", mnist_root, limit=50, seed=3)
    assert not np.array_equal(test.images[:30], a.images[:30])


def test_fresh_multimnist_draws_new_training_overlays_for_each_epoch(mnist_root, monkeypatch):
    monkeypatch.setattr(data, "MULTIMNIST_CHUNK", 16)
    fixed = load("multimnist", "train", mnist_root, limit=40, seed=3)
    fresh = load("multimnist", "train", mnist_root, limit=40, seed=3, fresh=True)
    assert fixed.for_epoch is None
    assert load("multimnist", "test", mnist_root, limit=40, seed=3, fresh=True).for_epoch is None
    np.testing.assert_array_equal(fresh.images, fixed.images)   # epoch 0: the usual set
    for name, got in zip(("images", "labels"), fresh.for_epoch(0)):
        np.testing.assert_array_equal(got, getattr(fixed, name))
    one, two = fresh.for_epoch(1), fresh.for_epoch(2)
    again = load("multimnist", "train", mnist_root, limit=40, seed=3, fresh=True).for_epoch(1)
    assert one[0].tobytes() == again[0].tobytes() and np.array_equal(one[1], again[1])
    for images, labels in (one, two):
        assert images.shape == (40, 1, 36, 36) and images.dtype == np.float32
        assert labels.shape == (40, 2) and (labels[:, 0] != labels[:, 1]).all()
        assert not np.array_equal(images, fixed.images)
    assert not np.array_equal(one[0], two[0])
    # In one chunk of an epoch, every training digit is a base digit once (the 60 digits
    # are 6 per class).
    monkeypatch.setattr(data, "MULTIMNIST_CHUNK", 60)
    whole = load("multimnist", "train", mnist_root, seed=3, fresh=True)
    for epoch in (0, 1, 5):
        assert np.bincount(whole.for_epoch(epoch)[1][:, 0]).tolist() == [6] * 10


@pytest.mark.parametrize("fresh_epoch", [None, 3])
def test_every_digit_is_a_base_equally_often_across_chunks(mnist_root, monkeypatch,
                                                           fresh_epoch):
    """Chunks of 16 of a 60-digit split: every digit is a base once in 60 examples, and
    twice or three times in 150 (a review found each chunk drawing its own permutation:
    in the default 60,000-example training set a third of the digits were never a base)."""
    from capsflow.runners import synthetic
    monkeypatch.setattr(data, "MULTIMNIST_CHUNK", 16)
    drawn = []

    def recording(*args, order=None, **kwargs):
        drawn.append(order)
        return synthetic_multimnist(*args, order=order, **kwargs)
    synthetic_multimnist = synthetic.multimnist
    monkeypatch.setattr(synthetic, "multimnist", recording)
    for count in (60, 150):
        drawn.clear()
        made = load("multimnist", "train", mnist_root, count=count, seed=5,
                    fresh=fresh_epoch is not None)
        labels = made.labels if fresh_epoch is None else made.for_epoch(fresh_epoch)[1]
        chunks = -(-count // 16)  # the last ones drawn (with fresh, after epoch 0's)
        bases = np.concatenate(drawn[-chunks:])[:count]
        uses = np.bincount(bases, minlength=60)
        assert uses.min() >= count // 60 and uses.max() <= -(-count // 60), uses
        assert np.array_equal(labels[:, 0], load("mnist", "train", mnist_root).labels[bases])
    assert np.bincount(labels[:60, 0]).tolist() == [6] * 10  # 6 digits of each class


def test_multimnist_chunks_keep_prefixes(mnist_root, monkeypatch):
    monkeypatch.setattr(data, "MULTIMNIST_CHUNK", 16)
    whole = load("multimnist", "train", mnist_root, count=40)
    part = load("multimnist", "train", mnist_root, limit=20)
    assert whole.images.shape[0] == 40
    np.testing.assert_array_equal(whole.images[:20], part.images)
    np.testing.assert_array_equal(whole.labels[:20], part.labels)


def test_affine_mnist(mnist_root):
    train = load("affine-mnist", "train", mnist_root, seed=1)
    test = load("affine-mnist", "test", mnist_root, seed=1)
    assert train.images.shape == (60, 1, 40, 40) and test.images.shape == (30, 1, 40, 40)
    assert "affNIST-like" in test.info.title and test.info.options == {"seed": 1}
    mnist_train = load("mnist", "train", mnist_root)
    # train: the digit itself, only moved: the same pixels in a bigger canvas
    np.testing.assert_allclose(np.sort(train.images[0].ravel())[-336:],
                               np.sort(mnist_train.images[0].ravel())[-336:])
    np.testing.assert_array_equal(train.labels, mnist_train.labels)
    again = load("affine-mnist", "test", mnist_root, seed=1, limit=10)
    assert again.images.tobytes() == test.images[:10].tobytes()


def test_generated_sets_need_mnist(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load("multimnist", "train", tmp_path)
    assert str(info.value).startswith("multimnist is generated from MNIST: mnist data not found")


# -------------------------------------------------------------- search, download


def test_explicit_data_dir_of_another_dataset_is_not_taken(tmp_path):
    _make_dataset(tmp_path / "kmnist", compress=False)
    with pytest.raises(DataNotFoundError):
        load("mnist", "test", tmp_path / "kmnist")
    _cifar_fixture(tmp_path / "c")
    with pytest.raises(DataNotFoundError):
        load("mnist", "test", tmp_path / "c" / "cifar-10-batches-py")


def test_download_lands_in_the_cache_and_is_found_later(tmp_path, monkeypatch):
    calls = []

    def fake_torchvision(info, root, train, download, **kwargs):
        calls.append((info.name, kwargs))
        _make_dataset(root / info.torchvision_class / "raw", compress=False, seed=6)

    monkeypatch.setattr(data, "_torchvision_dataset", fake_torchvision)
    with pytest.raises(DataNotFoundError, match="--download"):
        load("kmnist", "test")
    split = load("kmnist", "test", download=True)
    assert calls == [("kmnist", {})] and split.images.shape == (20, 1, 28, 28)
    load("kmnist", "train", download=True)  # found in the cache: no second download
    assert len(calls) == 1


def test_cifar10_download_through_torchvision(tmp_path, monkeypatch):
    def fake_download(cls_name, root, **kwargs):
        assert cls_name == "CIFAR10"
        _cifar_fixture(root, per_batch=1)

    monkeypatch.setattr(formats, "_torchvision_download", fake_download)
    split = load("cifar10", "train", download=True, verify=False)
    assert split.images.shape == (5, 3, 32, 32)
    assert (tmp_path / "cache" / "capsflow" / "data" / "cifar10" / "cifar-10-batches-py").is_dir()


# ------------------------------------------------------------------------ batches


def test_multi_hot_targets_and_any_image_shape():
    np.testing.assert_array_equal(one_hot(np.array([[1, 3], [0, 2]]), 4),
                                  [[0, 1, 0, 1], [1, 0, 1, 0]])
    rng = np.random.default_rng(0)
    images = np.zeros((10, 3, 32, 24), dtype=np.float32)
    images[:, :, 10:20, 8:16] = rng.random((10, 3, 10, 8))
    labels = np.stack([np.arange(10) % 5, (np.arange(10) + 1) % 5], axis=1)
    it = BatchIterator(images, labels, batch_size=4, augment_shift=3, rng=1, num_classes=5)
    batches = list(it)
    assert [x.shape for x, _ in batches] == [(4, 3, 32, 24)] * 2 + [(2, 3, 32, 24)]
    y = np.concatenate([y for _, y in batches])
    assert (y.sum(axis=1) == 2).all()
    np.testing.assert_allclose(sum(x.sum() for x, _ in batches), images.sum(), rtol=1e-5)
    with pytest.raises(DataArgumentError, match=r"labels \(N,\) or \(N, K\)"):
        BatchIterator(images, labels[:5], batch_size=2)


def test_derived_seeds_are_stable():
    assert data._derived_seed(0, "multimnist", "train", 0) == data._derived_seed(
        0, "multimnist", "train", 0)
    assert len({data._derived_seed(s, "x", sp) for s in range(3) for sp in ("a", "b")}) == 6


# ------------------------------------------------------------- the CLI, end to end

SMALL = ["--set", "routing_iters=1", "--set", "conv1_maps=16", "--set", "primary_types=4",
         "--no-progress"]
FIXED_GRAPH = """\
name: fixed
inputs:
  x: {shape: [N, 1, 28, 28]}
  y: {shape: [N, 10], optional: true}
params:
  w: {shape: [784, 10], init: {uniform_fan_in: 784}}
  b: {shape: [10], init: zeros}
nodes:
  - {id: x_flat, op: reshape, in: [x], attrs: {shape: [-1, 784]}}
  - {id: lengths, op: linear, in: [x_flat, w, b]}
  - {id: margin, op: margin_loss, in: [lengths, y]}
  - {id: loss, op: mean, in: [margin]}
outputs:
  loss: loss
  lengths: lengths
"""


def one_line(capsys, *argv) -> str:
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2, err
    assert err.startswith(f"capsflow {argv[0]}: error: ") and "\n" not in err, err
    return err


def test_multimnist_run_reports_the_papers_measure(mnist_root, tmp_path, capsys):
    from conftest import CAPSNET
    from capsflow.runners.training import read_checkpoint, read_metrics
    run = tmp_path / "run"
    rc, out, err = run_cli(capsys, "train", CAPSNET, "--dataset", "multimnist", "--data-dir",
                           mnist_root, "--limit-train", "20", "--limit-test", "10", "--bs", "10",
                           "--num_epochs", "1", "--save_dir", run, *SMALL)
    assert rc == 0, err
    assert "on MultiMNIST (generated): 1x36x36, 10 classes" in out
    assert "the paper's MultiMNIST measure" in out and "two longest capsules" in out
    ckpt = read_checkpoint(run / "last.npz")
    assert ckpt.overrides["height"] == 36 and ckpt.overrides["width"] == 36
    assert ckpt.data.labels_per_example == 2 and ckpt.data.options == {"seed": 0}
    epoch = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "epoch"][0]
    assert 0 <= epoch["test_acc"] <= 1
    rc, out, err = run_cli(capsys, "eval", CAPSNET, "--checkpoint", run / "last.npz",
                           "--limit-test", "10")
    assert rc == 0, err
    assert "multimnist test split (MultiMNIST (generated): 1x36x36, 10 classes), 10 examples" in out
    head = out.splitlines()[1]
    assert head.startswith("test accuracy (the paper's MultiMNIST measure: the two longest "
                           "capsules are the two digits): ")
    assert f"{100 * epoch['test_acc']:.2f}%" in head and "at least one digit found" in head


def test_fresh_multimnist_trains_on_new_overlays_each_epoch_and_resumes_exactly(
        mnist_root, tmp_path, capsys):
    """Epoch 1 is the fixed set's, epoch 2 is not; a run stopped in the middle of epoch 2
    and resumed ends where 2 uninterrupted epochs do (it draws epoch 2's overlays again,
    not epoch 1's). compare takes the flag too."""
    from conftest import CAPSNET, ctrl_c_in_call
    from capsflow.runners.training import read_checkpoint, read_metrics

    def train(name, *extra):
        rc, _, err = run_cli(capsys, "train", CAPSNET, "--dataset", "multimnist", "--data-dir",
                             mnist_root, "--limit-train", "20", "--limit-test", "10", "--bs",
                             "10", "--save_dir", tmp_path / name, *SMALL, *extra)
        assert rc == 0, err
        return read_checkpoint(tmp_path / name / "last.npz")

    def losses(name):
        return [r["train_loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")
                if r["kind"] == "epoch"]

    fixed = train("fixed", "--num_epochs", "2")
    whole = train("whole", "--num_epochs", "2", "--multimnist-fresh")
    assert whole.meta["config"]["multimnist_fresh"] is True
    assert losses("whole")[0] == losses("fixed")[0] and losses("whole")[1] != losses("fixed")[1]
    train("split", "--num_epochs", "1", "--multimnist-fresh")
    last = tmp_path / "split" / "last.npz"
    with ctrl_c_in_call(2):
        rc, _, err = run_cli(capsys, "train", CAPSNET, "--resume", last, "--num_epochs", "2")
    assert rc == 130, err
    assert read_checkpoint(last).meta["progress"]["iteration"] == 3      # epoch 2, step 1
    split = train("split", "--num_epochs", "2", "--resume", last)
    assert losses("split") == losses("whole")
    for name in whole.params:
        np.testing.assert_array_equal(split.params[name], whole.params[name], err_msg=name)
    assert not np.array_equal(fixed.params["digit.W"], whole.params["digit.W"])
    rc, _, err = run_cli(capsys, "compare", CAPSNET, "--dataset", "multimnist",
                         "--multimnist-fresh", "--data-dir", mnist_root, "--limit-train", "20",
                         "--limit-test", "10", "--bs", "10", "--num_epochs", "2", "--out",
                         tmp_path / "compare", *SMALL)
    assert rc == 0, err
    err = one_line(capsys, "train", CAPSNET, "--data-dir", mnist_root, "--multimnist-fresh",
                   "--save_dir", tmp_path / "mnist", "--no-progress")
    assert "--multimnist-fresh does not apply to mnist (only to multimnist)" in err


def test_a_model_trained_on_translated_mnist_is_evaluated_on_affnist(mnist_root, tmp_path,
                                                                    capsys):
    """The paper's affine test: train on affine-mnist, evaluate on affNIST's test.mat
    (a fixture in affNIST's layout); affnist has no training split."""
    sio = pytest.importorskip("scipy.io")
    from conftest import CAPSNET
    from test_formats import write_affnist
    affnist = tmp_path / "aff" / "affnist"
    affnist.mkdir(parents=True)
    rng = np.random.default_rng(5)
    write_affnist(affnist / "test.mat", rng.integers(0, 256, (12, 40, 40), dtype=np.uint8),
                  np.arange(12, dtype=np.uint8) % 10, sio)
    run = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", CAPSNET, "--dataset", "affine-mnist", "--data-dir",
                         mnist_root, "--limit-train", "10", "--limit-test", "10", "--bs", "10",
                         "--num_epochs", "1", "--save_dir", run, *SMALL)
    assert rc == 0, err
    rc, out, err = run_cli(capsys, "eval", CAPSNET, "--checkpoint", run / "last.npz",
                           "--dataset", "affnist", "--data-dir", tmp_path / "aff")
    assert rc == 0, err
    assert "affnist test split (affNIST (transformed test set): 1x40x40, 10 classes), 12 " \
           "examples" in out, out
    err = one_line(capsys, "train", CAPSNET, "--dataset", "affnist", "--data-dir",
                   tmp_path / "aff", "--save_dir", tmp_path / "bad", "--no-progress")
    assert "affnist is a test set, with no training split: train on affine-mnist" in err
    err = one_line(capsys, "eval", CAPSNET, "--checkpoint", run / "last.npz", "--dataset",
                   "affnist", "--data-dir", mnist_root)
    assert "affnist data not found in --data-dir" in err and "test.mat" in err


def test_generated_or_resized_sets_too_big_for_memory_are_one_line(mnist_root, folder_root,
                                                                   tmp_path, capsys,
                                                                   monkeypatch):
    """Refused before anything is made or allocated (a pretend 1 GiB machine)."""
    from conftest import CAPSNET
    monkeypatch.setattr("capsflow.core.memory.physical_memory", lambda: 2**30)
    err = one_line(capsys, "train", CAPSNET, "--dataset", "multimnist", "--multimnist-count",
                   "300000", "--data-dir", mnist_root, "--save_dir", tmp_path / "a", *SMALL)
    assert ("multimnist's train split: 300,000 images of 1x36x36 need 1.4 GiB as float32, "
            "more than this machine's 1.0 GiB of memory; use a smaller --multimnist-count "
            "or --limit-train") in err
    err = one_line(capsys, "train", CAPSNET, "--dataset", "folder", "--image-size", "3000",
                   "--data-dir", folder_root, "--save_dir", tmp_path / "b", *SMALL)
    assert (f"{folder_root / 'train'}: 12 images of 3x3000x3000 need 1.2 GiB as float32, "
            f"more than this machine's 1.0 GiB of memory; use a smaller --image-size or "
            f"--crop") in err


def test_the_papers_measure_counts_both_digits():
    from capsflow.runners.training import correct_predictions
    scores = np.array([[0.9, 0.8, 0.1], [0.9, 0.1, 0.8], [0.2, 0.9, 0.8]])
    pairs = one_hot(np.array([[0, 1], [0, 1], [2, 1]]), 3)
    assert correct_predictions(scores, pairs).tolist() == [True, False, True]
    singles = one_hot(np.array([0, 2, 1]), 3)
    assert correct_predictions(scores, singles).tolist() == [True, False, True]


def test_graph_that_cannot_take_the_data_is_one_line(folder_root, tmp_path, capsys):
    from conftest import CAPSNET
    graph = tmp_path / "fixed.yaml"
    graph.write_text(FIXED_GRAPH)
    err = one_line(capsys, "train", graph, "--dataset", "folder", "--data-dir", folder_root,
                   "--save_dir", tmp_path / "a", "--no-progress")
    assert "takes 1x28x28 images (input 'x') but --dataset folder has 3x32x32" in err
    assert "declares none of the vars channels, height, width, classes" in err
    err = one_line(capsys, "train", graph, "--dataset", "folder", "--data-dir", folder_root,
                   "--channels", "1", "--image-size", "28", "--save_dir", tmp_path / "b",
                   "--no-progress")
    assert "scores 10 classes but --dataset folder has 3" in err
    err = one_line(capsys, "train", CAPSNET, "--dataset", "folder", "--data-dir", folder_root,
                   "--set", "channels=1", "--save_dir", tmp_path / "c", "--no-progress")
    assert "--set channels=1 contradicts --dataset folder (image folder: 3x32x32" in err
    assert not (tmp_path / "c").exists()


def test_bad_data_through_the_cli_is_one_line(folder_root, mnist_root, tmp_path, capsys):
    from conftest import CAPSNET
    train = ["train", CAPSNET, "--save_dir", tmp_path / "run", "--no-progress"]
    err = one_line(capsys, *train, "--dataset", "folder")
    assert "--dataset folder reads your own images: pass --data-dir ROOT" in err
    err = one_line(capsys, *train, "--dataset", "mnist", "--data-dir", mnist_root,
                   "--image-size", "32")
    assert "--image-size does not apply to mnist" in err
    err = one_line(capsys, *train, "--dataset", "folder", "--data-dir", folder_root,
                   "--image-size", "0")
    assert "--image-size must be a size N or HxW" in err
    _png(folder_root / "train" / "red" / "odd.png", np.zeros((20, 20, 3), dtype=np.uint8))
    err = one_line(capsys, *train, "--dataset", "folder", "--data-dir", folder_root)
    assert "odd.png" in err and "pass a size" in err
    images = mnist_root / "mnist" / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(8)))  # a labels magic
    err = one_line(capsys, *train, "--dataset", "mnist", "--data-dir", mnist_root)
    assert f"{images}: magic number 0x00000801 is not 0x00000803" in err
    assert not (tmp_path / "run").exists()


def test_resume_on_other_data_is_one_line(folder_root, tmp_path, capsys):
    from conftest import CAPSNET
    from capsflow.runners.training import read_checkpoint
    run = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", CAPSNET, "--dataset", "folder", "--data-dir",
                         folder_root, "--bs", "6", "--num_epochs", "1", "--save_dir", run, *SMALL)
    assert rc == 0, err
    # the overrides are what one would --set: the derived sizes (grid_h, pixels...) follow
    assert read_checkpoint(run / "last.npz").overrides == {
        "channels": 3, "height": 32, "width": 32, "classes": 3, "conv1_maps": 16,
        "primary_types": 4, "routing_iters": 1}
    resume = ["train", CAPSNET, "--resume", run / "last.npz", "--num_epochs", "2",
              "--no-progress"]
    err = one_line(capsys, *resume, "--image-size", "30")
    assert "--image-size [30, 30] differs from the value None" in err
    for split in ("train", "test"):
        _png(folder_root / split / "yellow" / "0.png", np.zeros((32, 32, 3), dtype=np.uint8))
    err = one_line(capsys, *resume)
    assert ("was trained on image folder: 3x32x32, 3 classes (blue, green, red), the data "
            "are now image folder: 3x32x32, 4 classes (blue, green, red, yellow)") in err
