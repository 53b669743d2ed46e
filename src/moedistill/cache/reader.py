"""The verified reader: :func:`open_cache` checks a cache and returns a :class:`TeacherCache`."""

from __future__ import annotations

import bisect
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from moedistill.cache import encode
from moedistill.cache.layout import TARGET_DATASETS, VERIFIED, load_manifest, open_h5, read_json, sample_logprobs
from moedistill.data import shifted_labels
from moedistill.errors import UserError
from moedistill.files import atomic_write_json, file_checksum
from moedistill.fingerprints import model_fingerprint, tokenizer_hash

CHECKSUM_ALGORITHMS = ("xxh3_128", "sha256")  # what a manifest's "checksum" may name (sha256: older caches)
EXPECT_KEYS = {"teacher", "tokenizer", "data", "seq_len", "mode", "vocab_size", "top_k", "num_samples"}

# --------------------------------------------------------------------------- verification

# Checksums, once. Hashing every shard at every open costs a read of the whole cache per command
# and per rank (hundreds of GB for a real corpus). A full checksum therefore runs once per cache:
# at the first open (or when the generator completes it), after which ``verified.json`` in the cache
# directory records each shard's (size, mtime_ns, checksum) as verified, and later opens, in any
# process, hash only a shard whose size or modification time differs from that record. A cache in
# a directory this process cannot write is hashed once per process (``_verified``). Corruption
# that keeps a file's size and mtime (bit rot) is still caught: every HDF5 chunk carries a
# fletcher32 checksum that is verified whenever it is read, and ``moedistill inspect --verify``
# (``recheck``) hashes every shard whatever the record says.
_verified: set[tuple] = set()  # (resolved shard path, size, mtime_ns, checksum) hashed by this process


def _stamp(f: Path, shard: dict) -> tuple:
    st = f.stat()
    return (str(f.resolve()), st.st_size, st.st_mtime_ns, shard["checksum"])


def _recorded(path: Path) -> set[tuple]:
    try:
        return {(str((path / name).resolve()), size, mtime, checksum)
                for name, size, mtime, checksum in read_json(path / VERIFIED)["shards"]}
    except (OSError, ValueError, KeyError, TypeError, UserError):  # absent or unreadable: hash again
        return set()


def _record(path: Path, stamps: list[tuple]) -> None:
    try:
        atomic_write_json(path / VERIFIED, {"shards": [[Path(f).name, size, mtime, checksum]
                                                      for f, size, mtime, checksum in stamps]})
    except (OSError, UserError):  # read-only or full: this process remembers, the next one hashes again
        pass



def checksum_matches(path: Path, expected: str) -> bool:
    algo = expected.split(":", 1)[0]
    if algo not in CHECKSUM_ALGORITHMS:
        raise UserError(f"unknown checksum algorithm {algo!r} in the manifest of {path.parent}")
    return file_checksum(path, algo) == expected


def verify_shards(path: Path, manifest: dict, checksums: bool = True, recheck: bool = False) -> None:
    """Check that the listed shards exist, have the recorded size (and checksum), open as
    HDF5, and together cover sequences ``0..num_sequences`` in order. Raises UserError
    naming the file at fault. ``checksums``: hash the shards not yet verified unchanged (see
    ``_verified``); ``recheck``: hash every shard."""
    path = Path(path)
    fix = "regenerate the cache (moedistill cache cache.overwrite=true, or --overwrite)"
    expected_start = 0
    known = set() if recheck else _verified | _recorded(path)
    stamps, hashed = [], False
    for s in manifest["shards"]:
        f = path / s["file"]
        if not f.is_file():
            raise UserError(f"cache shard {f} is missing; {fix}")
        size = f.stat().st_size
        if size != int(s["bytes"]):
            raise UserError(
                f"cache shard {f} is truncated or altered: {size} bytes, the manifest says {s['bytes']}; {fix}"
            )
        if checksums:
            stamps.append(_stamp(f, s))
            if stamps[-1] not in known:
                if not checksum_matches(f, s["checksum"]):
                    raise UserError(f"cache shard {f} is corrupted (checksum differs from the manifest); {fix}")
                hashed = True
        try:
            with open_h5(f, "r") as h:
                rows = int(h["input_ids"].shape[0])
                start = int(h.attrs["seq_start"])
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"cache shard {f} cannot be read as HDF5 ({str(e).splitlines()[0]}); {fix}") from None
        if rows != int(s["rows"]) or start != int(s["seq_start"]) or start != expected_start:
            raise UserError(f"cache shard {f} holds rows {start}..{start + rows}, the manifest disagrees; {fix}")
        expected_start = start + rows
    if expected_start != int(manifest["num_sequences"]):
        raise UserError(f"cache {path} shards cover {expected_start} of {manifest['num_sequences']} sequences; {fix}")
    if hashed:
        _verified.update(stamps)
        _record(path, stamps)


