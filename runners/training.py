"""The training loop as a library: ``Trainer``, checkpoints, batched evaluation.

``capsflow train`` is a thin CLI over this module; other runners (e.g. a routing-variant
comparison) build a ``Trainer`` themselves::

    graph = capsflow.compile("graphs/capsnet.yaml", {"routing_iters": 1})
    data = load_data(TrainConfig(limit_train=1000))
    trainer = Trainer(graph, data, TrainConfig(num_epochs=2), save_dir="runs/r1")
    records = trainer.fit()          # one dict per epoch: train/test loss and accuracy

Design points:

* Validation calls ``graph.run`` only (never ``value_and_grad``): no backward pass and no
  update ever touches the test split.
* Every epoch ends with ``SAVE_DIR/last.npz`` (and ``best.npz`` when the test accuracy
  improved), written atomically. A checkpoint holds the parameters (``param/<name>``,
  readable by ``capsflow.load_params``), the optimizer state (``optim/<slot>/<name>``),
  the epoch, the spec's YAML text and a JSON ``meta`` record with the settings, the
  overrides, the batch iterator's RNG state and the running sums of the epoch, so that
  ``--resume`` reproduces an uninterrupted run number for number.
* Ctrl-C saves a checkpoint at the last completed step and returns; a loss (train or
  test) that turns NaN or inf stops training with one line and leaves the last good
  checkpoint alone: a non-finite state is never saved.
* A checkpoint is untrusted input (it may come from anywhere): ``read_checkpoint`` checks
  the type of every metadata field and never uses a stored file name as a path unchecked.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import tempfile
import time
import typing
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Tuple

import numpy as np

from capsflow.backends import Backend, get_backend, to_numpy
from capsflow.training.checkpoint import (atomic_file, check_numeric, load_npz,
                                         remove_stale_temporaries, same_file_atomic,
                                         save_npz_atomic)
from capsflow.errors import CapsflowError
from capsflow.options import Options, as_options
from capsflow.training.json_fields import hint_name, json_type_name, matches_hint, shown
from capsflow.training.optim import ExponentialDecay, make_optimizer, state_from_flat, state_to_flat
from capsflow.training.train_step import RecordedForward, TrainStep, device_to_host
from capsflow.runners.data import (BatchIterator, DataDescription, load_train_test,
                                   one_hot, shape_text)
from capsflow.runners.metrics_file import read_metrics
from capsflow.runners.step_memory import check_forward_fits, check_step_fits
from capsflow.runners.signals import StopRequests, interrupts_deferred, stops_dropped

CHECKPOINT_FORMAT = "capsflow-checkpoint"
CHECKPOINT_VERSION = 1
LAST = "last.npz"
BEST = "best.npz"
METRICS = "metrics.jsonl"
#: A graph input of this name is fed a seed at every training step, for its dropout ops
#: (ops/regularize.py); evaluation and prediction never feed it (dropout is the identity).
DROPOUT_SEED = "dropout_seed"
#: Graph outputs that may hold the class scores (N, classes), in order of preference: a
#: graph's ``scores`` (e.g. a CNN's logits), else CapsNet's capsule ``lengths``.
SCORE_OUTPUTS = ("scores", "lengths")
#: Graph variables that size the input (docs/spec.md, "Arithmetic"): set from the dataset.
INPUT_VARS = ("channels", "height", "width", "classes")


class TrainingDiverged(CapsflowError):
    """The loss became NaN or infinite; training stopped without saving that state."""


class CheckpointError(CapsflowError):
    """A checkpoint file that is damaged, crafted or not capsflow's."""


# ---------------------------------------------------------------------- settings


