"""Readers for the on-disk dataset formats of issue #15, as NumPy arrays.

Every reader returns ``(images, labels, class_names)``:

* images: float32 (N, C, H, W) in [0, 1], C-contiguous;
* labels: int64 (N,), indices into ``class_names``;
* class_names: list of str.

Formats:

* IDX (MNIST, Fashion-MNIST, KMNIST, EMNIST): :func:`read_idx_pair`, raw or ``.gz``.
* CIFAR-10 python batches (``cifar-10-batches-py/``): :func:`read_cifar10`, md5-checked.
* SVHN cropped digits (``train_32x32.mat``...): :func:`read_svhn`, md5-checked, needs scipy.
* affNIST's transformed test set (``test.mat``): :func:`read_affnist`, needs scipy.
* smallNORB binary matrices (``smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat``...):
  :func:`read_smallnorb`, optionally downsampled; :func:`center_crop` and
  :func:`random_crop` for the paper's 32x32 crops; :func:`read_smallnorb_info`.
* an image-folder tree ``ROOT/{train,test}/CLASS/*.png|jpg|...``: :func:`read_image_folder`;
  loose image files (for prediction): :func:`read_images`.

Every bad input raises :class:`~capsflow.runners.data.DataError` (or a subclass) with one
line that names the file and the problem. Size fields in binary headers are checked
against the file's length before anything is allocated from them; gzip streams are read
in chunks, so memory follows the bytes actually present, and what their headers declare
must fit in memory with its float32 copy (a gzip bomb: a few MB inflate to GBs);
compressed MATLAB variables are inflated and counted, keeping nothing, before scipy
unpacks them. Nothing here downloads unless a
caller passes ``download=True`` (CIFAR-10, SVHN: through torchvision). torchvision,
scipy and PIL are imported lazily.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import signal
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from capsflow.core import memory
from capsflow.lang.limits import show
from capsflow.runners.data import (AFFNIST_URL, DataArgumentError, DataError, DataNotFoundError,
                                   check_fits_in_memory, class_name_problem)

PathLike = Union[str, Path]
Size = Union[int, Tuple[int, int], Sequence[int]]
Arrays = Tuple[np.ndarray, np.ndarray, List[str]]

SPLITS = ("train", "test")

# --------------------------------------------------------------------------- helpers


def _line(text: str, limit: int = 600) -> str:
    """One printable line (library messages may span several lines)."""
    parts = [p.strip() for p in str(text).splitlines() if p.strip()]
    text = " ".join(parts)
    if len(text) > limit:
        text = text[:limit] + "..."
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _fail(path: PathLike, problem: str) -> DataError:
    return DataError(_line(f"{path}: {problem}"))


def _check_split(split: str, allowed: Sequence[str] = SPLITS) -> str:
    if split not in allowed:
        raise DataArgumentError(f"unknown split '{split}'; choose one of: {', '.join(allowed)}")
    return split


def _pair(value: Optional[Size], what: str) -> Optional[Tuple[int, int]]:
    """None, an int n -> (n, n), or an (h, w) pair of positive ints."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif isinstance(value, (str, bytes)):  # "32" is not the pair (3, 2)
        raise DataArgumentError(f"{what} must be an int or an (height, width) pair, "
                                f"got {value!r}")
    else:
        try:
            pair = tuple(int(v) for v in value)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise DataArgumentError(f"{what} must be an int or an (height, width) pair, "
                                    f"got {value!r}") from None
        if len(pair) != 2:
            raise DataArgumentError(f"{what} must be an int or an (height, width) pair, "
                                    f"got {value!r}")
    if min(pair) < 1:
        raise DataArgumentError(f"{what} must be positive, got {value!r}")
    return pair  # type: ignore[return-value]


def _to_float(pixels: np.ndarray, scale: float = 255.0) -> np.ndarray:
    """uint8 (N, C, H, W) (any strides) -> new C-contiguous float32 / scale."""
    out = np.empty(pixels.shape, dtype=np.float32)
    np.divide(pixels, np.float32(scale), out=out)
    return out


