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
  0 marks padding (id 0, delta 0 on disk; ``moedistill.targets.PAD_ID`` / ``PAD_LOGPROB``
  after decoding).

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

FORMAT_VERSION = 1
ID_DTYPE = np.uint32
DELTA_DTYPE = np.uint16
DELTA_MAX = int(np.iinfo(DELTA_DTYPE).max)

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


def encode_targets(ids, logprobs, steps, counts=None, num_samples: int | None = None) -> dict:
    """Sorted targets -> on-disk arrays ``{"target_ids", "target_deltas"[, "target_counts"]}``.

    ``ids`` int ``[..., W]``, ``logprobs`` float ``[..., W]``, ``counts`` int ``[..., W]``
    (sample mode; 0 = padding) or None (top-k mode, no padding). ``num_samples`` fixes the
    count dtype so that every part of a cache has the same layout.
    """
    valid = None if counts is None else counts != PAD_COUNT
    out = {  # padding is stored as id 0, delta 0 (and count PAD_COUNT)
        "target_ids": (ids if valid is None else np.where(valid, ids, 0)).astype(ID_DTYPE),
        "target_deltas": encode_logprobs(logprobs, steps, valid),
    }
    if counts is not None:
        out["target_counts"] = counts.astype(count_dtype(num_samples))
    return out


def decode_targets(ids: np.ndarray, deltas: np.ndarray, steps: np.ndarray, counts: np.ndarray | None = None):
    """On-disk arrays -> ``(ids int64, logprobs float32, counts float32 | None)``, padding =
    ``PAD_ID`` / ``PAD_LOGPROB`` / ``PAD_COUNT``."""
    lp = decode_logprobs(deltas, steps)
    ids64 = ids.astype(np.int64)
    if counts is None:
        return ids64, lp, None
    valid = counts != PAD_COUNT
    ids64[~valid] = PAD_ID
    lp[~valid] = PAD_LOGPROB
    return ids64, lp, counts.astype(np.float32)


def compression_kwargs(name: str, codec: str = DEFAULT_CODEC, level: int = DEFAULT_LEVEL) -> dict:
    """``h5py.create_dataset`` filter arguments for dataset ``name`` of a shard.

    Token ids (``input_ids``, ``target_ids``): byte-shuffle + compressor. Small integers
    (``target_deltas``, ``target_counts``, stored rank-major so that each rank's values sit
    together): bit-shuffle + compressor, which packs their mostly-zero high bit planes
    away (measured on the V=151,936 synthetic: 20 B/token against 26 with byte-shuffle).
    Every dataset ends with fletcher32, a per-chunk checksum HDF5 verifies on each read.
    """
    small_ints = name in ("target_deltas", "target_counts")
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
