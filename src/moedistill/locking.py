"""One writer per directory: an advisory lock that the operating system releases when its holder dies.

Every command that writes a run directory (``moedistill train``: ``<output_dir>/train/<run>``),
a teacher cache directory (``moedistill cache``, and the caches ``train`` generates) or
``<output_dir>/compressed`` (``moedistill compress``) first takes the lock of that directory:
``fcntl.flock(LOCK_EX | LOCK_NB)`` on the file ``.moedistill.lock`` inside it. A second
command that would write the same directory while the first runs stops at once with one line
naming the holder -- host, pid, command, since when -- instead of deleting or overwriting the
first one's files under it::

    error: run directory out/train/topk is in use by another moedistill process (host gpu7, pid 4242,
    since 2025-01-02T03:04:05+00:00: `moedistill train ...`); wait for it to finish, or stop it;
    a lock left by a process that died is released automatically

The lock is the ``flock`` itself, not the file: a process that is killed (``kill -9``, OOM,
power cut of the node) loses it with its file descriptors, so a crashed run never leaves a
stale lock behind. The file holds the holder's details as JSON (``host``, ``pid``, ``command``,
``started``), written after the lock is taken and read only for the message; it is removed
when the holder releases the lock normally, and a directory the lock had to create is removed
again if nothing else was written into it (a command refused for a bad setting leaves no
trace). Readers and cleaners of these directories ignore the file (``LOCK_FILE``).

Locks are per process and re-entrant: a process taking a lock it already holds (``moedistill
run`` nests commands) counts up and releases at the last ``release``. Under torchrun /
accelerate launch use :func:`lock_on_rank0`: process 0 takes the lock and every process
raises the same UserError if it could not.

Filesystems without ``flock`` (some NFS setups without a lock daemon, some FUSE mounts; the
call fails with ``ENOLCK``, ``EOPNOTSUPP`` or ``ENOSYS``): a warning is logged once and the
command runs without a lock -- two commands on one directory are then not stopped.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from moedistill import dist
from moedistill.errors import UserError

logger = logging.getLogger(__name__)

LOCK_FILE = ".moedistill.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_COMMAND_CHARS = 300  # of the holder's command line in the message
_held: dict[str, DirectoryLock] = {}  # realpath -> the lock this process holds there
_warned = False


def _command() -> str:
    argv = list(sys.argv)
    if not argv or not argv[0]:
        return sys.executable
    if Path(argv[0]).name == "moedistill" or Path(argv[0]).as_posix().endswith("moedistill/cli.py"):
        argv[0] = "moedistill"  # the console script, or python -m moedistill.cli
    return shlex.join(argv)


def _holder_info() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": _command(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def read_holder(directory) -> dict | None:
    """The details the holder of ``directory``'s lock wrote, or None (no file, empty, not JSON)."""
    try:
        info = json.loads(Path(directory, LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def describe_holder(info: dict | None) -> str:
    if not info:
        return "another moedistill process (it has not written its details yet)"
    command = str(info.get("command", "?"))
    if len(command) > _COMMAND_CHARS:
        command = command[:_COMMAND_CHARS] + " ..."
    return (f"another moedistill process (host {info.get('host', '?')}, pid {info.get('pid', '?')}, "
            f"since {info.get('started', '?')}: `{command}`)")


class DirectoryLock:
    """``with DirectoryLock(path, "run directory"):`` -- or ``lock = DirectoryLock(...).acquire()``
    ... ``lock.release()`` -- holds the exclusive lock of the directory ``path`` (created if
    needed). ``acquire`` raises UserError at once if another process holds it (no waiting)."""

    def __init__(self, directory, what: str = "directory"):
        self.directory = Path(directory)
        self.what = what
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None
        self._depth = 0
        self._created: list[Path] = []  # directories acquire() made, deepest first
        self._key: str | None = None
        self._outer: DirectoryLock | None = None  # the lock this process already held, when nested

    @property
    def locked(self) -> bool:
        """True while held (False when released, or when the filesystem could not lock it)."""
        return (self._outer or self)._fd is not None

    # ---------------------------------------------------------------- acquire

    def acquire(self) -> DirectoryLock:
        key = os.path.realpath(self.directory)
        held = _held.get(key)
        if held is not None:  # this process holds it already (nested commands): count up
            held._depth += 1
            self._outer = held
            return self
        try:
            return self._acquire(key)
        except BaseException:
            self._remove_created()
            raise

    def _acquire(self, key: str) -> DirectoryLock:
        for _ in range(50):  # retried only while a releasing holder removes the file or its directory
            self._make_dirs()
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise UserError(f"cannot create the lock file {self.path}: {e.strerror}; "
                                f"make {self.directory} writable or choose another directory") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(self._busy_message()) from None
            except OSError as e:
                os.close(fd)
                if e.errno not in _UNSUPPORTED:
                    raise
                self._unsupported(e)
                return self
            if self._same_file(fd):
                self._fd, self._depth, self._key = fd, 1, key
                _held[key] = self
                self._write_info()
                return self
            os.close(fd)  # the holder removed the file as we opened it: lock the one at the path now
        raise RuntimeError(f"could not lock {self.path}: the file kept being replaced")  # pragma: no cover

    def _make_dirs(self) -> None:
        if self.directory.is_dir():
            return
        if self.directory.exists() or self.directory.is_symlink():
            raise UserError(f"{self.what} {self.directory} is not a directory; remove it or choose another path")
        missing, p = [], self.directory
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {self.what} {self.directory}: {e.strerror}; "
                            f"choose a writable directory") from None
        self._created += [d for d in missing if d not in self._created]

    def _same_file(self, fd: int) -> bool:
        try:
            a, b = os.fstat(fd), os.stat(self.path)
        except FileNotFoundError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def _write_info(self) -> None:
        data = (json.dumps(_holder_info()) + "\n").encode()
        try:  # in place (the lock is on this very file): truncate, then write
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError as e:  # e.g. a full disk: the lock holds; only the message of a refused writer is poorer
            logger.warning("could not record this process in %s: %s", self.path, e.strerror)

    def _busy_message(self) -> str:
        info = read_holder(self.directory)
        for _ in range(10):  # the holder writes its details just after taking the lock
            if info:
                break
            time.sleep(0.05)
            info = read_holder(self.directory)
        return (f"{self.what} {self.directory} is in use by {describe_holder(info)}; wait for it to finish, "
                f"or stop it; a lock left by a process that died is released automatically")

    def _unsupported(self, e: OSError) -> None:
        global _warned
        if not _warned:
            logger.warning(
                "cannot lock %s (%s): this filesystem does not support flock; running without a lock, so do "
                "not run two moedistill commands on the same directory at once", self.path, e.strerror,
            )
            _warned = True
        self._remove_file()

    # ---------------------------------------------------------------- release

    def release(self) -> None:
        """Give the lock up (the last of nested acquires); removes the lock file, and the
        directories ``acquire`` created if they are still empty."""
        if self._outer is not None:
            outer, self._outer = self._outer, None
            outer.release()
            return
        if self._fd is None:
            self._remove_created()
            return
        self._depth -= 1
        if self._depth > 0:
            return
        _held.pop(self._key, None)
        fd, self._fd = self._fd, None
        try:
            self._remove_file()  # while still holding it: nobody takes a lock on a file about to vanish
            fcntl.flock(fd, fcntl.LOCK_UN)  # also for forked children sharing the descriptor
        finally:
            os.close(fd)
        self._remove_created()

    def _remove_file(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _remove_created(self) -> None:
        for d in self._created:  # deepest first; one that holds anything stays
            with contextlib.suppress(OSError):
                d.rmdir()
        self._created = []

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"DirectoryLock({str(self.directory)!r}, locked={self.locked})"


@contextlib.contextmanager
def lock_on_rank0(directory, what: str = "directory") -> Iterator[DirectoryLock | None]:
    """Every process of a launch enters; process 0 takes the lock of ``directory`` and holds
    it for the block; if it cannot, every process raises the same UserError (no process is
    left waiting for the others). Without a process group this is ``DirectoryLock``."""
    lock, message, bug = None, "", None
    if dist.rank() == 0:
        try:
            lock = DirectoryLock(directory, what).acquire()
        except UserError as e:
            message = str(e)
        except Exception as e:  # noqa: BLE001 - our bug: re-raised below, after the others were told to stop
            bug, message = e, f"process 0 could not lock {directory}: {e!r}"
    try:
        dist.agree(not message, message)
    except UserError:
        if bug is not None:
            raise bug from None
        raise
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