@dataclass
class TrainConfig:
    """Everything that decides a run's numbers (plus how often it reports)."""

    batch_size: int = 100
    lr: float = 1e-3
    optimizer: str = "adam"
    # The learning-rate schedule (capsflow.training.optim.ExponentialDecay): per-epoch,
    # lr * lr_decay ** epoch; or per-step, the official code's lr * lr_decay ** (step /
    # decay_steps), never below min_lr. None: the schedule's own default (DECAY_DEFAULTS).
    lr_schedule: str = "per-epoch"
    lr_decay: Optional[float] = None
    decay_steps: int = 2000
    min_lr: Optional[float] = None
    num_epochs: int = 10
    val_epoch: int = 1             # validate every N epochs (and always after the last)
    disp: int = 10                 # log running loss/accuracy every N iterations
    seed: int = 0                  # parameter init and batch order/shifts/flips
    shift: int = 2                 # random shifts of up to this many pixels (0: off)
    flip: bool = False             # random left-right mirroring (Fashion-MNIST's Keras port)
    dataset: str = "mnist"
    data_dir: Optional[str] = None
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    # How the dataset's images are made (runners/data.py, docs/data.md); None: its default.
    emnist_split: Optional[str] = None
    image_size: Optional[list] = None      # [height, width]: folder, smallnorb
    crop: Optional[list] = None            # [height, width]: folder, smallnorb
    channels: Optional[int] = None         # 1 or 3: folder
    multimnist_count: Optional[int] = None  # examples per split: multimnist
    multimnist_fresh: bool = False         # multimnist: new training overlays each epoch
    dtype: str = "float32"
    options: Options = Options()   # backend, precision, fast paths: how the numbers are made

    # Settings a resumed run must share with its checkpoint, or it would not continue
    # the same run. The others (epochs, reporting, options, test subset) may change.
    FIXED_ON_RESUME = ("batch_size", "lr", "optimizer", "lr_schedule", "lr_decay",
                       "decay_steps", "min_lr", "seed", "shift", "flip",
                       "dataset", "limit_train", "emnist_split", "image_size", "crop",
                       "channels", "multimnist_count", "multimnist_fresh", "dtype")

    #: schedule -> (lr_decay, min_lr) when not given: x0.9 per epoch (the Keras port), and
    #: the paper's official code, x0.96 every 2000 steps with a floor of 1e-6.
    DECAY_DEFAULTS = {"per-epoch": (0.9, 0.0), "per-step": (0.96, 1e-6)}

    def lr_schedule_fn(self) -> ExponentialDecay:
        """The schedule these settings describe (raises one line for a bad one)."""
        return ExponentialDecay(self.lr, self.lr_decay, self.lr_schedule, self.decay_steps,
                                self.min_lr)

    def describe_lr(self) -> str:
        """The schedule in words, e.g. 'lr 0.001 x0.96/2000 steps (min 1e-06)'."""
        if self.lr_schedule == "per-step":
            return (f"lr {self.lr:g} x{self.lr_decay:g}/{self.decay_steps} steps "
                    f"(min {self.min_lr:g})")
        return f"lr {self.lr:g} x{self.lr_decay:g}/epoch"

    def check(self) -> None:
        """One clear line for a setting no run can use. Fills in the schedule's defaults
        (DECAY_DEFAULTS) for an ``lr_decay`` or ``min_lr`` not given."""
        if self.lr_schedule not in self.DECAY_DEFAULTS:
            raise CapsflowError(f"--lr-schedule must be one of {', '.join(self.DECAY_DEFAULTS)}, "
                                f"got {self.lr_schedule!r}")
        decay, floor = self.DECAY_DEFAULTS[self.lr_schedule]
        self.lr_decay = decay if self.lr_decay is None else self.lr_decay
        if self.min_lr is None and math.isfinite(self.lr) and 0 < self.lr < floor:
            raise CapsflowError(f"--lr {self.lr:g} is below the {self.lr_schedule} schedule's "
                                f"floor {floor:g}; pass --min-lr (0, or at most the --lr)")
        self.min_lr = floor if self.min_lr is None else self.min_lr
        for name in ("batch_size", "num_epochs", "val_epoch", "disp"):
            if getattr(self, name) < 1:
                raise CapsflowError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("limit_train", "limit_test"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CapsflowError(f"--{_flag(name)} must be >= 1 examples, got {value}")
        if self.seed < 0:
            raise CapsflowError(f"--seed must be >= 0, got {self.seed}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise CapsflowError(f"--lr must be a finite number > 0, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            raise CapsflowError(f"--lr-decay must lie in (0, 1], got {self.lr_decay}")
        if self.decay_steps < 1:
            raise CapsflowError(f"--decay-steps must be >= 1, got {self.decay_steps}")
        if not (math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr):
            raise CapsflowError(f"--min-lr must lie in [0, --lr {self.lr:g}], got {self.min_lr}")
        if self.shift < 0:
            raise CapsflowError(f"the shift must be >= 0 pixels, got {self.shift}")
        from capsflow.core.graph import DTYPES
        if self.dtype not in DTYPES:
            raise CapsflowError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype}")
        make_optimizer(self.optimizer, self.lr)  # unknown names raise one line
        from capsflow.runners.data import _dataset_info, _resolve_options
        _resolve_options(_dataset_info(self.dataset), self.data_options())  # one line

    def describe_augmentation(self) -> str:
        """The training augmentation in words, e.g. 'shifts up to 2 px, left-right flips'."""
        words = [f"shifts up to {self.shift} px" if self.shift else "no shifts"]
        if self.flip:
            words.append("left-right flips")
        return ", ".join(words)

    def data_options(self) -> dict:
        """The dataset options given (``runners.data.load``'s keywords)."""
        given = {"emnist_split": self.emnist_split, "size": self.image_size,
                 "crop": self.crop, "channels": self.channels, "count": self.multimnist_count,
                 "fresh": self.multimnist_fresh or None}
        return {k: v for k, v in given.items() if v is not None}

    def to_json(self) -> dict:
        """The record stored in checkpoints (``meta["config"]``)."""
        return dict({f.name: getattr(self, f.name) for f in fields(self)},
                    options=asdict(self.options))

    @classmethod
    def from_json(cls, record: dict) -> "TrainConfig":
        """A checkpoint's config; settings it does not name keep their defaults, a value
        of the wrong type raises CheckpointError."""
        return from_record(cls, record, "config", complete=False)


_FLAGS = {"batch_size": "bs", "optimizer": "opt", "limit_train": "limit-train",
          "limit_test": "limit-test", "lr_decay": "lr-decay", "data_dir": "data-dir",
          "lr_schedule": "lr-schedule", "decay_steps": "decay-steps", "min_lr": "min-lr",
          "emnist_split": "emnist-split", "image_size": "image-size",
          "multimnist_count": "multimnist-count", "multimnist_fresh": "multimnist-fresh"}


def _flag(name: str) -> str:
    return _FLAGS.get(name, name)


@dataclass
class Data:
    """Train and test splits: images float32 (N, C, H, W) in [0, 1], labels int64 (N,)
    (MultiMNIST: (N, 2)), and what they are (None when made by hand). ``train_for_epoch``
    (MultiMNIST with ``--multimnist-fresh``): epoch -> that epoch's training split, epoch
    0's being ``train_images``, ``train_labels``."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    info: Optional[DataDescription] = None
    train_for_epoch: Optional[Callable[[int], Tuple[np.ndarray, np.ndarray]]] = None


def load_data(config: TrainConfig, download: bool = False) -> Data:
    """Both splits of ``config.dataset`` (first ``limit_*`` examples of each), made with
    its data options and seed; ``download``: fetch files found nowhere."""
    train, test = load_train_test(config.dataset, config.data_dir, config.limit_train,
                                  config.limit_test, download, config.seed,
                                  **config.data_options())
    return Data(train.images, train.labels, test.images, test.labels, train.info,
                train.for_epoch)


# ------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """A training checkpoint read back from disk (all arrays on the host), its metadata
    checked by ``read_checkpoint``."""

    path: Path
    params: dict                   # name -> array, the spec's parameter names
    optim: dict                    # capsflow.training.optim.state_to_flat layout
    meta: dict                     # JSON record, see Trainer.meta()
    sources: dict                  # spec files the run was compiled from: relative path -> text
    config: TrainConfig            # meta["config"], typed (defaults where it names none)
    progress: "Progress"           # meta["progress"], typed

    @property
    def overrides(self) -> dict:
        return dict(self.meta.get("overrides") or {})

    @property
    def data(self) -> Optional[DataDescription]:
        """What the run was trained on (``meta["data"]``), None in checkpoints written
        before capsflow recorded it."""
        record = self.meta.get("data")
        return None if record is None else DataDescription.from_json(record)

    @property
    def graph_name(self) -> str:
        return self.meta.get("graph_name") or Path(next(iter(self.sources))).stem

    @property
    def epoch(self) -> int:
        """Completed epochs."""
        return self.progress.epoch


def write_checkpoint(path: str | Path, params: dict, optim_flat: dict, meta: dict,
                     sources: dict) -> None:
    """Write a checkpoint atomically (a crash leaves the previous file intact).

    ``sources`` (relative path -> YAML text, the graph first) land under ``spec/<path>``;
    with ``meta["overrides"]`` they rebuild the graph (see ``graph_from_checkpoint``)."""
    arrays = {f"param/{k}": v for k, v in params.items()}
    arrays.update({f"optim/{k}": v for k, v in optim_flat.items()})
    arrays.update({f"spec/{k}": np.asarray(text) for k, text in sources.items()})
    arrays["epoch"] = np.asarray(int(meta["progress"]["epoch"]), dtype=np.int64)
    arrays["meta"] = np.asarray(json.dumps(dict(meta, spec_files=list(sources))))
    save_npz_atomic(path, arrays)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by ``write_checkpoint``; anything else is one clear line.

    The file is untrusted input: every metadata field is type-checked (TrainConfig and
    Progress field by field), arrays must hold numbers (spec files: text), and the stored
    spec file names must be relative paths inside the stored tree (see ``_stored_name``).
    """
    path = Path(path)
    return checkpoint_of(path, load_npz(path))  # missing or truncated files: one line there


def checkpoint_of(path: Path, arrays: dict) -> Checkpoint:
    """``read_checkpoint`` of the arrays already read from ``path``."""
    not_ours = (f"{path} is not a capsflow training checkpoint ({{}}); pass a last.npz or "
                f"best.npz written by capsflow train")
    if "meta" not in arrays:
        raise CheckpointError(not_ours.format("no 'meta' entry"))
    try:
        meta = json.loads(_text(arrays["meta"], "meta", path))
    except (ValueError, RecursionError) as exc:  # ValueError: JSON, or a 4,300-digit integer
        why = getattr(exc, "msg", "nested too deeply" if isinstance(exc, RecursionError)
                      else "a number too long")
        raise CheckpointError(f"{path}: the checkpoint's meta record is not valid JSON "
                              f"({why}); the file is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(not_ours.format("its meta record is not capsflow's"))
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is checkpoint version {meta.get('version')!r}; this "
                              f"capsflow reads version {CHECKPOINT_VERSION}")
    try:
        names = meta.get("spec_files")
        if not isinstance(names, list) or not names:
            raise CheckpointError("'spec_files' is not a non-empty list of file names")
        names = [_stored_name(n) for n in names]
        if len(set(names)) != len(names):
            raise CheckpointError("'spec_files' names a file twice")
        for key in ("graph_name", "graph_file"):
            if not isinstance(meta.get(key, ""), str):
                raise CheckpointError(f"'{key}' is {json_type_name(meta[key])}, expected a string")
        overrides = meta.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise CheckpointError(f"'overrides' is {json_type_name(overrides)}, expected an object")
        config = TrainConfig.from_json(meta.get("config", {}))
        config.check()
        progress = Progress.from_json(meta.get("progress"))
        if meta.get("data") is not None:
            DataDescription.from_json(meta["data"])  # DataError: a CapsflowError
    except CapsflowError as exc:
        raise CheckpointError(f"{path}: damaged checkpoint metadata: {exc}") from None
    missing = [f"spec/{n}" for n in names if f"spec/{n}" not in arrays]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint is incomplete (no {missing[0]}); "
                              f"the file is damaged")
    sources = {name: _text(arrays[f"spec/{name}"], f"spec/{name}", path) for name in names}
    params = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    optim = {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}
    if not params:
        raise CheckpointError(f"{path} holds no parameters (no 'param/<name>' entries)")
    check_numeric(params, path, "parameter")
    check_numeric(optim, path, "optimizer entry")
    return Checkpoint(path, params, optim, meta, sources, config, progress)


