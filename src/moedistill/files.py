"""Writing files so that no reader ever sees half of one, and checksums of what was written.

Every file moedistill writes that a later command reads (cache manifests, shards and
parts, checkpoint records, stage plans, logs, metrics, reports) goes through here: the
bytes go to a temporary name in the same directory, are fsync'ed, and the temporary
file is renamed over the real name (``os.replace`` is atomic on POSIX). A crash, a kill
or a full disk part-way leaves the old file (or none) under the real name and a
``*.tmp<pid>`` beside it, never a truncated file that looks whole. The temporary name
carries the process id, so two processes writing the same file (ranks of one launch)
never rename each other's temporary away.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from moedistill.errors import UserError

CHECKSUM_BLOCK = 1 << 23


def tmp_name(path: Path) -> Path:
    """The temporary sibling this process writes ``path`` through."""
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is then as durable as they allow
        if not Path(path).is_dir():
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """``with atomic_path(p) as tmp:`` write ``tmp`` (any library, e.g. h5py); on success it is
    fsync'ed and renamed to ``p``; on an exception it is removed and ``p`` is untouched."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path, obj, indent: int = 1) -> None:
    """JSON of ``obj`` (with a final newline), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_dir(path) -> Iterator[Path]:
    """``with atomic_dir(p) as tmp:`` fill the directory ``tmp`` (e.g. ``save_pretrained(tmp)``);
    on success it replaces ``p`` (:func:`replace_dir`); on an exception ``p`` is untouched and
    ``tmp`` is removed (a crash leaves it for the next attempt to clear). One process only: ranks that must all
    write one directory share a fixed temporary name and call :func:`replace_dir` themselves."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. a full disk: give back what the partial save took
        raise
    replace_dir(tmp, path)


def replace_dir(tmp, path) -> None:
    """Move the finished directory ``tmp`` to ``path``, replacing what was there.

    The caller wrote ``tmp`` whole first (e.g. ``save_pretrained(tmp)``), so ``path``
    holds the old directory, nothing, or the new one, never a partial new one. (Between
    the removal and the rename ``path`` is briefly absent; readers treat that as "not
    there yet".)"""
    tmp, path = Path(tmp), Path(path)
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_path(f)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    fsync_path(path.parent)


def file_checksum(path, algorithm: str = "xxh3_128") -> str:
    """``"<algorithm>:<hex>"`` of the file's bytes: xxh3_128 (~10 GB/s, disk speed dominates)
    or sha256 (read in older manifests)."""
    if algorithm == "xxh3_128":
        import xxhash  # only where files are checksummed; not needed to import the package

        h = xxhash.xxh3_128()
    elif algorithm == "sha256":
        h = hashlib.sha256()
    else:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}")
    with open(path, "rb") as f:
        while chunk := f.read(CHECKSUM_BLOCK):
            h.update(chunk)
    return f"{algorithm}:{h.hexdigest()}"


# --------------------------------------------------------------------------- full disks
#
# What the libraries raise when the disk fills differs: Python's own writers (json, text)
# an ``OSError`` with ``errno.ENOSPC``; safetensors a ``SafetensorError`` whose message ends
# in "No space left on device (os error 28)"; h5py an ``OSError``/``RuntimeError`` quoting
# HDF5's "errno = 28" (the cache avoids these: ``cache/writer.py`` writes through a file
# object that never fails under HDF5); torch.save a ``RuntimeError`` from its zip writer
# ("unexpected pos ...", "iostream error") that names no errno at all -- recognised by
# the free space left where it was writing.

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = re.compile(
    r"no space left on device|disk quota exceeded|os error (?:28|122)\b|errno\s*=\s*(?:28|122)\b|errno (?:28|122)\]",
    re.IGNORECASE,
)
# a writer that fails without saying why (torch.save's zip writer): full if the disk is (nearly) full
_WRITE_FAILED_TEXT = re.compile(r"inline_container|PytorchStreamWriter|iostream error|file write failed", re.IGNORECASE)
NEARLY_FULL = 16 << 20  # bytes free below which a failed write is taken for a full disk


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def free_bytes(path) -> int | None:
    """Bytes free to this user on the filesystem of ``path`` (or of its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_disk_full(exc: BaseException, path=None) -> bool:
    """True if ``exc`` (or an exception it was raised from) says the disk or quota is full.

    ``path``: where the failed write went; then an I/O failure that gives no reason
    (torch.save's) counts as a full disk when less than ``NEARLY_FULL`` bytes are free there."""
    if isinstance(exc, DiskFullError):
        return True
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        if _DISK_FULL_TEXT.search(str(e)):  # SafetensorError, h5py, tokenizers (a bare Exception) ...
            return True
    if path is not None and any(isinstance(e, (OSError, RuntimeError)) and _WRITE_FAILED_TEXT.search(str(e))
                                for e in _chain(exc)):
        free = free_bytes(path)
        return free is not None and free < NEARLY_FULL
    return False


def _path_of(exc: BaseException):
    for e in _chain(exc):
        if isinstance(e, OSError) and e.filename:
            return e.filename
        m = re.search(r"filename = '([^']+)'", str(e))  # HDF5's message
        if m:
            return m[1]
    return None


def _size(n: int) -> str:
    mb = n / 1e6
    return f"{mb:.2f} MB" if mb < 1 else f"{mb:.1f} MB" if mb < 100 else f"{mb:,.0f} MB"


class DiskFullError(UserError):
    """A write failed because the disk (or the quota) is full: one line naming the path, the
    space free there and (where known) the space needed. Everything moedistill writes is
    atomic, so what was cut short is never taken for complete and the same command resumes."""

    def __init__(self, path=None, needed: int | None = None):
        self.path = None if path is None else Path(re.sub(r"\.tmp\d*$", "", str(path)))
        self.needed = needed
        self.free = free_bytes(self.path) if self.path is not None else None
        where = f" writing {self.path}" if self.path is not None else ""
        room = []
        if self.free is not None:
            room.append(f"{_size(self.free)} free there")
        if needed is not None:
            room.append(f"about {_size(max(int(needed), 0))} needed")
        super().__init__(
            f"no space left on the device{where}" + (f"; {', '.join(room)}" if room else "")
            + "; free space and rerun the same command (caches resume, training resumes with --resume)"
        )

    @classmethod
    def from_exception(cls, exc: BaseException, path=None, needed: int | None = None) -> DiskFullError:
        if isinstance(exc, DiskFullError):
            return exc
        return cls(_path_of(exc) or path, needed)  # the file the library names, else the caller's


@contextlib.contextmanager
def disk_full_as_error(path=None, needed=None) -> Iterator[None]:
    """``with disk_full_as_error(p, needed=lambda: n):`` turn whatever a library raises on a full
    disk while writing ``p`` into :class:`DiskFullError` (``needed``: bytes the whole write
    takes, a number or a function called only then); other errors pass unchanged."""
    try:
        yield
    except Exception as e:
        if isinstance(e, DiskFullError) or not is_disk_full(e, path):
            raise
        try:
            n = needed() if callable(needed) else needed
        except Exception:  # noqa: BLE001 - an estimate that fails must not hide the message
            n = None
        raise DiskFullError.from_exception(e, path, n) from e


def model_bytes(model) -> int:
    """Bytes of a model's parameters and buffers (what its weights file takes)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # tied weights once
    return sum(t.numel() * t.element_size() for t in tensors.values())
