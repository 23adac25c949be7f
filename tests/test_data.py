"""Dataset loading (synthetic IDX files, real MNIST when present) and BatchIterator."""
from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from capsflow.runners import data
from capsflow.runners.data import BatchIterator, DataError, load_split, shift_images

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No user cache, env var or system folder leaks into (or out of) a test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CAPSFLOW_DATA", raising=False)
    monkeypatch.setattr(data, "SYSTEM_ROOT", tmp_path / "system")


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """IDX: magic (0, 0, 0x08 = uint8, ndim), big-endian uint32 dims, then the bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def _make_split(n: int, seed: int):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0] = 255  # guarantees the value 1.0 shows up
    images[1] = 0
    labels = (np.arange(n) + seed) % 10
    return images, labels.astype(np.uint8)


def _make_dataset(folder: Path, compress: bool, n_train: int = 50, n_test: int = 20,
                  seed: int = 0) -> dict:
    """Write the four IDX files into ``folder``; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for offset, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        images, labels = _make_split(n, seed + offset)
        image_name, label_name = FILES[split]
        _write_idx(folder / image_name, images, compress)
        _write_idx(folder / label_name, labels, compress)
        written[split] = (images, labels)
    return written


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
def test_load_split_from_root(tmp_path, compress, split):
    root = tmp_path / "root"
    written = _make_dataset(root / "mnist", compress)
    images, labels = load_split("mnist", split, data_dir=root)
    raw_images, raw_labels = written[split]
    assert images.shape == (raw_images.shape[0], 1, 28, 28)
    assert images.dtype == np.float32 and images.flags.c_contiguous
    assert labels.dtype == np.int64 and labels.shape == (raw_labels.shape[0],)
    assert images.min() == 0.0 and images.max() == 1.0
    np.testing.assert_allclose(images[:, 0], raw_images / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(labels, raw_labels)


def test_limit_keeps_first_examples(tmp_path):
    written = _make_dataset(tmp_path / "mnist", compress=True)
    images, labels = load_split("mnist", "train", data_dir=tmp_path, limit=7)
    assert images.shape == (7, 1, 28, 28) and labels.shape == (7,)
    assert images.flags.c_contiguous
    np.testing.assert_array_equal(labels, written["train"][1][:7])


def test_data_dir_may_be_the_dataset_folder(tmp_path):
    written = _make_dataset(tmp_path / "my-digits", compress=False)
    _, labels = load_split("mnist", "test", data_dir=tmp_path / "my-digits")
    np.testing.assert_array_equal(labels, written["test"][1])


def test_other_datasets_folder_is_not_taken_for_this_one(tmp_path):
    _make_dataset(tmp_path / "fashion-mnist", compress=False)
    with pytest.raises(DataError):
        load_split("mnist", "test", data_dir=tmp_path / "fashion-mnist")


def test_torchvision_layout_is_accepted(tmp_path):
    written = _make_dataset(tmp_path / "FashionMNIST" / "raw", compress=False, seed=3)
    _, labels = load_split("fashion-mnist", "train", data_dir=tmp_path)
    np.testing.assert_array_equal(labels, written["train"][1])


def test_env_var_then_user_cache(tmp_path, monkeypatch):
    from_cache = _make_dataset(tmp_path / "cache" / "capsflow" / "data" / "mnist", True, seed=1)
    _, labels = load_split("mnist", "test")
    np.testing.assert_array_equal(labels, from_cache["test"][1])

    from_env = _make_dataset(tmp_path / "envroot" / "mnist", True, seed=5)
    monkeypatch.setenv("CAPSFLOW_DATA", str(tmp_path / "envroot"))
    _, labels = load_split("mnist", "test")
    np.testing.assert_array_equal(labels, from_env["test"][1])


def test_fashion_falls_back_to_system_folder(tmp_path):
    written = _make_dataset(tmp_path / "system" / "fashion-mnist", compress=True, seed=2)
    _, labels = load_split("fashion-mnist", "test")  # (an explicit data_dir is used alone)
    np.testing.assert_array_equal(labels, written["test"][1])


def test_changed_source_is_staged_again(tmp_path):
    _make_dataset(tmp_path / "mnist", compress=True, seed=0)
    first = load_split("mnist", "test", data_dir=tmp_path)[1]
    written = _make_dataset(tmp_path / "mnist", compress=True, seed=4)
    later = os.stat(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").st_mtime + 10
    for path in (tmp_path / "mnist").iterdir():
        os.utime(path, (later, later))
    second = load_split("mnist", "test", data_dir=tmp_path)[1]
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(second, written["test"][1])


def test_missing_data_error_lists_searched_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSFLOW_DATA", str(tmp_path / "env-root"))
    with pytest.raises(DataError) as info:
        load_split("mnist", "train")
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, FileNotFoundError)
    for folder in (tmp_path / "env-root" / "mnist",
                   tmp_path / "cache" / "capsflow" / "data" / "mnist"):
        assert str(folder) in message
    assert "--data-dir" in message and "CAPSFLOW_DATA" in message


def test_nonexistent_data_dir_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_split("mnist", "train", data_dir=tmp_path / "typo")


def test_corrupt_gzip_is_a_data_error(tmp_path):
    _make_dataset(tmp_path / "mnist", compress=True)
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="t10k-images"):
        load_split("mnist", "test", data_dir=tmp_path)


