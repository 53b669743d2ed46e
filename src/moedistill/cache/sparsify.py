"""The per-batch target math: teacher logits -> the sparse targets a cache stores.

Per position: the log-softmax at T=1 over the full vocabulary, then either the ``width``
most probable ids (top-k mode) or the distinct ids of ``width`` draws with their counts
(sample mode), sorted by log-prob descending, and the statistics (entropy, covered
mass, distinct ids). Pure torch, on the logits' device; no files, no processes.
"""

from __future__ import annotations

import time

import torch

from moedistill.errors import UserError
from moedistill.targets import PAD_COUNT, PAD_ID, PAD_LOGPROB

# float32 elements of one [rows, V] chunk of logits processed at once: bounds the memory
# of the softmax/top-k/sampling step whatever B, L and V are (256 MiB on a GPU), and on a
# CPU keeps a chunk in cache (2 MiB) so that the passes over it do not go to memory.
CHUNK_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 19}


@torch.inference_mode()
def batch_targets(
    teacher, input_ids: torch.Tensor, *, mode: str, width: int, seed: int = 0, first_index: int = 0,
    timing: dict | None = None,
) -> dict:
    """One teacher forward and its sparse targets, computed on the teacher's device.

    Args:
        input_ids: int64 ``[B, L]`` on the teacher's input device.
        mode: ``"topk"`` (``width`` = k) or ``"sample"`` (``width`` = N draws).
        first_index: global index of row 0 (seeds the per-sequence sampling generator).
        timing: if given, ``timing["forward_s"]`` and ``timing["targets_s"]`` are increased
            by the seconds of the forward and of the rest.
    Returns (numpy, CPU):
        ``ids`` int64 ``[B, L, width]``, ``logprobs`` float32 ``[B, L, width]`` sorted descending
        (log-softmax at T=1 over the full vocabulary), ``counts`` int64 ``[B, L, width]`` or
        None, and ``stats`` (sums of entropy / covered mass / distinct ids over positions).
    Raises UserError when the teacher's logits hold NaN or +inf.
    """
    t0 = time.perf_counter()
    logits = teacher(input_ids=input_ids, use_cache=False).logits  # [B, L, V]
    if timing is not None:
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)
        t1 = time.perf_counter()
        timing["forward_s"] = timing.get("forward_s", 0.0) + t1 - t0
    out = sparse_targets(logits, mode=mode, width=width, seed=seed, first_index=first_index)
    if timing is not None:
        timing["targets_s"] = timing.get("targets_s", 0.0) + time.perf_counter() - t1
    return out


