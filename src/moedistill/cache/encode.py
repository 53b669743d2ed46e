"""How sparse teacher targets become small integer arrays, and back.

The one place that knows the cache's encoding; docs/CACHE_FORMAT.md describes the same
thing for readers that do not use this package.

Per position the cache stores W (``width``) entries sorted by teacher log-probability, descending
(top-k mode: the k most probable ids; sample mode: the distinct ids of N draws, padded
at the end). Three integer arrays of shape ``[..., W]``:

- ``ids``: token ids as ``uint32``. Stored with HDF5's byte-shuffle filter before the
  compressor, so the always-zero high bytes of ids < 2^24 cost almost nothing and the
  skewed second byte (frequent tokens have small ids in BPE vocabularies) is entropy-coded.
- ``logprob_deltas``: the log-probabilities, quantised and delta-coded along the sorted
  axis. With ``x_j = -logprob_j`` (non-decreasing in j) and a per-rank step ``s_j``::

      r_{-1} = 0;  d_j = round((x_j - r_{j-1}) / s_j);  r_j = r_{j-1} + d_j * s_j

  so ``d_j >= 0`` and decoding is ``logprob = -cumsum(d * s)``. Closed-loop rounding keeps
  every error within ``s_j / 2`` (no drift along j). The steps are powers of two, finest
  for the head that carries the probability mass and coarser for the tail whose error
  hardly moves the KL (1/256 nat for ranks 0-1, doubling at ranks 2, 4, 8, 16, 32,
  at most 1/8 nat). Why not one step: the error a quantised value adds to the
  distillation KL is about ``q_j * eps_j * log(q_j / p_j)`` -- proportional to the
  entry's probability -- so bits are best spent on the head.
- ``counts`` (sample mode only): draws per id, ``uint8`` when N < 256 else ``uint16``;
  0 marks padding (``moedistill.targets.PAD_ID`` / ``PAD_LOGPROB`` after decoding).

Sample mode stores only the valid entries (format version 2; :func:`pack` / :func:`unpack`).
A position holds n_t <= W distinct ids, valid entries first, so in the rank-major ``[W, L]``
array of a row the valid entries are exactly ``j < n_t``. The shard keeps ``lengths`` n_t
``[rows, L]`` and each target array as ``[rows, W * L]``: the row's valid entries in
rank-major order (``a[valid]`` in numpy), then zeros. A run of zeros at the end of a chunk
costs the compressor a few bytes, where padding scattered among the values (version 1:
38 of 64 entries a position on the tiny teacher) cost a fifth of the cache; one chunk per
row is kept, so parts still merge by copying compressed chunks. With
``sample_logprobs=False`` only ids and counts are stored, the entries ordered by count
(descending; ties keep the log-prob order) and the reader returns ``log(count / N)``.

All functions here but :func:`to_dense` (torch) are pure numpy; the writer and the reader
call them.
"""

from __future__ import annotations

import numpy as np
import torch

try:  # registers the zstd and bitshuffle filters with HDF5 (needed to read as well as to write)
    import hdf5plugin
except ImportError:  # only gzip caches can then be written and read
    hdf5plugin = None

from moedistill.errors import UserError
from moedistill.targets import PAD_COUNT, PAD_ID, PAD_LOGPROB

FORMAT_VERSION = 2  # 2: sample mode stores only the valid entries (pack); 1 is still read
ID_DTYPE = np.uint32
DELTA_DTYPE = np.uint16
DELTA_MAX = int(np.iinfo(DELTA_DTYPE).max)
TARGET_ARRAYS = ("target_ids", "target_deltas", "target_counts")  # per entry; target_lengths is per position

# Compressor (hdf5plugin's Zstandard), see compression_kwargs. zstd and gzip gave the same
# size on our data (benchmarks/bench_cache.py prints both); zstd writes 3-5x faster.
DEFAULT_CODEC = "zstd"
DEFAULT_LEVEL = 5

_FINEST_STEP_LOG2 = -8  # 1/256 nat for ranks 0-1
_COARSEST_STEP_LOG2 = -3  # 1/8 nat from rank 32 on


