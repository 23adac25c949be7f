"""Every dataset of issue #15 as NumPy arrays, read offline first; batches for training.

``load(dataset, split, data_dir, limit, download, seed, **options)`` returns a
:class:`Split`: images float32 (N, C, H, W) in [0, 1], labels int64 (N,) (multimnist:
(N, 2), the two digits' classes) and a :class:`DataDescription` (class names, input shape,
the options that shaped the images, as checkpoints record them).
``load_split(...)`` is the same without the description: ``(images, labels)``.
``load_train_test`` loads both splits of a run and checks that they agree.

Datasets (``DATASETS``; docs/data.md has the table with sizes and download commands):
mnist, fashion-mnist, kmnist, emnist (``emnist_split``: balanced, byclass, bymerge,
digits, letters, mnist), cifar10, svhn, smallnorb (``size``, ``crop``: the paper's 48x48
then 32x32), folder (your own ``ROOT/train/CLASS/*.png`` and ``ROOT/test/CLASS/...``;
``size``, ``crop``, ``channels``), and two generated from the MNIST files, deterministic in
``seed``: multimnist (two overlapping digits, 36x36; ``count``; ``fresh``: the training
overlays drawn anew for each epoch, ``Split.for_epoch``) and affine-mnist (train:
MNIST padded and translated in 40x40; test: an affine, generated, affNIST-like set); and
affnist, affNIST's own transformed test set (``test.mat``), a test split only.

Where the files are found. A data *root* holds one folder per dataset::

    ROOT/mnist/train-images-idx3-ubyte[.gz] ... (the four IDX files; also fashion-mnist/,
                                                kmnist/, and torchvision's MNIST/raw/...)
    ROOT/emnist/emnist-balanced-train-images-idx3-ubyte[.gz] ... (or emnist/gzip/, EMNIST/raw/)
    ROOT/cifar10/cifar-10-batches-py/data_batch_1 ... (or ROOT/cifar-10-batches-py/)
    ROOT/svhn/train_32x32.mat, test_32x32.mat
    ROOT/smallnorb/smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat[.gz] ...

A folder counts only when it holds the files of *both* splits. A ``data_dir`` argument
(the CLI's ``--data-dir``; it may also name the dataset folder itself) is the only place
searched when given: a folder without all the files is an error naming the missing ones,
never silently replaced by another copy. Without it the roots are searched in this
order: ``$CAPSFLOW_DATA``, the user cache (``$XDG_CACHE_HOME/capsflow/data`` or
``~/.cache/capsflow/data``), and for Fashion-MNIST the system folder
``/usr/share/datasets``. ``folder`` is read from ``data_dir`` only (it is required).
multimnist and affine-mnist are searched as mnist (their source).

The files are read by capsflow's own readers (runners/formats.py: IDX, CIFAR-10 pickles
through a restricted unpickler, SVHN .mat through scipy, smallNORB binary, image files
through Pillow); torchvision is needed only to download (``download=True``, the CLI's
``--download``), which fetches mnist, fashion-mnist, kmnist, emnist, cifar10 and svhn into
the user cache (found there by later searches). smallNORB has no torchvision loader: its
files are fetched by hand. torchvision, scipy and PIL are imported lazily, so importing
this module stays fast.
"""
from __future__ import annotations

import copy
import os
import zlib
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import numpy as np

from capsflow.core import memory
from capsflow.errors import CapsflowError

SPLITS = ("train", "test")
IMAGE_SIZE = 28      # MNIST's side (the IDX datasets')
NUM_CLASSES = 10     # MNIST's classes (the default of one_hot)
ENV_VAR = "CAPSFLOW_DATA"
SYSTEM_ROOT = Path("/usr/share/datasets")
#: MultiMNIST is generated in chunks of this many examples, each from its own seed: the
#: first N examples are the same whatever the count or limit, and memory stays bounded.
MULTIMNIST_CHUNK = 10_000
SMALLNORB_URL = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"
AFFNIST_URL = "https://www.cs.toronto.edu/~tijmen/affNIST/"


class DataError(CapsflowError):
    """A user-caused data problem (missing or unreadable files, bad dataset name)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The dataset's files were found in none of the searched folders."""


class DataArgumentError(DataError, ValueError):
    """A bad argument such as an unknown dataset name or split."""