def _md5(data: Union[bytes, PathLike]) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # a checksum, not a security measure
    if isinstance(data, (bytes, bytearray, memoryview)):
        digest.update(data)
    else:
        with open(data, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _verify_md5(path: Path, expected: str, actual: Optional[str] = None) -> None:
    actual = actual or _md5(path)
    if actual != expected:
        raise _fail(path, f"md5 {actual} does not match the published {expected}: the file "
                          f"is corrupt or not the official one; replace it with the official "
                          f"file (from Python, verify=False reads a file you made yourself)")


class _Binary:
    """A raw or gzip-compressed binary file read front to back, with the checks every
    header-driven format needs: truncation, bytes beyond the declared data, and (raw
    files) the declared size against the file's length *before* reading it."""

    CHUNK = 1 << 22

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                self.gz = f.read(2) == b"\x1f\x8b"
            self.length = None if self.gz else os.path.getsize(path)
            self.f: Any = gzip.open(path, "rb") if self.gz else open(path, "rb")
        except OSError as exc:
            raise _fail(path, f"cannot open: {exc.strerror or exc}") from None
        self.pos = 0

    def __enter__(self) -> "_Binary":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.f.close()

    def _read(self, n: int) -> bytearray:
        """Up to n bytes. A raw file's size was checked before a payload read, so its
        buffer is allocated once; a gzip stream grows its buffer chunk by chunk, so memory
        follows the bytes actually there, whatever a header claims."""
        try:
            if not self.gz:
                buf = bytearray(n)
                view, got = memoryview(buf), 0
                while got < n:
                    read = self.f.readinto(view[got:got + self.CHUNK])
                    if not read:
                        break
                    got += read
                del view
                del buf[got:]
            else:
                buf = bytearray()
                while len(buf) < n:
                    part = self.f.read(min(self.CHUNK, n - len(buf)))
                    if not part:
                        break
                    buf += part
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            what = "gzip stream" if self.gz else "file"
            raise _fail(self.path, f"corrupt or truncated {what}: {exc}") from None
        self.pos += len(buf)
        return buf

    def header(self, n: int, what: str) -> bytearray:
        data = self._read(n)
        if len(data) < n:
            raise _fail(self.path, f"truncated: the {what} needs {n} bytes, only "
                                   f"{len(data)} remain")
        return data

    def array(self, dtype: np.dtype, dims: Tuple[int, ...], what: str) -> np.ndarray:
        """The rest of the file as an array of ``dims``: a read-only memory map of a raw
        file (its length checked first), or the decompressed bytes of a gzip stream."""
        nbytes = int(np.prod(dims, dtype=object)) * dtype.itemsize
        copy = nbytes // dtype.itemsize * 4  # the loaders' float32 copy
        if self.length is None:
            self._check_fits(nbytes, copy, what)
            return np.frombuffer(self.payload(nbytes, what), dtype=dtype).reshape(dims)
        self._check_rest(nbytes, what)
        self._check_fits(0, copy, what)  # the map itself is the page cache's
        if nbytes == 0:
            return np.zeros(dims, dtype=dtype)
        try:
            return np.memmap(self.path, dtype=dtype, mode="r", offset=self.pos, shape=dims)
        except (OSError, ValueError) as exc:
            raise _fail(self.path, f"cannot map the data: {exc}") from None

    def _check_rest(self, nbytes: int, what: str) -> None:
        assert self.length is not None
        rest = self.length - self.pos
        if rest != nbytes:
            raise self._size_error(rest, nbytes, what)

    def payload(self, nbytes: int, what: str) -> bytearray:
        """Exactly the rest of the file, which must be ``nbytes`` long."""
        if self.length is not None:
            self._check_rest(nbytes, what)
        data = self._read(nbytes)
        if len(data) < nbytes:
            raise self._size_error(len(data), nbytes, what)
        if self.gz and self._read(1):
            raise _fail(self.path, f"holds more data than its header declares ({what}: "
                                   f"{nbytes:,} bytes); is it the right file?")
        return data

    def _check_fits(self, held: int, copy: int, what: str) -> None:
        """One line, before the data are read, when the ``held`` bytes a gzip stream
        inflates to (0 for a raw file's memory map) and their float32 copy (``copy``
        bytes: the loaders convert) do not fit in this machine's memory: a few MB of gzip
        can inflate to GBs (a gzip bomb), in many small reads that no single allocation
        would refuse, and a sparse raw file can declare any size."""
        room = memory.memory_room()
        if room is not None and held + copy > room[0]:
            sizes = (f"{memory.bytes_text(held)} decompressed, {memory.bytes_text(copy)} "
                     f"more as float32" if held else f"{memory.bytes_text(copy)} as float32")
            raise _fail(self.path, f"the header declares {what} ({sizes}), more than "
                                   f"{room[1]}; is it the right file?")

    def _size_error(self, have: int, need: int, what: str) -> DataError:
        if have < need:
            return _fail(self.path, f"truncated: the header declares {what} "
                                    f"({need:,} bytes of data) but the file holds {have:,}")
        return _fail(self.path, f"holds {have - need:,} bytes more than its header declares "
                                f"({what}: {need:,} bytes); is it the right file?")


def _existing(folder: Path, name: str) -> Optional[Path]:
    """folder/name or folder/name.gz, whichever exists (uncompressed first)."""
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _need_folder(folder: PathLike, what: str) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(f"{path}: no such folder (expected the {what})")
    return path


# ------------------------------------------------------------------------------ IDX

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,)

MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
KMNIST_CLASSES = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]
_DIGITS = [str(d) for d in range(10)]
_UPPER = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
_LOWER = [chr(c) for c in range(ord("a"), ord("z") + 1)]
_MERGED = set("cijklmopsuvwxyz")  # lower-case letters EMNIST folds into upper case
# Label index -> name for each EMNIST split (files emnist-<split>-{train,test}-...).
EMNIST_CLASSES: Dict[str, List[str]] = {
    "byclass": _DIGITS + _UPPER + _LOWER,
    "bymerge": _DIGITS + _UPPER + [c for c in _LOWER if c not in _MERGED],
    "balanced": _DIGITS + _UPPER + [c for c in _LOWER if c not in _MERGED],
    "letters": ["N/A"] + _LOWER,  # labels 1..26; 0 is unused
    "digits": list(_DIGITS),
    "mnist": list(_DIGITS),
}


def _read_idx(path: Path, magic: int, ndim: int, what: str) -> np.ndarray:
    with _Binary(path) as f:
        found = struct.unpack(">I", f.header(4, "IDX magic number"))[0]
        if found != magic:
            raise _fail(path, f"magic number 0x{found:08X} is not 0x{magic:08X} (IDX {what}, "
                              f"unsigned bytes, {ndim} dimension{'s' * (ndim > 1)}); "
                              f"is it the {what} file?")
        dims = struct.unpack(f">{ndim}I", f.header(4 * ndim, "IDX header"))
        if min(dims) == 0:
            raise _fail(path, f"IDX header declares an empty array {dims}")
        return f.array(np.dtype(np.uint8), dims, f"{' x '.join(map(str, dims))} bytes")


def read_idx_pair(images_path: PathLike, labels_path: PathLike, transpose: bool = False,
                  class_names: Optional[Sequence[str]] = None) -> Arrays:
    """One split of an IDX dataset (MNIST, Fashion-MNIST, KMNIST, EMNIST), raw or .gz.

    Checks: magic 0x00000803 (images) / 0x00000801 (labels); non-empty dims; the data
    length against the header (neither truncated nor longer); equal counts; labels below
    ``len(class_names)`` when given.

    Args:
        transpose: swap rows and columns (EMNIST stores its images transposed).
        class_names: names of the label values (e.g. ``FASHION_MNIST_CLASSES``,
            ``EMNIST_CLASSES["letters"]``); default "0", "1", ... up to the largest label.
    Returns:
        images float32 (N, 1, rows, cols), labels int64 (N,), class names.
    """
    images_path, labels_path = Path(images_path), Path(labels_path)
    pixels = _read_idx(images_path, IDX_IMAGES_MAGIC, 3, "images")
    labels = _read_idx(labels_path, IDX_LABELS_MAGIC, 1, "labels")
    if labels.shape[0] != pixels.shape[0]:
        raise _fail(labels_path, f"holds {labels.shape[0]:,} labels but {images_path.name} "
                                 f"holds {pixels.shape[0]:,} images")
    top = int(labels.max())
    if class_names is None:
        names = [str(i) for i in range(top + 1)]
    else:
        names = [str(n) for n in class_names]
        if top >= len(names):
            raise _fail(labels_path, f"label {top} is outside 0..{len(names) - 1} "
                                     f"({len(names)} class names)")
    if transpose:
        pixels = pixels.transpose(0, 2, 1)
    return _to_float(pixels[:, None]), np.array(labels, dtype=np.int64), names


