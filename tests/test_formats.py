"""runners/formats.py: every reader on small fixtures written here in the real on-disk
format, every corrupt case a one-line DataError naming the file, and the IDX reader on
the real MNIST files when present."""
from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import re
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from capsflow.runners import formats
from capsflow.runners.data import DataArgumentError, DataError, DataNotFoundError
from capsflow.runners.formats import (
    center_crop, random_crop, read_cifar10, read_idx_pair, read_image_folder, read_images,
    read_affnist, read_smallnorb, read_smallnorb_info, read_svhn)

from conftest import SHARED_DATA


def _error(exc_info, path) -> str:
    """The message: one line that names the file."""
    message = str(exc_info.value)
    assert "\n" not in message
    assert Path(path).name in message, message
    return message


# ------------------------------------------------------------------------------ IDX


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX: magic (0, 0, 0x08 = uint8, ndim), big-endian uint32 dims, then the bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write(path: Path, payload: bytes, compress: bool = False) -> Path:
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


@pytest.fixture
def idx_pair(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 4), dtype=np.uint8)  # non-square: catches H/W mix-ups
    images[0] = 255
    labels = np.array([0, 1, 2, 3, 4, 5, 9], dtype=np.uint8)
    return tmp_path, images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(idx_pair, compress):
    folder, images, labels = idx_pair
    ip = _write(folder / "imgs-idx3-ubyte", _idx_bytes(images), compress)
    lp = _write(folder / "lbls-idx1-ubyte", _idx_bytes(labels), compress)
    x, y, names = read_idx_pair(ip, lp)
    assert x.shape == (7, 1, 5, 4) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_array_equal(x[:, 0], images / np.float32(255))
    assert x[0].min() == 1.0
    assert y.dtype == np.int64 and y.tolist() == labels.tolist()
    assert names == [str(i) for i in range(10)]


def test_idx_transpose_and_class_names(idx_pair):
    folder, images, labels = idx_pair
    ip = _write(folder / "i", _idx_bytes(images))
    lp = _write(folder / "l", _idx_bytes(labels))
    x, _, names = read_idx_pair(ip, lp, transpose=True, class_names=formats.KMNIST_CLASSES)
    assert x.shape == (7, 1, 4, 5) and x.flags.c_contiguous
    np.testing.assert_array_equal(x[:, 0], images.transpose(0, 2, 1) / np.float32(255))
    assert names == formats.KMNIST_CLASSES
    with pytest.raises(DataError, match="label 9 is outside 0..4") as err:
        read_idx_pair(ip, lp, class_names=["a", "b", "c", "d", "e"])
    _error(err, lp)


def test_emnist_class_lists():
    assert len(formats.EMNIST_CLASSES["byclass"]) == 62
    assert len(formats.EMNIST_CLASSES["balanced"]) == 47
    assert formats.EMNIST_CLASSES["letters"][1] == "a"


@pytest.mark.parametrize("compress", [False, True])
def test_idx_corrupt_files(idx_pair, compress):
    folder, images, labels = idx_pair
    good_images = _idx_bytes(images)
    good_labels = _idx_bytes(labels)
    lp = _write(folder / "labels", good_labels, compress)
    cases = {
        "magic number 0x00000801 is not 0x00000803": good_labels,  # labels file as images
        "truncated": good_images[:-5],
        "than its header declares": good_images + b"\0" * 3,
        "truncated: the IDX header": good_images[:9],
        "empty array": struct.pack(">IIII", 0x803, 0, 5, 4),
    }
    for expected, payload in cases.items():
        ip = _write(folder / "images", payload, compress)
        with pytest.raises(DataError, match=re.escape(expected)) as err:
            read_idx_pair(ip, lp)
        _error(err, ip)
        ip.unlink()
    ip = _write(folder / "images", good_images, compress)
    short = _write(folder / "short", _idx_bytes(labels[:3]), compress)
    with pytest.raises(DataError, match="holds 3 labels but .* holds 7 images") as err:
        read_idx_pair(ip, short)
    _error(err, short)


def test_idx_corrupt_gzip(idx_pair):
    folder, images, labels = idx_pair
    lp = _write(folder / "labels", _idx_bytes(labels))
    whole = gzip.compress(_idx_bytes(images))
    for name, payload in {"cut.gz": whole[: len(whole) // 2],
                          "garbage.gz": whole[:10] + b"\xff" * 40}.items():
        path = folder / name
        path.write_bytes(payload)
        with pytest.raises(DataError, match="corrupt or truncated gzip stream") as err:
            read_idx_pair(path, lp)
        _error(err, path)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_huge_header_allocates_nothing(tmp_path, compress):
    """A header claiming 4G x 4G x 4G bytes: refused from the file's length (raw) or
    from the memory this machine has, or has free (gzip), never allocated."""
    lp = _write(tmp_path / "labels", _idx_bytes(np.zeros(3, np.uint8)))
    ip = _write(tmp_path / "images",
                struct.pack(">IIII", 0x803, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF) + b"\0" * 64,
                compress)
    start = time.perf_counter()
    memory = r"more than (this machine's|the [\d.,]+ \w+ of memory free now)"
    peak = _refused_idx_peak(ip, lp, memory if compress else "truncated")
    assert peak < 16 << 20, f"peak {peak:,} bytes"
    assert time.perf_counter() - start < 2


def _refused_idx_peak(images: Path, labels: Path, match: str) -> int:
    """The traced peak of read_idx_pair refusing ``images`` with one line matching ``match``."""
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=match) as err:
            read_idx_pair(images, labels)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _error(err, images)
    return peak


