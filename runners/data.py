"""MNIST and Fashion-MNIST as NumPy arrays, loaded through torchvision, offline first.

A data *root* holds one folder per dataset, each with the four standard IDX files,
gzip-compressed (``.gz``) or not::

    ROOT/mnist/train-images-idx3-ubyte[.gz]    ROOT/fashion-mnist/train-images-idx3-ubyte[.gz]
    ROOT/mnist/train-labels-idx1-ubyte[.gz]    ...
    ROOT/mnist/t10k-images-idx3-ubyte[.gz]
    ROOT/mnist/t10k-labels-idx1-ubyte[.gz]

torchvision's own layout (``ROOT/MNIST/raw/...``, ``ROOT/FashionMNIST/raw/...``) is
accepted too. A ``data_dir`` argument (the CLI's ``--data-dir``; it may also name the
dataset folder itself) is the only place searched when given: a folder without all four
files is an error naming the missing ones, never silently replaced by another copy.
Without it the roots are searched in this order: ``$CAPSFLOW_DATA``, the user cache
(``$XDG_CACHE_HOME/capsflow/data`` or ``~/.cache/capsflow/data``), and for Fashion-MNIST
the system folder ``/usr/share/datasets``.

torchvision reads only *uncompressed* files from ``<root>/MNIST/raw/``, so the found
files are decompressed (or symlinked, when already uncompressed) once into a staging
folder under the user cache and torchvision is pointed there. torchvision and torch
are imported lazily so that importing this module stays fast.
"""
from __future__ import annotations

import copy
import gzip
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from capsflow.errors import CapsflowError

SPLITS = ("train", "test")
IMAGE_SIZE = 28
NUM_CLASSES = 10
ENV_VAR = "CAPSFLOW_DATA"
SYSTEM_ROOT = Path("/usr/share/datasets")


class DataError(CapsflowError):
    """A user-caused data problem (missing or unreadable files, bad dataset name)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The dataset's IDX files were found in none of the searched folders."""


class DataArgumentError(DataError, ValueError):
    """A bad argument such as an unknown dataset name or split."""


@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset lives on disk and which torchvision class reads it."""

    name: str  # capsflow name and folder under a data root, e.g. "fashion-mnist"
    torchvision_class: str  # class in torchvision.datasets, also its folder name
    system_fallback: bool  # also search SYSTEM_ROOT (a distro package ships it)


DATASETS: Dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", "MNIST", system_fallback=False),
    "fashion-mnist": DatasetInfo("fashion-mnist", "FashionMNIST", system_fallback=True),
}

# The four IDX files, keyed by (split, kind); names as in the official releases.
IDX_FILES: Dict[Tuple[str, str], str] = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


# --------------------------------------------------------------------------- paths


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/capsflow`` or ``~/.cache/capsflow``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "capsflow"


def default_data_root() -> Path:
    """The user-cache data root; downloads land here."""
    return user_cache_dir() / "data"


def _dataset_info(dataset: str) -> DatasetInfo:
    key = dataset.strip().lower()
    if key not in DATASETS:
        raise DataArgumentError(
            f"unknown dataset '{dataset}'; choose one of: {', '.join(DATASETS)}")
    return DATASETS[key]


def _idx_file(folder: Path, name: str) -> Optional[Path]:
    """``folder/name`` or ``folder/name.gz``, whichever exists (uncompressed first)."""
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _has_all_files(folder: Path) -> bool:
    return all(_idx_file(folder, name) is not None for name in IDX_FILES.values())


def _names_other_dataset(folder: Path, info: DatasetInfo) -> bool:
    """True when ``folder`` is visibly another dataset's folder (avoid silent mix-ups)."""
    names = {folder.name.lower()}
    if folder.name == "raw":
        names.add(folder.parent.name.lower())
    others = {n for d in DATASETS.values() if d is not info
              for n in (d.name, d.torchvision_class.lower())}
    return bool(names & others)


def _candidate_folders(info: DatasetInfo, data_dir: Optional[Path]) -> List[Path]:
    """Folders that may hold the four IDX files, in search order: under ``data_dir``
    only, when it is given."""
    roots: List[Path] = []
    if data_dir is not None:
        roots.append(data_dir)
    else:
        env = os.environ.get(ENV_VAR)
        if env:
            roots.append(Path(env).expanduser())
        roots.append(default_data_root())
        if info.system_fallback:
            roots.append(SYSTEM_ROOT)

    folders: List[Path] = []
    for i, root in enumerate(roots):
        folders.append(root / info.name)
        folders.append(root / info.torchvision_class / "raw")
        # Only an explicit data_dir may name the dataset folder itself.
        if i == 0 and data_dir is not None and not _names_other_dataset(root, info):
            folders.append(root)
    return list(dict.fromkeys(folders))  # drop duplicates, keep order


