"""``capsflow predict GRAPH.yaml --checkpoint CKPT IMAGE_OR_FOLDER...``: classify image files.

For each image file (PNG, JPEG, BMP, ...; a folder stands for its image files, searched
recursively and sorted by path) prints the predicted class and the class scores: the
graph's output ``scores`` when it declares one, else CapsNet's capsule ``lengths``
(``runners.training.class_scores``). A model trained on MultiMNIST (two labels per
example) predicts the two classes of the longest capsules.

The images are made like the training data: converted to the checkpoint's channels (grey,
colour; smallNORB's two stereo channels get the grey image twice), resized to its input
height and width (bilinear; a training run that resized and then cropped, as folder runs
with ``--image-size``/``--crop`` and smallNORB do, is repeated), pixels scaled to [0, 1].
``--invert`` turns dark-on-light drawings into MNIST's light-on-dark.

The checkpoint says what the model was trained on: its data record (``meta["data"]``:
dataset, class names, input shape, the options that made the images). A checkpoint
without one (written before the record existed) falls back on the dataset's class names
and the graph's input shape.

``--recon DIR`` writes, for a graph with an output ``recon`` (a decoder), each image's
reconstruction as ``DIR/<file stem>.recon.png``: the decoder masked by the predicted
capsule. For a MultiMNIST model it writes the reconstruction from both predicted
capsules and, fed one capsule at a time (through the graph's label input ``y``), one per
digit: ``<stem>.recon.png``, ``<stem>.recon-<class>.png`` twice.
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from capsflow.backends import Backend, get_backend
from capsflow.cli import add_graph_arguments, check_output_dir, positive_int, printable
from capsflow.errors import CapsflowError
from capsflow.lang.yamlio import parse_override
from capsflow.options import add_option_arguments, options_from_args
from capsflow.runners.data import DATASETS, DataDescription, class_names
from capsflow.runners.pictures import save_image
from capsflow.runners.training import (batched_outputs, check_same_graph, class_scores,
                                       input_shape, load_model, num_classes, read_checkpoint)

RECON = "recon"      # the decoder's output (N, channels * height * width)
LABELS = "y"         # the graph input that masks the decoder (one-hot labels)
SHOWN_SCORES = 10    # without --top: every score up to this many classes, else the top 5


class PredictError(CapsflowError):
    """A prediction that cannot be made as asked (mismatched checkpoint, graph, images)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_graph_arguments(parser)
    a = parser.add_argument
    a("images", nargs="+", metavar="IMAGE_OR_FOLDER",
      help="image files (png, jpg, bmp, ...) or folders of them")
    a("--checkpoint", required=True, metavar="PATH",
      help="a last.npz or best.npz written by capsflow train")
    a("--recon", metavar="DIR",
      help="write each image's reconstruction as DIR/<name>.recon.png (graphs with a decoder)")
    a("--top", type=positive_int, metavar="K",
      help=f"show the K highest class scores (default: all of up to {SHOWN_SCORES} classes, "
           f"else the 5 highest)")
    a("--invert", action="store_true",
      help="invert the pixels (dark drawings on a light background -> MNIST's light on dark)")
    a("--bs", type=positive_int, default=100, help="batch size of the forward passes (default 100)")
    add_option_arguments(parser)


# --------------------------------------------------------------- what was trained


def data_description(ckpt: Any, graph: Any, log: Any = print) -> DataDescription:
    """What ``ckpt`` was trained on: its data record, checked against ``graph`` (the input
    shape and the number of class scores); a checkpoint without a record gets its
    dataset's class names and the graph's input shape."""
    shape = input_shape(graph)
    if shape is None:
        x = graph.spec.inputs.get("x")
        raise PredictError(f"{graph.spec.file}: input 'x' has shape "
                           f"{list(x.shape) if x is not None else 'none'}; predict needs "
                           f"images [N, channels, height, width]")
    scores = class_scores(graph)
    classes = num_classes(graph)
    described = ckpt.data  # checked by read_checkpoint
    if described is not None:
        if tuple(described.shape) != shape:
            c, h, w = shape
            raise PredictError(
                f"{ckpt.path} was trained on {described.describe()} images, but "
                f"{graph.spec.file} with these --set values takes {c}x{h}x{w}; drop the "
                f"--set flags that change channels, height or width")
        if described.num_classes != classes:
            raise PredictError(
                f"{ckpt.path} was trained on {described.num_classes} classes "
                f"({described.title}), but {graph.spec.file}'s '{scores}' has {classes}")
        return described
    dataset = ckpt.config.dataset
    info = DATASETS.get(dataset)
    names = class_names(dataset) if info is not None else None
    if names is None or len(names) != classes:
        log(f"note: {ckpt.path} does not record its class names; classes are numbered "
            f"0..{classes - 1}")
        names = [str(k) for k in range(classes)]
    per = info.labels_per_example if info is not None else 1
    return DataDescription(dataset, info.title if info else dataset, names, shape, per, {})