# ------------------------------------------------------------------------- CIFAR-10

CIFAR10_FOLDER = "cifar-10-batches-py"
# File name -> md5, as published in torchvision/datasets/cifar.py (CIFAR10.train_list,
# test_list, meta); tests/test_formats.py compares them with the installed torchvision.
CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR10_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
_PICKLE_LIMIT = 256 << 20  # a CIFAR-10 batch is 31 MB; refuse to slurp anything huge


def _numpy_reconstruct() -> Any:
    return np.ndarray.__reduce__(np.zeros(1, dtype=np.uint8))[0]  # numpy's _reconstruct


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """numpy's protocol-5 array reconstruction, refusing object arrays."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise pickle.UnpicklingError("refused an object array")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


class _SafeUnpickler(pickle.Unpickler):
    """Unpickling runs code named by the file: a crafted "batch" could call os.system.
    This unpickler resolves only the globals that CIFAR's batches need: numpy's array
    reconstruction (``_reconstruct``, ``ndarray``, ``dtype``: the official batches were
    written by Python 2's cPickle, protocol 2, and hold dicts of str -> uint8 array /
    list of int / list of str), plus what Python 3 writes for the same dicts: bytes at
    protocol 2 (``_codecs.encode``) and arrays at protocol 5 (``_frombuffer``, object
    arrays refused). Anything else, e.g. ``os.system`` or ``builtins.eval``, is refused
    before it is looked up."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        if name == "_frombuffer":
            return _frombuffer
        if module == "_codecs":
            return _latin1_encode
        return getattr(np, name)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes (protocol 2): latin-1 only."""
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refused the codec {encoding!r}")
    return text.encode("latin1")


def _load_pickle(path: Path, verify: bool) -> Dict[str, Any]:
    """A dict from a CIFAR pickle, keys as str, loaded with :class:`_SafeUnpickler`."""
    try:
        length = path.stat().st_size
        if length > _PICKLE_LIMIT:
            raise _fail(path, f"is {length:,} bytes, far larger than a CIFAR-10 batch")
        raw = path.read_bytes()
    except OSError as exc:
        raise _fail(path, f"cannot read: {exc.strerror or exc}") from None
    if verify:
        _verify_md5(path, CIFAR10_MD5[path.name], _md5(raw))
    try:
        # latin1 as torchvision: Python 2 str (numpy's raw bytes included) -> str.
        obj = _SafeUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise _fail(path, f"not a readable CIFAR-10 pickle: {type(exc).__name__}: {exc}"
                    ) from None
    if not isinstance(obj, dict):
        raise _fail(path, f"holds a {type(obj).__name__}, not a CIFAR-10 batch dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_batch(path: Path, verify: bool, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    entry = _load_pickle(path, verify)
    data, labels = entry.get("data"), entry.get("labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise _fail(path, f"lacks the 'data' array or the 'labels' list "
                          f"(keys: {', '.join(map(str, entry)) or 'none'})")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise _fail(path, f"'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if data.nbytes > path.stat().st_size:  # a zero-stride array: a few bytes, any size
        raise _fail(path, f"'data' claims {data.nbytes:,} bytes, more than the file holds")
    try:
        labels = np.asarray(labels).reshape(-1)
    except (TypeError, ValueError):  # ragged
        raise _fail(path, "'labels' is not a list of integers") from None
    if labels.shape[0] != data.shape[0]:
        raise _fail(path, f"holds {data.shape[0]:,} images but {labels.shape[0]:,} labels")
    return data, _whole_labels(path, labels, 0, num_classes - 1, "'labels'")


def _cifar_folder(folder: PathLike) -> Path:
    path = Path(folder).expanduser()
    return path / CIFAR10_FOLDER if (path / CIFAR10_FOLDER).is_dir() else path


def read_cifar10(folder: PathLike, split: str, verify: bool = True,
                 download: bool = False) -> Arrays:
    """CIFAR-10's python batches: ``data_batch_1..5`` (train) or ``test_batch``, and
    ``batches.meta`` for the class names.

    Args:
        folder: the ``cifar-10-batches-py`` folder, or a folder holding it (torchvision's
            root).
        verify: check each file's md5 against torchvision's published list.
        download: when files are missing, fetch them through torchvision into ``folder``.
    Checks: md5 (verify), the restricted unpickling, uint8 data (N, 3072), as many labels
    as images, labels in 0..9, 10 class names in the meta file.
    Returns:
        images float32 (N, 3, 32, 32), labels int64 (N,), class names.
    """
    _check_split(split)
    base = _cifar_folder(folder)
    names = CIFAR10_SPLITS[split] + ["batches.meta"]
    missing = [n for n in names if not (base / n).is_file()]
    if missing and download:
        _torchvision_download("CIFAR10", Path(folder).expanduser(), train=split == "train")
        base = _cifar_folder(folder)
        missing = [n for n in names if not (base / n).is_file()]
    if missing:
        raise DataNotFoundError(f"{base}: missing CIFAR-10 file(s) {', '.join(missing)}; "
                                f"unpack cifar-10-python.tar.gz there (or pass download)")
    meta = _load_pickle(base / "batches.meta", verify)
    classes = meta.get("label_names")
    if (not isinstance(classes, list) or len(classes) != 10
            or not all(isinstance(c, (str, bytes)) for c in classes)):
        raise _fail(base / "batches.meta", "'label_names' is not a list of 10 names")
    classes = [c.decode("latin1") if isinstance(c, bytes) else c for c in classes]
    parts = [_cifar_batch(base / n, verify, len(classes)) for n in CIFAR10_SPLITS[split]]
    data = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts])
    return _to_float(data.reshape(-1, 3, 32, 32)), labels, classes


def _torchvision_download(cls_name: str, root: Path, **kwargs: Any) -> None:
    """Fetch a dataset with torchvision's downloader (only on an explicit request)."""
    try:
        from torchvision import datasets  # lazy: importing torch takes seconds
    except ImportError:
        raise DataError(f"downloading {cls_name} needs torchvision "
                        f"(pip install 'capsflow[data]')") from None
    try:
        root.mkdir(parents=True, exist_ok=True)
        getattr(datasets, cls_name)(str(root), download=True, **kwargs)
    except (RuntimeError, OSError, ValueError) as exc:
        raise DataError(_line(f"{root}: downloading {cls_name} through torchvision failed: "
                              f"{exc}")) from None