def test_a_gzip_bomb_is_refused_before_it_inflates(tmp_path, monkeypatch):
    """32 MiB of zeros is a gzip stream of 32 KiB whose header may declare all of it; on
    a pretend 16 MiB machine (the pixels and their float32 copy would take 160 MiB) it is
    one line before a byte is inflated."""
    lp = _write(tmp_path / "labels", _idx_bytes(np.zeros(32, np.uint8)))
    ip = _write(tmp_path / "images", _idx_bytes(np.zeros((32, 1024, 1024), np.uint8)), True)
    assert ip.stat().st_size < 2**20
    monkeypatch.setattr("capsflow.core.memory.physical_memory", lambda: 2**24)
    peak = _refused_idx_peak(ip, lp, r"the header declares 32 x 1024 x 1024 bytes \(32\.0 "
                                     r"MiB decompressed, 128\.0 MiB more as float32\), more "
                                     r"than this machine's 16\.0 MiB")
    assert peak < 8 << 20, f"peak {peak:,} bytes"


def test_a_sparse_raw_idx_file_is_refused_before_its_float32_copy(tmp_path, monkeypatch):
    """A raw file is mapped, not read, but its float32 copy is made whole: a sparse file
    declaring 32 MiB of pixels on a pretend 16 MiB machine is one line (the gzip form of
    the check, above), not a 128 MiB allocation."""
    lp = _write(tmp_path / "labels", _idx_bytes(np.zeros(32, np.uint8)))
    ip = tmp_path / "images"
    ip.write_bytes(struct.pack(">IIII", 0x803, 32, 1024, 1024))
    os.truncate(ip, 16 + 32 * 1024 * 1024)
    monkeypatch.setattr("capsflow.core.memory.physical_memory", lambda: 2**24)
    peak = _refused_idx_peak(ip, lp, r"the header declares 32 x 1024 x 1024 bytes \(128\.0 "
                                     r"MiB as float32\), more than this machine's 16\.0 MiB")
    assert peak < 8 << 20, f"peak {peak:,} bytes"


def test_missing_idx_file(tmp_path):
    with pytest.raises(DataError, match="cannot open") as err:
        read_idx_pair(tmp_path / "nope", tmp_path / "nope2")
    _error(err, "nope")


MNIST = SHARED_DATA / "mnist"
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="real MNIST not in ../shared/data/mnist")
@pytest.mark.parametrize("split,prefix,counts", [("train", "train", TRAIN_COUNTS),
                                                 ("test", "t10k", TEST_COUNTS)])
def test_real_mnist(split, prefix, counts):
    x, y, names = read_idx_pair(MNIST / f"{prefix}-images-idx3-ubyte.gz",
                                MNIST / f"{prefix}-labels-idx1-ubyte.gz",
                                class_names=formats.MNIST_CLASSES)
    assert x.shape == (sum(counts), 1, 28, 28) and x.dtype == np.float32
    assert np.bincount(y).tolist() == counts
    assert names == formats.MNIST_CLASSES
    if split == "train":
        assert abs(float(x.mean()) - 0.1307) < 1e-3


# ------------------------------------------------------------------------- CIFAR-10


def _py2(obj) -> bytes:
    """The opcodes Python 2's cPickle (protocol 2) wrote CIFAR's batches with: str as
    BINSTRING, numpy arrays via numpy.core.multiarray._reconstruct + BUILD with raw data."""
    def text(value):
        raw = value.encode("latin1") if isinstance(value, str) else value
        return (b"U" + bytes([len(raw)]) + raw) if len(raw) < 256 else (
            b"T" + struct.pack("<i", len(raw)) + raw)

    def integer(v):
        return b"K" + bytes([v]) if 0 <= v < 256 else (
            b"M" + struct.pack("<H", v) if 0 <= v < 65536 else b"J" + struct.pack("<i", v))

    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2(k) + _py2(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, list):
        return b"](" + b"".join(_py2(v) for v in obj) + b"e"
    if isinstance(obj, (str, bytes)):
        return text(obj)
    if isinstance(obj, int):
        return integer(obj)
    assert isinstance(obj, np.ndarray) and obj.dtype == np.uint8
    dtype = (b"cnumpy\ndtype\n" + text("u1") + integer(0) + integer(1) + b"\x87R("
             + integer(3) + text("|") + b"NNN" + b"J\xff\xff\xff\xff" * 2 + integer(0) + b"tb")
    shape = b"(" + b"".join(integer(d) for d in obj.shape) + b"t"
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85"
            + text("b") + b"\x87R(" + integer(1) + shape + dtype + b"\x89" + text(obj.tobytes())
            + b"tb")


def _dumps(obj, protocol) -> bytes:
    return b"\x80\x02" + _py2(obj) + b"." if protocol == "py2" else pickle.dumps(obj, protocol)