# ------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset: its input shape and classes, where its files lie, how it is fetched.

    ``shape`` / ``classes`` are None where the data or the options decide them (folder:
    the images and class folders; emnist: the split; smallnorb: ``size``/``crop``)."""

    name: str                                   # capsflow name, e.g. "fashion-mnist"
    title: str                                  # shown to people
    reader: str                                 # idx, emnist, cifar10, svhn, smallnorb,
                                                # folder, multimnist, affine, affnist
    shape: Optional[Tuple[int, int, int]]       # (channels, height, width)
    class_list: Union[Tuple[str, ...], str, None]   # names, or a list in runners/formats.py
    folders: Tuple[str, ...] = ()               # under a data root, in search order
    files: str = ""                             # what its files are called, for messages
    torchvision_class: Optional[str] = None     # downloads through torchvision
    system_fallback: bool = False               # also search SYSTEM_ROOT
    source: Optional[str] = None                # generated from this dataset's files
    labels_per_example: int = 1
    options: Tuple[str, ...] = ()               # the load options it takes
    gz: bool = False                            # its files may be gzip-compressed (.gz)
    offline: str = ""                           # where the files come from (messages)

    @property
    def classes(self) -> Optional[Tuple[str, ...]]:
        """The class names, when the files do not decide them."""
        if isinstance(self.class_list, str):
            from capsflow.runners import formats  # lazy: formats imports this module
            return tuple(getattr(formats, self.class_list))
        return self.class_list

    @property
    def num_classes(self) -> Optional[int]:
        return None if self.classes is None else len(self.classes)


_IDX_OFFLINE = "the four IDX files (train-images-idx3-ubyte, ..., optionally .gz)"

DATASETS: Dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        "mnist", "MNIST", "idx", (1, 28, 28), tuple(str(d) for d in range(10)),
        ("mnist", "MNIST/raw"), "IDX", "MNIST", offline=_IDX_OFFLINE, gz=True),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", "Fashion-MNIST", "idx", (1, 28, 28), "FASHION_MNIST_CLASSES",
        ("fashion-mnist", "FashionMNIST/raw"), "IDX", "FashionMNIST", system_fallback=True,
        offline=_IDX_OFFLINE, gz=True),
    "kmnist": DatasetInfo(
        "kmnist", "Kuzushiji-MNIST", "idx", (1, 28, 28), "KMNIST_CLASSES", ("kmnist", "KMNIST/raw"),
        "IDX", "KMNIST", offline=_IDX_OFFLINE, gz=True),
    "emnist": DatasetInfo(
        "emnist", "EMNIST", "emnist", (1, 28, 28), None,
        ("emnist", "emnist/gzip", "EMNIST/raw"), "IDX", "EMNIST", options=("emnist_split",),
        offline="emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte[.gz]", gz=True),
    "cifar10": DatasetInfo(
        "cifar10", "CIFAR-10", "cifar10", (3, 32, 32), "CIFAR10_CLASSES",
        ("cifar10/cifar-10-batches-py", "cifar10", "cifar-10-batches-py"), "CIFAR-10",
        "CIFAR10", offline="cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)"),
    "svhn": DatasetInfo(
        "svhn", "SVHN", "svhn", (3, 32, 32), tuple(str(d) for d in range(10)), ("svhn",),
        "SVHN .mat", "SVHN", offline="train_32x32.mat and test_32x32.mat (format 2)"),
    "smallnorb": DatasetInfo(
        "smallnorb", "smallNORB", "smallnorb", None, "SMALLNORB_CLASSES", ("smallnorb",),
        "smallNORB", options=("size", "crop"), gz=True,
        offline="smallnorb-5x46789x9x18x6x2x96x96-training-{dat,cat}.mat and "
                "smallnorb-5x01235x9x18x6x2x96x96-testing-{dat,cat}.mat (optionally .gz)"),
    "folder": DatasetInfo(
        "folder", "image folder", "folder", None, None, options=("size", "crop", "channels"),
        offline="ROOT/train/CLASS/*.png and ROOT/test/CLASS/*.png (png, jpg, bmp, ...)"),
    "multimnist": DatasetInfo(
        "multimnist", "MultiMNIST (generated)", "multimnist", (1, 36, 36),
        tuple(str(d) for d in range(10)), source="mnist", labels_per_example=2,
        options=("count", "fresh"), offline="generated from the MNIST files"),
    "affine-mnist": DatasetInfo(
        "affine-mnist", "affine-mnist (train: MNIST padded and translated in 40x40; test: "
        "affine, generated, affNIST-like)", "affine", (1, 40, 40),
        tuple(str(d) for d in range(10)), source="mnist",
        offline="generated from the MNIST files"),
    "affnist": DatasetInfo(
        "affnist", "affNIST (transformed test set)", "affnist", (1, 40, 40),
        tuple(str(d) for d in range(10)), ("affnist",), "affNIST .mat",
        offline=f"test.mat of affNIST's transformed set ({AFFNIST_URL}); a test set only"),
}
#: Datasets with a test split only: evaluate on them (capsflow eval --dataset NAME).
TEST_ONLY = {"affnist": "train on affine-mnist (MNIST padded and translated in 40x40, as "
                        "the paper did) and evaluate with capsflow eval --dataset affnist"}
EMNIST_SPLITS = ("balanced", "byclass", "bymerge", "digits", "letters", "mnist")
DEFAULT_EMNIST_SPLIT = "balanced"
SMALLNORB_SIZE = 48   # Sabour et al. (2017): "downsampled to 48x48", then 32x32 crops
SMALLNORB_CROP = 32
#: Every load option, its meaning for messages and the CLI flag that sets it.
OPTIONS = {"emnist_split": "--emnist-split", "size": "--image-size", "crop": "--crop",
           "channels": "--channels", "count": "--multimnist-count",
           "fresh": "--multimnist-fresh"}


def dataset_names() -> List[str]:
    return list(DATASETS)


def _dataset_info(dataset: str) -> DatasetInfo:
    key = str(dataset).strip().lower()
    if key not in DATASETS:
        raise DataArgumentError(
            f"unknown dataset '{dataset}'; choose one of: {', '.join(DATASETS)}")
    return DATASETS[key]


def class_names(dataset: str, emnist_split: Optional[str] = None) -> Optional[List[str]]:
    """The class names of ``dataset`` when they do not depend on its files (None for
    folder, whose class folders name them)."""
    info = _dataset_info(dataset)
    if info.reader == "emnist":
        from capsflow.runners.formats import EMNIST_CLASSES
        split = _check_emnist_split(emnist_split or DEFAULT_EMNIST_SPLIT)
        names = list(EMNIST_CLASSES[split])
        return names[1:] if split == "letters" else names
    return None if info.classes is None else list(info.classes)


# ---------------------------------------------------------------- descriptions


MAX_CLASS_NAME = 200


def class_name_problem(name: str) -> str:
    """Why ``name`` cannot be a class name (stored in checkpoints, printed on one line),
    or '' when it can."""
    if len(name) > MAX_CLASS_NAME:
        return f"is {len(name)} characters long, more than {MAX_CLASS_NAME}"
    if not name.isprintable():
        return "holds a character that does not print (a tab, a newline, ...)"
    return ""


@dataclass
class DataDescription:
    """What a model trained on a dataset must know to take new images: the classes, the
    input shape and how the images were made (stored in checkpoints as ``meta["data"]``).

    ``options``: the resolved load options (JSON-able): ``emnist_split``; ``size`` and
    ``crop`` ([h, w] or None) and ``channels`` for folder and smallnorb; ``seed`` and
    ``count`` for the generated sets."""

    dataset: str
    title: str
    classes: List[str]
    shape: Tuple[int, int, int]                  # (channels, height, width)
    labels_per_example: int = 1
    options: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "title": self.title, "classes": list(self.classes),
                "shape": list(self.shape), "labels_per_example": self.labels_per_example,
                "options": copy.deepcopy(self.options)}

    @classmethod
    def from_json(cls, record: Any) -> "DataDescription":
        """A record from a checkpoint (untrusted): every field type-checked; a bad one
        raises DataError naming it."""
        def bad(what: str) -> DataError:
            return DataError(f"the data record {what}")

        if not isinstance(record, dict):
            raise bad("is not a JSON object")
        dataset, title = record.get("dataset"), record.get("title", "")
        if not isinstance(dataset, str) or not isinstance(title, str):
            raise bad("names no dataset")
        classes = record.get("classes")
        if (not isinstance(classes, list) or not classes
                or not all(isinstance(c, str) and not class_name_problem(c) for c in classes)):
            raise bad("has no list of class names")
        shape = record.get("shape")
        if (not isinstance(shape, list) or len(shape) != 3
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= 1 << 16
                           for s in shape)):
            raise bad(f"has no input shape [channels, height, width] ({str(shape)[:40]})")
        per = record.get("labels_per_example", 1)
        if per not in (1, 2) or isinstance(per, bool):
            raise bad(f"says {str(per)[:20]} labels per example (1 or 2)")
        options = record.get("options", {})
        if not isinstance(options, dict):
            raise bad("options are not a JSON object")
        clean: Dict[str, Any] = {}
        for key, value in options.items():
            if key in ("size", "crop"):
                if value is not None and not (isinstance(value, list) and len(value) == 2 and all(
                        isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16
                        for v in value)):
                    raise bad(f"option '{key}' is not [height, width]")
            elif key in ("channels", "count", "seed"):
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise bad(f"option '{key}' is not a whole number")
            elif key == "emnist_split":
                if value not in EMNIST_SPLITS:
                    raise bad(f"option 'emnist_split' is not one of {', '.join(EMNIST_SPLITS)}")
            else:
                continue  # written by a newer capsflow
            clean[key] = value
        made = clean.get("crop") or clean.get("size")  # the images' size as prepared
        if made is not None and list(made) != shape[1:]:
            raise bad(f"makes {made[0]}x{made[1]} images (its size and crop) but says the "
                      f"input is {shape[1]}x{shape[2]}")
        if clean.get("channels") not in (None, shape[0]):
            raise bad(f"makes {clean['channels']}-channel images but says the input has "
                      f"{shape[0]}")
        return cls(dataset, title or dataset, list(classes), tuple(shape), per, clean)

    def describe(self) -> str:
        return f"{self.title}: {shape_text(self.shape)}, {self.num_classes} classes"


class Split(NamedTuple):
    """One loaded split."""

    images: np.ndarray              # float32 (N, C, H, W) in [0, 1], C-contiguous
    labels: np.ndarray              # int64 (N,), or (N, 2) for multimnist
    info: DataDescription
    parts: Optional[np.ndarray] = None  # multimnist with keep_parts: (N, 2, 1, H, W)
    # multimnist's training split with fresh=True: epoch -> (images, labels) of that
    # epoch's overlays (epoch 0's are ``images``, ``labels``); None: one set for all epochs.
    for_epoch: Optional[Callable[[int], Tuple[np.ndarray, np.ndarray]]] = None


# --------------------------------------------------------------------------- paths


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/capsflow`` or ``~/.cache/capsflow``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "capsflow"


def default_data_root() -> Path:
    """The user-cache data root; downloads land here."""
    return user_cache_dir() / "data"


def _existing(folder: Path, name: str, gz: bool) -> Optional[Path]:
    """``folder/name`` or (``gz``) ``folder/name.gz``, whichever exists (uncompressed first)."""
    for candidate in (folder / name, folder / (name + ".gz")) if gz else (folder / name,):
        if candidate.is_file():
            return candidate
    return None


# The four MNIST-style IDX files, keyed by (split, kind); names as in the official releases.
IDX_FILES: Dict[Tuple[str, str], str] = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def _split_files(info: DatasetInfo, split: str, options: Dict[str, Any]) -> List[str]:
    """The file names one split of ``info`` is read from (inside its folder)."""
    if info.reader == "idx":
        return [IDX_FILES[(split, "images")], IDX_FILES[(split, "labels")]]
    if info.reader == "emnist":
        s = options.get("emnist_split") or DEFAULT_EMNIST_SPLIT
        return [f"emnist-{s}-{split}-images-idx3-ubyte", f"emnist-{s}-{split}-labels-idx1-ubyte"]
    if info.reader == "cifar10":
        from capsflow.runners.formats import CIFAR10_SPLITS
        return CIFAR10_SPLITS[split] + (["batches.meta"] if split == "train" else [])
    if info.reader == "svhn":
        return [f"{split}_32x32.mat"]
    if info.reader == "smallnorb":
        from capsflow.runners.formats import SMALLNORB_PREFIX
        return [f"{SMALLNORB_PREFIX[split]}-{k}.mat" for k in ("dat", "cat")]
    if info.reader == "affnist":  # a test set only
        from capsflow.runners.formats import AFFNIST_FILE
        return [AFFNIST_FILE] if split == "test" else []
    raise AssertionError(info.reader)


def _all_files(info: DatasetInfo, options: Dict[str, Any]) -> List[str]:
    return [n for s in SPLITS for n in _split_files(info, s, options)]


def _folder_names(info: DatasetInfo) -> set:
    """Lower-case folder names that identify ``info`` under a data root."""
    names = {info.name}
    for f in info.folders:
        names.add(f.split("/")[0].lower())
    if info.torchvision_class:
        names.add(info.torchvision_class.lower())
    return names


def _names_other_dataset(folder: Path, info: DatasetInfo) -> bool:
    """True when ``folder`` is visibly another dataset's folder (avoid silent mix-ups)."""
    names = {folder.name.lower()}
    if folder.name in ("raw", "gzip", "cifar-10-batches-py"):
        names.add(folder.parent.name.lower())
    others = {n for d in DATASETS.values() if d.folders and d is not info
              for n in _folder_names(d)} - _folder_names(info)
    return bool(names & others)


