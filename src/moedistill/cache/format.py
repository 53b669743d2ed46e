"""The cache on disk: layout, crash-safe writer, manifest, verified reader.

A cache is a directory::

    manifest.json          what it holds, fingerprints, per-shard range/rows/bytes/checksum,
                           "complete": true only once every shard is closed and verified
    shard-00000.h5         one per writer process (rank), a contiguous range of sequences
    parts/                 only while generating: one small HDF5 file per finished batch

Crash safety: every batch is written to ``parts/part-<start>-<end>.h5.tmp``, fsync'ed and
renamed, so a part file that exists is whole. A killed run leaves finished parts behind;
the rerun skips them. When a rank has all its parts it copies their compressed chunks
(no re-encoding: ``read_direct_chunk`` / ``write_direct_chunk``) into its shard, renames
it into place, records it in ``shard-RRRRR.json``, and only then deletes the parts. Rank
0 verifies every shard and writes ``manifest.json`` with ``complete: true`` last.
Every JSON and HDF5 file is written to a temporary name and ``os.replace``d.

Inside a shard (and a part) with n rows, seq_len L and width W (docs/CACHE_FORMAT.md)::

    input_ids      uint32 [n, L]
    target_ids     uint32 [n, W, L]       rank-major: [i, j, t] is rank j at position t
    target_deltas  uint16 [n, W, L]       log-probs, see moedistill.cache.encode
    target_counts  uint8|uint16 [n, W, L] (sample mode only)

each chunked by row (one sequence per chunk, so a reader touches one chunk per dataset),
filtered by (byte- or bit-) shuffle + compressor + fletcher32; the encoding parameters
are shard attributes.
"""

from __future__ import annotations

import bisect
import json
import os
import time
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from moedistill.cache import encode
from moedistill.errors import UserError

MANIFEST = "manifest.json"
PARTS_DIR = "parts"
FORMAT_NAME = "moedistill-teacher-cache"
TARGET_DATASETS = ("target_ids", "target_deltas", "target_counts")

# keys of the manifest that must match for a rerun to resume (or reuse) an existing cache
IDENTITY_KEYS = (
    "format_version",
    "mode",
    "top_k",
    "num_samples",
    "width",
    "vocab_size",
    "seq_len",
    "num_sequences",
    "batch_size",
    "seed",
    "fingerprints",
    "encoding",
)


# --------------------------------------------------------------------------- names


def shard_name(rank: int) -> str:
    return f"shard-{rank:05d}.h5"


def shard_info_name(rank: int) -> str:
    return f"shard-{rank:05d}.json"


def part_name(start: int, end: int) -> str:
    return f"part-{start:010d}-{end:010d}.h5"


def parse_part_name(name: str) -> tuple[int, int] | None:
    if not (name.startswith("part-") and name.endswith(".h5")):
        return None
    try:
        a, b = name[5:-3].split("-")
        return int(a), int(b)
    except ValueError:
        return None


# --------------------------------------------------------------------------- small files


def fsync_path(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj) -> None:
    """Write JSON to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}); the cache is damaged, regenerate it with overwrite") from None


def file_checksum(path: Path, block: int = 1 << 23) -> str:
    """``"xxh3_128:<hex>"`` of the file's bytes (~10 GB/s; disk speed dominates)."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return "xxh3_128:" + h.hexdigest()


def checksum_matches(path: Path, expected: str) -> bool:
    algo = expected.split(":", 1)[0]
    if algo == "xxh3_128":
        return file_checksum(path) == expected
    if algo == "sha256":
        import hashlib

        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 23):
                h.update(chunk)
        return "sha256:" + h.hexdigest() == expected
    raise UserError(f"unknown checksum algorithm {algo!r} in the manifest of {path.parent}")


# --------------------------------------------------------------------------- writing


def _h5py():
    import h5py

    try:  # registers the zstd filter with HDF5 (also needed to read)
        import hdf5plugin  # noqa: F401
    except ImportError:
        pass
    return h5py