def sparse_targets(logits: torch.Tensor, *, mode: str, width: int, seed: int = 0, first_index: int = 0) -> dict:
    """Sparse targets of teacher ``logits`` ``[B, L, V]`` (any float dtype, any device); see
    :func:`batch_targets` for the arguments and the result."""
    B, L, V = logits.shape
    dev = logits.device
    rows = max(1, CHUNK_ELEMENTS["cuda" if dev.type == "cuda" else "cpu"] // V)
    ids = torch.empty(B, L, width, dtype=torch.int64, device=dev)
    lps = torch.empty(B, L, width, dtype=torch.float32, device=dev)
    counts = torch.empty(B, L, width, dtype=torch.int64, device=dev) if mode == "sample" else None
    lse = torch.empty(B, L, dtype=torch.float32, device=dev)
    ent = torch.empty(B, L, dtype=torch.float32, device=dev)
    if mode == "topk":
        _topk_targets(logits, width, rows, ids, lps, lse, ent)
    else:
        _sampled_targets(logits, width, rows, seed, first_index, ids, lps, counts, lse, ent)
    if not torch.isfinite(lse).all():
        _raise_bad_logits(first_index, B)
    return {
        "ids": ids.cpu().numpy(),
        "logprobs": lps.cpu().numpy(),
        "counts": counts.cpu().numpy() if counts is not None else None,
        "stats": _stats(lps, counts, ent, width),
    }


def _topk_targets(logits, width, rows, ids, lps, lse_out, ent_out) -> None:
    """Top-``width`` ids and log-probs of every position, ``rows`` positions at a time, into the outputs."""
    B, L, V = logits.shape
    flat = logits.reshape(B * L, V)
    for r0 in range(0, B * L, rows):
        z = flat[r0 : r0 + rows].float()
        vals, idx = torch.topk(z, width, dim=-1, sorted=True)
        p = torch.softmax(z, -1)
        lse, ent = _lse_entropy(z, p, vals[:, 0], idx[:, 0])
        ids.view(B * L, width)[r0 : r0 + rows] = idx
        lps.view(B * L, width)[r0 : r0 + rows] = vals - lse[:, None]
        lse_out.view(-1)[r0 : r0 + rows] = lse
        ent_out.view(-1)[r0 : r0 + rows] = ent


def _sampled_targets(logits, width, rows, seed, first_index, ids, lps, counts, lse_out, ent_out) -> None:
    """``width`` draws at every position (one generator per sequence), as distinct ids and counts, into the outputs."""
    B, L, _ = logits.shape
    for b in range(B):
        gen = torch.Generator(device=logits.device)
        gen.manual_seed(sequence_seed(seed, first_index + b))
        for t0 in range(0, L, rows):
            z = logits[b, t0 : t0 + rows].float()
            top, arg = z.max(-1)
            p = torch.softmax(z, -1)
            lse, ent = _lse_entropy(z, p, top, arg)
            # torch.multinomial rejects NaN/inf/negative rows: check before it sees them
            if not torch.isfinite(lse).all():
                _raise_bad_logits(first_index, B)
            u, c, lp = _distinct_draws(z, p, lse, width, gen)
            ids[b, t0 : t0 + rows], counts[b, t0 : t0 + rows], lps[b, t0 : t0 + rows] = u, c, lp
            lse_out[b, t0 : t0 + rows] = lse
            ent_out[b, t0 : t0 + rows] = ent


def _stats(lps, counts, ent, width: int) -> dict:
    """Sums over the batch's positions of the entropy, the probability the stored ids cover and their number."""
    B, L = ent.shape
    valid = counts != PAD_COUNT if counts is not None else None
    mass = torch.where(valid, lps.exp(), 0.0).sum(-1) if valid is not None else lps.exp().sum(-1)
    distinct = valid.sum(-1) if valid is not None else torch.full((B, L), width, device=ent.device)
    return {
        "positions": B * L,
        "entropy_sum": float(ent.double().sum()),
        "mass_sum": float(mass.double().sum()),
        "distinct_sum": int(distinct.sum()),
        "distinct_max": int(distinct.max()),
    }


def _lse_entropy(z, p, top, arg):
    """Log-normaliser and entropy of rows of logits ``z`` [R, V] from their softmax ``p``.

    ``lse = z_max - log p_max`` reuses the softmax instead of a separate logsumexp pass
    (exact to float32 rounding: p_max >= 1/V never underflows), and ``H = lse - <p, z>``
    is one batched dot product. On a CPU, where these passes over [R, V] cost as much as
    the tiny teacher's forward, this halves the post-processing time.
    """
    lse = top - p.gather(1, arg[:, None]).squeeze(1).log()
    ent = lse - torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(-1)
    return lse, ent


def _raise_bad_logits(first_index: int, B: int):
    raise UserError(
        f"the teacher produced NaN/inf logits in the batch of sequences {first_index}..{first_index + B - 1}; "
        f"check its weights and dtype (float16 overflows: use bfloat16 or float32)"
    )


def sequence_seed(seed: int, index: int) -> int:
    """Seed of the sampling generator of global sequence ``index`` (splitmix64-style mix)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) % (1 << 64)
    x ^= x >> 32
    return x % (1 << 63)


def _distinct_draws(z, p, lse, width, gen):
    """``width`` draws per row of ``p`` [T, V] -> distinct ids, counts and log-probs [T, width],
    sorted by log-prob descending (ties: smaller id first), padding (PAD_ID, PAD_COUNT,
    PAD_LOGPROB) at the end."""
    draws = torch.multinomial(p, width, replacement=True, generator=gen)  # [T, width]
    s, _ = draws.sort(-1)
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    group = first.long().cumsum(-1) - 1  # index of each draw's distinct id
    counts = torch.full_like(s, PAD_COUNT).scatter_add_(1, group, torch.ones_like(s))
    uniq = torch.full_like(s, PAD_ID).scatter_(1, group, s)
    valid = counts != PAD_COUNT
    lp = torch.where(valid, z.gather(1, uniq.clamp(min=0)) - lse[:, None], PAD_LOGPROB)
    order = torch.sort(lp, dim=-1, descending=True, stable=True).indices
    return uniq.gather(1, order), counts.gather(1, order), lp.gather(1, order)