def _candidate_folders(info: DatasetInfo, data_dir: Optional[Path]) -> List[Path]:
    """Folders that may hold ``info``'s files, in search order: under ``data_dir`` only,
    when it is given."""
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
        folders.extend(root.joinpath(*f.split("/")) for f in info.folders)
        # Only an explicit data_dir may name the dataset folder itself.
        if i == 0 and data_dir is not None and not _names_other_dataset(root, info):
            folders.append(root)
    return list(dict.fromkeys(folders))  # drop duplicates, keep order


def _files_info(dataset: str) -> DatasetInfo:
    """The dataset whose files ``dataset`` is read from (mnist for the generated ones)."""
    info = _dataset_info(dataset)
    return DATASETS[info.source] if info.source else info


def find_dataset_folder(dataset: str, data_dir: Optional[Union[str, Path]] = None,
                        **options: Any) -> Path:
    """Return the first folder holding the files of both splits of ``dataset`` (for
    multimnist and affine-mnist: MNIST's; for folder: ``data_dir`` itself).

    Raises DataNotFoundError listing every folder searched (or naming the missing files
    of an explicit ``data_dir``)."""
    info = _dataset_info(dataset)
    opts = _resolve_options(info, options)
    explicit = _check_data_dir(data_dir, info)
    if info.reader == "folder":
        if explicit is None:
            raise DataArgumentError(
                f"--dataset folder reads your own images: pass --data-dir ROOT, where "
                f"{info.offline}")
        return explicit
    files_info = _files_info(dataset)
    names = _all_files(files_info, opts)
    folders = _candidate_folders(files_info, explicit)
    for folder in folders:
        if all(_existing(folder, n, files_info.gz) is not None for n in names):
            return folder
    prefix = f"{info.name} is generated from MNIST: " if info.source else ""
    if explicit is not None:
        raise DataNotFoundError(prefix + _incomplete_message(files_info, explicit, folders, names))
    raise DataNotFoundError(prefix + _not_found_message(files_info, folders, names))