# ----------------------------------------------------------------------------- SVHN

# File name and md5 per split, as published in torchvision/datasets/svhn.py.
SVHN_FILES = {
    "train": ("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test": ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
    "extra": ("extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7"),
}
SVHN_CLASSES = [str(d) for d in range(10)]
SVHN_MAX_BYTES = 2 << 30  # the largest official file, extra_32x32.mat, is about 1.3 GB


def read_svhn(folder: PathLike, split: str, verify: bool = True,
              download: bool = False) -> Arrays:
    """SVHN's cropped digits, ``<split>_32x32.mat`` (MATLAB v5; read with scipy).

    ``X`` is uint8 (32, 32, 3, N); ``y`` is (N, 1) with values 1..10, 10 meaning the
    digit 0 (mapped to label 0, as torchvision does).

    Args:
        split: "train", "test" or "extra".
        verify: check the md5 against torchvision's published list.
        download: when the file is missing, fetch it through torchvision into ``folder``.
    Checks: md5 (verify), a MATLAB 5.0 header (v7.3/HDF5 files are refused by name),
    both variables present, X uint8 (32, 32, 3, N), N labels in 1..10.
    Returns:
        images float32 (N, 3, 32, 32), labels int64 (N,), class names "0".."9".
    """
    _check_split(split, tuple(SVHN_FILES))
    base = Path(folder).expanduser()
    name, md5 = SVHN_FILES[split]
    path = base / name
    if not path.is_file() and download:
        _torchvision_download("SVHN", base, split=split)
    if not path.is_file():
        raise DataNotFoundError(f"{path}: no such file (SVHN {split} split, format 2 "
                                f"cropped digits; pass download to fetch it)")
    if verify:
        size = path.stat().st_size
        if size > SVHN_MAX_BYTES:  # before hashing it all: a sparse file can be any size
            raise _fail(path, f"is {memory.bytes_text(size)}; SVHN's official files are "
                              f"under {memory.bytes_text(SVHN_MAX_BYTES)}")
        _verify_md5(path, md5)
    mat = _loadmat(path, ("X", "y"), "SVHN", verified=verify)
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None:
        raise _fail(path, "lacks the variable 'X' or 'y' (SVHN format 2 holds both)")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise _fail(path, f"'X' is {x.dtype} {x.shape}, expected uint8 (32, 32, 3, N)")
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != x.shape[3]:
        raise _fail(path, f"holds {x.shape[3]:,} images but {y.shape[0]:,} labels")
    if y.size == 0:
        raise _fail(path, "holds no images")
    labels = _whole_labels(path, y, 1, 10, "labels 'y'", " (10 is the digit 0)") % 10
    return _to_float(x.transpose(3, 2, 0, 1)), labels, list(SVHN_CLASSES)


def _whole_labels(path: Path, labels: np.ndarray, low: int, high: int, what: str,
                  note: str = "") -> np.ndarray:
    """``labels`` as int64, when every one is a whole number in low..high, of any real
    type (MATLAB stores them as doubles): not NaN, not 3.5, not text."""
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)) \
            or not np.isin(labels, np.arange(low, high + 1)).all():
        raise _fail(path, f"{what} must be the whole numbers {low}..{high}{note}")
    return labels.astype(np.int64)


def _check_mat_header(path: Path, dataset: str = "SVHN") -> None:
    with open(path, "rb") as f:
        head = f.read(128)
    if head.startswith(b"MATLAB 7.3"):
        raise _fail(path, f"is a MATLAB v7.3 (HDF5) file; {dataset}'s files are MATLAB 5.0: "
                          "use the original download")
    if len(head) < 128 or not head.startswith(b"MATLAB 5.0 MAT-file") \
            or head[126:128] not in (b"IM", b"MI"):
        raise _fail(path, "is not a MATLAB 5.0 MAT-file (bad 128-byte header)")


MAT_COMPRESSED = 15  # miCOMPRESSED: a zlib stream holding one variable
DEFLATE_MAX_RATIO = 1032  # deflate's largest expansion: 258 bytes from 2 bits


def _check_mat_unpacks(path: Path) -> None:
    """One line when a MATLAB 5.0 file's variables, unpacked, and a float32 copy of them
    (the loaders convert uint8 pixels: 5 times their bytes) do not fit in this machine's
    memory. scipy inflates a compressed variable whole, and a few MB of zlib can inflate
    to GBs (a zip bomb); so the compressed elements are inflated here first in chunks,
    counting bytes and keeping none (``_mat_unpacked_bytes``)."""
    room = memory.memory_room()
    if room is None:
        return
    have, words = room
    budget = have // 5  # the pixels and their float32 copy
    total, bounded = _mat_unpacked_bytes(path, budget, bound_small=True)
    if total > budget and bounded:  # a bound, not a count, may have gone over: count all
        total, _ = _mat_unpacked_bytes(path, budget, bound_small=False)
    if total > budget:
        raise _fail(path, f"its variables unpack to more than {memory.bytes_text(budget)}, a "
                          f"fifth of {words} (the pixels and their float32 copy); is it the "
                          f"right file?")