def check_input_overrides(ckpt: Any, overrides: dict) -> None:
    """A --set of an input variable (channels, height, width, classes) that contradicts
    the data the checkpoint was trained on is one line, before the parameters' shapes
    would say it less clearly."""
    described = ckpt.data  # checked by read_checkpoint
    if described is None:
        return
    trained = dict(zip(("channels", "height", "width"), described.shape),
                   classes=described.num_classes)
    for var, value in trained.items():
        if var in overrides and overrides[var] != value:
            raise PredictError(f"--set {var}={overrides[var]} contradicts {ckpt.path}, trained "
                               f"on {described.describe()} ({var} {value}); drop it")


# ------------------------------------------------------------------------- images


def prepare_images(paths: Sequence[str | Path], described: DataDescription,
                   invert: bool = False) -> Tuple[np.ndarray, List[Path]]:
    """Image files (or folders of them) -> float32 (N, C, H, W) in [0, 1] made as the
    training data were (``described``), and the files in the same order."""
    from capsflow.runners.formats import read_images
    c, h, w = described.shape
    if c not in (1, 2, 3):
        raise PredictError(f"the model takes {c}-channel images; image files give 1 (grey) "
                           f"or 3 (colour)")
    size, crop = described.options.get("size"), described.options.get("crop")
    if size is None or crop is None:  # no resize-then-crop recipe: straight to H x W
        size, crop = (h, w), None
    parts, files = [], []
    for path in paths:
        images, found = read_images(path, size=tuple(size), channels=3 if c == 3 else 1,
                                    crop=None if crop is None else tuple(crop))
        parts.append(images)
        files.extend(found)
    images = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if c == 2:  # smallNORB's stereo pair: the one image seen by both cameras
        images = np.repeat(images, 2, axis=1)
    if invert:
        images = 1.0 - images
    return np.ascontiguousarray(images, dtype=np.float32), files


# ----------------------------------------------------------------------- predicting


def predict_scores(graph: Any, params: dict, images: np.ndarray, batch_size: int,
                   backend: Any) -> np.ndarray:
    """Class scores float (N, classes): ``scores`` or the capsule lengths."""
    scores = class_scores(graph)
    parts = [result[scores] for _, result in batched_outputs(
        graph, params, images, None, (scores,), batch_size, backend)]
    return np.concatenate(parts)