def _text(array: np.ndarray, key: str, path: Path) -> str:
    """A text entry of a checkpoint (a 0-d string array, as np.asarray(str) saves)."""
    if array.dtype.kind != "U" or array.ndim != 0:
        raise CheckpointError(f"{path}: '{key}' is not text ({array.dtype}, shape "
                              f"{array.shape}); the file is damaged")
    return str(array)


def _stored_name(name: Any) -> str:
    """A spec file name stored in a checkpoint, accepted only as a relative path that
    stays inside the stored tree: ``graph_from_checkpoint`` writes the files under a
    temporary folder by these names, and a crafted ``/etc/x`` or ``../x`` must never
    write outside it."""
    parts = name.split("/") if isinstance(name, str) else []
    bad = (not parts or any(p in ("", ".", "..") for p in parts)
           or "\\" in name or ":" in name or not name.isprintable())
    if bad:
        raise CheckpointError(f"'spec_files' holds {json.dumps(name)[:60]}, not a relative "
                              f"file name inside the stored spec folder")
    return name


def spec_sources(graph: Any) -> dict:
    """The spec files ``graph`` was compiled from (graph, bases, included fragments):
    path relative to their common folder -> text, the graph first."""
    files = [Path(f).resolve() for f in (getattr(graph.spec, "sources", None)
                                         or [graph.spec.file])]
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return {f.relative_to(root).as_posix(): f.read_text() for f in files}


def graph_from_checkpoint(ckpt: Checkpoint, overrides: Optional[dict] = None) -> Any:
    """Compile the spec stored in ``ckpt`` with its overrides (updated by ``overrides``),
    independent of the YAML files on disk now."""
    from capsflow.core.graph import compile as compile_graph
    merged = dict(ckpt.overrides, **(overrides or {}))
    main = next(iter(ckpt.sources))
    with tempfile.TemporaryDirectory(prefix="capsflow-spec-") as tmp:
        root = Path(tmp).resolve()
        for name, text in ckpt.sources.items():
            target = root.joinpath(*_stored_name(name).split("/"))
            if not target.resolve().is_relative_to(root):  # a second guard: never outside
                raise CheckpointError(f"{ckpt.path}: spec file '{name}' lies outside the "
                                      f"stored spec folder")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
            except OSError as exc:  # e.g. 'a' and 'a/b' both stored
                raise CheckpointError(f"{ckpt.path}: cannot rebuild the stored spec file "
                                      f"'{name}' ({exc.strerror}); the file is damaged") from None
        return compile_graph(root / main, merged)


# --------------------------------------------------------------------- evaluation


def class_scores(graph: Any) -> str:
    """The name of the output holding ``graph``'s class scores (N, classes), whose argmax
    is the predicted class: ``scores`` when the graph declares it, else ``lengths``.

    Raises CapsflowError (one line, naming the outputs the graph has) when it has neither
    or when that output is not two-dimensional."""
    outputs = graph.spec.outputs
    name = next((n for n in SCORE_OUTPUTS if n in outputs), None)
    if name is None:
        raise CapsflowError(
            f"{graph.spec.file} has no class-score output: declare 'scores' (or CapsNet's "
            f"'lengths'), shape (N, classes), under outputs; its outputs are "
            f"{', '.join(outputs) or 'none'}")
    shape = graph.dag.nodes[outputs[name]]["shape"]
    if len(shape) != 2:
        raise CapsflowError(f"{graph.spec.file}: output '{name}' has shape "
                            f"({', '.join(map(str, shape))}); class scores must be (N, classes)")
    return name


def num_classes(graph: Any) -> int:
    """The number of classes: the last dimension of the graph's class scores."""
    name = class_scores(graph)
    return int(graph.dag.nodes[graph.spec.outputs[name]]["shape"][-1])


def input_shape(graph: Any) -> Optional[tuple]:
    """(channels, height, width) of the graph's image input ``x`` (N, C, H, W), or None
    when it has no such input."""
    spec = graph.spec.inputs.get("x")
    shape = tuple(spec.shape) if spec is not None else ()
    if len(shape) != 4 or not all(isinstance(s, int) for s in shape[1:]):
        return None
    return shape[1:]


def _shape_text(shape: Any) -> str:
    return shape_text(shape) if shape is not None else "not [N, C, H, W]"


def check_fits(graph: Any, info: DataDescription) -> None:
    """One line when ``graph`` cannot take ``info``'s images or classes."""
    shape, classes = input_shape(graph), num_classes(graph)
    if shape != tuple(info.shape):
        declared = [v for v in INPUT_VARS if v in graph.spec.vars]
        how = (f"its vars {', '.join(declared)} do not size it" if declared else
               f"it declares none of the vars {', '.join(INPUT_VARS)} that would size it "
               f"(docs/spec.md, \"Arithmetic\")")
        raise CapsflowError(
            f"{graph.spec.file} takes {_shape_text(shape)} images (input 'x') but "
            f"--dataset {info.dataset} has {_shape_text(info.shape)}; {how}: use a graph "
            f"that declares them (graphs/capsnet.yaml does) or a dataset of that shape")
    if classes != info.num_classes:
        raise CapsflowError(
            f"{graph.spec.file} scores {classes} classes but --dataset {info.dataset} has "
            f"{info.num_classes}; declare the var 'classes' (graphs/capsnet.yaml does) or "
            f"pick a dataset with {classes} classes")


def fit_graph_to_data(graph: Any, info: DataDescription, given: dict) -> Any:
    """``graph`` compiled for ``info``'s input: the input vars it declares (channels,
    height, width, classes) set from the data, the ``given`` --set values kept; then
    checked (``check_fits``). A --set of an input var that contradicts the data is one
    line. The result's ``spec.vars`` differ from the file's, so the trainer records them
    as overrides, like --set values."""
    from capsflow.core.graph import compile as compile_graph
    wanted = dict(zip(("channels", "height", "width"), info.shape), classes=info.num_classes)
    for var, value in wanted.items():
        # graph.spec.vars holds the --set value as the graph declares it (e.g. an int)
        if var in given and graph.spec.vars.get(var, given[var]) != value:
            raise CapsflowError(f"--set {var}={given[var]} contradicts --dataset {info.dataset} "
                                f"({info.describe()}); drop it: the graph takes its input "
                                f"size from the data")
    declared = {k: v for k, v in wanted.items() if k in graph.spec.vars}
    if any(graph.spec.vars[k] != v for k, v in declared.items()):
        graph = compile_graph(graph.spec.file, dict(given, **declared))
    check_fits(graph, info)
    return graph


def correct_predictions(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """bool (N,): an example is right when its k highest class scores are exactly the k
    classes of its (multi-)hot target ``targets`` (N, classes), k its number of ones: the
    argmax for one label; for MultiMNIST's two, the paper's measure (the two longest
    capsules are the two digits)."""
    if targets.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    k = targets_k(targets)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :max(k, 1)]
    return np.take_along_axis(targets, top, axis=1).sum(axis=1) == k


def count_correct(xp: Any, scores: Any, targets: Any, k: int) -> Any:
    """``correct_predictions(scores, targets).sum()`` as array work on the device (a 0-d
    count, no sort, nothing the host waits for); ``k`` is the number of ones per target
    row, known on the host (``targets_k``). The top k are the classes whose rank in
    NumPy's stable sort of ``-scores`` is below k: class j comes before class c when
    its score is higher, or equal and j < c; NaN scores come after every number, among
    themselves in class order."""
    score_c, score_j = scores[:, :, None], scores[:, None, :]
    nan_c, nan_j = xp.isnan(score_c), xp.isnan(score_j)
    index = xp.arange(scores.shape[1])
    earlier = index[None, None, :] < index[None, :, None]        # [., c, j]: j < c
    ahead = xp.where(nan_c, ~nan_j | earlier,
                     ~nan_j & ((score_j > score_c) | ((score_j == score_c) & earlier)))
    top = ahead.sum(axis=2) < max(k, 1)
    return ((targets * top).sum(axis=1) == k).sum()