def _mat_unpacked_bytes(path: Path, budget: int, bound_small: bool) -> tuple:
    """(bytes the top-level elements of a MATLAB 5.0 file unpack to, whether any was
    bounded instead of counted); the count stops once past ``budget``. A plain element
    counts the bytes the file holds for it. A compressed one is inflated and counted,
    unless ``bound_small`` and deflate's largest ratio keeps it within the budget: then
    that bound counts (inflating SVHN's label vector costs nothing, its images do)."""
    with open(path, "rb") as f:
        order = "<" if f.read(128)[126:128] == b"IM" else ">"
        length = os.fstat(f.fileno()).st_size
        total, bounded = 0, False
        while total <= budget:
            tag = f.read(8)
            if len(tag) < 8:
                break  # the end, or a truncation scipy reports
            kind, count = struct.unpack(order + "II", tag)
            count = min(count, length - f.tell())
            if kind != MAT_COMPRESSED:
                total += count
                f.seek(count, os.SEEK_CUR)
            elif bound_small and total + DEFLATE_MAX_RATIO * count <= budget:
                total, bounded = total + DEFLATE_MAX_RATIO * count, True
                f.seek(count, os.SEEK_CUR)
            else:
                total += _inflated_size(f, count, budget - total)
    return total, bounded


def _inflated_size(f: BinaryIO, count: int, stop_above: int) -> int:
    """Bytes the zlib stream of the next ``count`` bytes of ``f`` inflates to, counted in
    chunks (none kept); the count stops once past ``stop_above``. A damaged stream counts
    what it gave (scipy reports the damage)."""
    inflater, size, left = zlib.decompressobj(), 0, count
    try:
        while left > 0 and size <= stop_above:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
            data = inflater.decompress(chunk, 1 << 24)
            size += len(data)
            while inflater.unconsumed_tail and size <= stop_above:
                size += len(inflater.decompress(inflater.unconsumed_tail, 1 << 24))
    except zlib.error:
        pass
    f.seek(left, os.SEEK_CUR)
    return size


def _loadmat(path: Path, names: Tuple[str, ...], dataset: str, verified: bool) -> dict:
    """``names`` from a MATLAB 5.0 file, through scipy; one line for any failure. A file
    whose md5 was not ``verified`` is read once in a child process first: scipy's C
    reader dies of a segmentation fault on some damaged files (one byte of a data type
    changed), which no exception here could turn into a line."""
    _check_mat_header(path, dataset)
    _check_mat_unpacks(path)
    try:
        from scipy.io import loadmat  # lazy: only the .mat datasets need scipy
    except ImportError:
        raise DataError(f"reading {dataset}'s .mat files needs scipy (pip install scipy)") from None
    if not verified:
        _check_scipy_survives(path, names)
    try:
        return loadmat(str(path), variable_names=names)
    except Exception as exc:  # noqa: BLE001 - scipy raises many kinds on a bad file
        raise _fail(path, f"unreadable MATLAB file: {type(exc).__name__}: {exc}") from None


def _check_scipy_survives(path: Path, names: Tuple[str, ...]) -> None:
    """Read ``path`` with scipy in a child process; one line if that process dies of a
    signal (its exceptions are left to the caller's own read, which reports them)."""
    code = ("import sys; from scipy.io import loadmat\n"
            "try: loadmat(sys.argv[1], variable_names=sys.argv[2:])\n"
            "except Exception: pass")
    done = subprocess.run([sys.executable, "-c", code, str(path), *names],
                          capture_output=True)
    if done.returncode < 0:
        raise _fail(path, f"damaged MATLAB file: scipy's reader crashed on it "
                          f"({signal.Signals(-done.returncode).name})")


# --------------------------------------------------------------------------- affNIST

AFFNIST_FILE = "test.mat"
AFFNIST_SIDE = 40


def read_affnist(folder: PathLike, limit: Optional[int] = None) -> Arrays:
    """affNIST's test set (Tieleman 2013), the one Sabour et al. (2017, Section 5.2) test on:
    ``test.mat`` of the "transformed" set, 320,000 MNIST test digits under random affine
    transformations in 40x40.

    The file holds one struct ``affNISTdata``; its ``image`` is uint8 (1600, N), each
    column one image with pixel ``row * 40 + column`` (as affNIST's own readers take it),
    and ``label_int`` holds the N digits 0..9. ``limit`` keeps the first examples before
    they become float32 (the whole set is 2 GB as float32).
    Returns:
        images float32 (N, 1, 40, 40), labels int64 (N,), class names "0".."9".
    """
    path = Path(folder).expanduser() / AFFNIST_FILE
    if not path.is_file():
        raise DataNotFoundError(f"{path}: no such file (affNIST's transformed test set, "
                                f"from {AFFNIST_URL})")
    mat = _loadmat(path, ("affNISTdata",), "affNIST", verified=False)
    data = mat.get("affNISTdata")
    fields = getattr(getattr(data, "dtype", None), "names", None) or ()
    if data is None or not {"image", "label_int"} <= set(fields) or data.size != 1:
        raise _fail(path, "lacks the struct 'affNISTdata' with fields 'image' and 'label_int'")
    images, labels = np.asarray(data["image"].flat[0]), np.asarray(data["label_int"].flat[0])
    side = AFFNIST_SIDE * AFFNIST_SIDE
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[0] != side:
        raise _fail(path, f"'image' is {images.dtype} {images.shape}, expected uint8 "
                          f"({side}, N)")
    labels = labels.reshape(-1)
    if labels.shape[0] != images.shape[1]:
        raise _fail(path, f"holds {images.shape[1]:,} images but {labels.shape[0]:,} labels")
    if labels.size == 0:
        raise _fail(path, "holds no images")
    labels = _whole_labels(path, labels, 0, 9, "labels 'label_int'")
    keep = images.shape[1] if limit is None else min(limit, images.shape[1])
    x = images[:, :keep].T.reshape(keep, 1, AFFNIST_SIDE, AFFNIST_SIDE)
    return _to_float(x), labels[:keep], [str(d) for d in range(10)]


# ------------------------------------------------------------------------ smallNORB

NORB_UINT8_MAGIC = 0x1E3D4C55  # "byte matrix"
NORB_INT32_MAGIC = 0x1E3D4C54  # "integer matrix"
_NORB_DTYPES = {NORB_UINT8_MAGIC: np.dtype("u1"), NORB_INT32_MAGIC: np.dtype("<i4")}
SMALLNORB_PREFIX = {"train": "smallnorb-5x46789x9x18x6x2x96x96-training",
                    "test": "smallnorb-5x01235x9x18x6x2x96x96-testing"}