def _dataset_specs(attrs: dict) -> dict:
    """name -> (dtype, per-row shape) of every dataset a shard holds. Target arrays are
    rank-major on disk, ``[W, L]`` per row, so each rank's similar values sit together."""
    L, W = int(attrs["seq_len"]), int(attrs["width"])
    specs = {
        "input_ids": (encode.ID_DTYPE, (L,)),
        "target_ids": (encode.ID_DTYPE, (W, L)),
        "target_deltas": (encode.DELTA_DTYPE, (W, L)),
    }
    if attrs["mode"] == "sample":
        specs["target_counts"] = (encode.count_dtype(int(attrs["num_samples"])), (W, L))
    return specs


def _create_datasets(f, attrs: dict, rows: int) -> dict:
    out = {}
    for name, (dtype, row_shape) in _dataset_specs(attrs).items():
        kw = encode.compression_kwargs(name, attrs["codec"], int(attrs["codec_level"]))
        out[name] = f.create_dataset(
            name, shape=(rows, *row_shape), maxshape=(None, *row_shape), dtype=dtype, chunks=(1, *row_shape), **kw
        )  # maxshape: a rank may own no rows (more processes than batches)
    for k, v in attrs.items():
        if v is not None:
            f.attrs[k] = v
    return out


def write_part(path: Path, arrays: dict, attrs: dict) -> None:
    """Write one finished batch as a whole file: ``<path>.tmp`` -> fsync -> rename.

    ``arrays``: ``input_ids`` [n, L] and the target arrays in their logical ``[n, L, W]``
    shape (transposed to the rank-major disk layout here)."""
    h5py = _h5py()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rows = int(arrays["input_ids"].shape[0])
    with h5py.File(tmp, "w") as f:
        ds = _create_datasets(f, attrs, rows)
        for name, d in ds.items():
            a = arrays[name]
            d[...] = np.swapaxes(a, 1, 2) if name in TARGET_DATASETS else a
    fsync_path(tmp)
    os.replace(tmp, path)


def merge_parts(parts: list[Path], out: Path, attrs: dict) -> dict:
    """Concatenate part files (in order) into one shard by copying compressed chunks.

    Returns the summed statistics. The shard is written to ``<out>.tmp`` and renamed.
    """
    h5py = _h5py()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    rows = 0
    for p in parts:
        with h5py.File(p, "r") as f:
            rows += int(f["input_ids"].shape[0])
    stats = empty_stats()
    with h5py.File(tmp, "w") as g:
        dst = _create_datasets(g, attrs, rows)
        row = 0
        for p in parts:
            with h5py.File(p, "r") as f:
                n = int(f["input_ids"].shape[0])
                for name, d in dst.items():
                    src = f[name]
                    tail = (0,) * (src.ndim - 1)
                    for i in range(n):
                        mask, chunk = src.id.read_direct_chunk((i, *tail))
                        d.id.write_direct_chunk((row + i, *tail), chunk, mask)
                add_stats(stats, stats_from_attrs(f.attrs))
                row += n
        write_stats_attrs(g.attrs, stats)
    fsync_path(tmp)
    os.replace(tmp, out)
    return stats


# --------------------------------------------------------------------------- statistics


STAT_KEYS = ("positions", "entropy_sum", "mass_sum", "distinct_sum", "distinct_max")


def empty_stats() -> dict:
    return {k: 0 for k in STAT_KEYS}


def add_stats(total: dict, more: dict) -> dict:
    for k in STAT_KEYS:
        if k == "distinct_max":
            total[k] = max(int(total[k]), int(more[k]))
        elif k in ("positions", "distinct_sum"):
            total[k] = int(total[k]) + int(more[k])
        else:
            total[k] = float(total[k]) + float(more[k])
    return total


def stats_from_attrs(attrs) -> dict:
    return {k: attrs[f"stat_{k}"].item() if hasattr(attrs[f"stat_{k}"], "item") else attrs[f"stat_{k}"] for k in STAT_KEYS}


def write_stats_attrs(attrs, stats: dict):
    for k in STAT_KEYS:
        attrs[f"stat_{k}"] = stats[k]


def summarise_stats(stats: dict) -> dict:
    n = max(int(stats["positions"]), 1)
    return {
        "positions": int(stats["positions"]),
        "mean_entropy": float(stats["entropy_sum"]) / n,
        "mean_mass": float(stats["mass_sum"]) / n,
        "mean_distinct": float(stats["distinct_sum"]) / n,
        "max_distinct": int(stats["distinct_max"]),
        "_sums": {k: stats[k] for k in STAT_KEYS},
    }