def _check_data_dir(data_dir: Optional[Union[str, Path]], info: DatasetInfo) -> Optional[Path]:
    if data_dir is None:
        return None
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        if info.reader == "folder":
            what = f"the image-folder root ({info.offline})"
        else:
            files_info = DATASETS[info.source] if info.source else info
            what = (f"a folder holding {files_info.folders[0]}/ with {files_info.offline}")
        state = "is not a folder" if path.exists() else "does not exist"
        raise DataNotFoundError(f"data directory {path} {state}; pass --data-dir ROOT, "
                                f"{what}")
    return path


def _gz_note(info: DatasetInfo) -> str:
    return " (optionally .gz)" if info.gz else ""


def _incomplete_message(info: DatasetInfo, data_dir: Path, folders: List[Path],
                        names: List[str]) -> str:
    """--data-dir lacks some (or all) of the files: name the missing ones of the folder
    that holds the most (the one the user most likely meant)."""
    folder = max(folders, key=lambda f: sum(_existing(f, n, info.gz) is not None for n in names))
    missing = [n for n in names if _existing(folder, n, info.gz) is None]
    if len(missing) < len(names):
        what = f"{folder} lacks {', '.join(missing)}"
    else:
        looked = ", ".join(str(f) for f in folders)
        what = f"no {info.files} files (looked in: {looked}), missing {', '.join(missing)}"
    return (f"{info.name} data not found in --data-dir {data_dir}: {what}{_gz_note(info)}; "
            f"an explicit --data-dir is used alone, not replaced by ${ENV_VAR} or the "
            f"cache: add the files or drop --data-dir")


def _fetch_hint(info: DatasetInfo) -> str:
    if info.torchvision_class:
        return f", or pass --download to fetch it into {default_data_root()}"
    if info.reader == "smallnorb":
        return f" (download them from {SMALLNORB_URL} and unpack them there)"
    if info.reader == "affnist":
        return f" (get test.mat of the transformed set from {AFFNIST_URL} and put it there)"
    return ""


def _not_found_message(info: DatasetInfo, folders: List[Path], names: List[str]) -> str:
    looked = ", ".join(str(f) for f in folders)
    return (f"{info.name} data not found (looked in: {looked}); pass --data-dir ROOT "
            f"where ROOT/{info.folders[0]}/ holds {', '.join(names)}{_gz_note(info)}, "
            f"or set {ENV_VAR}=ROOT{_fetch_hint(info)}")


# ------------------------------------------------------------------------ options


def _check_emnist_split(split: Any) -> str:
    if split not in EMNIST_SPLITS:
        raise DataArgumentError(f"unknown EMNIST split '{split}'; choose one of: "
                                f"{', '.join(EMNIST_SPLITS)}")
    return split


def _size_pair(value: Any, flag: str) -> Optional[List[int]]:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        pair = [int(value), int(value)]
    elif isinstance(value, (str, bytes)):  # "32" is not the pair [3, 2]
        pair = []
    else:
        try:
            pair = [int(v) for v in value]
        except (TypeError, ValueError):
            pair = []
    if len(pair) != 2 or min(pair) < 1:
        raise DataArgumentError(f"{flag} must be a positive size (N or HxW), got {value!r}")
    return pair


