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
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

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
    ``tmp`` is left for the next attempt to clear. One process only: ranks that must all
    write one directory share a fixed temporary name and call :func:`replace_dir` themselves."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    yield tmp
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
