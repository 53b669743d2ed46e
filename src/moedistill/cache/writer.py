"""Crash-safe writing of part and shard files (the layout is in ``layout.py``).

Every batch is written to ``parts/part-<start>-<end>.h5`` through a temporary name
(``moedistill.files.atomic_path``: write, fsync, rename), so a part file that exists is
whole. A killed run leaves finished parts behind; the rerun skips them. When a rank has
all its parts, :func:`merge_parts` copies their compressed chunks (no re-encoding:
``read_direct_chunk`` / ``write_direct_chunk``) into its shard, written the same way.
The generator (``generate.py``) records the shard, deletes the parts and has rank 0
write the manifest last.

HDF5 never sees a failed write. A full disk makes HDF5 leave a file it cannot close:
every later close (``with``, garbage collection, interpreter exit) tries the write again,
prints HDF5's error stack and, in h5py 3.16 / HDF5 2.0, ends in a segmentation fault. So
part and shard files are written through :class:`_Sink`, a file object (h5py's ``fileobj``
driver) that does the writes itself: the first that fails is kept, every later one is
dropped, HDF5 closes cleanly, and :func:`_h5_create` raises the kept ``OSError`` (errno
ENOSPC) after the temporary file is gone.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

import h5py

from moedistill.cache import encode
from moedistill.cache.layout import (
    add_stats,
    dataset_specs,
    empty_stats,
    open_h5,
    stats_from_attrs,
    write_stats_attrs,
)
from moedistill.files import atomic_path


class _Sink:
    """The file HDF5 writes through (h5py's ``fileobj`` driver): writes go to the disk until
    one fails; that error is kept (``self.error``) and every later write is held in memory
    (so that HDF5 reads back what it wrote) instead of the disk, so HDF5 always finishes."""

    def __init__(self, raw):
        self.raw, self.error = raw, None
        self._held: dict[int, bytes] = {}  # after a failure: offset -> bytes written there

    def write(self, b) -> int:
        n = len(b)
        if self.error is None:
            view, pos, done = memoryview(b).cast("B"), self.raw.tell(), 0
            try:
                while done < n:  # a raw write may be short: the rest, until it fails
                    w = self.raw.write(view[done:])
                    if not w:
                        raise OSError(errno.ENOSPC, "No space left on device")
                    done += w
                return n
            except OSError as e:
                self.error = e
                self.raw.seek(pos)
        self._held[self.raw.tell()] = bytes(b)
        self.raw.seek(n, 1)
        return n

    def read(self, size: int = -1) -> bytes:
        held = self._held.get(self.raw.tell())
        if held is not None and len(held) >= size >= 0:
            self.raw.seek(size, 1)
            return held[:size]
        return self.raw.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self.raw.truncate(size)
            except OSError as e:
                self.error = e
        return self.raw.tell() if size is None else size

    def flush(self) -> None:
        pass  # unbuffered; atomic_path fsyncs the file


@contextlib.contextmanager
def _h5_create(path: Path) -> Iterator[tuple[h5py.File, _Sink]]:
    """``with _h5_create(p) as (f, sink):`` a new HDF5 file written whole or not at all
    (``atomic_path``); a failed write raises its ``OSError`` (named ``p``) once HDF5 has closed.
    Writers that go on for long check ``sink.error`` and stop early."""
    with atomic_path(path) as tmp:
        with open(tmp, "w+b", buffering=0) as raw:
            sink = _Sink(raw)
            try:
                with h5py.File(sink, "w") as f:
                    yield f, sink
            except Exception:
                if sink.error is None:
                    raise
                # else what followed the failed write (e.g. HDF5 reading back a dropped block): the disk's error
        if sink.error is not None:
            e = sink.error
            raise OSError(e.errno or errno.EIO, e.strerror or str(e), str(path)) from e


def _create_datasets(f, attrs: dict, rows: int) -> dict:
    """The (empty) datasets of a shard or part of ``rows`` rows, and its attributes."""
    out = {}
    for name, (dtype, row_shape) in dataset_specs(attrs).items():
        kw = encode.compression_kwargs(name, attrs["codec"], int(attrs["codec_level"]))
        out[name] = f.create_dataset(
            name, shape=(rows, *row_shape), maxshape=(None, *row_shape), dtype=dtype, chunks=(1, *row_shape), **kw
        )  # maxshape: a rank may own no rows (more processes than batches)
    for k, v in attrs.items():
        if v is not None:
            f.attrs[k] = v
    return out


def write_part(path: Path, arrays: dict, attrs: dict) -> None:
    """Write one finished batch as a whole file (temporary name -> fsync -> rename).

    ``arrays``: every dataset of ``layout.dataset_specs`` in its disk layout (``encode.to_disk``)."""
    rows = int(arrays["input_ids"].shape[0])
    with _h5_create(path) as (f, _):
        for name, d in _create_datasets(f, attrs, rows).items():
            d[...] = arrays[name]


def merge_parts(parts: list[Path], out: Path, attrs: dict) -> dict:
    """Concatenate part files (in order) into one shard by copying compressed chunks.

    Returns the summed statistics. The shard is written to a temporary name and renamed.
    """
    rows = 0
    for p in parts:
        with open_h5(p, "r") as f:
            rows += int(f["input_ids"].shape[0])
    stats = empty_stats()
    with _h5_create(out) as (g, sink):
        dst = _create_datasets(g, attrs, rows)
        row = 0
        for p in parts:
            if sink.error is not None:  # the disk is full: stop copying, close, raise
                break
            with open_h5(p, "r") as f:
                n = int(f["input_ids"].shape[0])
                for name, d in dst.items():
                    _copy_chunks(f[name], d, n, row)
                add_stats(stats, stats_from_attrs(f.attrs))
                row += n
        write_stats_attrs(g.attrs, stats)
    return stats


def _copy_chunks(src, dst, n: int, row: int) -> None:
    """Rows ``0..n`` of ``src`` to rows ``row..row+n`` of ``dst``, compressed chunk by chunk."""
    tail = (0,) * (src.ndim - 1)
    for i in range(n):
        mask, chunk = src.id.read_direct_chunk((i, *tail))
        dst.id.write_direct_chunk((row + i, *tail), chunk, mask)