def _fingerprint_of(key: str, value):
    """Normalise an ``expect`` value (a string, or an object we can fingerprint)."""
    if isinstance(value, str):
        return value
    if key == "tokenizer":
        return tokenizer_hash(value)
    if key == "data":
        return value.stream_hash  # PackedData
    if key == "teacher":
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
    for key, want in expect.items():
        if key not in EXPECT_KEYS:
            raise ValueError(f"open_cache: unknown expect key {key!r} (known: {', '.join(sorted(EXPECT_KEYS))})")
        if want is None:
            continue
        want = _fingerprint_of(key, want)
        if not _matches(manifest, key, want):
            raise UserError(
                f"cache {path} does not match: {key} is {_shown(manifest, key)} in the cache but {want} was expected; "
                f"regenerate the cache for this {key} or point at the right cache"
            )


def _matches(manifest: dict, key: str, want) -> bool:
    fp = manifest["fingerprints"]
    if key == "teacher":
        return want in (fp["teacher"].get("name"), fp["teacher"].get("config_hash"))
    if key in ("tokenizer", "data"):
        return want == fp[key]
    return (int(want) if key != "mode" else want) == manifest.get(key)


def _shown(manifest: dict, key: str):
    """What the cache holds for ``key``, as an error message shows it."""
    fp = manifest["fingerprints"]
    if key == "teacher":
        return f"{fp['teacher'].get('name')} (config {fp['teacher'].get('config_hash', '')[:12]})"
    if key in ("tokenizer", "data"):
        return fp[key]
    return manifest.get(key)


# --------------------------------------------------------------------------- reader


class TeacherCache(Dataset):
    """A complete, verified cache as a map-style torch Dataset (see :func:`open_cache`).

    Items (torch tensors; L = seq_len, W = ``self.width``):
      ``input_ids`` int64 [L], ``labels`` int64 [L] (shifted: labels[t] = input_ids[t+1], last -100),
      ``target_ids`` int64 [L, W], ``target_logprobs`` float32 [L, W] (log-softmax at T=1 over
      the full vocabulary, sorted descending; padding -1 / -inf), and in sample mode
      ``target_counts`` float32 [L, W] (draws, summing to num_samples; 0 for padding). A sample
      cache without log-probs (``sample_logprobs`` false) gives ``log(counts / num_samples)``
      as ``target_logprobs``, its entries ordered by count.

    ``width`` is the manifest's ``k``: the stored width (manifest ``width``), which in
    sample mode is cut to the most distinct ids at any position. ``k`` is the same number.

    HDF5 files are opened lazily and kept per process id, so a DataLoader's forked (or
    spawned) workers each open their own handles.
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.mode = manifest["mode"]
        self.vocab_size = int(manifest["vocab_size"])
        self.seq_len = int(manifest["seq_len"])
        self.width = int(manifest["k"])
        self.num_samples = manifest.get("num_samples")
        self.sample_logprobs = sample_logprobs(manifest)  # None in top-k mode
        self.steps = np.asarray(manifest["encoding"]["logprob_steps"], dtype=np.float64)
        self._files = [self.path / s["file"] for s in manifest["shards"]]
        self._starts = [int(s["seq_start"]) for s in manifest["shards"]]
        self._n = int(manifest["num_sequences"])
        self._pid = None
        self._handles: dict = {}
        self._datasets: dict = {}

    @property
    def k(self) -> int:
        """Entries per position of an item (the manifest's name for :attr:`width`)."""
        return self.width

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
            try:
                h = open_h5(self._files[j], "r")
                dsets = {name: h[name] for name in ("input_ids", *TARGET_DATASETS) if name in h}
            except (OSError, KeyError) as e:
                raise UserError(
                    f"cache shard {self._files[j]} cannot be opened ({str(e).splitlines()[0]}); regenerate the cache"
                ) from None
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
        width = self.width  # disk: rank-major [rows, stored width, L] or packed -> [rows, L, width]
        t = encode.from_disk(raw, width)
        ids, lp, counts = encode.decode_targets(
            t["target_ids"], t.get("target_deltas"), self.steps[:width], t.get("target_counts"), self.num_samples
        )
        out = {"input_ids": raw["input_ids"].astype(np.int64), "target_ids": ids, "target_logprobs": lp}
        if counts is not None:
            out["target_counts"] = counts
        return out

    def __getitem__(self, i: int) -> dict:
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


def open_cache(path, expect: dict | None = None, verify: bool | str = True) -> TeacherCache:
    """Open a complete teacher cache as a torch Dataset, after checking it.

    Checks, each failing with one UserError that names the file or the two values:
    the manifest says ``complete``; every shard exists with the recorded size and, when
    ``verify`` (default), the recorded xxh3-128 checksum (computed here, not per worker, and
    only for shards not verified unchanged before -- see ``_verified``: the first open hashes
    the cache, later ones compare sizes and modification times; ``verify="full"`` hashes every
    shard; ``verify=False`` none -- the fletcher32 checksum of every chunk is still verified
    whenever it is read); the shards
    cover all sequences; and the fingerprints match ``expect`` (see :func:`check_expect`).
    """
    path = Path(path)
    manifest = load_manifest(path)
    if not manifest.get("complete"):
        raise UserError(
            f"cache {path} is incomplete (its generation was interrupted or is still running); "
            f"rerun the same `moedistill cache` command to finish it"
        )
    verify_shards(path, manifest, checksums=bool(verify), recheck=verify == "full")
    check_expect(path, manifest, expect)
    return TeacherCache(path, manifest)
