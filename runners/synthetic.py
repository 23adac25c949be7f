"""Generated datasets of Sabour et al. (2017), from MNIST arrays, in vectorised NumPy.

* :func:`multimnist`: MultiMNIST (Section 6), two overlapping digits of different classes
  in a 36x36 canvas, with each digit's own canvas as a reconstruction target.
* :func:`pad_and_translate`: the training set of the affine-robustness test (Section 5.2),
  each digit at a random position in a 40x40 black canvas.
* :func:`affine_test_set`: an affine (generated, affNIST-like) test set: random rotation,
  shear, per-axis scaling and translation into 40x40, drawn from the ranges affNIST
  uses. It is *not* affNIST (Tieleman's published files); results on it are not
  comparable with the paper's 79% affNIST figure.
* :func:`affine_warp`: the inverse-mapping bilinear warp behind it.
* :func:`save_batch_grid`: a labelled picture of a batch, for docs.

Every generator is deterministic in its ``seed`` (one ``numpy.random.default_rng``, a
fixed draw order): the same seed and inputs give the same bytes. Inputs follow
runners/data.py: images float32 (N, 1, H, W) (or (N, H, W)) in [0, 1], labels int (N,).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from capsflow.runners.data import DataArgumentError
from capsflow.runners.pictures import save_figure

AFFINE_NAME = "affine (generated, affNIST-like)"
# affNIST's ranges (Tieleman): rotation within +-20 degrees, shear within +-0.2, each
# axis scaled by 0.8..1.2, translated anywhere the digit's bounding box stays in 40x40.
AFFINE_ROTATION = 20.0
AFFINE_SHEAR = 0.2
AFFINE_SCALE = (0.8, 1.2)
AFFINE_SIZE = 40


def _digits(images: np.ndarray, what: str = "images") -> np.ndarray:
    """(N, 1, H, W) or (N, H, W) -> float32 (N, H, W)."""
    arr = np.asarray(images)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise DataArgumentError(f"{what} must be a non-empty (N, 1, H, W) or (N, H, W) grey "
                                f"array, got shape {np.shape(images)}")
    return np.asarray(arr, dtype=np.float32)


def _labels(labels: np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise DataArgumentError(f"labels must be integers of shape ({n},), got "
                                f"{arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


def _place(digits: np.ndarray, offsets: np.ndarray, size: int) -> np.ndarray:
    """Paste each (h, w) digit into a zero (size, size) canvas with its top-left corner
    at ``offsets`` (M, 2) = (row, col); every digit must fit."""
    m, h, w = digits.shape
    out = np.zeros((m, size, size), dtype=np.float32)
    rows = offsets[:, 0, None] + np.arange(h)
    cols = offsets[:, 1, None] + np.arange(w)
    out[np.arange(m)[:, None, None], rows[:, :, None], cols[:, None, :]] = digits
    return out


# ----------------------------------------------------------------------- MultiMNIST


def multimnist(images: np.ndarray, labels: np.ndarray, count: int, seed: int,
               shift: int = 4, size: int = 36, order: Optional[np.ndarray] = None
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MultiMNIST as in Sabour et al. (2017), Section 6.

    Recipe: example i takes base digit ``order[i]``, where ``order`` concatenates fresh
    random permutations of the input set (so every digit is a base equally often, +-1:
    the paper makes 1,000 examples per digit), and a top digit drawn uniformly from the
    digits of *another* class. Each digit is placed at the centre of a ``size`` canvas
    (offset (size - 28) / 2 = 4 for 36) and shifted by its own uniform integer (dy, dx)
    in [-shift, shift]. The two canvases are **added and clipped to 1**, as in the
    authors' code (``np.minimum(base + top, 255)``); the paper says only "overlaid".
    ``order``: the base digits' indices, where the caller draws them (a split made in
    chunks draws one stream of permutations for all its chunks, so that every digit is
    a base equally often across them, not within each chunk).

    Returns:
        images float32 (count, 1, size, size) in [0, 1]: the overlays;
        labels int64 (count, 2): (base class, top class), always different;
        parts float32 (count, 2, 1, size, size): each digit alone in its shifted canvas
            (the paper reconstructs each digit separately, Figure 5).
    Memory: 13 KB per example (parts included): generate the paper's 60M in chunks, each
    with its own seed.
    """
    digits = _digits(images)
    n, h, w = digits.shape
    labels = _labels(labels, n)
    if count < 1:
        raise DataArgumentError(f"count must be a positive number of examples, got {count}")
    if shift < 0:
        raise DataArgumentError(f"shift must be >= 0 pixels, got {shift}")
    pad_y, pad_x = (size - h) // 2, (size - w) // 2
    if min(pad_y, pad_x) < shift or size - max(h, w) - max(pad_y, pad_x) < shift:
        raise DataArgumentError(f"a {h}x{w} digit shifted by up to {shift} pixels does not "
                                f"fit a {size}x{size} canvas; use size >= "
                                f"{max(h, w) + 2 * shift}")
    classes, per_class = np.unique(labels, return_counts=True)
    if classes.size < 2:
        raise DataArgumentError("MultiMNIST needs digits of at least two classes")

    rng = np.random.default_rng(seed)
    if order is None:
        order = np.concatenate([rng.permutation(n) for _ in range(-(-count // n))])[:count]
    elif order.shape != (count,) or order.min() < 0 or order.max() >= n:
        raise DataArgumentError(f"order must hold {count} indices of the {n} digits")
    base_label = labels[order]
    # Top digit: uniform over the other classes' digits. In the class-sorted index the
    # base class is one block [start, start + n_c); draw r in [0, n - n_c) and skip it.
    by_class = np.argsort(labels, kind="stable")
    slot = np.searchsorted(classes, base_label)
    start = np.concatenate([[0], np.cumsum(per_class)[:-1]])[slot]
    n_same = per_class[slot]
    r = np.floor(rng.random(count) * (n - n_same)).astype(np.int64)
    r = np.minimum(r, n - n_same - 1)  # guard the float edge case r == n - n_same
    top = by_class[np.where(r < start, r, r + n_same)]
    shifts = rng.integers(-shift, shift + 1, size=(count, 2, 2))

    parts = np.empty((count, 2, 1, size, size), dtype=np.float32)
    centre = np.array([pad_y, pad_x])
    parts[:, 0, 0] = _place(digits[order], centre + shifts[:, 0], size)
    parts[:, 1, 0] = _place(digits[top], centre + shifts[:, 1], size)
    merged = np.minimum(parts[:, 0] + parts[:, 1], np.float32(1.0))
    pair = np.stack([base_label, labels[top]], axis=1)
    return np.ascontiguousarray(merged), pair, parts


# --------------------------------------------------------- translated / affine MNIST


def pad_and_translate(images: np.ndarray, seed: int, size: int = 40) -> np.ndarray:
    """Each digit at a uniform random integer position in a black ``size`` canvas
    (Sabour et al. 2017, Section 5.2: "an MNIST digit placed randomly on a black
    background of 40x40 pixels"): top-left corner in 0..size-28 on each axis.

    Returns float32 (N, 1, size, size); the labels are unchanged.
    """
    digits = _digits(images)
    n, h, w = digits.shape
    if size < max(h, w):
        raise DataArgumentError(f"canvas {size}x{size} is smaller than the {h}x{w} images")
    rng = np.random.default_rng(seed)
    offsets = np.stack([rng.integers(0, size - h + 1, size=n),
                        rng.integers(0, size - w + 1, size=n)], axis=1)
    return _place(digits, offsets, size)[:, None]


def affine_warp(images: np.ndarray, matrices: np.ndarray, size: Union[int, Tuple[int, int]],
                chunk: int = 1024) -> np.ndarray:
    """Warp each image by its own affine map, by inverse mapping and bilinear sampling.

    Args:
        images: (N, H, W) or (N, 1, H, W).
        matrices: (N, 2, 3) *inverse* maps, output pixel -> input pixel, in (x, y) =
            (column, row) pixel-centre coordinates: [x_in, y_in] = A[:, :2] @ [x, y] + A[:, 2].
        size: output side (or (h, w)); input pixels outside the image read as 0.
    Returns float32 (N, 1, h, w) in the input's range.
    """
    src = _digits(images)
    n, hin, win = src.shape
    hout, wout = (size, size) if isinstance(size, (int, np.integer)) else size
    out = np.empty((n, 1, hout, wout), dtype=np.float32)
    gy, gx = np.mgrid[0:hout, 0:wout]
    gx, gy = gx.reshape(1, -1).astype(np.float64), gy.reshape(1, -1).astype(np.float64)
    padded = np.pad(src, ((0, 0), (1, 1), (1, 1))).reshape(n, -1)  # zero ring
    stride = win + 2
    for lo in range(0, n, chunk):
        a = matrices[lo:lo + chunk].astype(np.float64)
        img = padded[lo:lo + chunk]
        x = a[:, 0, 0, None] * gx + a[:, 0, 1, None] * gy + a[:, 0, 2, None]
        y = a[:, 1, 0, None] * gx + a[:, 1, 1, None] * gy + a[:, 1, 2, None]
        inside = (x > -1) & (x < win) & (y > -1) & (y < hin)
        x = np.clip(x, -1, win - 1e-6)
        y = np.clip(y, -1, hin - 1e-6)
        x0, y0 = np.floor(x), np.floor(y)
        fx, fy = (x - x0).astype(np.float32), (y - y0).astype(np.float32)
        # Padded index of input pixel (y0, x0) is (y0 + 1, x0 + 1); its right/lower
        # neighbours are at most (hin, win), inside the zero ring.
        idx = (y0.astype(np.int64) + 1) * stride + x0.astype(np.int64) + 1
        v00 = np.take_along_axis(img, idx, axis=1)
        v01 = np.take_along_axis(img, idx + 1, axis=1)
        v10 = np.take_along_axis(img, idx + stride, axis=1)
        v11 = np.take_along_axis(img, idx + stride + 1, axis=1)
        top = v00 + fx * (v01 - v00)
        bottom = v10 + fx * (v11 - v10)
        value = (top + fy * (bottom - top)) * inside
        out[lo:lo + chunk, 0] = value.reshape(-1, hout, wout)
    return out


def _bounding_boxes(digits: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, 4) = x0, y0, x1, y1 of the nonzero pixels (the whole image for a
    blank one)."""
    n, h, w = digits.shape
    rows, cols = digits.any(axis=2), digits.any(axis=1)
    blank = ~rows.any(axis=1)
    y0, y1 = rows.argmax(axis=1), h - 1 - rows[:, ::-1].argmax(axis=1)
    x0, x1 = cols.argmax(axis=1), w - 1 - cols[:, ::-1].argmax(axis=1)
    box = np.stack([x0, y0, x1, y1], axis=1).astype(np.float64)
    box[blank] = (0, 0, w - 1, h - 1)
    return box


def affine_test_set(images: np.ndarray, labels: np.ndarray, seed: int,
                    size: int = AFFINE_SIZE, rotation: float = AFFINE_ROTATION,
                    shear: float = AFFINE_SHEAR,
                    scale: Tuple[float, float] = AFFINE_SCALE
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """An affine (generated, affNIST-like) set from MNIST (meant for its test split).

    Recipe, per image, all uniform and independent: angle in [-rotation, rotation]
    degrees, horizontal shear s in [-shear, shear], scales sx, sy in ``scale``; the
    linear part M = R(angle) @ [[1, s], [0, 1]] @ diag(sx, sy) acts about the 28x28
    image's centre. The translation t is uniform over the positions that keep the
    transformed bounding box of the digit's nonzero pixels inside the ``size`` canvas
    (centred when it cannot fit). Pixels come from the inverse map and bilinear
    interpolation (:func:`affine_warp`), zero outside the source.

    Returns:
        images float32 (N, 1, size, size) in [0, 1], labels int64 (N,) (a copy).
    """
    digits = _digits(images)
    n, h, w = digits.shape
    labels = _labels(labels, n)
    if not (0 < scale[0] <= scale[1]):
        raise DataArgumentError(f"scale must be a range 0 < low <= high, got {scale}")
    rng = np.random.default_rng(seed)
    angle = np.deg2rad(rng.uniform(-rotation, rotation, size=n))
    s = rng.uniform(-shear, shear, size=n)
    sx, sy = rng.uniform(scale[0], scale[1], size=(2, n))
    u = rng.random(size=(n, 2))

    cos, sin = np.cos(angle), np.sin(angle)
    # M = R @ Shear @ Scale, in (x, y) coordinates (y pointing down the rows).
    m = np.empty((n, 2, 2))
    m[:, 0, 0] = cos * sx
    m[:, 0, 1] = (cos * s - sin) * sy
    m[:, 1, 0] = sin * sx
    m[:, 1, 1] = (sin * s + cos) * sy
    c_in = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    c_out = np.full(2, (size - 1) / 2.0)

    box = _bounding_boxes(digits)
    corners = np.stack([box[:, [0, 1]], box[:, [2, 1]], box[:, [0, 3]], box[:, [2, 3]]],
                       axis=1) - c_in                                   # (N, 4, 2)
    moved = np.einsum("nij,nkj->nki", m, corners)                      # (N, 4, 2)
    lo_t = -c_out - moved.min(axis=1)                                   # t >= lo_t
    hi_t = (size - 1) - c_out - moved.max(axis=1)                       # t <= hi_t
    t = np.where(hi_t >= lo_t, lo_t + u * (hi_t - lo_t), (lo_t + hi_t) / 2)

    # Inverse: p_in = c_in + M^-1 (p_out - c_out - t).
    inv = np.linalg.inv(m)
    a = np.empty((n, 2, 3))
    a[:, :, :2] = inv
    a[:, :, 2] = c_in - np.einsum("nij,nj->ni", inv, c_out + t)
    out = affine_warp(digits, a, size)
    np.clip(out, 0.0, 1.0, out=out)
    return out, labels.copy()


# ----------------------------------------------------------------------- pictures


def _tile(image: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W') grey or (H, W, 3) colour; C = 2 (stereo) side by side."""
    if image.shape[0] == 3:
        return image.transpose(1, 2, 0)
    if image.shape[0] == 1:
        return image[0]
    gap = np.full((image.shape[1], 1), 0.5, dtype=image.dtype)
    parts = [image[0]]
    for ch in image[1:]:
        parts += [gap, ch]
    return np.concatenate(parts, axis=1)


def _caption(label: Any, class_names: Optional[Sequence[str]]) -> str:
    values = np.atleast_1d(np.asarray(label))
    if values.dtype.kind in "iu" and class_names is not None:
        return "+".join(str(class_names[int(v)]) for v in values)
    return "+".join(str(v) for v in values)


def save_batch_grid(images: np.ndarray, path: Union[str, Path], labels: Any = None,
                    nrow: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
                    title: Optional[str] = None, dpi: int = 100) -> Path:
    """A PNG of (B, C, H, W) images in [0, 1] (C = 1 grey, 2 stereo side by side, 3 RGB)
    on a grid ``nrow`` wide, each captioned by its label (an int, a pair such as
    MultiMNIST's (3, 7) -> "3+7", or a str; mapped through ``class_names``)."""
    import matplotlib  # lazy: only pictures need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = np.asarray(images, dtype=np.float32)
    if batch.ndim == 3:
        batch = batch[:, None]
    if batch.ndim != 4 or batch.shape[1] not in (1, 2, 3) or batch.shape[0] == 0:
        raise DataArgumentError(f"expected images (B, C, H, W) with C in 1..3, "
                                f"got {np.shape(images)}")
    b = batch.shape[0]
    nrow = nrow or min(b, 8)
    rows = math.ceil(b / nrow)
    tiles = [_tile(np.clip(im, 0, 1)) for im in batch]
    th, tw = tiles[0].shape[:2]
    fig_w = max(2.0, nrow * tw / 28 * 0.9)
    fig_h = rows * (th / 28 * 0.9 + (0.25 if labels is not None else 0.05)) + (0.4 if title else 0)
    fig, axes = plt.subplots(rows, nrow, figsize=(fig_w, fig_h), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= b:
            ax.axis("off")
            continue
        colour = tiles[i].ndim == 3
        ax.imshow(tiles[i], cmap=None if colour else "gray", vmin=0, vmax=1,
                  interpolation="nearest")
        for spine in ax.spines.values():
            spine.set_color("#94a3b8")
        if labels is not None:
            ax.set_title(_caption(labels[i], class_names), fontsize=8, pad=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(pad=0.3, h_pad=0.4, w_pad=0.2)
    path = Path(path)
    save_figure(fig, path, dpi=dpi)
    plt.close(fig)
    return path
