"""Parameters on disk: ``.npz`` files keyed by the YAML parameter names.

Every file is written through ``atomic_file``: a temporary file beside the target, named
``.<target>.<pid>.<random>.capsflow-tmp``, flushed to disk and renamed over the target.
A run killed at any moment (SIGKILL during a write included) leaves the previous file
whole; the temporary file it leaves behind is removed by the next run that writes into
the folder (``remove_stale_temporaries``).
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from capsflow.backends import to_numpy
from capsflow.core import memory
from capsflow.errors import CapsflowError


TEMP_SUFFIX = ".capsflow-tmp"
# .<target>.<pid of the writer>.<mkstemp's random part>.capsflow-tmp
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[A-Za-z0-9_]+" + re.escape(TEMP_SUFFIX) + "$")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: the data goes to a temporary file in the
    same folder (a rename within one file system is atomic), which is fsync'ed and then
    renamed over ``path``. An exception removes the temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():  # the rename would fail at the end, naming the temporary file
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
    check_replaceable(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.",
                               suffix=TEMP_SUFFIX)
    try:
        # mkstemp's file is private (0600); the file it becomes gets the permissions of
        # any new file (open() would give 0644 under the usual umask 022), where the file
        # system has permissions to set (some network and FAT mounts refuse chmod).
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points to it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)  # and so is the rename


def check_replaceable(path: str | Path) -> None:
    """Refuse a ``path`` that names a device, pipe or socket: the rename would replace
    it (run as root, ``-o /dev/null`` replaced the machine's /dev/null). A symbolic link
    is replaced, its target left as it was: output never goes through a link."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return  # nothing there (or not reachable: the write itself will say so)
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode) or stat.S_ISDIR(mode)):
        raise OSError(errno.EEXIST, "not a regular file (a device, pipe or socket) where "
                      "a file is to be written", str(path))


def _umask() -> int:
    """This process's umask, read without changing it where Linux says it (setting it
    to read it back would, for a moment, apply to files other threads create)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def same_file_atomic(src: str | Path, dst: str | Path) -> None:
    """Make ``dst`` the file ``src`` is: a hard link under a temporary name, renamed over
    ``dst`` (atomic, and no bytes written: a 100 MB checkpoint costs nothing twice).
    Where the file system refuses links, a copy through ``atomic_file``. Safe because
    capsflow never writes a checkpoint in place: each save renames a new file over its
    name, so a later save of either name leaves the other untouched."""
    src, dst = Path(src), Path(dst)
    check_replaceable(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here (some network or FAT file systems)
        with open(src, "rb") as fin, atomic_file(dst) as fout:
            shutil.copyfileobj(fin, fout, length=1 << 20)
        return
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(dst.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some systems (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | Path) -> list:
    """Delete the temporary files that killed runs left in ``folder``: only names of
    ``atomic_file``'s pattern, and only when the process that wrote them is gone (a run
    writing into the same folder keeps its own). Returns the removed paths."""
    removed = []
    for path in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        match = _TEMP_NAME.match(path.name)
        if match and path.is_file() and not _process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or cannot tell: leave its file alone
    return True


def save_npz_atomic(path: str | Path, arrays: dict) -> None:
    """Write ``arrays`` to ``path`` atomically (see ``atomic_file``)."""
    with atomic_file(path) as f:
        np.savez(f, **{k: to_numpy(v) for k, v in arrays.items()})


def load_npz(path: str | Path) -> dict:
    """Read every array of an .npz; a missing or corrupt file is one clear line."""
    path = Path(path)
    if not path.exists():
        raise CapsflowError(f"no such file: {path}")
    if not path.is_file():  # a FIFO would block the read forever, /dev/zero never end
        raise CapsflowError(f"{path} is not a regular file (a checkpoint is an .npz file)")
    _check_unpacked_size(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:
        # The file is untrusted and the parsers are zipfile's and numpy's: fuzzing damaged
        # files made them raise a dozen types (BadZipFile, ValueError, EOFError,
        # NotImplementedError, RuntimeError, tokenize.TokenError, MemoryError for a header
        # that declares a huge array...). Each means the file cannot be read.
        message = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise CapsflowError(f"{path} is not a readable .npz file ({exc.__class__.__name__}: "
                            f"{message}); was it truncated?") from None


def _check_unpacked_size(path: Path) -> None:
    """One line when the arrays of ``path`` unpack to more bytes than this machine has: a
    file of a few MB can unpack to GBs (a zip bomb: deflated zeros, members that share
    their data), and loading would exhaust memory. The zip's directory gives each
    member's size before anything is unpacked, and reading a member never yields more
    than that size. (A file zipfile cannot read is left for np.load, whose failure is
    one line.)"""
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except Exception:  # noqa: BLE001 - BadZipFile, NotImplementedError (zip version), ...
        return
    room = memory.memory_room()
    if room is not None and unpacked > room[0]:
        raise CapsflowError(f"{path}: its arrays unpack to {memory.bytes_text(unpacked)}, more "
                            f"than {room[1]}; the file is damaged or not capsflow's")


def save_params(path: str | Path, params: dict) -> None:
    """Save parameters as .npz keyed by the YAML parameter names."""
    save_npz_atomic(path, params)


def load_params(path: str | Path) -> dict:
    """Load parameters saved by ``save_params`` (or a checkpoint's parameters)."""
    return params_of(load_npz(path), path)


def params_of(data: dict, path: str | Path) -> dict:
    """The parameters among the arrays ``data`` read from ``path`` (``load_params``)."""
    prefix = "param/"
    if any(k.startswith(prefix) for k in data):  # a training checkpoint
        data = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
    return check_numeric(data, path, "parameter")


def check_numeric(arrays: dict, path: str | Path, what: str) -> dict:
    """``arrays`` when every one holds finite real numbers; a file is untrusted input, and
    a string array would fail far from here, inside an op. capsflow never saves a NaN or
    an infinity (a diverging run stops first), so one means damage."""
    for name, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise CapsflowError(f"{path}: {what} '{name}' holds {array.dtype} values, not "
                                f"real numbers; the file is damaged or not capsflow's")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise CapsflowError(f"{path}: {what} '{name}' holds NaN or infinite values; "
                                f"the file is damaged")
    return arrays