def find_dataset_folder(dataset: str, data_dir: Optional[Union[str, Path]] = None) -> Path:
    """Return the first folder holding all four IDX files of ``dataset``.

    Raises DataNotFoundError listing every folder searched.
    """
    info = _dataset_info(dataset)
    explicit = _check_data_dir(data_dir)
    folders = _candidate_folders(info, explicit)
    for folder in folders:
        if _has_all_files(folder):
            return folder
    if explicit is not None:
        raise DataNotFoundError(_incomplete_message(info, explicit, folders))
    raise DataNotFoundError(_not_found_message(info, folders))


def _check_data_dir(data_dir: Optional[Union[str, Path]]) -> Optional[Path]:
    if data_dir is None:
        return None
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(
            f"data directory {path} does not exist; pass --data-dir ROOT, "
            f"a folder holding mnist/ or fashion-mnist/ with the four IDX files")
    return path


def _incomplete_message(info: DatasetInfo, data_dir: Path, folders: List[Path]) -> str:
    """--data-dir lacks some (or all) of the files: name the missing ones of the folder
    that holds the most (the one the user most likely meant)."""
    names = list(IDX_FILES.values())
    folder = max(folders, key=lambda f: sum(_idx_file(f, n) is not None for n in names))
    missing = [n for n in names if _idx_file(folder, n) is None]
    if len(missing) < len(names):
        what = f"{folder} lacks {', '.join(missing)}"
    else:
        looked = ", ".join(str(f) for f in folders)
        what = f"no IDX files (looked in: {looked}), missing {', '.join(missing)}"
    return (f"{info.name} data not found in --data-dir {data_dir}: {what} (optionally .gz); "
            f"an explicit --data-dir is used alone, not replaced by ${ENV_VAR} or the "
            f"cache: add the files or drop --data-dir")


def _not_found_message(info: DatasetInfo, folders: List[Path]) -> str:
    looked = ", ".join(str(f) for f in folders)
    return (f"{info.name} data not found (looked in: {looked}); pass --data-dir ROOT "
            f"where ROOT/{info.name}/ holds the four IDX files "
            f"({', '.join(IDX_FILES.values())}, optionally .gz), or set {ENV_VAR}=ROOT")


# ------------------------------------------------------------- torchvision staging


def _staging_root(source: Path) -> Path:
    """A per-source cache folder, so two data roots never share staged files."""
    key = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:16]
    base = user_cache_dir() / "torchvision"
    try:
        base.mkdir(parents=True, exist_ok=True)
        probe = base / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError:
        # A read-only home (some CI runners): stage in the temp folder instead.
        base = Path(tempfile.gettempdir()) / "capsflow-torchvision"
    return base / key


def _stage_file(src: Path, dest: Path) -> None:
    """Make ``dest`` an uncompressed copy of (or symlink to) ``src``, if not fresh already.

    A staged file carries its source's mtime (symlinks report it anyway), so a changed
    source is staged again.
    """
    src_mtime = src.stat().st_mtime
    if dest.is_file() and dest.stat().st_mtime == src_mtime:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        if src.suffix == ".gz":
            with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, length=1 << 20)
            os.utime(tmp, (src_mtime, src_mtime))
        else:
            try:
                os.symlink(src.resolve(), tmp)
            except OSError:  # no symlinks (e.g. Windows without privileges)
                shutil.copy2(src, tmp)  # copy2 keeps the mtime
        os.replace(tmp, dest)  # atomic: concurrent runs never see half a file
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


def _torchvision_root(info: DatasetInfo, folder: Path) -> Path:
    """A root that torchvision can read ``info`` from: ``root/<Class>/raw/<4 files>``."""
    is_tv_layout = folder.name == "raw" and folder.parent.name == info.torchvision_class
    if is_tv_layout and all((folder / n).is_file() for n in IDX_FILES.values()):
        return folder.parent.parent
    root = _staging_root(folder)
    raw = root / info.torchvision_class / "raw"
    for name in IDX_FILES.values():
        src = _idx_file(folder, name)
        assert src is not None  # find_dataset_folder checked all four exist
        try:
            _stage_file(src, raw / name)
        except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
            raise DataError(f"cannot read {src}: {exc}; replace it with an intact copy") from None
    return root


def _torchvision_dataset(info: DatasetInfo, root: Path, train: bool, download: bool) -> Any:
    from torchvision import datasets  # lazy: importing torch takes seconds

    cls = getattr(datasets, info.torchvision_class)
    return cls(str(root), train=train, download=download)


