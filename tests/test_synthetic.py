"""runners/synthetic.py: MultiMNIST, padded-and-translated MNIST, the affine
(generated, affNIST-like) set and the batch picture; determinism, recipes, speed."""
from __future__ import annotations

import time

import numpy as np
import pytest

from capsflow.runners import synthetic
from capsflow.runners.data import DataArgumentError
from capsflow.runners.synthetic import (
    affine_test_set, affine_warp, multimnist, pad_and_translate, save_batch_grid)


@pytest.fixture(scope="module")
def digits():
    """600 fake 28x28 'digits': a random blob inside the central 20x20 box, as MNIST's,
    classes 0..9 in a shuffled order."""
    rng = np.random.default_rng(0)
    n = 600
    images = np.zeros((n, 1, 28, 28), dtype=np.float32)
    sizes = rng.integers(6, 20, size=(n, 2))
    for i, (h, w) in enumerate(sizes):
        top, left = 4 + (20 - h) // 2, 4 + (20 - w) // 2
        images[i, 0, top:top + h, left:left + w] = rng.random((h, w), dtype=np.float32) * 0.9 + 0.1
    labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
    return images, labels


def _box(image):
    rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
    return rows[0], rows[-1], cols[0], cols[-1]


# ----------------------------------------------------------------------- MultiMNIST


def test_multimnist_recipe(digits):
    images, labels = digits
    x, pair, parts = multimnist(images, labels, count=1500, seed=3)
    assert x.shape == (1500, 1, 36, 36) and x.dtype == np.float32 and x.flags.c_contiguous
    assert pair.shape == (1500, 2) and pair.dtype == np.int64
    assert parts.shape == (1500, 2, 1, 36, 36) and parts.dtype == np.float32
    assert (pair[:, 0] != pair[:, 1]).all()
    np.testing.assert_array_equal(x, np.minimum(parts[:, 0] + parts[:, 1], 1))  # add, clip
    assert 0 <= x.min() and x.max() <= 1
    # Each part is one input digit of its class, shifted by at most 4 from the centre.
    sums = images.sum(axis=(1, 2, 3))
    for i in range(0, 1500, 37):
        for k in range(2):
            part = parts[i, k, 0]
            match = np.flatnonzero(np.isclose(sums, part.sum(), rtol=1e-6))
            found = [j for j in match if labels[j] == pair[i, k]]
            assert found, "part is not an input digit of its class"
            src_top, _, src_left, _ = _box(images[found[0], 0])
            top, _, left, _ = _box(part)
            dy, dx = top - (src_top + 4), left - (src_left + 4)
            assert -4 <= dy <= 4 and -4 <= dx <= 4
            window = part[4 + dy:32 + dy, 4 + dx:32 + dx]
            np.testing.assert_array_equal(window, images[found[0], 0])


def test_multimnist_base_digits_used_evenly(digits):
    images, labels = digits
    _, pair, parts = multimnist(images, labels, count=1800, seed=1)  # 3 x 600
    # A digit's pixel sum (float64, rounded) names it: the 600 sums are distinct.
    sums = np.round(images.sum(axis=(1, 2, 3), dtype=np.float64), 4)
    assert np.unique(sums).size == 600
    base = np.round(parts[:, 0].sum(axis=(1, 2, 3), dtype=np.float64), 4)
    used, counts = np.unique(base, return_counts=True)
    assert np.array_equal(used, np.unique(sums)) and (counts == 3).all()
    # Top classes: every other class shows up for each base class.
    for c in range(10):
        tops = set(pair[pair[:, 0] == c, 1].tolist())
        assert tops == set(range(10)) - {c}


def test_multimnist_deterministic(digits):
    images, labels = digits
    a = multimnist(images, labels, count=300, seed=7)
    b = multimnist(images, labels, count=300, seed=7)
    c = multimnist(images, labels, count=300, seed=8)
    for u, v in zip(a, b):
        assert u.tobytes() == v.tobytes()
    assert a[0].tobytes() != c[0].tobytes()


def test_multimnist_arguments(digits):
    images, labels = digits
    with pytest.raises(DataArgumentError, match="does not fit a 36x36 canvas"):
        multimnist(images, labels, 10, seed=0, shift=5)
    with pytest.raises(DataArgumentError, match="at least two classes"):
        multimnist(images[:5], np.zeros(5, np.int64), 10, seed=0)
    with pytest.raises(DataArgumentError, match="labels must be integers"):
        multimnist(images, labels[:-1], 10, seed=0)
    x, _, _ = multimnist(images[:, 0], labels, 4, seed=0, shift=2, size=40)  # (N, H, W) too
    assert x.shape == (4, 1, 40, 40)


def test_multimnist_speed(digits):
    images, labels = digits
    start = time.perf_counter()
    multimnist(np.tile(images, (17, 1, 1, 1)), np.tile(labels, 17), count=10000, seed=0)
    assert time.perf_counter() - start < 5


# --------------------------------------------------------- translated / affine MNIST