def targets_k(targets: np.ndarray) -> int:
    """The k of ``correct_predictions``: the most ones in a row of the (multi-)hot
    ``targets`` (1 for one label, 2 for MultiMNIST's two)."""
    return int(round(float(targets.sum(axis=1).max()))) if targets.shape[0] else 0


def batched_outputs(graph: Any, params: dict, images: np.ndarray,
                    labels: Optional[np.ndarray] = None, outputs: Optional[tuple] = None,
                    batch_size: int = 100, backend: Options | Backend = Options(),
                    desc: Optional[str] = None,
                    forward: Optional[RecordedForward] = None) -> Iterator[tuple]:
    """Forward passes (``graph.run``, no backward) over ``images`` in order, recorded
    and replayed where the backend replays training steps (``RecordedForward``).

    Args:
        images: float32 (N, C, H, W). labels: int (N,) or (N, K) (multi-hot: MultiMNIST)
            or None; when given, ``y`` is fed, so the decoder is masked by the true
            label(s) and ``loss`` can be asked for;
            without labels the decoder uses the predicted class. The dropout seed is
            never fed (evaluation: dropout is the identity).
        outputs: the outputs to compute (default: the class scores, ``class_scores``).
        backend: the run's Options, or the Backend made from them (as graph.run takes).
        desc: show a tqdm bar with this description.
        forward: the ``RecordedForward`` of ``graph`` on ``params`` to run, computing at
            least ``outputs`` (a trainer keeps one for all its evaluations, so that its
            recording is made once); None: a new one for this call.
    Yields:
        (slice into the N examples, {output name: host NumPy array}) per batch.
    """
    outputs = (class_scores(graph),) if outputs is None else outputs
    n = images.shape[0]
    if forward is None:
        check_forward_fits(graph, params, as_options(backend), min(batch_size, n),
                           list(outputs), ["x"] + (["y"] if labels is not None else []))
        forward = RecordedForward(graph, params, backend, list(outputs))
    classes = num_classes(graph) if labels is not None else None
    starts = range(0, n, batch_size)
    if desc is not None:
        from tqdm import tqdm  # lazy: only runners that show progress need it
        starts = tqdm(starts, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
    for lo in starts:
        part = slice(lo, min(lo + batch_size, n))
        inputs = {"x": images[part]}
        if labels is not None:
            inputs["y"] = one_hot(labels[part], classes)
        out = forward(inputs)
        # Copies: a replayed forward pass rewrites its outputs in place.
        yield part, {k: np.array(to_numpy(out[k])) for k in outputs}


def evaluate_split(graph: Any, params: dict, images: np.ndarray, labels: np.ndarray,
                   batch_size: int = 100, backend: Options | Backend = Options(),
                   desc: Optional[str] = None,
                   forward: Optional[RecordedForward] = None) -> dict:
    """Mean loss and accuracy over a split, forward passes only.

    The loss feeds the true labels (it needs them); the predictions are the argmax of the
    class scores (``class_scores``: ``scores``, else the capsule lengths), which do not
    depend on the decoder's mask. No dropout seed is fed: dropout is the identity.
    Labels (N, K) (MultiMNIST) feed a multi-hot ``y`` and count an example as right when
    its K highest scores are its K classes (``correct_predictions``).
    ``forward``: as for ``batched_outputs`` (computing ``loss`` and the class scores).
    Returns {"loss": float, "acc": float in [0, 1], "pred": int64 (N,) or (N, K)}.
    """
    scores, classes = class_scores(graph), num_classes(graph)
    k = 1 if labels.ndim == 1 else labels.shape[1]
    total, right = 0.0, 0
    pred = np.empty((images.shape[0], k), dtype=np.int64)
    for part, out in batched_outputs(graph, params, images, labels, ("loss", scores),
                                     batch_size, backend, desc, forward):
        total += float(out["loss"]) * (part.stop - part.start)
        targets = one_hot(labels[part], classes)
        right += int(correct_predictions(out[scores], targets).sum())
        pred[part] = np.argsort(-out[scores], axis=1, kind="stable")[:, :k]
    n = max(images.shape[0], 1)
    return {"loss": total / n, "acc": right / n if labels.size else 0.0,
            "pred": pred[:, 0] if labels.ndim == 1 else pred}


# ------------------------------------------------------------------------ training


@dataclass
class _Sums:
    """Running sums over examples: loss * batch size, correct predictions, examples."""

    loss: float = 0.0
    correct: int = 0
    count: int = 0

    def add(self, loss: float, correct: int, count: int) -> None:
        self.loss += loss * count
        self.correct += correct
        self.count += count

    def means(self) -> tuple:
        n = max(self.count, 1)
        return self.loss / n, self.correct / n


class PhaseClock:
    """Seconds the trainer's host spends in each phase of training, summed over the run:
    ``batches`` (drawing, shuffling and shifting them), ``steps`` (queuing the steps'
    work, or running it where the backend runs it at once), ``reads`` (waiting for each
    step's loss, read one step late), ``evaluation`` and ``epoch_end`` (checks, metrics,
    checkpoint). ``capsflow bench --epoch`` prints them; a subclass may also time the
    device (``enter``/``leave`` are called at each phase's start and end)."""

    def __init__(self) -> None:
        self.seconds: dict = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.enter(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.leave(name)

    def enter(self, name: str) -> None:
        pass

    def leave(self, name: str) -> None:
        pass

    def timed(self, iterable: Any, name: str) -> Iterator:
        """``iterable``'s items, the time taken to make each one counted in ``name``."""
        items = iter(iterable)
        while True:
            with self.phase(name):
                try:
                    item = next(items)
                except StopIteration:
                    return
            yield item


@dataclass
class _QueuedStep:
    """A training step whose work is queued and whose numbers are not read yet:
    ``read()`` gives (loss, correct predictions); the rest is what its accounting needs."""

    read: Callable[[], tuple]
    lr: float
    iterator: dict         # BatchIterator.get_state() after its batch
    count: int             # examples in its batch


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint's meta record."""

    epoch: int = 0                 # completed epochs = index of the epoch in progress
    iteration: int = 0             # completed optimizer steps over the whole run
    iterator: Optional[dict] = None  # BatchIterator.get_state() after the last step
    epoch_sums: _Sums = field(default_factory=_Sums)
    window: _Sums = field(default_factory=_Sums)   # since the last --disp record
    epoch_seconds: float = 0.0     # time spent in the epoch in progress so far
    best_acc: Optional[float] = None
    best_epoch: Optional[int] = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict) -> "Progress":
        """Every field must be there, of its type (else CheckpointError), and the best
        accuracy a fraction."""
        progress = from_record(cls, record, "progress", complete=True)
        if progress.best_acc is not None and not 0 <= progress.best_acc <= 1:
            raise CheckpointError(f"'progress.best_acc' is {progress.best_acc}, not a fraction "
                                  f"in [0, 1]")
        return progress


def from_record(cls: type, record: Any, where: str, complete: bool) -> Any:
    """The dataclass ``cls`` made from a JSON record, each field checked against its
    annotation (a checkpoint is untrusted input: a wrong type would otherwise surface as
    a TypeError deep inside training). Unknown keys are ignored (written by a newer
    capsflow). ``complete``: every field must be given. Counts are never negative and
    numbers never NaN or infinite, in any record capsflow writes.

    Raises CheckpointError naming the field, e.g. ``progress.epoch``.
    """
    if not isinstance(record, dict):
        raise CheckpointError(f"'{where}' is {json_type_name(record)}, not a JSON object")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        name, hint = f"{where}.{f.name}", hints[f.name]
        if f.name not in record:
            if complete:
                raise CheckpointError(f"'{name}' is missing")
            continue
        value = record[f.name]
        if is_dataclass(hint):
            value = from_record(hint, value, name, complete)
        elif not matches_hint(value, hint):
            raise CheckpointError(f"'{name}' is {json_type_name(value)} {shown(value)}, "
                                  f"expected {hint_name(hint)}")
        values[f.name] = value
    try:
        return cls(**values)
    except CapsflowError as exc:  # e.g. Options with an unknown backend
        raise CheckpointError(f"'{where}': {exc}") from None


class Trainer:
    """Trains ``graph`` on ``data`` with ``config``; checkpoints and metrics in ``save_dir``.

    ``log`` receives the human-readable lines (epoch summaries, notes); ``progress_bar``
    switches the tqdm bars; ``processes_here``: how many processes (this one included)
    train at once on this machine, sharing its memory (`compare --jobs`; a data-parallel
    ``world`` says its own). Parameters live on the backend for the whole run. The
    optimizer holds and updates (in place) the trainable ones only: a ``trainable: false``
    parameter keeps its initial (or restored) value and is saved with the others.
    """

    def __init__(self, graph: Any, data: Data, config: TrainConfig, save_dir: str | Path,
                 log: Callable[[str], None] = print, progress_bar: bool = True,
                 world: Any = None, processes_here: int = 1) -> None:
        config.check()
        self.graph, self.data, self.config = graph, data, config
        self.save_dir = Path(save_dir)
        # Data-parallel (runners/distributed.py): a World joined by this process. Every
        # rank runs this loop on its share of each global batch; rank 0 alone logs and
        # writes metrics and checkpoints.
        self.world = world
        self.is_main = world is None or world.is_main
        if not self.is_main:
            log, progress_bar = (lambda line: None), False
        self.log, self.progress_bar = log, progress_bar
        self.backend = get_backend(config.options)
        self.sources = spec_sources(graph)
        self.overrides = _declared_overrides(graph)
        self.scores = class_scores(graph)  # the output whose argmax is the prediction
        if data.info is not None:
            check_fits(graph, data.info)
        side = min(data.train_images.shape[2:], default=0)
        if config.shift and config.shift >= side:  # a shift past the image blanks it
            raise CapsflowError(f"--shift {config.shift} is not less than the images' "
                                f"{side} pixels (height and width); shifts of at most "
                                f"{max(side - 1, 0)} keep some of each image")
        seed_input = graph.spec.inputs.get(DROPOUT_SEED)
        if seed_input is not None and seed_input.shape not in ((), (1,)):
            raise CapsflowError(f"graph input '{DROPOUT_SEED}' has shape "
                                f"{list(seed_input.shape)}; the trainer feeds it one seed "
                                f"per step: declare it {{shape: [1], optional: true}}")
        if world is not None and config.batch_size % world.world_size:
            raise CapsflowError(f"--bs {config.batch_size} is the global batch and must be "
                                f"divisible by the {world.world_size} ranks")
        # After the quick checks (this one may measure for seconds): each rank runs its
        # share of the batch, in its share of this machine's memory.
        ranks = world.world_size if world is not None else 1
        check_step_fits(graph, config.options,
                        -(-min(config.batch_size, len(data.train_labels)) // ranks),
                        config.dtype, self.scores, log=self.log,
                        processes_here=(world.local_world_size if world is not None
                                        else processes_here))
        host = graph.init_params(config.seed, config.dtype)
        if not graph.trainable(host):
            raise CapsflowError(f"{graph.spec.file} has no trainable parameter to train")
        self.params = {k: self.backend.asarray(v) for k, v in host.items()}
        if world is not None:
            from capsflow.runners.distributed import broadcast_params
            broadcast_params(world, self.params, self.backend.xp)  # identical from the start
        self.optimizer = make_optimizer(config.optimizer, config.lr)
        self.opt_state = self.optimizer.init_state(graph.trainable(self.params))
        self.schedule = config.lr_schedule_fn()
        self.batches = BatchIterator(data.train_images, data.train_labels, config.batch_size,
                                     shuffle=True, augment_shift=config.shift,
                                     augment_flip=config.flip,
                                     rng=np.random.default_rng(config.seed),
                                     num_classes=num_classes(graph))
        self.examples_epoch = 0  # the epoch whose training examples self.batches holds
        self.train_fingerprint = data_fingerprint(data.train_images, data.train_labels)
        self.state = Progress()
        self.clock = PhaseClock()   # where the host's time goes (capsflow bench --epoch)
        self._numbers = None        # device_to_host reader of each step's (loss, correct)
        self._forward = None        # the RecordedForward of evaluation
        self.stopped_early = False  # set when Ctrl-C ended fit()
        self.how_to_continue = f"--resume {self.last_path}"  # said when Ctrl-C ends fit()
        # Data-parallel: SIGINT/SIGTERM ask every rank to stop after the same step.
        self.stop_requests = StopRequests()
        self.out_of_time = False    # set when fit()'s time budget ended it before the last epoch

    # -- checkpoints -----------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.save_dir / LAST

    @property
    def best_path(self) -> Path:
        return self.save_dir / BEST

    @property
    def metrics_path(self) -> Path:
        return self.save_dir / METRICS

    def meta(self) -> dict:
        """The JSON record stored with every checkpoint; ``data`` (when the data say what
        they are) is ``DataDescription.to_json()``: dataset, class names, input shape and
        the options that made the images, what ``capsflow predict`` needs."""
        meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "graph_file": str(self.graph.spec.file), "graph_name": self.graph.spec.name,
                "overrides": self.overrides, "config": self.config.to_json(),
                "progress": self.state.to_json(), "train_data": self.train_fingerprint}
        if self.data.info is not None:
            meta["data"] = self.data.info.to_json()
        return meta

    def save(self, path: str | Path) -> None:
        if not self.is_main:
            return
        write_checkpoint(path, self.params, state_to_flat(self.opt_state), self.meta(),
                         self.sources)

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from ``ckpt``: parameters, optimizer, batch order, running sums.

        Raises one line when the checkpoint belongs to another graph or to a run with
        other fixed settings (see TrainConfig.FIXED_ON_RESUME)."""
        # Another graph's parameters may well have the same names and shapes (routing
        # variants do), so the names decide; an edited file of the same graph is noted.
        if ckpt.graph_name != self.graph.spec.name:
            raise CapsflowError(
                f"{ckpt.path} is a checkpoint of graph '{ckpt.graph_name}', not of "
                f"'{self.graph.spec.name}' ({self.graph.spec.file}); resume it with the graph "
                f"it was trained with, or train '{self.graph.spec.name}' without --resume")
        saved = ckpt.meta.get("config", {})
        for name in TrainConfig.FIXED_ON_RESUME:
            if name in saved and saved[name] != getattr(self.config, name):
                raise CapsflowError(
                    f"--{_flag(name)} {getattr(self.config, name)} differs from the value "
                    f"{saved[name]} that {ckpt.path} was trained with; a resumed run keeps "
                    f"its settings (drop the flag)")
        trained, now = ckpt.data, self.data.info
        if trained is not None and now is not None and (
                trained.classes != now.classes or tuple(trained.shape) != tuple(now.shape)):
            raise CapsflowError(f"{ckpt.path} was trained on {trained.describe()} "
                                f"({_some(trained.classes)}), the data are now "
                                f"{now.describe()} ({_some(now.classes)}); resume it on the "
                                f"data it was trained on")
        trained_on = ckpt.meta.get("train_data")  # absent in checkpoints before it was kept
        if trained_on is not None and trained_on != self.train_fingerprint:
            then = (f"{shown(trained_on.get('examples'))} examples, digest "
                    f"{shown(trained_on.get('digest'))}" if isinstance(trained_on, dict)
                    else shown(trained_on))
            now = self.train_fingerprint
            raise CapsflowError(
                f"{ckpt.path} was trained on other training data ({then}) than these "
                f"({now['examples']} examples, digest \"{now['digest']}\"); resume it on "
                f"the data it was trained on (the same --data-dir)")
        if ckpt.overrides != self.overrides:
            raise CapsflowError(f"graph variables {self.overrides} differ from {ckpt.overrides} "
                                f"that {ckpt.path} was trained with; pass the same --set flags")
        check_checkpoint_params(self.graph, ckpt)
        dtype = np.dtype(self.config.dtype)
        self.params = {k: self.backend.asarray(ckpt.params[k], dtype=dtype)
                       for k in self.graph.spec.params}
        unfrozen = sorted(set(self.graph.trainable(self.params))
                          - {k.partition("/")[2] for k in ckpt.optim if k != "t"})
        if unfrozen and any(k != "t" for k in ckpt.optim):  # (a stateless optimizer has none)
            raise CapsflowError(f"parameter '{unfrozen[0]}' is trainable in "
                                f"{self.graph.spec.file} but has no optimizer state in "
                                f"{ckpt.path} (was it trainable: false then?); a resumed "
                                f"run keeps what it trains: freeze it again, or start afresh")
        try:
            self.opt_state = state_from_flat(ckpt.optim, self.backend.xp)
            fresh = self.optimizer.init_state(self.graph.trainable(self.params))
            _check_opt_state(self.opt_state, fresh)
            self.state = copy.deepcopy(ckpt.progress)
            if self.state.iterator is not None:
                self.batches.set_state(self.state.iterator)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise CapsflowError(f"{ckpt.path}: damaged training state ({exc}); "
                                f"start a fresh run or use another checkpoint") from None
        if ckpt.sources != self.sources:
            self.log(f"note: {self.graph.spec.file} differs from the spec text stored in "
                     f"{ckpt.path}; continuing with {self.graph.spec.file}")
        self._trim_metrics(ckpt.path.parent / METRICS)

    def _trim_metrics(self, source: Path) -> None:
        """Keep the metrics records up to the resumed iteration (drops any written after
        the checkpoint, so a resumed run's file equals an uninterrupted run's). An epoch's
        record has its last step's iteration, which a checkpoint made in its evaluation
        shares: epoch records count by epoch (one the checkpoint has not finished goes)."""
        if not self.is_main:
            return
        records = read_metrics(source, drop_unfinished=True) if source.is_file() else []
        kept = [r for r in records if r.get("iteration", 0) <= self.state.iteration
                and not (r.get("kind") == "epoch" and r["epoch"] > self.state.epoch)]
        with atomic_file(self.metrics_path) as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept).encode())

    # -- the loop --------------------------------------------------------------------
    def fit(self, seconds: Optional[float] = None) -> list:
        """Train until ``config.num_epochs`` epochs are complete, or, with ``seconds``,
        until the first epoch that ends later than that after the call (then
        ``out_of_time`` is set; ``last.npz`` holds that epoch, and a resumed run goes on).

        Returns the epoch records written to metrics.jsonl by this call. Ctrl-C saves
        ``last.npz`` at the last completed step, sets ``stopped_early`` and returns.
        Raises TrainingDiverged when the loss is not finite.
        """
        deadline = None if seconds is None else time.perf_counter() + seconds
        if self.is_main:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            for path in remove_stale_temporaries(self.save_dir):
                self.log(f"note: removed {path}, left by a run that was killed while writing")
            if self.state.iteration == 0 and self.state.epoch == 0:
                self.metrics_path.write_text("")  # a fresh run starts a fresh file
        records = []
        # Built here, after any restore() has replaced the parameters and optimizer state:
        # a recorded step holds on to the arrays it was recorded with.
        if self.world is None:
            self.train_step = TrainStep(self.graph, self.params, self.optimizer,
                                        self.opt_state, backend=self.backend,
                                        outputs=["loss", self.scores])
        else:
            # Op by op (no recorded replay): the all-reduce goes between the backward pass
            # and the update, through torch.distributed on the host, which a recording
            # of the two halves cannot hold; and the update must wait for the global loss.
            from capsflow.runners.distributed import GradientReducer
            self.train_step = None
            self.reducer = GradientReducer(self.world, self.graph.trainable(self.params),
                                           self.backend.xp)
        # Data-parallel ranks take SIGINT and SIGTERM as requests to stop, the save too.
        with self.stop_requests.handled() if self.world is not None else nullcontext():
            try:
                while self.state.epoch < self.config.num_epochs:
                    records.append(self._epoch())
                    if (deadline is not None and time.perf_counter() > deadline
                            and self.state.epoch < self.config.num_epochs):
                        self.out_of_time = True
                        break
            except KeyboardInterrupt:
                with stops_dropped():  # stopping already: another stop must not cut the save
                    self.save(self.last_path)
                self.stopped_early = True
                self.log(f"interrupted in epoch {self.state.epoch + 1} after iteration "
                         f"{self.state.iteration}; saved {self.last_path}; continue with "
                         f"{self.how_to_continue}")
        return records

    def _epoch(self) -> dict:
        cfg, st = self.config, self.state
        e = st.epoch
        # The rate of the epoch's last update, should no batch remain (resumed at its end,
        # e.g. after Ctrl-C in its evaluation); each step sets it below.
        lr = self.schedule.lr_at(e, max(st.iteration - 1, 0))
        started = time.perf_counter() - st.epoch_seconds
        for name, value in self.graph.scheduled_values(e).items():
            self.params[name].fill(value)  # in place: a recorded step holds this array
        if self.data.train_for_epoch is not None and self.examples_epoch != e:
            with self.clock.phase("batches"):  # a set drawn afresh for each epoch
                self.batches.replace_examples(*self.data.train_for_epoch(e))
            self.examples_epoch = e
        batches = self._bar(self.batches, total=len(self.batches),
                            initial=(st.iterator or {}).get("position", 0),
                            desc=f"epoch {e + 1}/{cfg.num_epochs}")
        # One process: step t's loss and correct count are read once step t+1 is queued,
        # so a device runs step t+1 while the host waits for step t's numbers (and then
        # draws the next batch). ``st`` counts a step when its numbers are read: it always
        # describes the parameters of the steps read, and Ctrl-C or the epoch's end
        # read the step still pending first.
        pending: Optional[_QueuedStep] = None
        try:
            for x, y in self.clock.timed(batches, "batches"):
                queued = st.iteration + (pending is not None)  # steps queued before this one
                lr = self.schedule.lr_at(e, queued)  # per-step schedules change it here
                inputs = {"x": x, "y": y}
                if DROPOUT_SEED in self.graph.spec.inputs:
                    # From the run's seed and the step count, which a checkpoint restores:
                    # a resumed run draws the masks of an uninterrupted one.
                    rank = self.world.rank if self.world is not None else 0
                    inputs[DROPOUT_SEED] = dropout_seed(cfg.seed, queued, rank).reshape(
                        self.graph.spec.inputs[DROPOUT_SEED].shape)
                if self.world is not None:
                    with self.clock.phase("steps"), _overflow_quiet():
                        local = self._local_gradients(inputs)
                    with interrupts_deferred():  # never stop half-way through an update
                        with self.clock.phase("steps"):
                            numbers, stop = self._distributed_update(local, y.shape[0], lr)
                        self._account(_QueuedStep(lambda: numbers, lr, self.batches.get_state(),
                                                  y.shape[0]), started, batches)
                    if stop:  # a rank was asked to stop: all stop here, rank 0 saves
                        raise KeyboardInterrupt
                    continue
                with self.clock.phase("steps"), _overflow_quiet():
                    out = self.train_step.gradients(inputs)
                with interrupts_deferred():  # never stop half-way through an update
                    with self.clock.phase("steps"), _overflow_quiet():
                        # A step whose loss is not finite is not applied (train_step.py).
                        self.train_step.update(lr)
                        step = _QueuedStep(self._start_reading(out, y), lr,
                                           self.batches.get_state(), y.shape[0])
                    if pending is not None:
                        self._account(pending, started, batches)
                    pending = step
            if pending is not None:
                with interrupts_deferred():
                    step, pending = pending, None
                    self._account(step, started, batches)
        except KeyboardInterrupt:
            if pending is not None:  # its update is applied: count it before saving
                with interrupts_deferred():
                    self._account(pending, started, batches)
            raise
        validate = (e + 1) % cfg.val_epoch == 0 or e + 1 == cfg.num_epochs
        test = None
        if validate:
            with self.clock.phase("evaluation"), _overflow_quiet():
                test = self._evaluate()
        with interrupts_deferred(), self.clock.phase("epoch_end"):
            return self._finish_epoch(lr, test, time.perf_counter() - started)

    def _start_reading(self, out: dict, y: np.ndarray) -> Callable[[], tuple]:
        """Start copying the step's (loss, correct predictions) to the host, both made on
        the device from its outputs and the labels it read, before the next step can
        overwrite them (a replayed step rewrites its outputs and input buffers); returns
        the function that gives them."""
        xp = self.backend.xp
        if self._numbers is None:
            self._numbers = device_to_host(self.backend, (2,), np.float64)
        targets = self.train_step.last_inputs["y"]
        correct = count_correct(xp, out[self.scores], targets, targets_k(y))
        numbers = xp.stack([xp.asarray(out["loss"], dtype=xp.float64).reshape(()),
                            correct.astype(xp.float64)])
        read = self._numbers.start(numbers)

        def loss_and_correct() -> tuple:
            values = read()
            return float(values[0]), int(values[1])
        return loss_and_correct

    def _account(self, step: _QueuedStep, started: float, bar: Any) -> None:
        """Count a step in the run's progress, once its numbers are read: a loss that is
        not finite stops training, naming that step."""
        cfg, st = self.config, self.state
        with self.clock.phase("reads"):
            loss, correct = step.read()
        if not np.isfinite(loss):
            raise TrainingDiverged(self._diverged_message(
                f"the loss became {loss} at iteration {st.iteration + 1}", step.lr))
        st.iteration += 1
        st.iterator = step.iterator
        st.epoch_sums.add(loss, correct, step.count)
        st.window.add(loss, correct, step.count)
        st.epoch_seconds = time.perf_counter() - started
        if st.iteration % cfg.disp == 0:
            self._log_window(step.lr, bar)

    # -- data-parallel steps (runners/distributed.py) ----------------------------------
    def _local_gradients(self, inputs: dict) -> tuple:
        """This rank's share of the global batch ``inputs``: (gradients of the mean loss
        over the share or None when it is empty, share size, loss, correct count)."""
        from capsflow.runners.distributed import share
        n = inputs["y"].shape[0]
        part = share(n, self.world.rank, self.world.world_size)
        local = {k: (v[part] if k in ("x", "y") else v) for k, v in inputs.items()}
        count = part.stop - part.start
        if count == 0:  # a last, short batch with fewer examples than ranks
            return None, 0, 0.0, 0
        out, grads = self.graph.value_and_grad(self.params, local, backend=self.backend,
                                               outputs=["loss", self.scores])
        loss = float(to_numpy(out["loss"]))
        correct = int(correct_predictions(to_numpy(out[self.scores]), local["y"]).sum())
        return grads, count, loss, correct

    def _distributed_update(self, local: tuple, n: int, lr: float) -> tuple:
        """All-reduce the shares' gradients (weighted by share size: the gradient of the
        mean loss over all ``n`` examples), then the same optimizer step on every rank,
        skipped (on every rank) when the global loss is not finite.
        Returns ((mean loss over the global batch, correct predictions in it), whether
        any rank was asked to stop)."""
        grads, count, loss, correct = local
        reduced = self.reducer.reduce(grads, count / n, loss * count, correct,
                                      stop=self.stop_requests.asked)
        mean_loss = reduced.loss_sum / n
        if np.isfinite(mean_loss):
            self.optimizer.step(self.graph.trainable(self.params), reduced.grads,
                                self.opt_state, lr=lr, backend=self.backend)
        return (mean_loss, reduced.correct), reduced.stop

    def _evaluate(self) -> dict:
        """The test split's loss and accuracy: on one process all of it; data-parallel,
        each rank its share (``_evaluate_share``; every rank gets the sums)."""
        cfg = self.config
        desc = "test" if self.progress_bar else None
        # One for the run, so that it records its forward pass once; anew when restore()
        # has replaced the parameters it reads.
        if self._forward is None or self._forward.params is not self.params:
            self._forward = RecordedForward(self.graph, self.params, self.backend,
                                            ["loss", self.scores])
        if self.world is None:
            return evaluate_split(self.graph, self.params, self.data.test_images,
                                  self.data.test_labels, cfg.batch_size, self.backend, desc=desc,
                                  forward=self._forward)
        return self._evaluate_share()

    def _evaluate_share(self) -> dict:
        """Data-parallel evaluation: each rank its contiguous share of the test split, in
        rounds of one batch, as many on every rank (the largest share's). Each round ends
        in one small all-reduce of the sums and the stop requests, so that a stop during
        evaluation ends it within a batch on every rank, and no rank waits for another."""
        from capsflow.runners.distributed import share
        cfg, xp = self.config, self.backend.xp
        images, labels = self.data.test_images, self.data.test_labels
        n = images.shape[0]
        part = share(n, self.world.rank, self.world.world_size)
        rounds = range(-(-share(n, 0, self.world.world_size).stop // cfg.batch_size))
        if self.progress_bar:
            from tqdm import tqdm
            rounds = tqdm(rounds, desc="test", unit="batch", leave=False, dynamic_ncols=True)
        total = np.zeros(2)
        for r in rounds:
            lo = min(part.start + r * cfg.batch_size, part.stop)
            hi = min(lo + cfg.batch_size, part.stop)
            sums = [0.0, 0.0, 1.0 if self.stop_requests.asked else 0.0]
            if hi > lo:
                result = evaluate_split(self.graph, self.params, images[lo:hi], labels[lo:hi],
                                        cfg.batch_size, self.backend, forward=self._forward)
                sums[:2] = result["loss"] * (hi - lo), round(result["acc"] * (hi - lo))
            reduced = to_numpy(self.world.all_reduce(xp.asarray(sums, dtype=xp.float64)))
            if reduced[2] > 0:  # a rank was asked to stop: all stop here, rank 0 saves
                raise KeyboardInterrupt
            total += reduced[:2]
        return {"loss": float(total[0]) / max(n, 1), "acc": float(total[1]) / max(n, 1)}

    def _log_window(self, lr: float, bar: Any) -> None:
        st = self.state
        loss, acc = st.window.means()
        run_loss, run_acc = st.epoch_sums.means()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{run_loss:.4f}", acc=f"{100 * run_acc:.2f}%", refresh=False)
        self._append({"kind": "train", "epoch": st.epoch + 1, "iteration": st.iteration,
                      "loss": loss, "acc": acc, "lr": lr})
        st.window = _Sums()

    def _finish_epoch(self, lr: float, test: Optional[dict], seconds: float) -> dict:
        st = self.state
        bad = [k for k, v in self.params.items() if not bool(self.backend.xp.isfinite(v).all())]
        if bad:  # a finite loss with non-finite gradients: do not checkpoint that
            raise TrainingDiverged(self._diverged_message(
                f"parameter '{bad[0]}' became nan or inf by iteration {st.iteration}", lr))
        if test is not None and not math.isfinite(test["loss"]):
            # The last step's update was applied with a finite loss, but it left
            # parameters (finite, huge) that overflow: the same divergence, seen later.
            raise TrainingDiverged(self._diverged_message(
                f"the test loss became {test['loss']} after iteration {st.iteration}", lr))
        train_loss, train_acc = st.epoch_sums.means()
        record = {"kind": "epoch", "epoch": st.epoch + 1, "iteration": st.iteration,
                  "train_loss": train_loss, "train_acc": train_acc,
                  "test_loss": test["loss"] if test else None,
                  "test_acc": test["acc"] if test else None, "lr": lr, "seconds": seconds}
        scheduled = self.graph.scheduled_values(st.epoch)
        if scheduled:
            record["scheduled"] = scheduled
        improved = test is not None and (st.best_acc is None or test["acc"] > st.best_acc)
        if improved:
            st.best_acc, st.best_epoch = test["acc"], st.epoch + 1
        st.epoch += 1
        st.epoch_sums, st.window, st.epoch_seconds = _Sums(), _Sums(), 0.0
        st.iterator = self.batches.get_state()  # between epochs: next epoch's draws
        self._append(record)
        self.log(format_epoch(record, self.config.num_epochs))
        # best before last: a run killed between the two resumes from the previous
        # last.npz, replays the epoch and writes best.npz again.
        if improved:
            self.save(self.best_path)
            if self.is_main:
                same_file_atomic(self.best_path, self.last_path)  # no second write
        else:
            self.save(self.last_path)
        return record

    def _diverged_message(self, what: str, lr: float) -> str:
        st = self.state
        kept = (f"last good checkpoint: {self.last_path} (epoch {st.epoch})"
                if self.last_path.is_file() else "no checkpoint was written before it")
        return (f"{what} (epoch {st.epoch + 1}, lr {lr:g}); training stopped, {kept}; "
                f"try a smaller --lr")

    def _append(self, record: dict) -> None:
        if not self.is_main:
            return
        try:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:  # a full disk says so at write or close, without the name
            raise CapsflowError(f"{self.metrics_path}: cannot append a record "
                                f"({exc.strerror or exc})") from None

    def _bar(self, iterable: Any, total: int, initial: int, desc: str) -> Any:
        if not self.progress_bar:
            return iterable
        from tqdm import tqdm  # lazy: importing tqdm is only needed for a bar
        # Outside a terminal (e.g. nohup to a log) refresh rarely to keep logs short.
        interval = 0.5 if sys.stderr.isatty() else 60.0
        return tqdm(iterable, total=total, initial=initial, desc=desc, unit="it",
                    dynamic_ncols=True, mininterval=interval, leave=False)


def format_epoch(record: dict, num_epochs: int) -> str:
    """One line per epoch: train loss/acc, test loss/acc, lr, any scheduled parameters'
    values (docs/spec.md), seconds."""
    test = (f"test loss {record['test_loss']:.4f}  test acc {100 * record['test_acc']:.2f}%"
            if record["test_acc"] is not None else "test -")
    scheduled = "".join(f"  {name} {value:.4g}"
                        for name, value in record.get("scheduled", {}).items())
    return (f"epoch {record['epoch']}/{num_epochs}  train loss {record['train_loss']:.4f}  "
            f"train acc {100 * record['train_acc']:.2f}%  {test}  lr {record['lr']:.2e}"
            f"{scheduled}  {record['seconds']:.1f} s")


# ------------------------------------------------------------------------- helpers


def dropout_seed(run_seed: int, step: int, rank: int = 0) -> np.ndarray:
    """The dropout seed of the training step that follows ``step`` completed steps of a
    run seeded ``run_seed`` (a 0-d int64 array): a function of these numbers alone. Rank
    r > 0 of a data-parallel run draws its own (with one seed, every rank's share would
    get the masks of rank 0's rows); rank 0 draws one process's. It lies below 2**24, so
    the float32 input it becomes holds it exactly."""
    entropy = [run_seed, step] if rank == 0 else [run_seed, step, rank]
    word = np.random.SeedSequence(entropy).generate_state(1)[0]
    return np.asarray(int(word) >> 8, dtype=np.int64)


def _some(names: list, shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _declared_overrides(graph: Any) -> dict:
    """Graph variables whose value differs from the YAML file's own ``vars``, less those
    that follow from the others (capsnet.yaml's ``grid_h`` or ``pixels`` from
    ``height`` and ``channels``): the values a user would --set, which rebuild the same
    graph and stay right when a resumed run's data are checked against them."""
    from capsflow.lang.spec import load_spec
    default = load_spec(graph.spec.file).vars
    diff = {k: v for k, v in graph.spec.vars.items() if default.get(k) != v}
    for name in list(diff):
        trial = {k: v for k, v in diff.items() if k != name}
        try:
            if load_spec(graph.spec.file, trial).vars == graph.spec.vars:
                diff = trial  # ``name`` is computed from the others
        except CapsflowError:
            pass
    return diff


def _check_opt_state(state: dict, fresh: dict) -> None:
    """The restored optimizer state must have the slots, shapes and dtypes of a fresh one,
    a step count >= 0, and second moments >= 0 (a negative v would be reported as the
    run diverging)."""
    if "t" in fresh and state["t"] < 0:
        raise ValueError(f"optimizer step count t is {state['t']}, expected >= 0")
    for slot, arrays in fresh.items():
        if slot == "t":
            continue
        for name, arr in arrays.items():
            have = state[slot][name]
            if tuple(have.shape) != tuple(arr.shape) or have.dtype != arr.dtype:
                raise ValueError(f"optimizer slot {slot}/{name} is {have.dtype} "
                                 f"{tuple(have.shape)}, expected {arr.dtype} {tuple(arr.shape)}")
            if slot == "v" and bool((have < 0).any()):
                raise ValueError(f"optimizer slot v/{name} holds negative values")


@contextmanager
def _overflow_quiet() -> Iterator[None]:
    """A diverging run is reported once, by the trainer, instead of by NumPy's overflow
    warnings. np.errstate holds for this thread only; the warnings filter also silences
    the worker threads of the CPU convolution."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# ---------------------------------------------------------------------- inference


def _blake2b(arrays: Iterator[np.ndarray], size: int) -> str:
    """The BLAKE2b digest (``size`` bytes, in hex) of the arrays' bytes, in order."""
    import hashlib
    digest = hashlib.blake2b(digest_size=size)
    for array in arrays:
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def data_fingerprint(images: np.ndarray, labels: np.ndarray) -> dict:
    """The training set in a few bytes, kept in checkpoints: a run resumed on other data
    (another --data-dir holding the same dataset's name) would go on without a word.
    The labels' and pixels' digest: a fraction of a second for MNIST."""
    return {"examples": int(images.shape[0]), "digest": _blake2b(iter((labels, images)), 16)}


def state_digest(trainer: "Trainer") -> str:
    """Where ``trainer`` stands, in a line the ranks of a data-parallel run compare: its
    progress and a digest of its parameters (ranks that resumed from different
    checkpoints, or some afresh, would otherwise train on apart)."""
    params = _blake2b((to_numpy(trainer.params[k]) for k in sorted(trainer.params)), 8)
    st = trainer.state
    return f"epoch {st.epoch}, iteration {st.iteration}, parameters {params}"


def run_files(folder: Path) -> list:
    """The files of a run that ``folder`` holds (last.npz, best.npz, a non-empty
    metrics.jsonl): what a new run there would replace."""
    return [name for name in (LAST, BEST, METRICS)
            if (folder / name).is_file() and (folder / name).stat().st_size]


def check_checkpoint_params(graph: Any, ckpt: Checkpoint) -> None:
    """``graph.check_params`` of the checkpoint's parameters, its error naming the file."""
    try:
        graph.check_params(ckpt.params)
    except CapsflowError as exc:
        raise CapsflowError(f"{ckpt.path}: {exc}") from None


def check_same_graph(ckpt: Checkpoint, graph_path: str | Path) -> None:
    """One line unless ``ckpt`` was trained with the graph of ``graph_path``, by name:
    another graph's parameters may have the same names and shapes (routing variants do),
    and would be evaluated as if they were this graph's."""
    from capsflow.lang.spec import load_spec
    name = load_spec(graph_path).name
    if ckpt.graph_name != name:
        raise CapsflowError(f"{ckpt.path} is a checkpoint of graph '{ckpt.graph_name}', not "
                            f"of '{name}' ({graph_path}); pass the graph it was trained with")


def load_model(graph_path: str | Path, checkpoint: str | Path | Checkpoint,
               overrides: Optional[dict] = None, backend: Options | Backend = Options(),
               log: Callable[[str], None] = print) -> tuple:
    """A trained model for inference: (graph, params on ``backend``, Checkpoint).
    ``checkpoint``: its path, or the Checkpoint when the caller has read it already.

    The graph is ``graph_path`` compiled with the checkpoint's variable overrides,
    updated by ``overrides`` (e.g. ``{"routing_iters": 5}`` at test time). When the spec
    files on disk differ from those stored in the checkpoint, the stored ones are used
    (with a note through ``log``): they are what the parameters were trained with.
    """
    from capsflow.core.graph import compile as compile_graph
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    check_same_graph(ckpt, graph_path)
    graph = compile_graph(graph_path, dict(ckpt.overrides, **(overrides or {})))
    if spec_sources(graph) != ckpt.sources:
        log(f"note: {graph_path} (or a file it includes) differs from the spec stored in "
            f"{ckpt.path}; using the stored spec")
        graph = graph_from_checkpoint(ckpt, overrides)
    check_checkpoint_params(graph, ckpt)
    dtype = np.dtype(ckpt.config.dtype)
    be = get_backend(backend)
    params = {k: be.asarray(ckpt.params[k], dtype=dtype) for k in graph.spec.params}
    return graph, params, ckpt