# --------------------------------------------------------------------------- manifest


def manifest_identity(manifest: dict) -> dict:
    return {k: manifest.get(k) for k in IDENTITY_KEYS}


def identity_diff(have: dict, want: dict) -> list[str]:
    """Human-readable differences between two identities (empty if they match)."""
    out = []
    for k in IDENTITY_KEYS:
        _diff(k, have.get(k), want.get(k), out)
    return out


def _diff(key: str, a, b, out: list) -> None:
    """Nested dicts down to the differing leaf (``fingerprints.teacher.name``), so that the
    shortened values shown are the ones that differ."""
    if a == b:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for sub in sorted(set(a) | set(b)):
            _diff(f"{key}.{sub}", a.get(sub), b.get(sub), out)
    else:
        out.append(f"{key}: cache has {_short(a)}, this run has {_short(b)}")


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 80 else s[:77] + "..."


def load_manifest(path: Path) -> dict:
    path = Path(path)
    m = path / MANIFEST
    if not path.is_dir():
        raise UserError(f"cache directory {path} does not exist; generate it with `moedistill cache` or fix the path")
    if not m.is_file():
        raise UserError(f"{path} is not a teacher cache ({MANIFEST} missing); generate it with `moedistill cache`")
    manifest = read_json(m)
    if manifest.get("format") != FORMAT_NAME:
        raise UserError(f"{m} is not a moedistill teacher-cache manifest; point at a cache directory")
    if int(manifest.get("format_version", 0)) > encode.FORMAT_VERSION:
        raise UserError(
            f"cache {path} has format version {manifest['format_version']}, this moedistill reads up to "
            f"{encode.FORMAT_VERSION}; upgrade moedistill"
        )
    return manifest


# --------------------------------------------------------------------------- verification


def verify_shards(path: Path, manifest: dict, checksums: bool = True) -> None:
    """Check that the listed shards exist, have the recorded size (and checksum), open as
    HDF5, and together cover sequences ``0..num_sequences`` in order. Raises UserError
    naming the file at fault."""
    h5py = _h5py()
    path = Path(path)
    fix = "regenerate the cache (moedistill cache cache.overwrite=true, or --overwrite)"
    expected_start = 0
    for s in manifest["shards"]:
        f = path / s["file"]
        if not f.is_file():
            raise UserError(f"cache shard {f} is missing; {fix}")
        size = f.stat().st_size
        if size != int(s["bytes"]):
            raise UserError(f"cache shard {f} is truncated or altered: {size} bytes, the manifest says {s['bytes']}; {fix}")
        if checksums and not checksum_matches(f, s["checksum"]):
            raise UserError(f"cache shard {f} is corrupted (checksum differs from the manifest); {fix}")
        try:
            with h5py.File(f, "r") as h:
                rows = int(h["input_ids"].shape[0])
                start = int(h.attrs["seq_start"])
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"cache shard {f} cannot be read as HDF5 ({str(e).splitlines()[0]}); {fix}") from None
        if rows != int(s["rows"]) or start != int(s["seq_start"]) or start != expected_start:
            raise UserError(f"cache shard {f} holds rows {start}..{start + rows}, the manifest disagrees; {fix}")
        expected_start = start + rows
    if expected_start != int(manifest["num_sequences"]):
        raise UserError(f"cache {path} shards cover {expected_start} of {manifest['num_sequences']} sequences; {fix}")


def _fingerprint_of(key: str, value):
    """Normalise an ``expect`` value (a string, or an object we can fingerprint)."""
    if key == "tokenizer" and not isinstance(value, str):
        from moedistill.data import tokenizer_hash

        return tokenizer_hash(value)
    if key == "data" and not isinstance(value, str):
        return value.stream_hash  # PackedData
    if key == "teacher" and not isinstance(value, str):
        from moedistill.models import model_fingerprint

        return model_fingerprint(value)
    return value