def _resolve_options(info: DatasetInfo, options: Dict[str, Any]) -> Dict[str, Any]:
    """The options ``info`` takes, checked, with defaults; an option it does not take
    (given, not None) is an error naming the datasets that do."""
    unknown = [k for k in options if k not in OPTIONS]
    if unknown:
        raise DataArgumentError(f"unknown data option '{unknown[0]}'; the options are "
                                f"{', '.join(OPTIONS)}")
    for key, value in options.items():
        if value is not None and key not in info.options:
            takers = [d.name for d in DATASETS.values() if key in d.options]
            raise DataArgumentError(f"{OPTIONS[key]} does not apply to {info.name} (only to "
                                    f"{', '.join(takers)})")
    out: Dict[str, Any] = {}
    if "emnist_split" in info.options:
        out["emnist_split"] = _check_emnist_split(options.get("emnist_split")
                                                  or DEFAULT_EMNIST_SPLIT)
    if "size" in info.options:
        default = SMALLNORB_SIZE if info.reader == "smallnorb" else None
        size = options.get("size")
        out["size"] = _size_pair(default if size is None else size, OPTIONS["size"])
    if "crop" in info.options:
        default = SMALLNORB_CROP if info.reader == "smallnorb" else None
        crop = options.get("crop")
        out["crop"] = _size_pair(default if crop is None else crop, OPTIONS["crop"])
    if "channels" in info.options:
        channels = options.get("channels")
        if channels not in (None, 1, 3):
            raise DataArgumentError(f"{OPTIONS['channels']} must be 1 (grey) or 3 (colour), "
                                    f"got {channels!r}")
        out["channels"] = channels
    if "count" in info.options:
        count = options.get("count")
        if count is not None and (not isinstance(count, (int, np.integer)) or count < 1):
            raise DataArgumentError(f"{OPTIONS['count']} must be a positive number of "
                                    f"examples, got {count!r}")
        out["count"] = None if count is None else int(count)
    if "fresh" in info.options:
        fresh = options.get("fresh")
        if not (fresh is None or isinstance(fresh, bool)):
            raise DataArgumentError(f"{OPTIONS['fresh']} is on or off (true or false), "
                                    f"got {fresh!r}")
        out["fresh"] = bool(fresh)
    return out


def _derived_seed(seed: int, *words: Any) -> int:
    """A 64-bit seed for one generated part (dataset, split, chunk) of a run seeded
    ``seed``: the same arguments always give the same number."""
    key = [int(seed)] + [zlib.crc32(str(w).encode()) for w in words]
    return int(np.random.SeedSequence(key).generate_state(2, np.uint64)[0])


# ------------------------------------------------------------------------ downloads


def _torchvision_dataset(info: DatasetInfo, root: Path, train: bool, download: bool,
                         **kwargs: Any) -> Any:
    """torchvision's loader of an IDX dataset (used to download it into ``root``)."""
    try:
        from torchvision import datasets  # lazy: importing torch takes seconds
    except ImportError:
        raise DataError(f"downloading {info.name} needs torchvision "
                        f"(pip install 'capsflow[data]')") from None
    cls = getattr(datasets, info.torchvision_class)
    return cls(str(root), train=train, download=download, **kwargs)


def _download(info: DatasetInfo, options: Dict[str, Any], searched: DataNotFoundError) -> Path:
    """Fetch ``info``'s files (both splits) into the user cache through torchvision and
    return the folder they landed in (found there by later searches too)."""
    if not info.torchvision_class:
        raise DataNotFoundError(f"{searched}; capsflow cannot download {info.name} "
                                f"(torchvision has no loader for it)")
    from capsflow.runners import formats
    root = default_data_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        if info.reader in ("idx", "emnist"):
            extra = {"split": options["emnist_split"]} if info.reader == "emnist" else {}
            _torchvision_dataset(info, root, True, True, **extra)  # fetches both splits
        elif info.reader == "cifar10":
            formats._torchvision_download("CIFAR10", root / "cifar10", train=True)
        else:  # svhn: one file per split
            for split in SPLITS:
                formats._torchvision_download("SVHN", root / "svhn", split=split)
    except (RuntimeError, OSError, ValueError, DataError) as exc:
        raise DataNotFoundError(
            f"{searched}; downloading into {root} failed too: {_one_line(exc)}") from None
    names = _all_files(info, options)
    for folder in _candidate_folders(info, root):
        if all(_existing(folder, n, info.gz) is not None for n in names):
            return folder
    raise DataNotFoundError(f"{searched}; torchvision's download into {root} did not leave "
                            f"{', '.join(names)} in {root / info.folders[-1]}")


def _one_line(exc: BaseException) -> str:
    """torchvision's multi-line download errors -> first and last line (the cause)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')} ({lines[-1]})"


# ------------------------------------------------------------------------- readers


def _find(info: DatasetInfo, data_dir: Optional[Union[str, Path]], download: bool,
          options: Dict[str, Any]) -> Path:
    """The folder of ``info``'s files, downloaded when found nowhere and ``download``."""
    try:
        return find_dataset_folder(info.name, data_dir, **_given(info, options))
    except DataNotFoundError as missing:
        if not download:
            raise
        return _download(_files_info(info.name), options, missing)


def _given(info: DatasetInfo, options: Dict[str, Any]) -> Dict[str, Any]:
    """Resolved options back as load() options (those find_dataset_folder re-checks)."""
    return {k: v for k, v in options.items() if k in info.options and k in OPTIONS}


