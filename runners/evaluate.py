"""``capsflow eval GRAPH.yaml --checkpoint PATH``: accuracy of a trained checkpoint.

Prints the test accuracy, the accuracy of each class and the confusion matrix. The
predictions are the argmax of the graph's class scores (its output ``scores``, else
CapsNet's ``lengths``: ``runners.training.class_scores``). The labels are not fed to the
graph, so the decoder is masked by the *predicted* class, as at test time in the paper;
the mean reconstruction error is reported with that mask. A graph without a decoder (no
output ``recon``, e.g. graphs/baseline-cnn.yaml) gets the same report without that
number, and a note saying why.

The test split is the checkpoint's dataset (``--dataset`` picks another of the same
shape), made with the run's data options and seed (its data record). A MultiMNIST model
is scored with the paper's measure: an example is right when its two longest capsules
are its two digits; the reconstruction error then masks the decoder with both predicted
capsules, against the overlay.
"""
from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from capsflow.backends import Backend, get_backend
from capsflow.cli import add_graph_arguments, positive_int
from capsflow.errors import CapsflowError
from capsflow.options import Options, add_option_arguments, options_from_args
from capsflow.runners.data import (DATASETS, NUM_CLASSES, OPTIONS, DataNotFoundError,
                                   find_dataset_folder, load, shape_text)
from capsflow.runners.training import (batched_outputs, class_scores, input_shape,
                                       load_model, num_classes)
from capsflow.lang.yamlio import parse_override