@pytest.mark.parametrize("kwargs, word", [
    ({"dataset": "imagenet", "split": "train"}, "fashion-mnist"),  # (cifar10 is one now)
    ({"dataset": "mnist", "split": "valid"}, "test"),
])
def test_bad_arguments_name_the_choices(tmp_path, kwargs, word):
    with pytest.raises(ValueError, match=word):
        load_split(data_dir=tmp_path, **kwargs)


# ----------------------------------------------------------------------- batches


def _toy(n: int = 10, seed: int = 0):
    """Images with a small blob well inside the frame (mass survives a 2-pixel shift)."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 1, 28, 28), dtype=np.float32)
    images[:, :, 10:18, 9:19] = rng.random((n, 1, 8, 10), dtype=np.float32)
    labels = np.arange(n) % 10
    return images, labels


def _epoch(it: BatchIterator) -> list:
    return [(x.copy(), y.copy()) for x, y in it]


@pytest.mark.parametrize("bad, said", [
    (np.array([0, 1, -1, 2]), r"\[0, 10\).*from -1 to 2"),
    (np.array([0, 10, 3, 2]), r"\[0, 10\).*from 0 to 10"),
    (np.array([0.0, 1.5, 2.0, 3.0]), "whole class numbers"),
    (np.array([0.0, np.nan, 2.0, 3.0]), "whole class numbers"),
    (np.array(["0", "1", "2", "3"]), "whole class numbers"),
])
def test_labels_outside_the_classes_are_refused(bad, said):
    # -1 was the last class's one-hot, 10 an IndexError in the middle of an epoch.
    images, labels = _toy(4)
    with pytest.raises(data.DataArgumentError, match=said):
        BatchIterator(images, bad, batch_size=2)
    it = BatchIterator(images, labels, batch_size=2)
    with pytest.raises(data.DataArgumentError, match=said):
        it.replace_examples(images, bad)
    whole = BatchIterator(images, labels.astype(np.float64), batch_size=4, shuffle=False,
                          augment_shift=0)
    np.testing.assert_array_equal(next(iter(whole))[1].argmax(1), labels)


def test_batches_shapes_and_one_hot():
    images, labels = _toy(10)
    it = BatchIterator(images, labels, batch_size=4, shuffle=False, augment_shift=0)
    batches = _epoch(it)
    assert len(it) == 3 and len(batches) == 3
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]
    for x, y in batches:
        assert x.dtype == np.float32 and x.flags.c_contiguous and x.shape[1:] == (1, 28, 28)
        assert y.dtype == np.float32 and y.shape[1] == 10
        np.testing.assert_array_equal(y.sum(axis=1), 1.0)
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), images)
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]).argmax(1), labels)


def test_drop_last():
    images, labels = _toy(10)
    it = BatchIterator(images, labels, batch_size=4, drop_last=True, rng=0)
    assert len(it) == 2 and [x.shape[0] for x, _ in it] == [4, 4]


def test_re_iterable_with_new_order_each_epoch():
    images, labels = _toy(10)
    it = BatchIterator(images, labels, batch_size=3, shuffle=True, augment_shift=0, rng=1)
    orders = []
    for _ in range(3):
        ys = [y.argmax(1) for _, y in it]
        assert len(ys) == 4
        order = np.concatenate(ys)
        assert sorted(order.tolist()) == sorted(labels.tolist())
        orders.append(order)
    assert any(not np.array_equal(orders[0], o) for o in orders[1:])


def test_shift_keeps_mass_and_moves_content():
    images, labels = _toy(64)
    it = BatchIterator(images, labels, batch_size=64, shuffle=False, augment_shift=2, rng=3)
    (x, _), = list(it)
    np.testing.assert_allclose(x.sum(axis=(1, 2, 3)), images.sum(axis=(1, 2, 3)), rtol=1e-5)
    moved = [not np.array_equal(a, b) for a, b in zip(x, images)]
    assert sum(moved) > 40  # 24 of 25 offsets move the image


def test_shift_images_direction_and_zero_fill():
    image = np.zeros((1, 1, 28, 28), dtype=np.float32)
    image[0, 0, 0, 0] = 1.0  # at the border: a shift up/left pushes it out
    image[0, 0, 5, 7] = 2.0
    down_right = shift_images(image, np.array([[2, 1]]), 2)
    assert down_right[0, 0, 7, 8] == 2.0 and down_right[0, 0, 2, 1] == 1.0
    assert down_right.sum() == 3.0
    up_left = shift_images(image, np.array([[-1, -2]]), 2)
    assert up_left[0, 0, 4, 5] == 2.0 and up_left.sum() == 2.0
    np.testing.assert_array_equal(shift_images(image, np.zeros((1, 2), int), 2), image)


def test_flips_mirror_about_half_the_examples_left_to_right():
    images, labels = _toy(200)
    flipping = BatchIterator(images, labels, batch_size=200, shuffle=False, augment_shift=0,
                             rng=3, augment_flip=True)
    (x, y), = list(flipping)
    mirrored = np.array([np.array_equal(a, b[:, :, ::-1]) and not np.array_equal(a, b)
                         for a, b in zip(x, images)])
    kept = np.array([np.array_equal(a, b) for a, b in zip(x, images)])
    assert (mirrored | kept).all() and 70 < mirrored.sum() < 130
    np.testing.assert_array_equal(y.argmax(1), labels)
    (again, _), = list(flipping)
    assert not np.array_equal(again, x)                     # each epoch mirrors others
    # Flips are drawn after the order and the shifts, which stay as without flips: the
    # examples left unmirrored are the very batches of a run without --flip.
    shifted = BatchIterator(images, labels, batch_size=200, shuffle=True, augment_shift=2, rng=4)
    both = BatchIterator(images, labels, batch_size=200, shuffle=True, augment_shift=2, rng=4,
                         augment_flip=True)
    (xs, ys), = list(shifted)
    (xb, yb), = list(both)
    np.testing.assert_array_equal(ys, yb)
    unchanged = sum(np.array_equal(a, b) for a, b in zip(xs, xb))
    assert 70 < unchanged < 130


def _assert_same(batches_a: list, batches_b: list) -> None:
    assert len(batches_a) == len(batches_b)
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_same_seed_same_batches():
    images, labels = _toy(20)
    a = BatchIterator(images, labels, batch_size=6, rng=7)
    b = BatchIterator(images, labels, batch_size=6, rng=np.random.default_rng(7))
    _assert_same(_epoch(a), _epoch(b))
    _assert_same(_epoch(a), _epoch(b))


def test_resume_between_epochs():
    images, labels = _toy(20)
    straight = BatchIterator(images, labels, batch_size=6, rng=11)
    reference = [_epoch(straight) for _ in range(3)]

    first = BatchIterator(images, labels, batch_size=6, rng=11)
    _epoch(first)
    saved = json.loads(json.dumps(first.get_state()))  # must survive JSON
    resumed = BatchIterator(images, labels, batch_size=6, rng=999)
    resumed.set_state(saved)
    _assert_same(_epoch(resumed), reference[1])
    _assert_same(_epoch(resumed), reference[2])


def test_resume_mid_epoch():
    images, labels = _toy(20)
    straight = BatchIterator(images, labels, batch_size=6, rng=5)
    reference = [_epoch(straight) for _ in range(2)]

    first = BatchIterator(images, labels, batch_size=6, rng=5)
    seen = []
    for x, y in first:
        seen.append((x.copy(), y.copy()))
        if len(seen) == 2:
            saved = json.loads(json.dumps(first.get_state()))
            break
    resumed = BatchIterator(images, labels, batch_size=6, rng=0)
    resumed.set_state(saved)
    _assert_same(seen + _epoch(resumed), reference[0])
    _assert_same(_epoch(resumed), reference[1])


# ------------------------------------------------------------------ real datasets

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="shared/data/mnist not present")
def test_real_mnist_test_split():
    images, labels = load_split("mnist", "test", data_dir=SHARED_DATA)
    assert images.shape == (10000, 1, 28, 28) and images.dtype == np.float32
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert np.bincount(labels, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert images.min() == 0.0 and images.max() == 1.0


@pytest.mark.skipif(not SYSTEM_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split_from_system_folder(monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_ROOT", SYSTEM_FASHION.parent)
    images, labels = load_split("fashion-mnist", "test", limit=None)
    assert images.shape == (10000, 1, 28, 28)
    assert np.bincount(labels, minlength=10).tolist() == [1000] * 10


def test_download_only_when_asked_and_failure_is_one_line(tmp_path, monkeypatch):
    calls = []

    def offline(info, root, train, download):
        calls.append(download)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://x/, got:\n"
                           "<urlopen error [Errno -2] Name or service not known>\n")

    monkeypatch.setattr(data, "_torchvision_dataset", offline)
    with pytest.raises(DataError):
        load_split("mnist", "test")
    assert calls == []
    with pytest.raises(DataError) as info:
        load_split("mnist", "test", download=True)
    assert calls == [True]
    message = str(info.value)
    assert "\n" not in message and "Name or service not known" in message
    assert str(tmp_path / "cache" / "capsflow" / "data") in message


def test_sizes_that_cannot_fit_in_memory_are_one_line_before_any_allocation(monkeypatch):
    """A hostile --multimnist-count, --image-size or crop is refused before anything is
    allocated (here against a pretend 1 GiB machine)."""
    monkeypatch.setattr("capsflow.core.memory.physical_memory", lambda: 2**30)
    data.check_fits_in_memory(1000, (1, 36, 36), "small", "hint")     # 5 MB: fine
    with pytest.raises(data.DataArgumentError) as err:
        data.check_fits_in_memory(10**9, (1, 36, 36), "multimnist's train split",
                                  "use a smaller --multimnist-count or --limit-train")
    assert str(err.value) == (
        "multimnist's train split: 1,000,000,000 images of 1x36x36 need 4,828.0 GiB as "
        "float32, more than this machine's 1.0 GiB of memory; use a smaller "
        "--multimnist-count or --limit-train")
    with pytest.raises(data.DataArgumentError, match="need 14,483.9 GiB"):
        data.check_fits_in_memory(10**9, (1, 36, 36), "parts", "hint", copies=3)
    monkeypatch.setattr("capsflow.core.memory.physical_memory", lambda: None)  # unknown: no refusal
    data.check_fits_in_memory(10**12, (1, 36, 36), "any", "hint")