def _read_files(info: DatasetInfo, split: str, folder: Path, options: Dict[str, Any],
                seed: int, verify: bool, limit: Optional[int]
                ) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """One split of a file-based dataset (its folder found): images, labels, classes
    (affnist: only the first ``limit``, before they become float32)."""
    from capsflow.runners import formats
    if info.reader in ("idx", "emnist"):
        names = _split_files(info, split, options)
        image_file, label_file = (_existing(folder, n, True) for n in names)
        assert image_file is not None and label_file is not None  # found both splits
        if info.reader == "emnist":
            s = options["emnist_split"]
            x, y, classes = formats.read_idx_pair(image_file, label_file, transpose=True,
                                                  class_names=formats.EMNIST_CLASSES[s])
            if s == "letters":  # labels 1..26 (0 unused): shift to 26 classes a..z
                if y.size and y.min() < 1:
                    raise DataError(f"{label_file}: EMNIST letters labels must lie in "
                                    f"1..26, found {y.min()}")
                y, classes = y - 1, classes[1:]
        else:
            x, y, classes = formats.read_idx_pair(image_file, label_file,
                                                  class_names=info.classes)
        if x.shape[1:] != info.shape:
            raise DataError(f"{image_file}: images are {x.shape[2]}x{x.shape[3]}, "
                            f"expected {info.shape[1]}x{info.shape[2]} for {info.name}")
        return x, y, classes
    if info.reader == "cifar10":
        return formats.read_cifar10(folder, split, verify=verify)
    if info.reader == "svhn":
        return formats.read_svhn(folder, split, verify=verify)
    if info.reader == "smallnorb":
        x, y, classes = formats.read_smallnorb(folder, split, size=options["size"])
        crop = options["crop"]
        if crop is not None:
            # The paper: random 32x32 crops in training, the centre one at test time.
            # Here each training image keeps one crop, drawn from the run's seed (the
            # shift augmentation still moves it every epoch).
            if split == "train":
                x = formats.random_crop(x, crop, rng=_derived_seed(seed, info.name, split))
            else:
                x = formats.center_crop(x, crop)
        return x, y, classes
    if info.reader == "affnist":
        return formats.read_affnist(folder, limit)
    raise AssertionError(info.reader)


def _round_robin(labels: np.ndarray) -> np.ndarray:
    """An order taking one example of each class in turn (stable within a class), so
    the first N examples of a class-sorted folder hold every class."""
    n = labels.shape[0]
    by_class = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[by_class] = np.arange(n) - starts[labels[by_class]]
    return np.lexsort((labels, rank))