def logprob_steps(width: int) -> np.ndarray:
    """Quantisation step (nats) for each rank ``0..width-1``: float64 ``[width]``.

    Rank j gets ``2 ** clip(-8 + bit_length(j // 2), -8, -3)``: 1/256 for ranks 0-1,
    1/128 for 2-3, 1/64 for 4-7, 1/32 for 8-15, 1/16 for 16-31, 1/8 from 32 on.
    Non-decreasing in j, which keeps the deltas non-negative.
    """
    exps = [min(_FINEST_STEP_LOG2 + int(j // 2).bit_length(), _COARSEST_STEP_LOG2) for j in range(width)]
    return np.ldexp(1.0, np.asarray(exps, dtype=np.int64)).astype(np.float64)


def encode_logprobs(logprobs: np.ndarray, steps: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Quantise sorted log-probs to non-negative deltas.

    Args:
        logprobs: float ``[..., W]``, non-increasing along the last axis over the valid
            entries (valid entries first). ``-inf`` is allowed and stored as the floor.
        steps: float64 ``[W]`` from :func:`logprob_steps` (non-decreasing).
        valid: bool ``[..., W]`` or None (all valid). Invalid entries get delta 0.
    Returns:
        ``uint16 [..., W]`` deltas; ``decode_logprobs`` inverts within ``steps / 2``.
    """
    x = -np.asarray(logprobs, dtype=np.float64)
    if valid is not None:
        x = np.where(valid, x, 0.0)
    x = np.nan_to_num(x, nan=np.inf, posinf=np.inf)  # callers reject NaN before this; inf -> floor
    out = np.zeros(x.shape, dtype=DELTA_DTYPE)
    recon = np.zeros(x.shape[:-1], dtype=np.float64)
    for j in range(x.shape[-1]):
        d = np.clip(np.rint((x[..., j] - recon) / steps[j]), 0, DELTA_MAX)
        if valid is not None:
            d = np.where(valid[..., j], d, 0)
        out[..., j] = d
        recon = recon + d * steps[j]
    return out


def decode_logprobs(deltas: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """``uint16 [..., W]`` deltas -> float32 log-probs ``[..., W]`` (``-cumsum(d * s)``).

    Exact in float32: every term is an integer multiple of a power of two and the sum
    stays below 2^24 finest steps.
    """
    return -np.cumsum(deltas.astype(np.float32) * steps.astype(np.float32), axis=-1)


def tolerance(steps: np.ndarray) -> np.ndarray:
    """Largest absolute error of a decoded log-prob at each rank (nats): ``steps / 2``."""
    return np.asarray(steps, dtype=np.float64) / 2


def count_dtype(num_samples: int):
    return np.uint8 if num_samples <= np.iinfo(np.uint8).max else np.uint16


def encode_targets(ids, logprobs, steps, counts=None, num_samples: int | None = None,
                   with_logprobs: bool = True) -> dict:
    """Sorted targets -> ``{"target_ids", "target_deltas"[, "target_counts"]}`` integer arrays,
    ``[..., W]`` like the inputs (:func:`to_disk` gives the on-disk layout).

    ``ids`` int ``[..., W]``, ``logprobs`` float ``[..., W]``, ``counts`` int ``[..., W]``
    (sample mode; 0 = padding) or None (top-k mode, no padding). ``num_samples`` fixes the
    count dtype so that every part of a cache has the same layout. ``with_logprobs=False``
    (sample mode): no deltas, and the entries are reordered by count, descending.
    """
    valid = None if counts is None else counts != PAD_COUNT
    ids = ids if valid is None else np.where(valid, ids, 0)  # padding is stored as id 0 (and count 0)
    if not with_logprobs:
        if counts is None:
            raise ValueError("with_logprobs=False needs counts (sample mode)")
        order = np.argsort(-counts.astype(np.int64), axis=-1, kind="stable")  # padding (count 0) stays last
        return {"target_ids": np.take_along_axis(ids, order, -1).astype(ID_DTYPE),
                "target_counts": np.take_along_axis(counts, order, -1).astype(count_dtype(num_samples))}
    out = {"target_ids": ids.astype(ID_DTYPE), "target_deltas": encode_logprobs(logprobs, steps, valid)}
    if counts is not None:
        out["target_counts"] = counts.astype(count_dtype(num_samples))
    return out


def decode_targets(ids: np.ndarray, deltas: np.ndarray | None, steps: np.ndarray, counts: np.ndarray | None = None,
                   num_samples: int | None = None):
    """Arrays of :func:`encode_targets` -> ``(ids int64, logprobs float32, counts float32 | None)``,
    padding = ``PAD_ID`` / ``PAD_LOGPROB`` / ``PAD_COUNT``. ``deltas`` None (a cache without
    log-probs): the log-probs are ``log(counts / num_samples)``, the draws' own estimate."""
    ids64 = ids.astype(np.int64)
    if deltas is None:
        with np.errstate(divide="ignore"):
            lp = np.log(counts.astype(np.float64) / float(num_samples)).astype(np.float32)
    else:
        lp = decode_logprobs(deltas, steps)
    if counts is None:
        return ids64, lp, None
    valid = counts != PAD_COUNT
    ids64[~valid] = PAD_ID
    lp[~valid] = PAD_LOGPROB
    return ids64, lp, counts.astype(np.float32)


def to_disk(arrays: dict, packed: bool) -> dict:
    """:func:`encode_targets`' ``[n, L, W]`` arrays -> the shard's datasets: rank-major
    ``[n, W, L]``, or with ``packed`` (sample mode, version 2) ``target_lengths [n, L]`` and
    each target array :func:`pack`'ed to ``[n, W * L]``. Other entries pass unchanged."""
    out = dict(arrays)
    names = [k for k in TARGET_ARRAYS if k in arrays]
    for k in names:
        out[k] = np.ascontiguousarray(np.swapaxes(arrays[k], 1, 2))
    if packed:
        counts = arrays["target_counts"]
        lengths = (counts != PAD_COUNT).sum(-1).astype(counts.dtype)  # valid entries come first
        out["target_lengths"] = lengths
        for k in names:
            out[k] = pack(out[k], lengths)
    return out


def from_disk(raw: dict, width: int) -> dict:
    """The shard's target datasets of some rows -> ``[n, L, width]`` arrays of
    :func:`encode_targets` (the first ``width`` ranks), for either layout."""
    lengths = raw.get("target_lengths")
    out = {}
    for k in TARGET_ARRAYS:
        if k in raw:
            a = raw[k][:, :width] if lengths is None else unpack(raw[k], lengths, width)
            out[k] = np.swapaxes(a, 1, 2)
    return out


def pack(a: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Rank-major ``[n, W, L]`` -> ``[n, W * L]``: per row the entries ``j < lengths[t]``
    (``a[i][valid]``, rank-major order), then zeros."""
    n, W, L = a.shape
    valid = (np.arange(W)[:, None] < lengths[:, None, :]).reshape(n, W * L)
    out = np.zeros((n, W * L), dtype=a.dtype)
    out[np.arange(W * L) < valid.sum(1, keepdims=True)] = a.reshape(n, W * L)[valid]
    return out


def unpack(packed: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """Inverse of :func:`pack` for the first ``width`` ranks (``lengths <= width``): ``[n, width, L]``,
    zeros after each position's entries."""
    n, L = lengths.shape
    valid = np.arange(width)[:, None] < lengths[:, None, :]  # [n, width, L]
    out = np.zeros((n, width, L), dtype=packed.dtype)
    out[valid] = packed[np.arange(packed.shape[1]) < valid.sum((1, 2))[:, None]]
    return out


def compression_kwargs(name: str, codec: str = DEFAULT_CODEC, level: int = DEFAULT_LEVEL) -> dict:
    """``h5py.create_dataset`` filter arguments for dataset ``name`` of a shard.

    Token ids (``input_ids``, ``target_ids``): byte-shuffle + compressor. Small integers
    (``target_deltas``, ``target_counts``, ``target_lengths``, stored rank-major so that each rank's values sit
    together): bit-shuffle + compressor, which packs their mostly-zero high bit planes
    away (measured on the V=151,936 synthetic: 20 B/token against 26 with byte-shuffle).
    Every dataset ends with fletcher32, a per-chunk checksum HDF5 verifies on each read.
    """
    small_ints = name in ("target_deltas", "target_counts", "target_lengths")
    if codec == "zstd":
        if hdf5plugin is None:
            raise UserError("the zstd cache codec needs the hdf5plugin package (pip install hdf5plugin); or use gzip")
        if small_ints:
            return dict(fletcher32=True, **hdf5plugin.Bitshuffle(cname="zstd", clevel=level))
        return dict(shuffle=True, fletcher32=True, **hdf5plugin.Zstd(clevel=level))
    if codec == "gzip":  # readable by any HDF5 build, ~2 % larger, several times slower to write
        return dict(shuffle=True, fletcher32=True, compression="gzip", compression_opts=level)
    raise UserError(f"unknown cache codec {codec!r}; use zstd or gzip")


def to_dense(target_ids, target_logprobs, vocab_size: int, fill: float | str = float("-inf")):
    """Rebuild full-vocabulary teacher log-probs from sparse targets (what the original
    prototype fed its loss; here for tests and inspection).

    MEMORY-HUNGRY: the result is ``[..., vocab_size]`` float32 -- for one 4096-token
    sequence of a 151,936-token vocabulary that is 2.5 GB. The loss never needs it (it
    gathers the stored ids); use this for inspection or for code that wants dense logits.

    Args:
        target_ids: int ``[..., width]`` (torch or numpy), padding = ``PAD_ID`` (any negative id).
        target_logprobs: float ``[..., width]``, padding = ``PAD_LOGPROB``.
        vocab_size: V.
        fill: value for ids that are not stored: a number (default ``-inf``, so a softmax
            over the result renormalises over the stored ids), or ``"tail"`` to spread the
            missing mass ``1 - sum(exp(logprobs))`` evenly over the ids that are not stored.
    Returns:
        torch.float32 ``[..., vocab_size]`` log-probs (logits up to a constant).
    """
    ids = torch.as_tensor(target_ids).long()
    lp = torch.as_tensor(target_logprobs).float()
    valid = ids >= 0
    if fill == "tail":
        mass = torch.where(valid, lp.exp(), torch.zeros_like(lp)).sum(-1, keepdim=True)
        n_missing = (vocab_size - valid.sum(-1, keepdim=True)).clamp(min=1)
        base = torch.log((1.0 - mass).clamp(min=1e-30) / n_missing)
    elif isinstance(fill, str):
        raise UserError(f"to_dense fill={fill!r}: use a number or 'tail'")
    else:
        base = torch.full(lp.shape[:-1] + (1,), float(fill))
    # padding goes to a spare column V that is cut off afterwards, so it never overwrites id 0
    dense = base.expand(*lp.shape[:-1], vocab_size + 1).clone()
    dense.scatter_(-1, torch.where(valid, ids, vocab_size), torch.where(valid, lp, base.expand_as(lp)))
    return dense[..., :vocab_size]