def test_pad_and_translate(digits):
    images, _ = digits
    x = pad_and_translate(images, seed=2)
    assert x.shape == (600, 1, 40, 40) and x.dtype == np.float32
    np.testing.assert_allclose(x.sum(axis=(1, 2, 3)), images.sum(axis=(1, 2, 3)), rtol=1e-6)
    assert x.tobytes() == pad_and_translate(images, seed=2).tobytes()
    # Offsets cover 0..12 on each axis: the digit's box moves over the whole canvas.
    tops = np.array([_box(x[i, 0])[0] - _box(images[i, 0])[0] for i in range(600)])
    assert tops.min() == 0 and tops.max() == 12
    with pytest.raises(DataArgumentError, match="smaller than"):
        pad_and_translate(images, seed=0, size=20)


def test_affine_warp_exact_cases():
    rng = np.random.default_rng(5)
    image = rng.random((1, 7, 9), dtype=np.float32)
    identity = np.array([[[1.0, 0, 0], [0, 1.0, 0]]])
    np.testing.assert_array_equal(affine_warp(image, identity, (7, 9))[0, 0], image[0])
    # Output (x, y) reads input (x - 2, y - 1): a shift right by 2, down by 1.
    shift = np.array([[[1.0, 0, -2], [0, 1.0, -1]]])
    out = affine_warp(image, shift, (7, 9))[0, 0]
    np.testing.assert_array_equal(out[1:, 2:], image[0, :-1, :-2])
    assert not out[0].any() and not out[:, :2].any()
    # Half a pixel right: the mean of horizontal neighbours.
    half = np.array([[[1.0, 0, -0.5], [0, 1.0, 0]]])
    out = affine_warp(image, half, (7, 9))[0, 0]
    np.testing.assert_allclose(out[:, 1:], (image[0, :, 1:] + image[0, :, :-1]) / 2, atol=1e-6)
    # A quarter turn about the centre of a square image equals np.rot90.
    square = rng.random((1, 8, 8), dtype=np.float32)
    c = 3.5  # the centre of 0..7
    rot = np.array([[[0.0, -1, 2 * c], [1, 0, 0]]])  # x_in = 7 - y, y_in = x
    np.testing.assert_allclose(affine_warp(square, rot, 8)[0, 0], np.rot90(square[0]), atol=1e-6)


def test_affine_test_set(digits):
    images, labels = digits
    x, y = affine_test_set(images, labels, seed=4)
    assert x.shape == (600, 1, 40, 40) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.tolist() == labels.tolist() and y is not labels
    assert 0 <= x.min() and x.max() <= 1
    assert x.tobytes() == affine_test_set(images, labels, seed=4)[0].tobytes()
    assert x.tobytes() != affine_test_set(images, labels, seed=5)[0].tobytes()
    # Area scales by sx * sy in 0.64..1.44 (bilinear keeps the mass of a translation).
    ratio = x.sum(axis=(1, 2, 3)) / images.sum(axis=(1, 2, 3))
    assert 0.55 < ratio.min() and ratio.max() < 1.55
    # The translation spreads digits across the canvas, not just around the centre.
    centres = np.array([np.argwhere(x[i, 0] > 0).mean(axis=0) for i in range(600)])
    assert centres.min() < 12 and centres.max() > 27
    assert synthetic.AFFINE_NAME == "affine (generated, affNIST-like)"


def test_affine_pure_translation_keeps_everything(digits):
    images, labels = digits
    x, _ = affine_test_set(images, labels, seed=1, rotation=0, shear=0, scale=(1, 1))
    np.testing.assert_allclose(x.sum(axis=(1, 2, 3)), images.sum(axis=(1, 2, 3)), rtol=1e-4)


def test_affine_speed(digits):
    images, labels = digits
    many = np.tile(images, (5, 1, 1, 1))
    start = time.perf_counter()
    affine_test_set(many, np.tile(labels, 5), seed=0)
    assert time.perf_counter() - start < 5


# ----------------------------------------------------------------------- pictures


def test_save_batch_grid(tmp_path, digits):
    pytest.importorskip("matplotlib")
    from PIL import Image
    images, labels = digits
    x, pair, _ = multimnist(images, labels, count=10, seed=0)
    path = save_batch_grid(x, tmp_path / "mm.png", labels=pair, nrow=5, title="MultiMNIST")
    assert Image.open(path).size[0] > 100
    stereo = np.random.default_rng(0).random((3, 2, 12, 12), dtype=np.float32)
    save_batch_grid(stereo, tmp_path / "stereo.png", labels=[0, 1, 4],
                    class_names=["animal", "human", "airplane", "truck", "car"])
    rgb = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    save_batch_grid(rgb, tmp_path / "rgb.png")
    assert (tmp_path / "stereo.png").is_file() and (tmp_path / "rgb.png").is_file()
    with pytest.raises(DataArgumentError):
        save_batch_grid(np.zeros((2, 5, 4, 4)), tmp_path / "bad.png")
