"""The cache on disk: file names, datasets, statistics and the manifest.

A cache is a directory (docs/CACHE_FORMAT.md)::

    manifest.json          what it holds, fingerprints, per-shard range/rows/bytes/checksum,
                           "complete": true only once every shard is closed and verified
    shard-00000.h5         one per writer process (rank), a contiguous range of sequences
    parts/                 only while generating: one small HDF5 file per finished batch

Inside a shard (and a part) with n rows, seq_len L and width W (the per-position target
axis on disk: the manifest's ``width``), top-k mode (and sample mode of format version 1)::

    input_ids      uint32 [n, L]
    target_ids     uint32 [n, W, L]       rank-major: [i, j, t] is rank j at position t
    target_deltas  uint16 [n, W, L]       log-probs, see moedistill.cache.encode
    target_counts  uint8|uint16 [n, W, L] (sample mode, version 1)

sample mode (version 2, attribute ``packed``: only the valid entries, ``encode.pack``)::

    input_ids       uint32 [n, L]
    target_lengths  uint8|uint16 [n, L]      distinct ids n_t at position t
    target_ids      uint32 [n, W * L]        row i: rank-major valid entries, then zeros
    target_deltas   uint16 [n, W * L]        (absent when sample_logprobs is false)
    target_counts   uint8|uint16 [n, W * L]

each chunked by row (one sequence per chunk, so a reader touches one chunk per dataset),
filtered by (byte- or bit-) shuffle + compressor + fletcher32; the encoding parameters
are shard attributes. How the files are written is in ``writer.py``, how they are read
in ``reader.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py

from moedistill.cache import encode  # also registers hdf5plugin's zstd filter with HDF5
from moedistill.errors import UserError

MANIFEST = "manifest.json"
VERIFIED = "verified.json"  # the shards' (size, mtime, checksum) when last checksummed in full (reader.py)
PARTS_DIR = "parts"
FORMAT_NAME = "moedistill-teacher-cache"
TARGET_DATASETS = ("target_lengths", *encode.TARGET_ARRAYS)

# keys of the manifest that must match for a rerun to resume (or reuse) an existing cache
IDENTITY_KEYS = (
    "format_version",
    "mode",
    "top_k",
    "num_samples",
    "sample_logprobs",
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


# --------------------------------------------------------------------------- datasets


def open_h5(path: Path, mode: str = "r") -> h5py.File:
    """A shard or part file (hdf5plugin's filters are registered: ``encode`` imports it)."""
    return h5py.File(path, mode)


def dataset_specs(attrs: dict) -> dict:
    """name -> (dtype, per-row shape) of every dataset a shard (of this version) holds. Target
    arrays are rank-major on disk, ``[width, L]`` per row, so each rank's similar values sit
    together; sample mode packs them to ``[width * L]`` (``encode.pack``)."""
    seq_len, width = int(attrs["seq_len"]), int(attrs["width"])
    if attrs["mode"] != "sample":
        return {
            "input_ids": (encode.ID_DTYPE, (seq_len,)),
            "target_ids": (encode.ID_DTYPE, (width, seq_len)),
            "target_deltas": (encode.DELTA_DTYPE, (width, seq_len)),
        }
    count = encode.count_dtype(int(attrs["num_samples"]))
    specs = {
        "input_ids": (encode.ID_DTYPE, (seq_len,)),
        "target_lengths": (count, (seq_len,)),
        "target_ids": (encode.ID_DTYPE, (width * seq_len,)),
        "target_deltas": (encode.DELTA_DTYPE, (width * seq_len,)),
        "target_counts": (count, (width * seq_len,)),
    }
    if not attrs["sample_logprobs"]:
        del specs["target_deltas"]
    return specs


def sample_logprobs(manifest: dict) -> bool | None:
    """Whether a sample cache stores log-probs (version 1 always did); None in top-k mode."""
    if manifest.get("mode") != "sample":
        return None
    return bool(manifest.get("sample_logprobs", True))


def packed(manifest: dict) -> bool:
    """Whether the target arrays are packed (sample mode from format version 2)."""
    return manifest.get("mode") == "sample" and int(manifest.get("format_version", 0)) >= 2


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
    values = {k: attrs[f"stat_{k}"] for k in STAT_KEYS}
    return {k: v.item() if hasattr(v, "item") else v for k, v in values.items()}  # numpy scalars -> Python


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


# what describes the layout on disk rather than the targets: a complete cache of an older format
# version that this moedistill reads holds the same targets, so they do not stop its reuse
_LAYOUT_ENCODING_KEYS = ("layout", "packed")


def manifest_identity(manifest: dict) -> dict:
    out = {k: manifest.get(k) for k in IDENTITY_KEYS}
    out["sample_logprobs"] = sample_logprobs(manifest)
    return out


def identity_diff(have: dict, want: dict, complete: bool = False) -> list[str]:
    """Human-readable differences between two identities (empty if they match). ``complete``:
    ``have`` is a complete cache, which is reused whatever its (readable) format version; a partial
    one is resumed only by the same version (its parts must share one layout)."""
    out = []
    for k in IDENTITY_KEYS:
        a, b = have.get(k), want.get(k)
        if complete and k == "format_version":
            continue
        if complete and k == "encoding" and isinstance(a, dict) and isinstance(b, dict):
            a, b = ({x: v for x, v in d.items() if x not in _LAYOUT_ENCODING_KEYS} for d in (a, b))
        _diff(k, a, b, out)
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


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path} is not valid JSON ({e.msg}); the cache is damaged, regenerate it with overwrite"
        ) from None


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
    _check_fields(m, manifest)
    return manifest


# the manifest entries every reader relies on, and their types (a hand-edited or cut manifest
# is refused here, in one line, instead of failing with a KeyError deep in a reader)
_FIELDS = {"mode": str, "width": int, "vocab_size": int, "seq_len": int, "num_sequences": int,
           "fingerprints": dict, "encoding": dict, "shards": list}


def _check_fields(m: Path, manifest: dict) -> None:
    fix = "the manifest was edited or damaged; regenerate the cache (cache.overwrite=true)"
    for key, tp in _FIELDS.items():
        v = manifest.get(key)
        if not isinstance(v, tp) or isinstance(v, bool):
            raise UserError(f"{m}: '{key}' is {json.dumps(v)}, not a {tp.__name__}; {fix}")
    if manifest["mode"] not in ("topk", "sample"):
        raise UserError(f"{m}: mode {manifest['mode']!r} is neither topk nor sample; {fix}")
    if not isinstance(manifest["encoding"].get("logprob_steps"), list):
        raise UserError(f"{m}: encoding.logprob_steps is missing; {fix}")
    if manifest.get("complete"):
        k, width = manifest.get("k"), manifest["width"]
        # topk: k is top_k, the stored width; sample: the most distinct ids at any position (<= width)
        want = manifest.get("top_k") if manifest["mode"] == "topk" else max(
            1, int((manifest.get("stats") or {}).get("max_distinct", k or 0)))
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= width or k != want:
            raise UserError(f"{m}: k={json.dumps(k)} does not match the stored targets (width {width}, expected "
                            f"k={want}); {fix}")