def _download(info: DatasetInfo, train: bool, searched: DataNotFoundError) -> Any:
    """Download into the user cache via torchvision (found there by later searches)."""
    root = default_data_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        return _torchvision_dataset(info, root, train, download=True)
    except (RuntimeError, OSError) as exc:
        raise DataNotFoundError(
            f"{searched}; downloading into {root} failed too: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    """torchvision's multi-line download errors -> first and last line (the cause)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')} ({lines[-1]})"


# ------------------------------------------------------------------------- loading


def load_split(
    dataset: str,
    split: str,
    data_dir: Optional[Union[str, Path]] = None,
    limit: Optional[int] = None,
    download: bool = False,
) -> Tuple[np.ndarray, np.ndarray]:
    """Load one split of MNIST or Fashion-MNIST.

    Args:
        dataset: "mnist" or "fashion-mnist".
        split: "train" (60000 examples) or "test" (10000 examples).
        data_dir: a data root (holding ``mnist/``...) or a dataset folder; searched first.
        limit: keep only the first ``limit`` examples.
        download: fetch the files through torchvision when found nowhere.

    Returns:
        images: float32 (N, 1, 28, 28) in [0, 1], C-contiguous.
        labels: int64 (N,) with values in 0..9.
    """
    info = _dataset_info(dataset)
    if split not in SPLITS:
        raise DataArgumentError(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise DataArgumentError(f"limit must be a positive number of examples, got {limit}")
    train = split == "train"

    try:
        folder = find_dataset_folder(info.name, data_dir)
    except DataNotFoundError as missing:
        if not download:
            raise
        ds = _download(info, train, missing)
        where = default_data_root()
    else:
        root = _torchvision_root(info, folder)
        try:
            ds = _torchvision_dataset(info, root, train, download=False)
        except (RuntimeError, ValueError, TypeError, AssertionError, OSError) as exc:
            raise DataError(f"cannot read {info.name} {split} IDX files in {folder}: "
                            f"{str(exc) or type(exc).__name__}; replace them with intact copies"
                            ) from None
        where = folder
    return _to_arrays(ds.data, ds.targets, limit, where)


def _to_arrays(data: Any, targets: Any, limit: Optional[int],
               where: Path) -> Tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 28, 28) and int64 (N,) tensors -> float32 (N, 1, 28, 28), int64 (N,)."""
    pixels = data.numpy()
    labels = targets.numpy()
    if pixels.ndim != 3 or pixels.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"images in {where} have shape {pixels.shape}, expected (N, 28, 28)")
    if labels.shape != (pixels.shape[0],):
        raise DataError(f"{where} holds {pixels.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"labels in {where} must lie in 0..{NUM_CLASSES - 1}")
    if limit is not None:
        pixels, labels = pixels[:limit], labels[:limit]
    images = np.empty((pixels.shape[0], 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    np.divide(pixels[:, None], np.float32(255.0), out=images)  # as torchvision's ToTensor
    return images, np.ascontiguousarray(labels, dtype=np.int64)


# ------------------------------------------------------------------------ batching


def one_hot(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """int labels (B,) -> float32 one-hot (B, num_classes)."""
    out = np.zeros((labels.shape[0], num_classes), dtype=np.float32)
    out[np.arange(labels.shape[0]), labels] = 1.0
    return out


def shift_images(images: np.ndarray, shifts: np.ndarray, max_shift: int) -> np.ndarray:
    """Translate each image by its own (dy, dx), filling with zeros.

    Args:
        images: (B, C, H, W).
        shifts: int (B, 2) with entries in [-max_shift, max_shift]; +dy moves content down,
            +dx moves it right.
    Returns:
        new C-contiguous (B, C, H, W) array, same dtype.
    """
    b, _, h, w = images.shape
    s = max_shift
    padded = np.pad(images, ((0, 0), (0, 0), (s, s), (s, s)))
    # out[y, x] = in[y - dy, x - dx] = padded[y - dy + s, x - dx + s]
    rows = (s - shifts[:, 0])[:, None] + np.arange(h)  # (B, H)
    cols = (s - shifts[:, 1])[:, None] + np.arange(w)  # (B, W)
    batch = np.arange(b)[:, None, None]
    # Advanced indices split by a slice put the broadcast dims first: (B, H, W, C).
    gathered = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return np.ascontiguousarray(gathered.transpose(0, 3, 1, 2))


class BatchIterator:
    """Mini-batches over (images, labels), re-iterable: each ``iter()`` is a new epoch.

    Every epoch draws, from one ``numpy.random.Generator``, a permutation (when
    ``shuffle``) and one random (dy, dx) shift per example (when ``augment_shift > 0``).
    ``get_state()``/``set_state()`` capture that generator plus the position inside the
    current epoch, so a resumed run sees the same batches as an uninterrupted one.

    Yields:
        x: float32 (B, 1, 28, 28), C-contiguous.
        y: float32 one-hot (B, num_classes).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        shuffle: bool = True,
        augment_shift: int = 2,
        drop_last: bool = False,
        rng: Union[np.random.Generator, int, None] = None,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        """``images`` (N, C, H, W), ``labels`` int (N,); ``rng`` a Generator or a seed."""
        if images.ndim != 4 or labels.shape != (images.shape[0],):
            raise DataArgumentError(
                f"expected images (N, C, H, W) and labels (N,), "
                f"got {images.shape} and {labels.shape}")
        if batch_size < 1:
            raise DataArgumentError(f"batch size must be >= 1, got {batch_size}")
        if augment_shift < 0:
            raise DataArgumentError(f"augment_shift must be >= 0 pixels, got {augment_shift}")
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.augment_shift = int(augment_shift)
        self.drop_last = bool(drop_last)
        self.num_classes = int(num_classes)
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        self._resume_position = 0  # batches to skip on the next iter() (set_state)
        self._epoch: Optional[Dict[str, Any]] = None  # the epoch in progress, if any

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        return self._epoch_batches()

    def _draw_epoch(self) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Example order (N,) and shifts (N, 2) for one epoch, in a fixed draw order."""
        n = self.images.shape[0]
        order = self.rng.permutation(n) if self.shuffle else np.arange(n)
        shifts = None
        if self.augment_shift > 0:
            s = self.augment_shift
            shifts = self.rng.integers(-s, s + 1, size=(n, 2))
        return order, shifts

    def _epoch_batches(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        start_state = _rng_state(self.rng)
        order, shifts = self._draw_epoch()
        skip, self._resume_position = self._resume_position, 0
        record = {"rng": start_state, "position": skip}
        self._epoch = record
        for b in range(skip, len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, order.shape[0])
            # Counted before the yield: a checkpoint taken after using this batch
            # must resume with the next one.
            record["position"] = b + 1
            yield self._make_batch(order[lo:hi], None if shifts is None else shifts[lo:hi])
        if self._epoch is record:
            self._epoch = None

    def _make_batch(self, index: np.ndarray,
                    shifts: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        x = np.take(self.images, index, axis=0)  # a copy: callers may modify it
        if shifts is not None:
            x = shift_images(x, shifts, self.augment_shift)
        return x, one_hot(self.labels[index], self.num_classes)

    def get_state(self) -> Dict[str, Any]:
        """JSON-able state: the generator at the start of the current epoch (or now,
        between epochs) and how many batches of that epoch were already handed out."""
        if self._epoch is not None:
            return copy.deepcopy(self._epoch)
        return {"rng": _rng_state(self.rng), "position": 0}

    def set_state(self, state: Dict[str, Any]) -> None:
        """Restore a ``get_state()`` result; the next ``iter()`` continues from there."""
        try:
            rng_state, position = state["rng"], int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise DataArgumentError(
                "batch iterator state needs keys 'rng' and 'position'; "
                "pass a get_state() result") from None
        if not 0 <= position <= len(self):
            raise DataArgumentError(
                f"batch iterator state position {position} is outside 0..{len(self)}; "
                f"was it saved with another batch size or dataset?")
        _set_rng_state(self.rng, rng_state)
        self._resume_position = position
        self._epoch = None


def _rng_state(rng: np.random.Generator) -> Dict[str, Any]:
    """The bit generator's state with arrays turned into lists (JSON-able)."""
    return _to_jsonable(copy.deepcopy(rng.bit_generator.state))


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _set_rng_state(rng: np.random.Generator, state: Dict[str, Any]) -> None:
    expected = type(rng.bit_generator).__name__
    if not isinstance(state, dict):
        raise DataArgumentError(f"batch iterator state holds no {expected} generator state")
    if state.get("bit_generator") != expected:
        raise DataArgumentError(
            f"batch iterator state is for a {state.get('bit_generator')} generator, "
            f"this iterator uses {expected}")
    state = copy.deepcopy(state)
    inner = state.get("state")
    if expected == "MT19937" and isinstance(inner, dict) and "key" in inner:
        inner["key"] = np.asarray(inner["key"], dtype=np.uint32)
    rng.bit_generator.state = state