SMALLNORB_CLASSES = ["animal", "human", "airplane", "truck", "car"]
SMALLNORB_INFO = ["instance", "elevation", "azimuth", "lighting"]
_NORB_MAX_NDIM = 16


def read_norb_matrix(path: PathLike, magic: int) -> np.ndarray:
    """One NYU binary-matrix file (raw or .gz): int32 magic, int32 ndim, then
    max(3, ndim) int32 dims, all little-endian, then the data in C order. A raw file
    comes back memory-mapped (read-only): the 448 MB training images are then read
    chunk by chunk while downsampling."""
    path = Path(path)
    with _Binary(path) as f:
        head = f.header(8, "matrix header")
        found, ndim = struct.unpack("<ii", head)
        if found != magic:
            kind = {NORB_UINT8_MAGIC: "uint8", NORB_INT32_MAGIC: "int32"}
            raise _fail(path, f"magic number 0x{found & 0xFFFFFFFF:08X} is not 0x{magic:08X} "
                              f"(NORB {kind.get(magic, '')} matrix); is it the right file?")
        if not 1 <= ndim <= _NORB_MAX_NDIM:
            raise _fail(path, f"header declares {ndim} dimensions, expected 1..{_NORB_MAX_NDIM}")
        dims = struct.unpack(f"<{max(3, ndim)}i", f.header(4 * max(3, ndim), "dimensions"))
        dims = dims[:ndim]
        if min(dims) < 1:
            raise _fail(path, f"header declares dimensions {dims}; all must be positive")
        dtype = _NORB_DTYPES[magic]
        return f.array(dtype, dims, f"{' x '.join(map(str, dims))} {dtype.name}")


def _norb_file(folder: Path, split: str, kind: str) -> Path:
    name = f"{SMALLNORB_PREFIX[split]}-{kind}.mat"
    found = _existing(folder, name)
    if found is None:
        raise DataNotFoundError(f"{folder}: missing smallNORB file {name} (or {name}.gz)")
    return found


def read_smallnorb(folder: PathLike, split: str, size: Optional[Size] = None) -> Arrays:
    """smallNORB's stereo pairs: ``<prefix>-dat.mat`` (uint8 N x 2 x 96 x 96) and
    ``<prefix>-cat.mat`` (int32 N, categories 0..4), raw or .gz, where the prefix is
    ``smallnorb-5x46789x9x18x6x2x96x96-training`` or ``...-5x01235x...-testing``.

    Args:
        size: downsample to size x size (or (h, w)) by area averaging, e.g. 48 as in
            Sabour et al. (2017): "downsampled to 48x48"; then :func:`random_crop` 32x32
            for training and :func:`center_crop` 32x32 for testing.
    Checks: magic numbers (0x1E3D4C55 images, 0x1E3D4C54 categories), dims (N, 2, 96, 96)
    and (N,), data lengths against the headers, equal counts, categories in 0..4.
    Returns:
        images float32 (N, 2, H, W) (the two cameras as channels), labels int64 (N,),
        class names.
    """
    _check_split(split)
    base = _need_folder(folder, "smallNORB folder")
    out = _pair(size, "size")
    dat_path, cat_path = _norb_file(base, split, "dat"), _norb_file(base, split, "cat")
    pixels = read_norb_matrix(dat_path, NORB_UINT8_MAGIC)
    if pixels.ndim != 4 or pixels.shape[1] != 2:
        raise _fail(dat_path, f"holds a {pixels.shape} matrix, expected (N, 2, 96, 96)")
    cats = read_norb_matrix(cat_path, NORB_INT32_MAGIC)
    if cats.ndim != 1 or cats.shape[0] != pixels.shape[0]:
        raise _fail(cat_path, f"holds a {cats.shape} matrix, expected ({pixels.shape[0]},) "
                              f"to match {dat_path.name}")
    if cats.min() < 0 or cats.max() >= len(SMALLNORB_CLASSES):
        raise _fail(cat_path, f"categories must lie in 0..{len(SMALLNORB_CLASSES) - 1}, "
                              f"found {cats.min()}..{cats.max()}")
    images = _to_float(pixels) if out is None else area_resize(pixels, out)
    del pixels  # closes the memory map
    return images, np.array(cats, dtype=np.int64), list(SMALLNORB_CLASSES)


def read_smallnorb_info(folder: PathLike, split: str) -> np.ndarray:
    """``<prefix>-info.mat``: int64 (N, 4) = instance, elevation, azimuth, lighting."""
    _check_split(split)
    path = _norb_file(_need_folder(folder, "smallNORB folder"), split, "info")
    info = read_norb_matrix(path, NORB_INT32_MAGIC)
    if info.ndim != 2 or info.shape[1] != len(SMALLNORB_INFO):
        raise _fail(path, f"holds a {info.shape} matrix, expected (N, 4)")
    return np.array(info, dtype=np.int64)


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in): output pixel i averages input span [i, i + 1) * n_in / n_out."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    pix = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, pix + 1) - np.maximum(lo, pix), 0, None)
    return (overlap / (n_in / n_out)).astype(np.float32)


def area_resize(images: np.ndarray, size: Size, chunk: int = 1024) -> np.ndarray:
    """(N, C, H, W) uint8 (0..255) or float (0..1) -> float32 (N, C, h, w) in [0, 1] by
    area averaging (exact 2x2 means for 96 -> 48), in chunks to bound memory."""
    h, w = _pair(size, "size")  # type: ignore[misc]
    n, c, hin, win = images.shape
    check_fits_in_memory(n, (c, h, w), "resized images", "use a smaller --image-size")
    rows, cols = _area_weights(hin, h), _area_weights(win, w).T
    scale = np.float32(1 / 255.0 if images.dtype == np.uint8 else 1.0)
    out = np.empty((n, c, h, w), dtype=np.float32)
    whole = hin % h == 0 and win % w == 0  # e.g. 96 -> 48: plain block means, cheaper
    for lo in range(0, n, chunk):
        part = images[lo:lo + chunk].astype(np.float32)
        if whole:
            fy, fx = hin // h, win // w
            acc = out[lo:lo + chunk]
            acc[...] = part[:, :, 0::fy, 0::fx]
            for i in range(fy):  # strided sums beat a 6-D mean by ~6x
                for j in range(fx):
                    if i or j:
                        acc += part[:, :, i::fy, j::fx]
            acc *= scale / np.float32(fy * fx)
        else:
            out[lo:lo + chunk] = np.matmul(rows, np.matmul(part * scale, cols))
    np.clip(out, 0.0, 1.0, out=out)
    return out