def check_expect(path: Path, manifest: dict, expect: dict | None) -> None:
    """Compare the cache's fingerprints with what the caller is about to train on.

    ``expect`` keys: ``teacher`` (name or config hash, or the model), ``tokenizer``
    (hash or tokenizer), ``data`` (stream hash or PackedData), ``seq_len``, and
    optionally ``mode``, ``vocab_size``, ``top_k``, ``num_samples``.
    """
    if not expect:
        return
    fp = manifest["fingerprints"]
    known = {"teacher", "tokenizer", "data", "seq_len", "mode", "vocab_size", "top_k", "num_samples"}
    for key, want in expect.items():
        if key not in known:
            raise ValueError(f"open_cache: unknown expect key {key!r} (known: {', '.join(sorted(known))})")
        if want is None:
            continue
        want = _fingerprint_of(key, want)
        if key == "teacher":
            have = fp["teacher"]
            if want in (have.get("name"), have.get("config_hash")):
                continue
            have_s = f"{have.get('name')} (config {have.get('config_hash', '')[:12]})"
        elif key in ("tokenizer", "data"):
            have_s = fp[key]
            if want == have_s:
                continue
        else:
            have_s = manifest.get(key)
            if (int(want) if key != "mode" else want) == have_s:
                continue
        raise UserError(
            f"cache {path} does not match: {key} is {have_s} in the cache but {want} was expected; "
            f"regenerate the cache for this {key} or point at the right cache"
        )


# --------------------------------------------------------------------------- reader