def _cifar_fixture(root: Path, protocol="py2", per_batch: int = 3, bytes_keys=False) -> dict:
    """cifar-10-batches-py/ with five train batches, a test batch and batches.meta, each a
    pickled dict as in the real files (uint8 data (N, 3072) R, G, B planes, labels list)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    written = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [(i + k) % 10 for k in range(per_batch)]
        entry = {key("batch_label"): f"batch {i}", key("labels"): labels, key("data"): data,
                 key("filenames"): [f"img_{i}_{k}.png" for k in range(per_batch)]}
        (folder / name).write_bytes(_dumps(entry, protocol))
        written[name] = (data, labels)
    meta = {key("label_names"): list(formats.CIFAR10_CLASSES), key("num_vis"): 3072,
            key("num_cases_per_batch"): per_batch}
    (folder / "batches.meta").write_bytes(_dumps(meta, protocol))
    return written


@pytest.mark.parametrize("protocol,bytes_keys", [("py2", False), (2, False), (2, True),
                                                 (pickle.HIGHEST_PROTOCOL, False)])
def test_cifar10_round_trip(tmp_path, protocol, bytes_keys):
    written = _cifar_fixture(tmp_path, protocol, bytes_keys=bytes_keys)
    x, y, names = read_cifar10(tmp_path, "train", verify=False)
    assert x.shape == (15, 3, 32, 32) and x.dtype == np.float32 and x.flags.c_contiguous
    data, labels = written["data_batch_2"]
    # Row layout: 1024 red, 1024 green, 1024 blue values, each plane row-major.
    np.testing.assert_array_equal(x[3:6], data.reshape(3, 3, 32, 32) / np.float32(255))
    assert y[3:6].tolist() == labels and y.dtype == np.int64
    assert names == formats.CIFAR10_CLASSES
    xt, yt, _ = read_cifar10(tmp_path / "cifar-10-batches-py", "test", verify=False)
    assert xt.shape == (3, 3, 32, 32) and yt.tolist() == written["test_batch"][1]


def test_cifar10_checksum(tmp_path):
    _cifar_fixture(tmp_path)
    with pytest.raises(DataError, match="md5 [0-9a-f]{32} does not match the published "
                                        "5ff9c542aee3614f3951f8cda6e48888") as err:
        read_cifar10(tmp_path, "test")  # verify=True by default
    _error(err, "batches.meta")


def test_cifar10_md5s_match_torchvision():
    spec = importlib.util.find_spec("torchvision")  # finds, does not import (no torch)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchvision not installed")
    source = (Path(list(spec.submodule_search_locations)[0]) / "datasets" / "cifar.py").read_text()
    published = dict(re.findall(r'"(data_batch_\d|test_batch)", "([0-9a-f]{32})"', source))
    published["batches.meta"] = re.search(r'"md5": "([0-9a-f]{32})"', source).group(1)
    assert published == formats.CIFAR10_MD5
    svhn = (Path(list(spec.submodule_search_locations)[0]) / "datasets" / "svhn.py").read_text()
    for name, md5 in formats.SVHN_FILES.values():
        assert re.search(rf'"{re.escape(name)}",\s*"{md5}"', svhn), name


def test_cifar10_refuses_code_in_pickles(tmp_path):
    _cifar_fixture(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({"data": Evil(), "labels": []}, protocol=2))
    with pytest.raises(DataError, match="refused to load global (posix|os|nt).system") as err:
        read_cifar10(tmp_path, "test", verify=False)
    _error(err, "test_batch")
    assert not marker.exists()


def test_cifar10_refuses_arrays_larger_than_the_file(tmp_path):
    """numpy.ndarray(shape, uint8, b"\\0", 0, strides 0): a pickle of 200 bytes that
    unpickles to any number of images (the reader copied them all to float32)."""
    _cifar_fixture(tmp_path)

    class Zeros:
        def __init__(self, shape):
            self.shape = shape

        def __reduce__(self):
            return (np.ndarray, (self.shape, np.dtype("u1"), b"\0", 0, (0,) * len(self.shape)))

    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps({"data": Zeros((50_000, 3072)), "labels": [0] * 3},
                                   protocol=2))
    with pytest.raises(DataError, match="'data' claims 153,600,000 bytes, more than the "
                                        "file holds") as err:
        read_cifar10(tmp_path, "test", verify=False)
    _error(err, "test_batch")


def test_cifar10_bad_batches(tmp_path):
    written = _cifar_fixture(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    data, labels = written["test_batch"]
    whole = "'labels' must be the whole numbers 0..9"
    cases = [
        ("not a readable CIFAR-10 pickle", b"\x80\x02garbage"),
        ("holds a list", pickle.dumps([1, 2])),
        ("lacks the 'data' array", pickle.dumps({"labels": labels})),
        (r"'data' is uint8 \(3, 100\)", pickle.dumps({"data": data[:, :100], "labels": labels})),
        ("holds 3 images but 2 labels", pickle.dumps({"data": data, "labels": labels[:2]})),
        (whole, pickle.dumps({"data": data, "labels": [0, 1, 12]})),
        (whole, pickle.dumps({"data": data, "labels": [0, 3.5, 1]})),  # was read as 3
        (whole, pickle.dumps({"data": data, "labels": [0, "1", 1]})),
        ("not a readable CIFAR-10 pickle: .*truncated|not a readable", pickle.dumps(
            {"data": data, "labels": labels})[:-40]),
    ]
    for expected, payload in cases:
        path.write_bytes(payload)
        with pytest.raises(DataError, match=expected) as err:
            read_cifar10(tmp_path, "test", verify=False)
        _error(err, path)
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(pickle.dumps({"label_names": ["a", "b"]}))
    with pytest.raises(DataError, match="not a list of 10 names") as err:
        read_cifar10(tmp_path, "test", verify=False)
    _error(err, meta)


def test_cifar10_missing_files_and_download(tmp_path, monkeypatch):
    _cifar_fixture(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError, match="missing CIFAR-10 file.*data_batch_3"):
        read_cifar10(tmp_path, "train", verify=False)
    with pytest.raises(DataArgumentError, match="unknown split"):
        read_cifar10(tmp_path, "valid", verify=False)
    calls = []

    def fake_download(cls_name, root, **kwargs):  # what torchvision would unpack
        calls.append((cls_name, root, kwargs))
        _cifar_fixture(tmp_path / "fresh")

    monkeypatch.setattr(formats, "_torchvision_download", fake_download)
    x, _, _ = read_cifar10(tmp_path / "fresh", "train", verify=False, download=True)
    assert x.shape[0] == 15 and calls == [("CIFAR10", tmp_path / "fresh", {"train": True})]


# ----------------------------------------------------------------------------- SVHN


@pytest.fixture
def svhn(tmp_path):
    sio = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [2], [9], [10]], dtype=np.uint8)
    sio.savemat(tmp_path / "train_32x32.mat", {"X": x, "y": y})
    return tmp_path, x, y, sio


def test_svhn_round_trip(svhn):
    folder, x, y, _ = svhn
    images, labels, names = read_svhn(folder, "train", verify=False)
    assert images.shape == (5, 3, 32, 32) and images.dtype == np.float32
    assert images.flags.c_contiguous
    assert labels.tolist() == [0, 1, 2, 9, 0] and labels.dtype == np.int64
    # X is (row, col, channel, N): image 3, channel 1, row 4, col 7.
    assert images[3, 1, 4, 7] == np.float32(x[4, 7, 1, 3] / np.float32(255))
    assert names == [str(d) for d in range(10)]


def test_svhn_checksum_and_missing(svhn):
    folder = svhn[0]
    with pytest.raises(DataError, match="does not match the published "
                                        "e26dedcc434d2e4c54c9b2d4a06d8373") as err:
        read_svhn(folder, "train")
    _error(err, "train_32x32.mat")
    with pytest.raises(DataNotFoundError) as err:
        read_svhn(folder, "test", verify=False)
    _error(err, "test_32x32.mat")


def broken_mat_files(path: Path, dataset: str) -> list:
    """(message, write) for a .mat file that is no MATLAB 5.0 file, an HDF5 one, or cut."""
    good = path.read_bytes()
    return [
        ("not a MATLAB 5.0 MAT-file", lambda: path.write_bytes(b"hello" * 40)),
        (rf"is a MATLAB v7.3 \(HDF5\) file; {dataset}'s files",
         lambda: path.write_bytes(b"MATLAB 7.3 MAT-file" + b" " * 200)),
        ("unreadable MATLAB file", lambda: path.write_bytes(good[: len(good) // 2])),
    ]


def test_svhn_bad_files(svhn):
    folder, x, y, sio = svhn
    path = folder / "train_32x32.mat"
    cases = broken_mat_files(path, "SVHN") + [
        ("lacks the variable 'X' or 'y'", lambda: sio.savemat(path, {"X": x})),
        (r"'X' is uint8 \(32, 32, 1, 5\)", lambda: sio.savemat(path, {"X": x[:, :, :1], "y": y})),
        ("holds 5 images but 4 labels", lambda: sio.savemat(path, {"X": x, "y": y[:4]})),
        ("must be the whole numbers 1..10", lambda: sio.savemat(path, {"X": x, "y": y * 0})),
        # found by a review: NaN and 3.5 were read as the digits 2 and 3, with a warning
        ("must be the whole numbers 1..10", lambda: sio.savemat(
            path, {"X": x, "y": np.where(np.arange(5) < 2, np.nan, 3.5)[:, None]})),
    ]
    for expected, write in cases:
        write()
        with pytest.raises(DataError, match=expected) as err:
            read_svhn(folder, "train", verify=False)
        _error(err, path)


@pytest.mark.parametrize("compressed", [True, False])
def test_a_mat_file_that_unpacks_beyond_memory_is_refused_unread(svhn, monkeypatch,
                                                                 compressed):
    """64 MiB of zeros, compressed, is a .mat file of about 64 KiB; on a pretend 32 MiB
    machine (room for 6.4 MiB of pixels beside their float32 copy) it is one line,
    counted by inflating in chunks before scipy unpacks anything (an uncompressed one is
    counted from its tags). The small file still loads."""
    folder, x, y, sio = svhn
    path = folder / "train_32x32.mat"
    big = np.zeros((32, 32, 3, 21846), np.uint8)  # 64 MiB
    sio.savemat(path, {"X": big, "y": np.ones((21846, 1), np.uint8)},
                do_compression=compressed)
    assert (path.stat().st_size < 2**20) == compressed
    monkeypatch.setattr("capsflow.core.memory.physical_memory", lambda: 2**25)
    loaded = []
    monkeypatch.setattr(sio, "loadmat", lambda *a, **k: loaded.append(a))
    with pytest.raises(DataError, match=r"its variables unpack to more than 6\.4 MiB, a "
                                        r"fifth of this machine's 32\.0 MiB of memory") as err:
        read_svhn(folder, "train", verify=False)
    _error(err, path)
    assert loaded == []
    monkeypatch.undo()
    monkeypatch.setattr("capsflow.core.memory.physical_memory", lambda: 2**25)
    sio.savemat(path, {"X": x, "y": y}, do_compression=compressed)
    assert read_svhn(folder, "train", verify=False)[0].shape == (5, 3, 32, 32)


def test_a_small_compressed_variable_is_bounded_then_counted(svhn, monkeypatch):
    """A small compressed variable is bounded by deflate's largest ratio instead of
    inflated; where that bound alone would refuse the file, every variable is counted
    exactly, and a file whose exact size fits loads."""
    from capsflow.runners.formats import _mat_unpacked_bytes
    folder, _, _, sio = svhn
    path = folder / "train_32x32.mat"
    n = 2000  # random pixels: the images do not compress, the labels do
    x = np.random.default_rng(0).integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    sio.savemat(path, {"y": np.ones((n, 1), np.uint8), "X": x}, do_compression=True)
    exact, bounded = _mat_unpacked_bytes(path, 2**40, bound_small=False)
    assert not bounded and x.nbytes < exact < x.nbytes + 8192
    budget = exact + 8192  # the labels' bound (1032 x their deflated bytes) goes over
    total, bounded = _mat_unpacked_bytes(path, budget, bound_small=True)
    assert bounded and total > budget
    monkeypatch.setattr("capsflow.core.memory.physical_memory", lambda: 5 * budget + 4)
    assert read_svhn(folder, "train", verify=False)[0].shape == (n, 3, 32, 32)
    monkeypatch.setattr("capsflow.core.memory.physical_memory", lambda: 5 * (exact - 1))
    with pytest.raises(DataError, match="its variables unpack to more than"):
        read_svhn(folder, "train", verify=False)


def test_svhn_download_goes_through_torchvision(tmp_path, monkeypatch):
    sio = pytest.importorskip("scipy.io")
    calls = []

    def fake_download(cls_name, root, **kwargs):
        calls.append((cls_name, root, kwargs))
        x = np.zeros((32, 32, 3, 2), np.uint8)
        sio.savemat(root / "test_32x32.mat", {"X": x, "y": np.array([[10], [3]])})

    monkeypatch.setattr(formats, "_torchvision_download", fake_download)
    _, labels, _ = read_svhn(tmp_path, "test", verify=False, download=True)
    assert labels.tolist() == [0, 3] and calls == [("SVHN", tmp_path, {"split": "test"})]


# -------------------------------------------------------------------------- affNIST


def write_affnist(path: Path, images: np.ndarray, labels: np.ndarray, sio) -> None:
    """affNIST's layout: one struct affNISTdata, image uint8 (1600, N) (column n is image
    n, pixel row * 40 + column), label_int (1, N), and label_one_of_n as the real files."""
    n = images.shape[0]
    sio.savemat(path, {"affNISTdata": {
        "image": images.reshape(n, 1600).T, "label_int": labels.reshape(1, n),
        "label_one_of_n": np.eye(10, dtype=np.uint8)[labels % 10].T}})


@pytest.fixture
def affnist(tmp_path):
    sio = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, size=(6, 40, 40), dtype=np.uint8)
    y = np.array([7, 0, 3, 9, 1, 7], dtype=np.uint8)
    write_affnist(tmp_path / "test.mat", x, y, sio)
    return tmp_path, x, y, sio


def test_affnist_round_trip(affnist):
    folder, x, y, sio = affnist
    images, labels, names = read_affnist(folder)
    assert images.shape == (6, 1, 40, 40) and images.dtype == np.float32
    assert images.flags.c_contiguous and labels.dtype == np.int64
    assert labels.tolist() == y.tolist() and names == [str(d) for d in range(10)]
    # image 2, row 5, column 31 (not transposed)
    assert images[2, 0, 5, 31] == np.float32(x[2, 5, 31] / np.float32(255))
    np.testing.assert_array_equal(np.rint(images[:, 0] * 255).astype(np.uint8), x)
    sio.savemat(folder / "test.mat", {"affNISTdata": {"image": x.reshape(6, 1600).T,
                                                       "label_int": y.astype(float)}})
    assert read_affnist(folder)[1].tolist() == y.tolist()   # labels stored as doubles
    first, labels, _ = read_affnist(folder, limit=2)
    assert first.shape == (2, 1, 40, 40) and labels.tolist() == [7, 0]
    np.testing.assert_array_equal(first, images[:2])


def test_a_mat_file_that_crashes_scipy_is_one_line(affnist):
    """One byte of a data type set to 0 makes scipy's C reader die of a segmentation
    fault (scipy 1.17): the file is read in a child process first, and that death is one
    line here, not the end of capsflow."""
    folder, x, y, sio = affnist
    path = folder / "test.mat"
    sio.savemat(path, {"affNISTdata": {"image": np.ones((1600, 12), np.uint8),
                                       "label_int": np.zeros((1, 12), np.uint8)}})
    raw = bytearray(path.read_bytes())
    raw[raw.index(bytes([2, 0, 0, 0, 0, 0x4b, 0, 0]))] = 0   # miUINT8 -> 0, the image data
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as err:
        read_affnist(folder)
    message = _error(err, "test.mat")
    assert "damaged MATLAB file: scipy's reader crashed on it (SIG" in message or \
        "unreadable MATLAB file" in message, message


def test_affnist_bad_files(affnist):
    folder, x, y, sio = affnist
    path = folder / "test.mat"
    cases = broken_mat_files(path, "affNIST") + [
        ("lacks the struct 'affNISTdata'", lambda: sio.savemat(path, {"X": x})),
        ("lacks the struct 'affNISTdata'",
         lambda: sio.savemat(path, {"affNISTdata": {"image": x.reshape(6, 1600).T}})),
        (r"'image' is uint8 \(1599, 6\), expected uint8 \(1600, N\)",
         lambda: sio.savemat(path, {"affNISTdata": {"image": x.reshape(6, 1600).T[1:],
                                                     "label_int": y.reshape(1, 6)}})),
        (r"'image' is float64", lambda: sio.savemat(path, {"affNISTdata": {
            "image": x.reshape(6, 1600).T / 255.0, "label_int": y.reshape(1, 6)}})),
        ("holds 6 images but 5 labels", lambda: sio.savemat(
            path, {"affNISTdata": {"image": x.reshape(6, 1600).T, "label_int": y[:5]}})),
        ("must be the whole numbers 0..9", lambda: write_affnist(path, x, y + 10, sio)),
        ("must be the whole numbers 0..9", lambda: sio.savemat(path, {"affNISTdata": {
            "image": x.reshape(6, 1600).T, "label_int": y.reshape(1, 6) + 0.5}})),
        ("must be the whole numbers 0..9", lambda: sio.savemat(path, {"affNISTdata": {
            "image": x.reshape(6, 1600).T, "label_int": np.full((1, 6), np.nan)}})),
        ("holds no images", lambda: sio.savemat(path, {"affNISTdata": {
            "image": np.zeros((1600, 0), np.uint8), "label_int": np.zeros((1, 0))}})),
    ]
    for expected, write in cases:
        write()
        with pytest.raises(DataError, match=expected) as err:
            read_affnist(folder)
        _error(err, path)
    path.unlink()
    with pytest.raises(DataNotFoundError, match="transformed test set") as err:
        read_affnist(folder)
    _error(err, path)


# ------------------------------------------------------------------------ smallNORB

PREFIX = "smallnorb-5x46789x9x18x6x2x96x96-training"


def _norb_bytes(array: np.ndarray, magic: int) -> bytes:
    dims = list(array.shape) + [1] * (3 - array.ndim)  # at least 3 dims are stored
    header = struct.pack("<ii", magic, array.ndim) + struct.pack(f"<{len(dims)}i", *dims)
    dtype = "<i4" if magic == formats.NORB_INT32_MAGIC else "u1"
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


@pytest.fixture
def norb(tmp_path):
    rng = np.random.default_rng(3)
    dat = rng.integers(0, 256, size=(4, 2, 96, 96), dtype=np.uint8)
    cat = np.array([0, 4, 2, 1], dtype=np.int32)
    info = np.array([[4, 0, 0, 0], [6, 8, 34, 5], [7, 3, 10, 2], [9, 1, 2, 1]], dtype=np.int32)
    return tmp_path, dat, cat, info


def _write_norb(folder, dat, cat, info, compress=False):
    for kind, array, magic in (("dat", dat, formats.NORB_UINT8_MAGIC),
                               ("cat", cat, formats.NORB_INT32_MAGIC),
                               ("info", info, formats.NORB_INT32_MAGIC)):
        _write(folder / f"{PREFIX}-{kind}.mat", _norb_bytes(array, magic), compress)


@pytest.mark.parametrize("compress", [False, True])
def test_smallnorb_round_trip(norb, compress):
    folder, dat, cat, info = norb
    _write_norb(folder, dat, cat, info, compress)
    x, y, names = read_smallnorb(folder, "train")
    assert x.shape == (4, 2, 96, 96) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_array_equal(x, dat / np.float32(255))
    assert y.tolist() == [0, 4, 2, 1] and y.dtype == np.int64
    assert names == ["animal", "human", "airplane", "truck", "car"]
    np.testing.assert_array_equal(read_smallnorb_info(folder, "train"), info)
    small, _, _ = read_smallnorb(folder, "train", size=48)
    expected = dat.reshape(4, 2, 48, 2, 48, 2).mean(axis=(3, 5)) / 255
    assert small.shape == (4, 2, 48, 48)
    np.testing.assert_allclose(small, expected, atol=1e-6)
    odd, _, _ = read_smallnorb(folder, "train", size=(32, 40))
    assert odd.shape == (4, 2, 32, 40) and 0 <= odd.min() and odd.max() <= 1
    np.testing.assert_allclose(odd.mean(axis=(2, 3)), x.mean(axis=(2, 3)), atol=1e-5)
    with pytest.raises(DataNotFoundError, match="smallnorb-5x01235x9x18x6x2x96x96-testing-dat"):
        read_smallnorb(folder, "test")


def test_smallnorb_corrupt_files(norb):
    folder, dat, cat, info = norb
    _write_norb(folder, dat, cat, info)
    dat_path = folder / f"{PREFIX}-dat.mat"
    cat_path = folder / f"{PREFIX}-cat.mat"
    good_dat = _norb_bytes(dat, formats.NORB_UINT8_MAGIC)
    huge = struct.pack("<iiiiii", formats.NORB_UINT8_MAGIC, 4, 2 ** 31 - 1, 2, 96, 96)
    cases = [
        (dat_path, "magic number 0x1E3D4C54 is not 0x1E3D4C55",
         _norb_bytes(dat.astype(np.int32), formats.NORB_INT32_MAGIC)),
        (dat_path, "truncated", good_dat[:-100]),
        (dat_path, "bytes more than its header declares", good_dat + b"\0"),
        (dat_path, "truncated", huge + b"\0" * 100),
        (dat_path, "dimensions .* all must be positive",
         struct.pack("<iiiiii", formats.NORB_UINT8_MAGIC, 4, -4, 2, 96, 96)),
        (dat_path, "declares 99 dimensions", struct.pack("<ii", formats.NORB_UINT8_MAGIC, 99)),
        (dat_path, r"expected \(N, 2, 96, 96\)",
         _norb_bytes(dat.reshape(4, 1, 192, 96), formats.NORB_UINT8_MAGIC)),
        (cat_path, r"expected \(4,\)",
         _norb_bytes(cat[:3], formats.NORB_INT32_MAGIC)),
        (cat_path, "categories must lie in 0..4",
         _norb_bytes(cat + 3, formats.NORB_INT32_MAGIC)),
    ]
    for path, expected, payload in cases:
        path.write_bytes(payload)
        tracemalloc.start()
        try:
            with pytest.raises(DataError, match=expected) as err:
                read_smallnorb(folder, "train")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        _error(err, path)
        assert peak < 32 << 20
        _write_norb(folder, dat, cat, info)


def test_a_resize_too_big_for_memory_is_refused_before_its_weights(monkeypatch):
    monkeypatch.setattr("capsflow.core.memory.physical_memory", lambda: 2**30)
    with pytest.raises(DataArgumentError, match="resized images: 1 images of 1x100000x100000 "
                                                "need 37.3 GiB"):
        formats.area_resize(np.zeros((1, 1, 96, 96), np.uint8), 100000)


def test_a_resize_before_a_small_crop_is_checked_against_memory(tmp_path, monkeypatch):
    """A checkpoint's size option (or --image-size) of 20000 with a crop of 28: each image
    is resized whole before its crop, 1.6 GB of float32 the final 28x28 check never saw
    (a crafted checkpoint made predict take 1.6 GB; 65536 would need 25 GB)."""
    from PIL import Image
    path = tmp_path / "one.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(path)
    monkeypatch.setattr("capsflow.core.memory.physical_memory", lambda: 2**30)
    with pytest.raises(DataArgumentError, match=r"one\.png: 1 images of 1x20000x20000 need "
                                                r"3\.0 GiB as float32, more than this machine's "
                                                r"1\.0 GiB of memory; use a smaller --image-size"):
        formats._load_images([path], 20000, 28, 1)
    small = formats._load_images([path], 56, 28, 1)
    assert small.shape == (1, 1, 28, 28)


def test_crops(norb):
    images = np.arange(2 * 2 * 6 * 8, dtype=np.float32).reshape(2, 2, 6, 8)
    c = center_crop(images, 4)
    np.testing.assert_array_equal(c, images[:, :, 1:5, 2:6])
    r1, r2 = random_crop(images, (3, 5), rng=7), random_crop(images, (3, 5), rng=7)
    np.testing.assert_array_equal(r1, r2)
    assert r1.shape == (2, 2, 3, 5) and r1.flags.c_contiguous
    for n in range(2):  # each crop is a window of its own image, both channels alike
        top, left = divmod(int(np.argwhere(images[n, 0] == r1[n, 0, 0, 0])[0] @ [8, 1]), 8)
        np.testing.assert_array_equal(r1[n], images[n, :, top:top + 3, left:left + 5])
    with pytest.raises(DataArgumentError, match="larger than the images"):
        center_crop(images, 9)


# --------------------------------------------------------------------- image folders


def _png(path: Path, array: np.ndarray, mode=None, fmt=None) -> Path:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, format=fmt)
    return path


@pytest.fixture
def folder_tree(tmp_path):
    """ROOT/{train,test}/{cat,dog}/*.png, grey 6x5 images, plus a stray text file."""
    pytest.importorskip("PIL")
    rng = np.random.default_rng(4)
    arrays = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("dog", "cat"):
            for i in range(n):
                a = rng.integers(0, 256, size=(6, 5), dtype=np.uint8)
                arrays[(split, cls, i)] = a
                _png(tmp_path / split / cls / f"{i}.png", a)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    return tmp_path, arrays


def test_image_folder_round_trip(folder_tree):
    root, arrays = folder_tree
    x, y, names = read_image_folder(root, "train")
    assert names == ["cat", "dog"] and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert x.shape == (6, 1, 6, 5) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_array_equal(x[4, 0], arrays[("train", "dog", 1)] / np.float32(255))
    xt, yt, _ = read_image_folder(root, "test", channels=3)
    assert xt.shape == (4, 3, 6, 5) and yt.tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(xt[:, 0], xt[:, 2])
    resized, _, _ = read_image_folder(root, "test", size=(12, 10), crop=8)
    assert resized.shape == (4, 1, 8, 8)


def test_image_folder_walks_each_real_folder_once(folder_tree):
    """Links back up the tree (a review found two of them made the walk grow without end,
    and one counted the other class's images under this one ~40 times) are followed once;
    a linked folder elsewhere is read as the class's own."""
    root, arrays = folder_tree
    cat = root / "train" / "cat"
    (cat / "up").symlink_to("..")
    (cat / "up2").symlink_to("..")
    (cat / "self").symlink_to(".")
    _png(root / "elsewhere" / "extra.png", arrays[("train", "cat", 0)])
    (root / "train" / "dog" / "more").symlink_to(root / "elsewhere")
    x, y, names = read_image_folder(root, "train")
    assert names == ["cat", "dog"] and y.tolist() == [0, 0, 0, 1, 1, 1, 1]
    # cat: its own 3 images (up/, up2/ and self/ hold it); dog: its 3 and extra.png


def test_image_folder_colour_and_sizes(folder_tree):
    root, _ = folder_tree
    colour = np.zeros((9, 7, 3), dtype=np.uint8)
    colour[..., 0] = 200
    _png(root / "train" / "dog" / "red.jpg", colour, fmt="JPEG")
    with pytest.raises(DataError, match="is 9x7 .* is 6x5.*pass a size") as err:
        read_image_folder(root, "train")
    message = _error(err, "red.jpg")
    assert "0.png" in message  # names both files
    x, _, _ = read_image_folder(root, "train", size=16)
    assert x.shape == (7, 3, 16, 16)  # one colour image makes the set RGB
    red = x[6]
    assert red[0].mean() > 0.7 and red[1].mean() < 0.1
    grey, _, _ = read_image_folder(root, "train", size=16, channels=1)
    assert grey.shape == (7, 1, 16, 16)
    assert abs(grey[6].mean() - 0.299 * 200 / 255) < 0.03  # ITU-R 601 luma
    with pytest.raises(DataArgumentError, match="channels must be 1"):
        read_image_folder(root, "train", size=16, channels=2)
    with pytest.raises(DataArgumentError, match="crop 20x20 is larger"):
        read_image_folder(root, "train", size=16, crop=20)


def test_image_folder_16_bit(tmp_path):
    pytest.importorskip("PIL")
    wide = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    _png(tmp_path / "train" / "a" / "x.png", wide)
    x, _, _ = read_image_folder(tmp_path, "train")
    np.testing.assert_allclose(x[0, 0], wide / 65535.0, atol=1e-6)


def test_image_folder_float_and_32_bit_grey(tmp_path):
    """A float TIFF in [0, 1] is read as it is (convert("L") made it black); a 32-bit
    integer image within 16 bits as 16-bit grey; beyond, or a float outside [0, 1], is
    one line."""
    Image = pytest.importorskip("PIL.Image")
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    floats = np.array([[0.0, 0.25], [0.7, 1.0]], dtype=np.float32)
    Image.fromarray(floats, mode="F").save(folder / "f.tif")
    Image.fromarray(np.array([[0, 65535], [1000, 7]], dtype=np.int32), mode="I").save(
        folder / "i.tif")
    x, _, _ = read_image_folder(tmp_path, "train")
    np.testing.assert_allclose(x[0, 0], floats, atol=1e-7)
    np.testing.assert_allclose(x[1, 0], [[0, 1], [1000 / 65535, 7 / 65535]], atol=1e-7)
    Image.fromarray(np.array([[0, 2 ** 20], [0, 0]], dtype=np.int32), mode="I").save(
        folder / "i.tif")
    with pytest.raises(DataError, match=r"i.tif: I image has pixels from 0 to 1.04858e\+06; "
                                        r"capsflow reads this mode within 0..65535 \(convert"):
        read_image_folder(tmp_path, "train")
    (folder / "i.tif").unlink()
    Image.fromarray(floats * 255, mode="F").save(folder / "f.tif")
    with pytest.raises(DataError, match="f.tif: F image has pixels from 0 to 255; capsflow "
                                        r"reads this mode within 0..1$"):
        read_image_folder(tmp_path, "train")


def test_image_folder_class_names_pipes_and_deep_trees(tmp_path):
    """Class names a checkpoint could not read back (a tab, more than 200 characters)
    are refused before training; a pipe named x.png is refused, not opened (it would
    wait forever); a class folder 1,200 folders deep is walked (os.walk's recursion
    ended in a RecursionError)."""
    pytest.importorskip("PIL")
    grey = np.full((4, 4), 128, np.uint8)
    for split in ("train", "test"):
        _png(tmp_path / "ok" / split / "a" / "0.png", grey)
        _png(tmp_path / "ok" / split / "b" / "0.png", grey)
    for bad, said in (("b\tc", r"holds a character that does not print \(a tab, a newline, "
                                r"\.\.\.\)"),
                      ("x" * 220, "is 220 characters long, more than 200")):
        root = tmp_path / f"bad{len(bad)}"
        for split in ("train", "test"):
            _png(root / split / "a" / "0.png", grey)
            _png(root / split / bad / "0.png", grey)
        with pytest.raises(DataError, match=f"class folder .* {said}; rename it") as err:
            read_image_folder(root, "train")
        _error(err, "train")
    os.mkfifo(tmp_path / "ok" / "train" / "b" / "f.png")
    with pytest.raises(DataError, match="f.png: not a regular file") as err:
        read_image_folder(tmp_path / "ok", "train")
    (tmp_path / "ok" / "train" / "b" / "f.png").unlink()
    deep = tmp_path / "ok" / "train" / "b"
    for _ in range(1200):  # one level at a time: mkdir(parents=True) recurses too
        deep = deep / "d"
        deep.mkdir()
    _png(deep / "1.png", grey)
    try:
        x, y, classes = read_image_folder(tmp_path / "ok", "train")
    finally:  # bottom up: shutil.rmtree (pytest's clean-up) recurses as os.walk did
        (deep / "1.png").unlink()
        for _ in range(1200):
            deep.rmdir()
            deep = deep.parent
    assert x.shape == (3, 1, 4, 4) and y.tolist() == [0, 1, 1] and classes == ["a", "b"]


def test_image_folder_layout_errors(folder_tree):
    root, arrays = folder_tree
    with pytest.raises(DataNotFoundError) as err:
        read_image_folder(root / "nowhere", "train")
    _error(err, "nowhere")
    (root / "test" / "cat").rename(root / "test" / "kitten")
    with pytest.raises(DataError, match="lacks class folder.*cat") as err:
        read_image_folder(root, "test")
    _error(err, "test")
    with pytest.raises(DataError, match="lacks class folder.*cat"):
        read_image_folder(root, "train")  # caught whichever split is read
    (root / "test" / "kitten").rename(root / "test" / "cat")
    (root / "test" / "bird").mkdir()
    with pytest.raises(DataError, match="has class folder.*bird"):
        read_image_folder(root, "test")
    (root / "test" / "bird").rmdir()
    (root / "train" / "emu").mkdir()
    (root / "test" / "emu").mkdir()
    _png(root / "test" / "emu" / "0.png", arrays[("test", "cat", 0)])
    with pytest.raises(DataError, match="holds no image files") as err:
        read_image_folder(root, "train")
    _error(err, "emu")


def test_image_folder_without_classes(tmp_path):
    pytest.importorskip("PIL")
    (tmp_path / "train").mkdir()
    _png(tmp_path / "train" / "loose.png", np.zeros((4, 4), np.uint8))  # images straight under train/, no classes
    with pytest.raises(DataError, match="has no class folders") as err:
        read_image_folder(tmp_path, "train")
    _error(err, "train")
    with pytest.raises(DataNotFoundError) as err:
        read_image_folder(tmp_path, "test")
    _error(err, "test")


def test_image_folder_bad_images(folder_tree):
    root, _ = folder_tree
    bad = root / "train" / "dog" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"nonsense" * 10)
    with pytest.raises(DataError, match="unreadable image") as err:
        read_image_folder(root, "train")
    _error(err, bad)
    whole = (root / "train" / "dog" / "0.png").read_bytes()
    bad.write_bytes(whole[: len(whole) - 30])  # truncated pixel data
    with pytest.raises(DataError, match="unreadable image") as err:
        read_image_folder(root, "train")
    _error(err, bad)


def test_read_images_for_prediction(folder_tree):
    root, arrays = folder_tree
    x, files = read_images(root / "test" / "dog")
    assert [f.name for f in files] == ["0.png", "1.png"] and x.shape == (2, 1, 6, 5)
    np.testing.assert_array_equal(x[1, 0], arrays[("test", "dog", 1)] / np.float32(255))
    one = root / "train" / "cat" / "2.png"
    x, files = read_images([one, str(one)], size=(28, 28), channels=3)
    assert x.shape == (2, 3, 28, 28) and files == [one, one]
    x, _ = read_images(one, size=12, crop=10)
    assert x.shape == (1, 1, 10, 10)
    with pytest.raises(DataNotFoundError) as err:
        read_images([root / "missing.png"])
    _error(err, "missing.png")
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files") as err:
        read_images(root / "empty")
    _error(err, "empty")
