"""``capsflow visualize GRAPH.yaml --checkpoint PATH --out DIR``: pictures of a trained model.

Writes into DIR:

* ``recon.png``: test images and their reconstructions, the decoder masked by the
  predicted class (no labels fed); for a MultiMNIST model also the reconstruction from
  both predicted capsules and, feeding the decoder one capsule at a time (through the
  label input ``y``), from each alone;
* ``perturbation.png``: the paper's Figure 4: each of the 16 dimensions of the predicted
  digit capsule shifted from -0.25 to +0.25 in steps of 0.05 and decoded. The shifted
  capsules go straight into the decoder through ``graph.run(..., feed={"routing/v": v})``;
* ``curves.png``: training and test loss and accuracy from the run's metrics.jsonl.

The first two need a decoder (an output ``recon``; the second also ``digitcaps``): for a
graph without one (e.g. graphs/baseline-cnn.yaml) they are skipped with a note, and
only ``curves.png`` is drawn; with nothing to draw at all the command fails with one
line. Predictions are the argmax of the class scores (``runners.training.class_scores``).

Grids come from ``torchvision.utils.make_grid``, figures from matplotlib (Agg backend).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from capsflow.backends import Backend, get_backend, to_numpy
from capsflow.cli import check_output_dir, non_negative_int, positive_int
from capsflow.errors import CapsflowError
from capsflow.options import Options, options_from_args
from capsflow.runners.data import one_hot
from capsflow.runners.evaluate import RECON, add_model_arguments, open_model
from capsflow.runners.pictures import save_figure
from capsflow.runners.training import (METRICS, batched_outputs, class_scores, num_classes,
                                       read_metrics)

CAPSULES = "digitcaps"       # graph output holding the digit capsules (N, 10, 16)
DELTAS = np.round(np.arange(-0.25, 0.25 + 1e-9, 0.05), 2) + 0.0  # 11 shifts as in the paper
# (+ 0.0 turns the -0.0 in the middle into 0.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    a = parser.add_argument
    a("--out", required=True, metavar="DIR", help="folder for the PNG files")
    a("--count", type=positive_int, default=32,
      help="test images in the reconstruction grid (default 32)")
    a("--index", type=non_negative_int, default=0,
      help="test image whose capsule is perturbed (default 0, the first)")
    a("--metrics", metavar="FILE",
      help="metrics.jsonl for the curves (default: the one beside the checkpoint)")


def main(args: argparse.Namespace) -> int:
    out = check_output_dir(args.out, "--out")
    backend = get_backend(options_from_args(args))
    graph, params, ckpt, info, images, labels = open_model(args, backend)
    outputs = graph.spec.outputs
    decoder = RECON in outputs
    perturb = decoder and CAPSULES in outputs
    if perturb and not 0 <= args.index < images.shape[0]:
        raise CapsflowError(f"--index {args.index} is outside the {images.shape[0]} test "
                            f"images loaded (see --limit-test)")
    metrics = Path(args.metrics) if args.metrics else ckpt.path.parent / METRICS
    if args.metrics and not metrics.is_file():
        raise CapsflowError(f"no such metrics file: {metrics}")
    if not decoder and not metrics.is_file():
        raise CapsflowError(f"nothing to draw: {graph.spec.name} has no decoder (no output "
                            f"'{RECON}', so no recon.png or perturbation.png) and there is "
                            f"no {metrics} for curves.png (pass --metrics FILE)")
    out.mkdir(parents=True, exist_ok=True)
    names = info.classes
    written = []
    if decoder:
        written.append(reconstruction_figure(graph, params, images[:args.count],
                                             labels[:args.count], names, out / "recon.png",
                                             args.bs, backend))
    else:
        print(f"note: {graph.spec.name} has no output '{RECON}' (no decoder); recon.png and "
              f"perturbation.png skipped")
    if perturb:
        written.append(perturbation_figure(graph, params, images[args.index:args.index + 1],
                                           names, out / "perturbation.png", args.index,
                                           backend))
    elif decoder:
        print(f"note: {graph.spec.name} has no output '{CAPSULES}' (the digit capsules, "
              f"N x classes x dims) to perturb; perturbation.png skipped")
    if metrics.is_file():
        written.append(curves_figure(read_metrics(metrics), out / "curves.png",
                                     title=f"{graph.spec.name} on {info.dataset}"))
    else:
        print(f"note: no {metrics}; curves.png skipped (pass --metrics FILE)")
    for path in written:
        print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------ figures


def _pyplot() -> Any:
    import matplotlib  # lazy: only this runner draws
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _tiles(images: np.ndarray, shape: tuple) -> np.ndarray:
    """(B, C*H*W) or (B, C, H, W) -> (B, 1 or 3, H, W'): grey, colour, or (C = 2, a
    smallNORB stereo pair) the two images side by side."""
    c, h, w = shape
    tiles = np.ascontiguousarray(images.reshape(-1, c, h, w), dtype=np.float32)
    if c not in (1, 3):
        tiles = np.concatenate(list(tiles.transpose(1, 0, 2, 3)), axis=-1)[:, None]
    return tiles


def _grid(images: np.ndarray, nrow: int, shape: tuple = (1, 28, 28)) -> np.ndarray:
    """(B, C*H*W) or (B, C, H, W) in [0, 1] -> (H, W, 3) image of a make_grid tiling."""
    import torch
    from torchvision.utils import make_grid
    grid = make_grid(torch.from_numpy(_tiles(images, shape)), nrow=nrow, padding=2,
                     pad_value=0.5)
    return grid.permute(1, 2, 0).numpy()


def _decode(graph: Any, params: dict, images: np.ndarray, labels: np.ndarray | None,
            batch_size: int, backend: Any) -> tuple:
    """(reconstructions (N, pixels), class scores (N, classes)); ``labels`` (N,) or
    (N, K) mask the decoder (one capsule, or K), None: the predicted capsule."""
    scores = class_scores(graph)
    recon = np.empty((images.shape[0], int(np.prod(images.shape[1:]))), dtype=np.float32)
    score = np.empty((images.shape[0], num_classes(graph)), dtype=np.float32)
    for part, out in batched_outputs(graph, params, images, labels, (scores, RECON),
                                     batch_size, backend):
        recon[part], score[part] = out[RECON], out[scores]
    return recon, score


def reconstruction_figure(graph: Any, params: dict, images: np.ndarray, labels: np.ndarray,
                          names: list, path: Path, batch_size: int = 100,
                          backend: Options | Backend = Options()) -> Path:
    """Inputs (left) and reconstructions from the predicted capsule (right). Labels
    (N, K) (MultiMNIST): the K highest-scoring capsules are the prediction; the panels
    show the decoder fed all K of them and each alone (one capsule at a time)."""
    shape = images.shape[1:]
    k = 1 if labels.ndim == 1 else labels.shape[1]
    recon, score = _decode(graph, params, images, None, batch_size, backend)
    top = np.argsort(-score, axis=1, kind="stable")[:, :k]
    panels = [(images, f"test images 0-{images.shape[0] - 1}")]
    if k == 1:
        pred = top[:, 0]
        wrong = [f"#{i}: {names[labels[i]]} read as {names[pred[i]]}"
                 for i in np.flatnonzero(pred != labels)]
        panels.append((recon, "reconstructions (decoder fed the predicted capsule)"))
    else:
        right = np.sort(top, axis=1) == np.sort(labels, axis=1)
        wrong = ["#{}: {} read as {}".format(i, "+".join(names[c] for c in labels[i]),
                                             "+".join(names[c] for c in top[i]))
                 for i in np.flatnonzero(~right.all(axis=1))]
        panels.append((_decode(graph, params, images, top, batch_size, backend)[0],
                       f"decoder fed the {k} predicted capsules"))
        for j in range(k):
            panels.append((_decode(graph, params, images, top[:, j], batch_size, backend)[0],
                           f"predicted capsule {j + 1} alone"))
    nrow = min(8, images.shape[0])
    rows = -(-images.shape[0] // nrow)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 1.2 + 5 * rows / nrow))
    for ax, (tiles, title) in zip(axes, panels):
        ax.imshow(_grid(tiles, nrow, shape), interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    correct = images.shape[0] - len(wrong)
    summary = f"{correct}/{images.shape[0]} classified correctly"
    if wrong:
        summary += "; " + ", ".join(wrong[:4]) + (" ..." if len(wrong) > 4 else "")
    fig.suptitle(summary, fontsize=9, y=0.04)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def perturbed_capsules(v: np.ndarray, cls: int, deltas: np.ndarray = DELTAS) -> np.ndarray:
    """v (10, 16) -> (16 * len(deltas), 10, 16): row d*len(deltas)+k has capsule ``cls``'s
    dimension d shifted by deltas[k], every other value unchanged."""
    dims = v.shape[-1]
    out = np.repeat(v[None], dims * deltas.size, axis=0).reshape(dims, deltas.size, *v.shape)
    out[np.arange(dims), :, cls, np.arange(dims)] += deltas
    return out.reshape(-1, *v.shape)


def perturbation_figure(graph: Any, params: dict, image: np.ndarray, names: list, path: Path,
                        index: int = 0, backend: Options | Backend = Options()) -> Path:
    """The 16 x 11 grid of decoded capsule perturbations for one image (1, C, H, W)."""
    scores = class_scores(graph)
    out = graph.run(params, {"x": image}, backend=backend, outputs=[scores, CAPSULES])
    v = to_numpy(out[CAPSULES])[0]                                        # (10, 16)
    cls = int(to_numpy(out[scores])[0].argmax())
    length = float(np.linalg.norm(v[cls]))
    caps = perturbed_capsules(v, cls)                                     # (176, 10, 16)
    n = caps.shape[0]
    # y fixes the mask on the predicted capsule even if a shift changed the argmax;
    # x is a required input, though the fed capsules cut everything upstream of them.
    decoded = graph.run(params, {"x": np.broadcast_to(image, (n,) + image.shape[1:]),
                                 "y": one_hot(np.full(n, cls), num_classes(graph))},
                        backend=backend, outputs=[RECON],
                        feed={graph.spec.outputs[CAPSULES]: caps})
    grid = _grid(to_numpy(decoded[RECON]), DELTAS.size, image.shape[1:])
    tile_h, tile_w = _tiles(image, image.shape[1:]).shape[-2:]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 9.2))
    ax.imshow(grid, interpolation="nearest")
    # tiles plus make_grid's padding
    ax.set_xticks(2 + tile_w / 2 + (tile_w + 2) * np.arange(DELTAS.size))
    ax.set_xticklabels([f"{d:+.2f}" for d in DELTAS], fontsize=7, rotation=90)
    ax.set_yticks(2 + tile_h / 2 + (tile_h + 2) * np.arange(v.shape[-1]))
    ax.set_yticklabels([str(d) for d in range(v.shape[-1])], fontsize=7)
    ax.set_xlabel("shift added to the dimension")
    ax.set_ylabel("dimension of the digit capsule")
    ax.set_title(f"test image {index}: capsule '{names[cls]}' (length {length:.2f}), "
                 f"one dimension shifted per row", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def curves_figure(records: list, path: Path, title: str = "") -> Path:
    """Loss and accuracy against iterations: training every --disp iterations (lines),
    test at the validated epochs (markers)."""
    train = [r for r in records if r.get("kind") == "train"]
    tested = [r for r in records if r.get("kind") == "epoch" and r.get("test_acc") is not None]
    if not train and not tested:
        raise CapsflowError(f"no training records to plot in the metrics for {path.name}")
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy (%)")):
        scale = 100 if key == "acc" else 1
        if train:
            ax.plot([r["iteration"] for r in train], [scale * r[key] for r in train],
                    lw=1, label="train (running, per --disp window)")
        if tested:
            ax.plot([r["iteration"] for r in tested], [scale * r[f"test_{key}"] for r in tested],
                    "o-", label="test (end of epoch)")
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    losses = [r["loss"] for r in train] + [r["test_loss"] for r in tested]
    if min(losses) > 0:  # a log axis cannot show a loss of 0 (a hand-made file's)
        ax_loss.set_yscale("log")
    if tested:
        best = max(tested, key=lambda r: r["test_acc"])
        ax_acc.set_title(f"best test accuracy {100 * best['test_acc']:.2f}% "
                         f"(epoch {best['epoch']})", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