class TeacherCache(Dataset):
    """A complete, verified cache as a map-style torch Dataset (see :func:`open_cache`).

    Items (torch tensors; L = seq_len, K = ``self.k``):
      ``input_ids`` int64 [L], ``labels`` int64 [L] (shifted: labels[t] = input_ids[t+1], last -100),
      ``target_ids`` int64 [L, K], ``target_logprobs`` float32 [L, K] (log-softmax at T=1 over
      the full vocabulary, sorted descending; padding -1 / -inf), and in sample mode
      ``target_counts`` float32 [L, K] (draws, summing to num_samples; 0 for padding).

    HDF5 files are opened lazily and kept per process id, so a DataLoader's forked (or
    spawned) workers each open their own handles.
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.mode = manifest["mode"]
        self.vocab_size = int(manifest["vocab_size"])
        self.seq_len = int(manifest["seq_len"])
        self.k = int(manifest["k"])
        self.num_samples = manifest.get("num_samples")
        self.steps = np.asarray(manifest["encoding"]["logprob_steps"], dtype=np.float64)
        self._files = [self.path / s["file"] for s in manifest["shards"]]
        self._starts = [int(s["seq_start"]) for s in manifest["shards"]]
        self._n = int(manifest["num_sequences"])
        self._pid = None
        self._handles: dict = {}
        self._datasets: dict = {}

    # pickling (spawned workers) carries no open handles
    def __getstate__(self):
        d = dict(self.__dict__)
        d["_handles"], d["_datasets"], d["_pid"] = {}, {}, None
        return d

    def __len__(self) -> int:
        return self._n

    @property
    def num_tokens(self) -> int:
        return self._n * self.seq_len

    def _shard(self, j: int) -> dict:
        """The datasets of shard ``j`` (name -> h5py Dataset), opened once per process."""
        if self._pid != os.getpid():  # first use in this process (e.g. a forked worker)
            self._handles, self._datasets, self._pid = {}, {}, os.getpid()
        dsets = self._datasets.get(j)
        if dsets is None:
            h5py = _h5py()
            try:
                h = h5py.File(self._files[j], "r")
                dsets = {name: h[name] for name in ("input_ids", *TARGET_DATASETS) if name in h}
            except (OSError, KeyError) as e:
                raise UserError(f"cache shard {self._files[j]} cannot be opened ({str(e).splitlines()[0]}); regenerate the cache") from None
            self._handles[j], self._datasets[j] = h, dsets  # looked up once: h5py name lookups cost ~0.1 ms each
        return dsets

    def read_rows(self, start: int, stop: int) -> dict:
        """Decoded numpy arrays of global rows ``[start, stop)`` (within one shard)."""
        j = bisect.bisect_right(self._starts, start) - 1
        lo, hi = start - self._starts[j], stop - self._starts[j]
        dsets = self._shard(j)
        try:
            raw = {name: d[lo:hi] for name, d in dsets.items()}
        except (OSError, ValueError, KeyError) as e:
            raise UserError(
                f"cache shard {self._files[j]}: rows {lo}..{hi} cannot be read ({str(e).splitlines()[0]}); "
                f"the file is corrupted, regenerate the cache"
            ) from None
        K = self.k  # disk: [rows, W, L] rank-major -> [rows, L, K]
        t = {name: np.swapaxes(raw[name][:, :K], 1, 2) for name in TARGET_DATASETS if name in raw}
        ids, lp, counts = encode.decode_targets(t["target_ids"], t["target_deltas"], self.steps[:K], t.get("target_counts"))
        out = {"input_ids": raw["input_ids"].astype(np.int64), "target_ids": ids, "target_logprobs": lp}
        if counts is not None:
            out["target_counts"] = counts
        return out

    def __getitem__(self, i: int) -> dict:
        import torch

        from moedistill.data import shifted_labels

        i = int(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"index {i} out of range for a cache of {self._n} sequences")
        rows = self.read_rows(i, i + 1)
        item = {k: torch.from_numpy(v[0]) for k, v in rows.items()}
        item["labels"] = shifted_labels(item["input_ids"])
        return item

    def close(self):
        for h in self._handles.values():
            try:
                h.close()
            except Exception:  # noqa: BLE001 - closing a handle of a dead file is harmless
                pass
        self._handles, self._datasets = {}, {}

    def __repr__(self):
        return (
            f"TeacherCache({str(self.path)!r}, mode={self.mode}, k={self.k}, vocab={self.vocab_size}, "
            f"sequences={self._n}, seq_len={self.seq_len})"
        )


def open_cache(path, expect: dict | None = None, verify: bool = True) -> TeacherCache:
    """Open a complete teacher cache as a torch Dataset, after checking it.

    Checks, each failing with one UserError that names the file or the two values:
    the manifest says ``complete``; every shard exists with the recorded size and, when
    ``verify`` (default), the recorded xxh3-128 checksum (computed once here, not per
    worker: ~10 GB/s plus disk reads; pass ``verify=False`` for a very large cache -- the
    fletcher32 checksum of every chunk is still verified whenever it is read); the shards
    cover all sequences; and the fingerprints match ``expect`` (see :func:`check_expect`).
    """
    path = Path(path)
    manifest = load_manifest(path)
    if not manifest.get("complete"):
        raise UserError(
            f"cache {path} is incomplete (its generation was interrupted or is still running); "
            f"rerun the same `moedistill cache` command to finish it"
        )
    verify_shards(path, manifest, checksums=verify)
    check_expect(path, manifest, expect)
    return TeacherCache(path, manifest)


# --------------------------------------------------------------------------- inspect


def cache_bytes(path: Path, manifest: dict) -> int:
    return sum(int(s["bytes"]) for s in manifest.get("shards", []))


def verify_contents(ds: TeacherCache, block: int = 64) -> int:
    """Decode every row; check ids, ordering, finiteness and counts. Returns rows checked."""
    n = len(ds)
    tol = 1e-6
    for start in range(0, n, block):
        j = bisect.bisect_right(ds._starts, start) - 1
        stop = min(start + block, n, ds._starts[j + 1] if j + 1 < len(ds._starts) else n)
        r = ds.read_rows(start, stop)
        where = f"cache shard {ds._files[j]} rows {start - ds._starts[j]}..{stop - ds._starts[j]}"
        ids, lp = r["target_ids"], r["target_logprobs"]
        valid = ids >= 0
        problems = []
        if (r["input_ids"] < 0).any() or (r["input_ids"] >= ds.vocab_size).any():
            problems.append("input ids outside the vocabulary")
        if (ids >= ds.vocab_size).any():
            problems.append("target ids outside the vocabulary")
        if np.isnan(lp).any() or np.isinf(lp[valid]).any():
            problems.append("NaN/inf log-probs")
        if (lp[valid] > tol).any():
            problems.append("log-probs above 0")
        lpv = np.where(valid, lp, -1e30)  # padding sorts last without -inf - -inf = NaN
        if (np.diff(lpv, axis=-1) > tol).any():
            problems.append("targets not sorted by log-prob")
        if ds.mode == "topk" and not valid.all():
            problems.append("padding in top-k mode")
        if ds.mode == "sample":
            c = r["target_counts"]
            if (c.sum(-1) != ds.num_samples).any():
                problems.append(f"counts that do not sum to num_samples={ds.num_samples}")
            if not (valid[..., :1]).all():
                problems.append("positions without any target")
        if problems:
            raise UserError(f"{where}: {', '.join(problems)}; the cache is corrupted, regenerate it")
    return n


def inspect_cache(path, verify: bool = False) -> dict:
    """Print a summary of the cache at ``path``; with ``verify`` check checksums and every row.

    Returns the summary as a dict (also for partial caches, which are reported as such).
    """
    path = Path(path)
    m = load_manifest(path)
    n, L = int(m["num_sequences"]), int(m["seq_len"])
    tokens = n * L
    complete = bool(m.get("complete"))
    size = cache_bytes(path, m)
    stats = m.get("stats") or {}
    fp = m["fingerprints"]
    enc = m["encoding"]
    summary = {
        "path": str(path),
        "complete": complete,
        "format_version": m["format_version"],
        "mode": m["mode"],
        "k": m.get("k"),
        "top_k": m.get("top_k"),
        "num_samples": m.get("num_samples"),
        "vocab_size": m["vocab_size"],
        "seq_len": L,
        "sequences": n,
        "tokens": tokens,
        "shards": len(m.get("shards", [])),
        "bytes": size,
        "bytes_per_token": size / tokens if complete and tokens else None,
        "mean_mass": stats.get("mean_mass"),
        "mean_entropy": stats.get("mean_entropy"),
        "mean_distinct": stats.get("mean_distinct"),
        "teacher": fp["teacher"],
        "source": m.get("source"),
    }
    lines = [("cache", str(path))]
    if complete:
        lines.append(("status", f"complete (format {m['format_version']})"))
    else:
        parts = list((path / PARTS_DIR).glob("part-*.h5")) if (path / PARTS_DIR).is_dir() else []
        done = sum(b - a for a, b in filter(None, (parse_part_name(p.name) for p in parts)))
        shards_done = sorted(path.glob("shard-*.json"))
        for s in shards_done:
            info = read_json(s)
            done += int(info["rows"])
        summary["sequences_done"] = done
        lines.append(("status", f"INCOMPLETE: {done}/{n} sequences generated; rerun the same `moedistill cache` command to resume"))
    if m["mode"] == "topk":
        lines.append(("mode", f"topk (k={m['top_k']})"))
    else:
        md = stats.get("mean_distinct")
        extra = f", {md:.1f} distinct ids per position on average, at most {m.get('k')}" if md is not None and complete else ""
        lines.append(("mode", f"sample (N={m['num_samples']} draws{extra})"))
    lines += [
        ("teacher", f"{fp['teacher'].get('name')} (config {fp['teacher'].get('config_hash', '')[:12]})"),
        ("data", f"{m.get('source')} (stream {fp['data'][:12]}, tokenizer {fp['tokenizer'][:12]})"),
        ("vocabulary", f"{m['vocab_size']:,}"),
        ("sequences", f"{n:,} x {L} = {tokens:,} tokens"),
    ]
    if complete:
        lines += [
            ("shards", f"{len(m['shards'])} ({size / 2**20:.2f} MiB)"),
            ("bytes/token", f"{size / tokens:.1f}"),
            ("mass", f"{stats['mean_mass']:.4f} mean teacher probability covered by the stored ids"),
            ("entropy", f"{stats['mean_entropy']:.4f} nats mean teacher entropy (full vocabulary)"),
        ]
    steps = enc["logprob_steps"]
    lines.append((
        "encoding",
        f"rank-major; ids uint32 byte-shuffle, log-probs uint16 deltas (steps {_frac(min(steps))}.."
        f"{_frac(max(steps))} nat) bit-shuffle; {enc['codec']}({enc['level']}) + fletcher32",
    ))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{width}}  {v}")
    if verify:
        if not complete:
            raise UserError(f"cache {path} is incomplete; finish it (rerun `moedistill cache`) before verifying")
        t = time.time()
        ds = open_cache(path, verify=True)  # sizes, checksums, HDF5 headers
        rows = verify_contents(ds)
        ds.close()
        print(f"{'verify':<{width}}  OK: checksums match, {rows:,} rows decode, no NaN/inf ({time.time() - t:.1f} s)")
        summary["verified"] = True
    return summary


def _frac(x: float) -> str:
    return f"1/{round(1 / x)}" if x < 1 else f"{x:g}"