def top_classes(scores: np.ndarray, k: int) -> np.ndarray:
    """int64 (N, k): the k highest-scoring classes of each row, highest first."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k]


def reconstruct(graph: Any, params: dict, images: np.ndarray, labels: np.ndarray,
                batch_size: int, backend: Any) -> np.ndarray:
    """The decoder's output (N, pixels) with its capsules masked by ``labels``, int (N,)
    for one capsule or (N, K) for K of them, fed through the label input ``y``."""
    return np.concatenate([result[RECON] for _, result in batched_outputs(
        graph, params, images, labels, (RECON,), batch_size, backend)])


def _png(image: np.ndarray, path: Path) -> None:
    """(C, H, W) in [0, 1] -> PNG: grey (C = 1), colour (C = 3), side by side (C = 2)."""
    from PIL import Image
    pixels = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    if pixels.shape[0] == 3:
        save_image(Image.fromarray(pixels.transpose(1, 2, 0), mode="RGB"), path)
    else:
        save_image(Image.fromarray(np.concatenate(list(pixels), axis=1), mode="L"), path)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "class"


def _stems(files: List[Path]) -> List[str]:
    """A distinct output name per input file: the stem, or the stem and its position
    when two inputs share a stem (lengthened while another file's name is that: d1/a.png,
    d2/a.png and a-1.png)."""
    stems = [_safe(f.stem) for f in files]
    counts = Counter(stems)
    taken = {s for s in stems if counts[s] == 1}
    names = []
    for i, stem in enumerate(stems):
        name = stem
        if counts[stem] > 1:
            name = f"{stem}-{i}"
            while name in taken:
                name = f"{name}-{i}"
            taken.add(name)
        names.append(name)
    return names


def write_reconstructions(graph: Any, params: dict, images: np.ndarray, files: List[Path],
                          predicted: np.ndarray, described: DataDescription, out_dir: Path,
                          batch_size: int, backend: Any) -> List[Path]:
    """``out_dir/<stem>.recon.png`` (the predicted capsules) and, for two predicted
    classes, ``<stem>.recon-<class>.png`` for each; returns the files written."""
    shape = (images.shape[0],) + tuple(described.shape)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = _stems(files)
    # (which predicted class, or None for all of them; the capsules the decoder sees)
    masks: List[Tuple[Optional[int], np.ndarray]] = [(None, predicted)]
    if predicted.shape[1] > 1:
        masks += [(j, predicted[:, j]) for j in range(predicted.shape[1])]
    written = []
    for which, mask in masks:
        recon = reconstruct(graph, params, images, mask, batch_size, backend).reshape(shape)
        for i, stem in enumerate(stems):
            if which is None:
                name = f"{stem}.recon.png"
            else:
                cls = int(predicted[i, which])
                name = f"{stem}.recon-{_safe(described.classes[cls])}.png"
            _png(recon[i], out_dir / name)
            written.append(out_dir / name)
    return written


def format_line(file: Path, scores: np.ndarray, predicted: Sequence[int], names: List[str],
                what: str, top: Optional[int]) -> str:
    """``FILE: CLASS (score)  |  lengths: a 0.91, b 0.12, ...``"""
    label = "+".join(names[c] for c in predicted)
    chosen = ", ".join(f"{scores[c]:.3f}" for c in predicted)
    if top is None and len(names) <= SHOWN_SCORES:
        shown = range(len(names))
    else:
        shown = np.argsort(-scores, kind="stable")[:top or 5]
    listed = ", ".join(f"{names[c]} {scores[c]:.3f}" for c in shown)
    # one line per file, whatever its name or the class names hold (newlines, escapes)
    return printable(f"{file}: {label} ({chosen})  |  {what}: {listed}")


def main(args: argparse.Namespace) -> int:
    backend: Backend = get_backend(options_from_args(args))
    recon_dir = check_output_dir(args.recon, "--recon") if args.recon else None
    ckpt = read_checkpoint(args.checkpoint)
    check_same_graph(ckpt, args.graph)  # before the overrides are checked against it
    overrides = dict(parse_override(o) for o in args.overrides)
    check_input_overrides(ckpt, overrides)
    graph, params, ckpt = load_model(args.graph, ckpt, overrides, backend)
    described = data_description(ckpt, graph)
    if recon_dir is not None and (RECON not in graph.spec.outputs
                                  or LABELS not in graph.spec.inputs):
        raise PredictError(f"{graph.spec.file} has no decoder (an output '{RECON}' masked by "
                           f"the input '{LABELS}'); drop --recon")
    images, files = prepare_images(args.images, described, args.invert)
    what = class_scores(graph)
    scores = predict_scores(graph, params, images, args.bs, backend)
    predicted = top_classes(scores, described.labels_per_example)
    print(printable(f"{ckpt.path}: {graph.spec.name} trained on {described.describe()}; "
                    f"{images.shape[0]} image(s)"))
    for i, file in enumerate(files):
        print(format_line(file, scores[i], predicted[i], described.classes, what, args.top))
    if recon_dir is not None:
        written = write_reconstructions(graph, params, images, files, predicted, described,
                                        recon_dir, args.bs, backend)
        print(printable(f"wrote {len(written)} reconstruction(s) to {recon_dir}"))
    return 0
