"""``capsflow eval GRAPH.yaml --checkpoint PATH``: accuracy of a trained checkpoint.

Prints the test accuracy, the accuracy of each class and the confusion matrix. The
predictions are the argmax of the graph's class scores (its output ``scores``, else
CapsNet's ``lengths``: ``runners.training.class_scores``). The labels are not fed to the
graph, so the decoder is masked by the *predicted* class, as at test time in the paper;
the mean reconstruction error is reported with that mask. A graph without a decoder (no
output ``recon``, e.g. graphs/baseline-cnn.yaml) gets the same report without that
number, and a note saying why.
"""
from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from capsflow.backends import Backend, get_backend
from capsflow.cli import add_graph_arguments, positive_int
from capsflow.options import Options, add_option_arguments, options_from_args
from capsflow.runners.data import (DATASETS, NUM_CLASSES, DataNotFoundError,
                                   find_dataset_folder, load_split)
from capsflow.runners.training import batched_outputs, class_scores, load_model
from capsflow.lang.yamlio import parse_override

RECON = "recon"  # graph output holding the reconstructions (N, pixels), when it has a decoder
CLASS_NAMES = {
    "mnist": [str(k) for k in range(NUM_CLASSES)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"],
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the commands that read a trained checkpoint (eval, visualize)."""
    add_graph_arguments(parser)
    a = parser.add_argument
    a("--checkpoint", required=True, metavar="PATH",
      help="a last.npz or best.npz written by capsflow train")
    a("--dataset", choices=list(DATASETS),
      help="dataset (default: the one the checkpoint was trained on)")
    a("--data-dir", dest="data_dir", metavar="ROOT",
      help="data root holding mnist/ or fashion-mnist/ (default: the training run's, "
           "else $CAPSFLOW_DATA, then ~/.cache/capsflow/data)")
    a("--limit-test", dest="limit_test", type=positive_int, metavar="N",
      help="use the first N test examples only")
    a("--bs", type=positive_int, default=100,
      help="batch size of the forward passes (default 100)")
    add_option_arguments(parser)


def open_model(args: argparse.Namespace, backend: Backend) -> tuple:
    """(graph, params on ``backend``, checkpoint, dataset name, test images, test labels)
    from the shared flags; images float32 (N, 1, 28, 28), labels int64 (N,)."""
    overrides = dict(parse_override(o) for o in args.overrides)
    graph, params, ckpt = load_model(args.graph, args.checkpoint, overrides, backend)
    class_scores(graph)  # a graph without class scores fails here, before the data loads
    dataset = args.dataset or ckpt.config.dataset
    data_dir = args.data_dir
    if data_dir is None and ckpt.config.data_dir:  # the training run's, where it still is
        try:
            find_dataset_folder(dataset, ckpt.config.data_dir)
            data_dir = ckpt.config.data_dir
        except DataNotFoundError:
            pass
    images, labels = load_split(dataset, "test", data_dir, args.limit_test)
    return graph, params, ckpt, dataset, images, labels


def predict(graph: Any, params: dict, images: np.ndarray, batch_size: int = 100,
            backend: Options | Backend = Options(), desc: str | None = "eval") -> tuple:
    """Predicted classes int64 (N,) (argmax of the class scores) and the mean SSE per
    image of the reconstructions, with the decoder masked by the predicted class (no
    labels are fed); the SSE is None for a graph without a decoder (no output 'recon')."""
    scores = class_scores(graph)
    decoder = RECON in graph.spec.outputs
    pred = np.empty(images.shape[0], dtype=np.int64)
    sse = 0.0
    wanted = (scores, RECON) if decoder else (scores,)
    for part, out in batched_outputs(graph, params, images, None, wanted, batch_size,
                                     backend, desc):
        pred[part] = out[scores].argmax(axis=1)
        if decoder:
            diff = out[RECON] - images[part].reshape(out[RECON].shape)
            sse += float(np.square(diff, dtype=np.float64).sum())
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)


def main(args: argparse.Namespace) -> int:
    backend = get_backend(options_from_args(args))
    graph, params, ckpt, dataset, images, labels = open_model(args, backend)
    print(f"{ckpt.path}: {graph.spec.name}, {ckpt.progress.epoch} epoch(s), "
          f"{ckpt.progress.iteration} iterations; {dataset} test split, "
          f"{images.shape[0]} examples")
    pred, recon_sse = predict(graph, params, images, args.bs, backend)
    if recon_sse is None:
        print(f"note: {graph.spec.name} has no output '{RECON}' (no decoder); the "
              f"reconstruction error is skipped")
    print(format_report(confusion_matrix(labels, pred), CLASS_NAMES[dataset], recon_sse))
    return 0