RECON = "recon"  # graph output holding the reconstructions (N, pixels), when it has a decoder


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the commands that read a trained checkpoint (eval, visualize)."""
    add_graph_arguments(parser)
    a = parser.add_argument
    a("--checkpoint", required=True, metavar="PATH",
      help="a last.npz or best.npz written by capsflow train")
    a("--dataset", choices=list(DATASETS),
      help="dataset (default: the one the checkpoint was trained on)")
    a("--data-dir", dest="data_dir", metavar="ROOT",
      help="data root holding mnist/, cifar10/... (default: the training run's, "
           "else $CAPSFLOW_DATA, then ~/.cache/capsflow/data)")
    a("--limit-test", dest="limit_test", type=positive_int, metavar="N",
      help="use the first N test examples only")
    a("--bs", type=positive_int, default=100,
      help="batch size of the forward passes (default 100)")
    add_option_arguments(parser)


def open_model(args: argparse.Namespace, backend: Backend) -> tuple:
    """(graph, params on ``backend``, checkpoint, DataDescription of the test split, test
    images, test labels) from the shared flags; images float32 (N, C, H, W), labels int64
    (N,) or (N, 2) (MultiMNIST)."""
    overrides = dict(parse_override(o) for o in args.overrides)
    graph, params, ckpt = load_model(args.graph, args.checkpoint, overrides, backend)
    class_scores(graph)  # a graph without class scores fails here, before the data loads
    dataset = args.dataset or ckpt.config.dataset
    options = {}
    if dataset == ckpt.config.dataset:  # made as in training (the record: resolved values)
        recorded = ckpt.data.options if ckpt.data is not None else ckpt.config.data_options()
        options = {k: v for k, v in recorded.items() if k in OPTIONS}
    data_dir = args.data_dir
    if data_dir is None and ckpt.config.data_dir:  # the training run's, where it still is
        try:
            find_dataset_folder(dataset, ckpt.config.data_dir, **options)
            data_dir = ckpt.config.data_dir
        except DataNotFoundError:
            pass
    split = load(dataset, "test", data_dir, args.limit_test, seed=ckpt.config.seed, **options)
    shape, classes = input_shape(graph), num_classes(graph)
    if tuple(split.info.shape) != shape or split.info.num_classes != classes:
        trained = shape_text(shape) if shape else "?"
        raise CapsflowError(
            f"{ckpt.path} takes {trained} images and scores {classes} classes (trained on "
            f"{ckpt.config.dataset}); --dataset {dataset} has {split.info.describe()}: "
            f"evaluate it on data of its shape")
    return graph, params, ckpt, split.info, split.images, split.labels


def predict(graph: Any, params: dict, images: np.ndarray, batch_size: int = 100,
            backend: Options | Backend = Options(), desc: str | None = "eval",
            labels_per_example: int = 1) -> tuple:
    """Predicted classes int64 (N,) (argmax of the class scores; with
    ``labels_per_example`` K > 1: (N, K), the K highest) and the mean SSE per image of the
    reconstructions, with the decoder masked by the predicted class(es): no labels are fed
    for one, the predicted K as a multi-hot ``y`` (a second pass) for several. The SSE is
    None for a graph without a decoder (no output 'recon')."""
    scores = class_scores(graph)
    decoder = RECON in graph.spec.outputs
    k = labels_per_example
    pred = np.empty((images.shape[0], k), dtype=np.int64)
    sse = 0.0

    def add_sse(part: slice, recon: np.ndarray) -> None:
        nonlocal sse
        diff = recon - images[part].reshape(recon.shape)
        sse += float(np.square(diff, dtype=np.float64).sum())

    single = decoder and k == 1
    wanted = (scores, RECON) if single else (scores,)
    for part, out in batched_outputs(graph, params, images, None, wanted, batch_size,
                                     backend, desc):
        pred[part] = np.argsort(-out[scores], axis=1, kind="stable")[:, :k]
        if single:
            add_sse(part, out[RECON])
    if decoder and k > 1:
        for part, out in batched_outputs(graph, params, images, pred, (RECON,), batch_size,
                                         backend):
            add_sse(part, out[RECON])
    pred = pred[:, 0] if k == 1 else pred
    return pred, (sse / max(images.shape[0], 1) if decoder else None)


def confusion_matrix(labels: np.ndarray, pred: np.ndarray,
                     num_classes: int = NUM_CLASSES) -> np.ndarray:
    """int64 (K, K): row = true class, column = predicted class."""
    flat = labels.astype(np.int64) * num_classes + pred
    return np.bincount(flat, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def format_report(confusion: np.ndarray, names: list, recon_sse: float | None) -> str:
    """Accuracy, per-class accuracy and the confusion matrix as aligned text
    (``recon_sse`` None: a graph without a decoder, no reconstruction error)."""
    total = int(confusion.sum())
    correct = int(np.trace(confusion))
    head = f"test accuracy: {100 * correct / max(total, 1):.2f}% ({correct}/{total})"
    if recon_sse is not None:
        head += f"; mean reconstruction SSE per image (predicted-class mask): {recon_sse:.2f}"
    lines = [head, "", "per-class accuracy:"]
    width = max(len(n) for n in names)
    for k, name in enumerate(names):
        n = int(confusion[k].sum())
        acc = f"{100 * confusion[k, k] / n:6.2f}%" if n else "     -"
        lines.append(f"  {name.rjust(width)}  {acc}  ({int(confusion[k, k])}/{n})")
    cell = max(len(str(int(confusion.max()))), 2)
    lines += ["", "confusion matrix (rows: true class, columns: predicted class):",
              " " * (width + 3) + " ".join(str(k).rjust(cell) for k in range(len(names)))]
    for k, name in enumerate(names):
        lines.append(f"  {name.rjust(width)} " + " ".join(str(int(c)).rjust(cell)
                                                         for c in confusion[k]))
    return "\n".join(lines)


def format_multi_report(labels: np.ndarray, pred: np.ndarray, names: list,
                        recon_sse: float | None) -> str:
    """MultiMNIST's report: the paper's accuracy (both classes right), how often at least
    one is, and per class how often a digit of it is found among the predicted ones."""
    n = labels.shape[0]
    found = (labels[:, :, None] == pred[:, None, :]).any(axis=2)     # (N, K): label found
    both, one = int(found.all(axis=1).sum()), int(found.any(axis=1).sum())
    head = (f"test accuracy (the paper's MultiMNIST measure: the two longest capsules are "
            f"the two digits): {100 * both / max(n, 1):.2f}% ({both}/{n}); at least one "
            f"digit found: {100 * one / max(n, 1):.2f}%")
    if recon_sse is not None:
        head += (f"; mean reconstruction SSE per image (both predicted capsules, against "
                 f"the overlay): {recon_sse:.2f}")
    lines = [head, "", "per-class recall (examples holding the class whose class is "
                       "among the two predicted):"]
    width = max(len(name) for name in names)
    for c, name in enumerate(names):
        holds = labels == c
        total, hits = int(holds.sum()), int((found & holds).sum())
        acc = f"{100 * hits / total:6.2f}%" if total else "     -"
        lines.append(f"  {name.rjust(width)}  {acc}  ({hits}/{total})")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)


def main(args: argparse.Namespace) -> int:
    backend = get_backend(options_from_args(args))
    graph, params, ckpt, info, images, labels = open_model(args, backend)
    print(f"{ckpt.path}: {graph.spec.name}, {ckpt.progress.epoch} epoch(s), "
          f"{ckpt.progress.iteration} iterations; {info.dataset} test split "
          f"({info.describe()}), {images.shape[0]} examples")
    pred, recon_sse = predict(graph, params, images, args.bs, backend,
                              labels_per_example=info.labels_per_example)
    if recon_sse is None:
        print(f"note: {graph.spec.name} has no output '{RECON}' (no decoder); the "
              f"reconstruction error is skipped")
    if info.labels_per_example > 1:
        print(format_multi_report(labels, pred, info.classes, recon_sse))
    else:
        print(format_report(confusion_matrix(labels, pred, info.num_classes), info.classes,
                            recon_sse))
    return 0