def _generate(info: DatasetInfo, split: str, x: np.ndarray, y: np.ndarray,
              options: Dict[str, Any], seed: int, limit: Optional[int],
              keep_parts: bool, epoch: int = 0
              ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """A generated split from the MNIST split (x, y); MultiMNIST's ``epoch`` > 0: the
    overlays drawn afresh for that epoch (``fresh``), each chunk from its own seed."""
    from capsflow.runners import synthetic
    if info.reader == "multimnist":
        count = options["count"] or x.shape[0]
        wanted = count if limit is None else min(count, limit)
        check_fits_in_memory(wanted, (1, 36, 36), f"multimnist's {split} split",
                             f"use a smaller {OPTIONS['count']} or --limit-{split}",
                             copies=3 if keep_parts else 1)  # parts: each digit alone too
        images, labels, parts = [], [], []
        epoch_words = (f"epoch {epoch}",) if epoch else ()
        # The base digits of all chunks: one stream of permutations of the split, so each
        # digit is a base equally often (within one) across chunks. Each chunk takes a
        # whole chunk's worth, used or not, so that the first N examples stay the same
        # whatever the count.
        bases = _Permutations(x.shape[0], _derived_seed(seed, info.name, split, "bases",
                                                        *epoch_words))
        for chunk in range(-(-wanted // MULTIMNIST_CHUNK)):
            take = min(MULTIMNIST_CHUNK, wanted - chunk * MULTIMNIST_CHUNK)
            words = (info.name, split, chunk) + epoch_words
            m, pair, part = synthetic.multimnist(
                x, y, MULTIMNIST_CHUNK, _derived_seed(seed, *words),
                order=bases.take(MULTIMNIST_CHUNK))
            images.append(m[:take])
            labels.append(pair[:take])
            if keep_parts:
                parts.append(part[:take])
            del m, part
        return (np.concatenate(images), np.concatenate(labels),
                np.concatenate(parts) if keep_parts else None)
    if split == "train":  # the paper's training set: digits placed at random in 40x40
        return synthetic.pad_and_translate(x, _derived_seed(seed, info.name, split)), y, None
    images, labels = synthetic.affine_test_set(x, y, _derived_seed(seed, info.name, split))
    return images, labels, None


class _Permutations:
    """Successive random permutations of range(n), from one seed, read in pieces."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.rng = n, np.random.default_rng(seed)
        self.pending = np.empty(0, dtype=np.int64)

    def take(self, count: int) -> np.ndarray:
        while self.pending.size < count:
            self.pending = np.concatenate([self.pending, self.rng.permutation(self.n)])
        taken, self.pending = self.pending[:count], self.pending[count:]
        return taken


def _check_limit(limit: Optional[int]) -> None:
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise DataArgumentError(f"limit must be a positive number of examples, got {limit}")


def load(dataset: str, split: str, data_dir: Optional[Union[str, Path]] = None,
         limit: Optional[int] = None, download: bool = False, seed: int = 0,
         verify: bool = True, keep_parts: bool = False, **options: Any) -> Split:
    """Load one split of any dataset in ``DATASETS``.

    Args:
        dataset: a name in ``DATASETS``.
        split: "train" or "test".
        data_dir: a data root (holding ``mnist/``...) or the dataset's folder; searched
            alone when given. Required for ``folder`` (ROOT/train/CLASS/..., ROOT/test/...).
        limit: keep only the first ``limit`` examples (folder: taken one class at a time,
            so that a few examples cover every class; generated sets: the first ``limit``
            of the full set, the same whatever the limit).
        download: fetch the files through torchvision when found nowhere.
        seed: the generated sets' seed (multimnist, affine-mnist) and smallNORB's training
            crops; the other datasets ignore it.
        verify: check CIFAR-10's and SVHN's md5 sums.
        keep_parts: multimnist only: also return each digit alone (``Split.parts``).
        options: ``emnist_split``; ``size``, ``crop`` (an int or (h, w)), ``channels``
            (1 or 3) for folder (size, crop also smallnorb: default 48 and 32); ``count``
            (multimnist examples per split; default one per MNIST digit); ``fresh``
            (multimnist: ``Split.for_epoch`` gives each epoch's own training overlays,
            epoch 0's being the set returned; the test split stays one set).
    Returns:
        a :class:`Split`: images float32 (N, C, H, W) in [0, 1], C-contiguous; labels
        int64 (N,) (multimnist: (N, 2)); the :class:`DataDescription`.
    """
    info = _dataset_info(dataset)
    if split not in SPLITS:
        raise DataArgumentError(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")
    if split == "train" and info.name in TEST_ONLY:
        raise DataArgumentError(f"{info.name} is a test set, with no training split: "
                                f"{TEST_ONLY[info.name]}")
    _check_limit(limit)
    opts = _resolve_options(info, options)
    recorded: Dict[str, Any] = {k: opts[k] for k in ("emnist_split", "size", "crop")
                                if k in opts}
    parts = for_epoch = None
    if info.reader == "folder":
        if download:
            raise DataArgumentError("--download does not apply to --dataset folder: its "
                                    "images are your own")
        from capsflow.runners import formats
        root = find_dataset_folder(info.name, data_dir)
        x, y, classes = formats.read_image_folder(root, split, size=opts["size"],
                                                  crop=opts["crop"], channels=opts["channels"])
        order = _round_robin(y)
        if limit is not None:
            order = order[:limit]
        x, y = np.take(x, order, axis=0), y[order]
        recorded["channels"] = int(x.shape[1])
    else:
        folder = _find(info, data_dir, download, opts)
        files_info = _files_info(info.name)
        x, y, classes = _read_files(files_info, split, folder, opts, seed, verify, limit)
        if info.source:
            if opts.get("fresh") and split == "train":  # the MNIST digits stay for it
                for_epoch = partial(_fresh_split, info, x, y, opts, seed, limit)
            x, y, parts = _generate(info, split, x, y, opts, seed, limit, keep_parts)
            classes = list(info.classes)
            recorded["seed"] = int(seed)
            if info.reader == "multimnist":
                recorded["count"] = opts["count"]
        elif info.reader == "smallnorb":
            recorded["seed"] = int(seed)
    if limit is not None and limit < x.shape[0]:
        x, y = x[:limit].copy(), y[:limit]  # a copy: the whole split is not kept alive
        parts = None if parts is None else parts[:limit].copy()
    recorded = {k: v for k, v in recorded.items() if v is not None}
    description = DataDescription(info.name, info.title, [str(c) for c in classes],
                                  tuple(int(s) for s in x.shape[1:]),
                                  info.labels_per_example, recorded)
    images = np.ascontiguousarray(x, dtype=np.float32)
    return Split(images, np.ascontiguousarray(y, dtype=np.int64), description, parts, for_epoch)


def _fresh_split(info: DatasetInfo, x: np.ndarray, y: np.ndarray, options: Dict[str, Any],
                 seed: int, limit: Optional[int], epoch: int) -> Tuple[np.ndarray, np.ndarray]:
    """``Split.for_epoch``: the training overlays of ``epoch`` from the MNIST digits (x, y)."""
    images, labels, _ = _generate(info, "train", x, y, options, seed, limit, False, epoch)
    return images, labels


def load_split(dataset: str, split: str, data_dir: Optional[Union[str, Path]] = None,
               limit: Optional[int] = None, download: bool = False,
               **options: Any) -> Tuple[np.ndarray, np.ndarray]:
    """``load(...)`` as ``(images, labels)``: e.g. MNIST's float32 (N, 1, 28, 28) in
    [0, 1] and int64 (N,) labels in 0..9."""
    loaded = load(dataset, split, data_dir, limit, download, **options)
    return loaded.images, loaded.labels


def load_train_test(dataset: str, data_dir: Optional[Union[str, Path]] = None,
                    limit_train: Optional[int] = None, limit_test: Optional[int] = None,
                    download: bool = False, seed: int = 0, verify: bool = True,
                    **options: Any) -> Tuple[Split, Split]:
    """Both splits of a run: the test split made like the training one (folder: the
    training images' channels), and one line when the two disagree in shape or classes."""
    info = _dataset_info(dataset)
    train = load(dataset, "train", data_dir, limit_train, download, seed, verify, **options)
    test_options = dict(options)
    if info.reader == "folder" and options.get("channels") is None:
        test_options["channels"] = train.info.shape[0]
    test = load(dataset, "test", data_dir, limit_test, download, seed, verify, **test_options)
    if test.info.shape != train.info.shape:
        where = f" in {data_dir}" if data_dir is not None else ""
        hint = (f"; pass {OPTIONS['size']} to resize both" if "size" in info.options else "")
        raise DataError(f"{dataset}{where}: the test images are {shape_text(test.info.shape)} "
                        f"but the training images are {shape_text(train.info.shape)}{hint}")
    if test.info.classes != train.info.classes:
        raise DataError(f"{dataset}: the test split's classes differ from the training "
                        f"split's ({len(test.info.classes)} vs {len(train.info.classes)})")
    return train, test


def shape_text(shape: Tuple[int, ...]) -> str:
    """(3, 32, 32) -> '3x32x32', as messages write image shapes."""
    return "x".join(str(s) for s in shape)


def check_fits_in_memory(count: int, shape: Tuple[int, ...], what: str, smaller: str,
                         copies: int = 1) -> None:
    """One line, before anything is allocated, when ``copies`` x ``count`` float32 images of
    ``shape`` would not fit in this machine's memory; ``smaller`` says which flags shrink
    them (a hostile --multimnist-count or --image-size must not exhaust memory)."""
    need = copies * count * int(np.prod(shape, dtype=object)) * 4
    room = memory.memory_room()
    if room is not None and need > room[0]:
        raise DataArgumentError(f"{what}: {count:,} images of {shape_text(shape)} need "
                                f"{memory.bytes_text(need)} as float32, more than {room[1]}; "
                                f"{smaller}")


# ------------------------------------------------------------------------ batching


def one_hot(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """int labels (B,) -> float32 one-hot (B, num_classes); (B, K) -> multi-hot (K ones
    per row when the K labels differ, as MultiMNIST's two)."""
    labels = np.asarray(labels)
    out = np.zeros((labels.shape[0], num_classes), dtype=np.float32)
    rows = np.arange(labels.shape[0])
    out[rows if labels.ndim == 1 else rows[:, None], labels] = 1.0
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


def _class_indices(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``labels`` as int64, refused unless every one is a whole number in [0, num_classes):
    one_hot would turn -1 into the last class without a word, and a label past the end
    into an IndexError in the middle of an epoch."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return labels.astype(np.int64)
    if labels.dtype.kind not in "iub":
        if labels.dtype.kind != "f" or not np.all(np.isfinite(labels)) \
                or not np.all(labels == np.round(labels)):
            raise DataArgumentError(f"labels must be whole class numbers, got dtype "
                                    f"{labels.dtype} with values that are not")
    low, high = labels.min(), labels.max()
    if low < 0 or high >= num_classes:
        raise DataArgumentError(f"labels must lie in [0, {num_classes}) for {num_classes} "
                                f"classes, got values from {low} to {high}")
    return labels.astype(np.int64)


class BatchIterator:
    """Mini-batches over (images, labels), re-iterable: each ``iter()`` is a new epoch.

    Every epoch draws, from one ``numpy.random.Generator``, a permutation (when
    ``shuffle``), one random (dy, dx) shift per example (when ``augment_shift > 0``) and
    whether each example is mirrored left to right (when ``augment_flip``; probability 1/2).
    ``get_state()``/``set_state()`` capture that generator plus the position inside the
    current epoch, so a resumed run sees the same batches as an uninterrupted one.

    Works for any image size and channel count; labels (N,) give one-hot targets,
    labels (N, K) (MultiMNIST's two classes) multi-hot ones.

    Yields:
        x: float32 (B, C, H, W), C-contiguous.
        y: float32 one-hot (B, num_classes) (multi-hot for labels (N, K)).
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
        augment_flip: bool = False,
    ) -> None:
        """``images`` (N, C, H, W), ``labels`` int (N,) or (N, K); ``rng`` a Generator or
        a seed."""
        labels = np.asarray(labels)
        if images.ndim != 4 or labels.ndim not in (1, 2) or labels.shape[0] != images.shape[0]:
            raise DataArgumentError(
                f"expected images (N, C, H, W) and labels (N,) or (N, K), "
                f"got {images.shape} and {labels.shape}")
        if batch_size < 1:
            raise DataArgumentError(f"batch size must be >= 1, got {batch_size}")
        if augment_shift < 0:
            raise DataArgumentError(f"augment_shift must be >= 0 pixels, got {augment_shift}")
        if num_classes < 1:
            raise DataArgumentError(f"num_classes must be >= 1, got {num_classes}")
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.labels = _class_indices(labels, num_classes)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.augment_shift = int(augment_shift)
        self.augment_flip = bool(augment_flip)
        self.drop_last = bool(drop_last)
        self.num_classes = int(num_classes)
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        self._resume_position = 0  # batches to skip on the next iter() (set_state)
        self._epoch: Optional[Dict[str, Any]] = None  # the epoch in progress, if any

    def replace_examples(self, images: np.ndarray, labels: np.ndarray) -> None:
        """Draw the next batches from ``images``, ``labels`` (as many, of the same shapes:
        a generated set's next epoch); the order, shifts and position are kept."""
        if images.shape != self.images.shape or labels.shape != self.labels.shape:
            raise DataArgumentError(f"replacement examples {images.shape}, {labels.shape} "
                                    f"differ from {self.images.shape}, {self.labels.shape}")
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.labels = _class_indices(labels, self.num_classes)

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        return self._epoch_batches()

    def _draw_epoch(self) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
        """Example order (N,), shifts (N, 2) and flips bool (N,) for one epoch, in a fixed
        draw order (flips last: a run without them draws what it drew before they existed)."""
        n = self.images.shape[0]
        order = self.rng.permutation(n) if self.shuffle else np.arange(n)
        shifts = flips = None
        if self.augment_shift > 0:
            s = self.augment_shift
            shifts = self.rng.integers(-s, s + 1, size=(n, 2))
        if self.augment_flip:
            flips = self.rng.random(n) < 0.5
        return order, shifts, flips

    def _epoch_batches(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        start_state = _rng_state(self.rng)
        order, shifts, flips = self._draw_epoch()
        skip, self._resume_position = self._resume_position, 0
        record = {"rng": start_state, "position": skip}
        self._epoch = record
        for b in range(skip, len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, order.shape[0])
            # Counted before the yield: a checkpoint taken after using this batch
            # must resume with the next one.
            record["position"] = b + 1
            yield self._make_batch(order[lo:hi], None if shifts is None else shifts[lo:hi],
                                   None if flips is None else flips[lo:hi])
        if self._epoch is record:
            self._epoch = None

    def _make_batch(self, index: np.ndarray, shifts: Optional[np.ndarray],
                    flips: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        x = np.take(self.images, index, axis=0)  # a copy: callers may modify it
        if flips is not None:
            x[flips] = x[flips, :, :, ::-1]
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
    try:
        if expected == "MT19937" and isinstance(inner, dict) and "key" in inner:
            inner["key"] = np.asarray(inner["key"], dtype=np.uint32)
        rng.bit_generator.state = state
    except (OverflowError, TypeError, ValueError) as exc:  # numbers outside 0 .. 2**128
        raise DataArgumentError(f"batch iterator state holds no valid {expected} state "
                                f"({str(exc)[:80]})") from None