def center_crop(images: np.ndarray, size: Size) -> np.ndarray:
    """(N, C, H, W) -> the central (N, C, h, w), as torchvision's CenterCrop."""
    h, w = _pair(size, "crop")  # type: ignore[misc]
    hin, win = images.shape[-2:]
    if h > hin or w > win:
        raise DataArgumentError(f"crop {h}x{w} is larger than the images ({hin}x{win})")
    top, left = int(round((hin - h) / 2.0)), int(round((win - w) / 2.0))
    return np.ascontiguousarray(images[..., top:top + h, left:left + w])


def random_crop(images: np.ndarray, size: Size,
                rng: Union[np.random.Generator, int, None] = None) -> np.ndarray:
    """(N, C, H, W) -> (N, C, h, w), each image cropped at its own uniform position."""
    h, w = _pair(size, "crop")  # type: ignore[misc]
    n, _, hin, win = images.shape
    if h > hin or w > win:
        raise DataArgumentError(f"crop {h}x{w} is larger than the images ({hin}x{win})")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    top = rng.integers(0, hin - h + 1, size=n)
    left = rng.integers(0, win - w + 1, size=n)
    rows = top[:, None] + np.arange(h)
    cols = left[:, None] + np.arange(w)
    gathered = images[np.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return np.ascontiguousarray(gathered.transpose(0, 3, 1, 2))  # (N, h, w, C) -> NCHW


# --------------------------------------------------------------------- image folders

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif",
                    ".tiff", ".webp")
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# Grey modes read as numbers, not through convert("L") (which truncates them to 8 bits):
# (divisor, largest pixel read): 16-bit grey (Pillow opens some 16-bit PNGs as "I") by
# 65535, refusing 32-bit integers beyond 16 bits (their scale is unknown); float ("F")
# pixels as they are, within [0, 1] (convert("L") would make 0.7 black).
_WIDE_MODES = {**dict.fromkeys(("I", "I;16", "I;16B", "I;16L", "I;16N"), (65535.0, 65535.0)),
               "F": (1.0, 1.0)}


def _pil() -> Any:
    try:
        from PIL import Image  # lazy: installed with torchvision
    except ImportError:
        raise DataError("reading image files needs Pillow (pip install pillow)") from None
    return Image


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _image_files(folder: Path) -> List[Path]:
    """Image files under ``folder`` (recursively, hidden ones skipped), sorted. Only
    regular files count (opening a pipe named x.png would wait forever). Linked folders
    are followed, each real folder once, and never a folder that holds ``folder``: a link
    back up the tree would be walked again and again (a loop), and count the other
    classes' images under this one. The walk keeps its own stack: os.walk recurses, and
    a tree a thousand folders deep would exhaust Python's."""
    found = []
    seen = {(s.st_dev, s.st_ino) for s in map(os.stat, Path(folder).resolve().parents)}
    stack = [Path(folder)]
    while stack:
        where = stack.pop()
        try:
            here = os.stat(where)
            if (here.st_dev, here.st_ino) in seen:
                continue
            seen.add((here.st_dev, here.st_ino))
            with os.scandir(where) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir():  # follows links, as is_file below
                        stack.append(Path(entry.path))
                    elif _is_image(Path(entry.name)):
                        if not entry.is_file():
                            raise _fail(entry.path, "not a regular file (a pipe, device, "
                                                    "socket or broken link)")
                        found.append(Path(entry.path))
        except OSError as exc:
            raise _fail(where, f"cannot read the folder: {exc.strerror or exc}") from None
    return sorted(found)


def _class_folders(split_dir: Path) -> List[str]:
    names = sorted(d.name for d in split_dir.iterdir()
                   if d.is_dir() and not d.name.startswith("."))
    for name in names:  # the names go into checkpoints, which must read them back
        problem = class_name_problem(name)
        if problem:
            raise _fail(split_dir, f"class folder {show(name)} {problem}; rename it")
    return names


class _Header:
    """What an image's header says, without decoding its pixels."""

    def __init__(self, path: Path):
        Image = _pil()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    self.size = (im.height, im.width)
                    self.colour = _has_colour(im)
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds on a bad file
            raise _fail(path, f"unreadable image: {type(exc).__name__}: {exc}") from None


def _has_colour(im: Any) -> bool:
    if im.mode in ("P", "PA"):
        palette = im.getpalette() or []
        rgb = np.asarray(palette[:768], dtype=np.int32).reshape(-1, 3)
        return bool((rgb != rgb[:, :1]).any())
    return im.mode not in _GREY_MODES


