"""Crash-safe writing of part and shard files (the layout is in ``layout.py``).

Every batch is written to ``parts/part-<start>-<end>.h5`` through a temporary name
(``moedistill.files.atomic_path``: write, fsync, rename), so a part file that exists is
whole. A killed run leaves finished parts behind; the rerun skips them. When a rank has
all its parts, :func:`merge_parts` copies their compressed chunks (no re-encoding:
``read_direct_chunk`` / ``write_direct_chunk``) into its shard, written the same way.
The generator (``generate.py``) records the shard, deletes the parts and has rank 0
write the manifest last.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moedistill.cache import encode
from moedistill.cache.layout import (
    TARGET_DATASETS,
    add_stats,
    dataset_specs,
    empty_stats,
    open_h5,
    stats_from_attrs,
    write_stats_attrs,
)
from moedistill.files import atomic_path


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

    ``arrays``: ``input_ids`` [n, L] and the target arrays in their logical ``[n, L, width]``
    shape (transposed to the rank-major disk layout here)."""
    rows = int(arrays["input_ids"].shape[0])
    with atomic_path(path) as tmp, open_h5(tmp, "w") as f:
        for name, d in _create_datasets(f, attrs, rows).items():
            a = arrays[name]
            d[...] = np.swapaxes(a, 1, 2) if name in TARGET_DATASETS else a


def merge_parts(parts: list[Path], out: Path, attrs: dict) -> dict:
    """Concatenate part files (in order) into one shard by copying compressed chunks.

    Returns the summed statistics. The shard is written to a temporary name and renamed.
    """
    rows = 0
    for p in parts:
        with open_h5(p, "r") as f:
            rows += int(f["input_ids"].shape[0])
    stats = empty_stats()
    with atomic_path(out) as tmp, open_h5(tmp, "w") as g:
        dst = _create_datasets(g, attrs, rows)
        row = 0
        for p in parts:
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