def _load_image(path: Path, channels: int, size: Optional[Tuple[int, int]]) -> np.ndarray:
    """One image file -> float32 (channels, H, W) in [0, 1], resized to ``size``."""
    Image = _pil()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.mode in _WIDE_MODES:
                    img = Image.fromarray(_wide_grey(im, path), mode="F")
                    if size is not None:
                        img = img.resize((size[1], size[0]), Image.BILINEAR)
                    arr = np.clip(np.asarray(img, dtype=np.float32), 0, 1)[None]
                    return np.repeat(arr, channels, axis=0)
                img = im.convert("RGB" if channels == 3 else "L")
                if size is not None:
                    img = img.resize((size[1], size[0]), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt, too large...
        raise _fail(path, f"unreadable image: {type(exc).__name__}: {exc}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _wide_grey(im: Any, path: Path) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grey image -> float32 (H, W) in [0, 1], or one
    line for pixels outside the range its mode can be read with (_WIDE_MODES)."""
    divisor, largest = _WIDE_MODES[im.mode]
    pixels = np.asarray(im, dtype=np.float64)
    if not np.isfinite(pixels).all():
        raise _fail(path, "image has NaN or infinite pixels")
    low, high = float(pixels.min(initial=0.0)), float(pixels.max(initial=0.0))
    if low < 0 or high > largest:
        hint = " (convert it to 8 or 16 bits)" if im.mode == "I" else ""
        raise _fail(path, f"{im.mode} image has pixels from {low:g} to {high:g}; capsflow "
                          f"reads this mode within 0..{largest:g}{hint}")
    return (pixels / divisor).astype(np.float32)


def _load_images(files: List[Path], size: Optional[Size], crop: Optional[Size],
                 channels: Optional[int]) -> np.ndarray:
    """Image files -> float32 (N, C, H, W): headers first (sizes, colour), then pixels."""
    out_size, crop_size = _pair(size, "size"), _pair(crop, "crop")
    if channels not in (None, 1, 3):
        raise DataArgumentError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    headers = [_Header(p) for p in files]
    if channels is None:
        channels = 3 if any(h.colour for h in headers) else 1
    if out_size is None:
        first = headers[0].size
        for path, head in zip(files, headers):
            if head.size != first:
                raise _fail(path, f"is {head.size[0]}x{head.size[1]} (HxW) but {files[0]} is "
                                  f"{first[0]}x{first[1]}; pass a size (e.g. size={first[0]}) "
                                  f"to resize every image")
        out_size = first
    if crop_size is not None and (crop_size[0] > out_size[0] or crop_size[1] > out_size[1]):
        raise DataArgumentError(f"crop {crop_size[0]}x{crop_size[1]} is larger than the "
                                f"images ({out_size[0]}x{out_size[1]}, e.g. {files[0]})")
    final = crop_size or out_size
    check_fits_in_memory(len(files), (channels, *final), f"{files[0].parent.parent}",
                         "use a smaller --image-size or --crop")
    if crop_size is not None:  # each image is resized whole before its crop: its pixels
        check_fits_in_memory(1, (channels, *out_size), f"{files[0]}",  # and float32 copy
                             "use a smaller --image-size", copies=2)
    images = np.empty((len(files), channels, final[0], final[1]), dtype=np.float32)
    resize = out_size if size is not None else None
    for i, path in enumerate(files):
        arr = _load_image(path, channels, resize)
        images[i] = arr if crop_size is None else center_crop(arr[None], crop_size)[0]
    return images


def read_image_folder(root: PathLike, split: str, size: Optional[Size] = None,
                      crop: Optional[Size] = None, channels: Optional[int] = None) -> Arrays:
    """torchvision's ImageFolder layout: ``ROOT/<split>/<CLASS>/**/*.png|jpg|jpeg|bmp|...``.

    Classes are the sub-folders of ``ROOT/train``, sorted by name; ``ROOT/test`` (when it
    exists, and always when reading it) must have exactly the same ones.

    Args:
        size: resize every image to size x size (an int) or (h, w), bilinear with
            antialiasing; the aspect ratio is not kept. Without it all images must share
            one size.
        crop: then centre-crop to crop x crop or (h, w).
        channels: 1 (grey, ITU-R 601 luma) or 3 (RGB; alpha dropped, grey replicated);
            default 3 when any image is colour, else 1. 16-bit grey is scaled by 65535.
    Checks: the folders exist, no class folder without images, equal class sets in train
    and test, every file decodes (truncated/corrupt files, decompression bombs refused),
    one image size without ``size``, a crop no larger than the images.
    Returns:
        images float32 (N, C, H, W), labels int64 (N,), class names (the folder names).
    """
    _check_split(split)
    base = _need_folder(root, "image-folder root holding train/ and test/")
    split_dir = base / split
    train_dir, test_dir = base / "train", base / "test"
    if not train_dir.is_dir():
        raise DataNotFoundError(f"{train_dir}: no such folder (the class folders of the "
                                f"training split; layout ROOT/train/CLASS/image.png)")
    if not split_dir.is_dir():
        raise DataNotFoundError(f"{split_dir}: no such folder (layout ROOT/{split}/CLASS/...)")
    classes = _class_folders(train_dir)
    if not classes:
        raise _fail(train_dir, "has no class folders (layout ROOT/train/CLASS/image.png)")
    if test_dir.is_dir():
        test_classes = _class_folders(test_dir)
        missing = [c for c in classes if c not in test_classes]
        extra = [c for c in test_classes if c not in classes]
        if missing:
            raise _fail(test_dir, f"lacks class folder(s) {', '.join(missing)} that "
                                  f"{train_dir} has; every class needs test images")
        if extra:
            raise _fail(test_dir, f"has class folder(s) {', '.join(extra)} that {train_dir} "
                                  f"lacks; the training split defines the classes")
    files: List[Path] = []
    labels: List[int] = []
    for index, name in enumerate(classes):
        found = _image_files(split_dir / name)
        if not found:
            raise _fail(split_dir / name, f"holds no image files "
                                          f"({', '.join(IMAGE_EXTENSIONS)})")
        files.extend(found)
        labels.extend([index] * len(found))
    images = _load_images(files, size, crop, channels)
    return images, np.asarray(labels, dtype=np.int64), classes


def read_images(paths: Union[PathLike, Iterable[PathLike]], size: Optional[Size] = None,
                channels: Optional[int] = None,
                crop: Optional[Size] = None) -> Tuple[np.ndarray, List[Path]]:
    """Loose image files for prediction: a folder (its image files, recursively, sorted
    by path) or a list of files, preprocessed as :func:`read_image_folder` does.

    Returns:
        images float32 (N, C, H, W) in [0, 1], and the files in the same order.
    """
    if isinstance(paths, (str, Path)):
        path = Path(paths).expanduser()
        if path.is_dir():
            files = _image_files(path)
            if not files:
                raise _fail(path, f"holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        else:
            files = [path]
    else:
        files = [Path(p).expanduser() for p in paths]
        if not files:
            raise DataArgumentError("no image files given")
    for f in files:
        if not f.is_file():
            raise DataNotFoundError(f"{f}: no such image file")
    return _load_images(files, size, crop, channels), files
