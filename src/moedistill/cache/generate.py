"""Streaming generation of the teacher cache.

The teacher runs batch after batch under ``torch.inference_mode``; per position the
log-softmax (T=1, full vocabulary), the top-k (or the N draws) and the statistics are
computed on the teacher's device, and only the small sparse result goes to the CPU. A
background thread encodes it and writes one crash-safe part file per batch; a bounded
queue keeps memory flat and lets the teacher run while the disk works.

Batches are fixed by ``batch_size`` alone: batch b holds sequences ``[b*B, (b+1)*B)``.
Under torchrun each rank takes a contiguous run of whole batches, so every batch is
computed with the same composition whatever the number of processes, and sampling
draws from a generator seeded by ``(seed, sequence index)`` -- resumed, multi-process
and uninterrupted runs give the same cache.
"""

from __future__ import annotations

import datetime
import math
import os
import queue
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from moedistill.cache import encode
from moedistill.cache import format as fmt
from moedistill.dist import barrier, launched_rank, launched_world
from moedistill.errors import UserError

# float32 elements of one [rows, V] chunk of logits processed at once: bounds the memory
# of the softmax/top-k/sampling step whatever B, L and V are (256 MiB on a GPU), and on a
# CPU keeps a chunk in cache (2 MiB) so that the passes over it do not go to memory.
CHUNK_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 19}
QUEUE_BATCHES = 4  # finished batches waiting for the writer thread
_KILL_ENV = "MOEDISTILL_TEST_KILL_AFTER_PARTS"  # tests: SIGKILL this process after N parts are committed


# --------------------------------------------------------------------------- entry points


def cache_dir(cfg, split: str | None = None) -> Path:
    """Where the cache of ``split`` lives: ``cache.dir`` or ``<output_dir>/cache/<mode>``,
    with ``-<split>`` appended for a split other than ``data.split``."""
    base = Path(cfg.cache.dir) if cfg.cache.dir else Path(cfg.output_dir) / "cache" / cfg.cache.mode
    if split is None or split == cfg.data.split:
        return base
    return base.with_name(f"{base.name}-{split}")


def generate_from_config(cfg, split: str | None = None) -> Path:
    """Build (or resume, or reuse) the teacher cache described by ``cfg``; returns its directory.

    ``split`` defaults to ``cfg.data.split`` (with ``data.max_sequences``); another split
    (e.g. ``cfg.data.eval_split``) uses ``data.eval_max_sequences`` and its own directory.
    A complete cache with the same identity is reused without loading the teacher.
    """
    from moedistill.data import prepare
    from moedistill.models import get_model, load_tokenizer

    split = split or cfg.data.split
    max_sequences = cfg.data.max_sequences if split == cfg.data.split else cfg.data.eval_max_sequences
    out = cache_dir(cfg, split)
    tokenizer = load_tokenizer(cfg.teacher.name, cfg.teacher.trust_remote_code)
    _check_teacher_context(cfg)
    packed = prepare(
        tokenizer,
        cfg.data.dataset,
        seq_len=cfg.data.seq_len,
        dataset_config=cfg.data.dataset_config,
        split=split,
        text_field=cfg.data.text_field,
        max_samples=cfg.data.max_samples,
        max_sequences=max_sequences,
    )
    kwargs = dict(
        mode=cfg.cache.mode,
        top_k=cfg.cache.top_k,
        num_samples=cfg.cache.num_samples,
        batch_size=cfg.cache.batch_size,
        overwrite=cfg.cache.overwrite,
        teacher_name=cfg.teacher.name,
        seed=cfg.seed,
    )
    if not cfg.cache.overwrite and _reusable(out, cfg, packed, kwargs):
        return out
    teacher, _ = get_model(
        cfg.teacher.name,
        dtype=cfg.teacher.dtype,
        device_map=cfg.teacher.device_map,
        trust_remote_code=cfg.teacher.trust_remote_code,
        with_tokenizer=False,
    )
    if cfg.teacher.device_map is None:
        teacher.to(_default_device())
    return generate_cache(teacher, tokenizer, packed, out, **kwargs)


def _check_teacher_context(cfg) -> None:
    """data.seq_len within the teacher's context, from its config file (before any data or weights)."""
    from moedistill.integrity import check_context
    from moedistill.models import config_or_none

    config = config_or_none(cfg.teacher.name, cfg.teacher.trust_remote_code)
    if config is not None:
        check_context(config, cfg.data.seq_len, f"teacher {cfg.teacher.name}")


def _reusable(out: Path, cfg, packed, kwargs) -> bool:
    """True if ``out`` already holds a complete cache of exactly this configuration
    (checked from the teacher's config file, without loading its weights)."""
    if not (out / fmt.MANIFEST).is_file():
        return False
    try:
        from moedistill.models import config_or_none, model_fingerprint

        config = config_or_none(cfg.teacher.name, cfg.teacher.trust_remote_code)
        if config is None:
            return False
        stub = type("ConfigOnly", (), {"config": config})()
        manifest = fmt.load_manifest(out)
        want = _identity(
            packed, vocab_size=int(config.vocab_size), teacher_fp=model_fingerprint(stub), **_identity_kwargs(kwargs)
        )
    except Exception:  # noqa: BLE001 - any doubt: take the full path, which loads the teacher and checks properly
        return False
    if not manifest.get("complete") or fmt.identity_diff(fmt.manifest_identity(manifest), want):
        return False
    fmt.verify_shards(out, manifest, checksums=False)
    if _rank_world()[0] == 0:
        print(f"teacher cache {out} is complete; nothing to do", file=sys.stderr)
    return True


def _identity_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in ("mode", "top_k", "num_samples", "batch_size", "teacher_name", "seed")}


def generate_cache(
    teacher,
    tokenizer,
    packed,
    out_dir,
    *,
    mode: str = "topk",
    top_k: int = 64,
    num_samples: int = 64,
    batch_size: int = 8,
    overwrite: bool = False,
    teacher_name: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Run ``teacher`` over ``packed.blocks`` and write the cache to ``out_dir``.

    Args:
        teacher: a causal LM (HF ``PreTrainedModel``) already on its device(s); its
            ``logits`` ``[B, L, V]`` define the targets.
        tokenizer: the teacher's tokenizer; must be the one ``packed`` was made with.
        packed: ``moedistill.data.PackedData`` (int32 blocks ``[n, L]`` + fingerprints).
        out_dir: cache directory (created; see docs/CACHE_FORMAT.md).
        mode: ``"topk"`` (the ``top_k`` most probable ids) or ``"sample"`` (``num_samples``
            draws per position at T=1, stored as distinct ids + counts).
        batch_size: sequences per teacher forward (also the unit of resumption).
        overwrite: replace an existing cache of a different configuration.
        teacher_name: recorded in the manifest (default: the model's ``name_or_path``).
        seed: seeds the draws of sample mode (per sequence: the result does not depend
            on batch boundaries, resumption or the number of processes).
    Returns:
        ``Path(out_dir)``. Under torchrun every rank writes its shard and rank 0 the manifest.
    """
    from moedistill.data import tokenizer_hash
    from moedistill.models import model_fingerprint

    out = Path(out_dir)
    if mode not in ("topk", "sample"):
        raise UserError(f"cache mode {mode!r} must be topk or sample")
    if batch_size < 1:
        raise UserError(f"cache batch_size={batch_size} must be >= 1")
    from moedistill.integrity import check_context

    check_context(teacher.config, int(packed.seq_len), "teacher")
    V = _vocab_size(teacher)
    if mode == "topk" and not 1 <= top_k <= V:
        raise UserError(f"cache top_k={top_k} must be between 1 and the teacher's vocabulary size {V}; set cache.top_k")
    if mode == "sample" and num_samples < 1:
        raise UserError(f"cache num_samples={num_samples} must be >= 1; set cache.num_samples")
    if tokenizer is not None and tokenizer_hash(tokenizer) != packed.tokenizer_hash:
        raise UserError("the packed data was tokenised with another tokenizer than the teacher's; prepare it with the teacher's tokenizer")
    blocks = packed.blocks
    if blocks.size and (int(blocks.max()) >= V or int(blocks.min()) < 0):
        raise UserError(
            f"token id {int(blocks.max())} is outside the teacher's vocabulary of {V}; "
            f"the data was tokenised for another model"
        )
    teacher_name = teacher_name or str(getattr(teacher.config, "_name_or_path", "") or type(teacher).__name__)
    identity = _identity(
        packed, vocab_size=V, teacher_fp=model_fingerprint(teacher), mode=mode, top_k=top_k,
        num_samples=num_samples, batch_size=batch_size, teacher_name=teacher_name, seed=seed,
    )
    rank, world = _rank_world()
    n = int(blocks.shape[0])
    ranges = _rank_ranges(n, batch_size, world)

    # 1. every rank reads the existing directory and decides the same way
    state = _check_existing(out, identity, overwrite)
    if state == "complete":
        if rank == 0:
            print(f"teacher cache {out} is complete; nothing to do", file=sys.stderr)
        return out
    # 2. once every rank has read it, rank 0 prepares the directory; the others wait
    barrier()
    if rank == 0:
        _prepare_dir(out, identity, overwrite, ranges, packed)
    barrier()
    # 3. every rank generates its batches and merges them into its shard
    W = identity["width"]
    attrs = _shard_attrs(identity)
    start, end = ranges[rank]
    _generate_rank(teacher, blocks, out, attrs, rank, start, end, batch_size, mode, W, seed, progress and rank == 0)
    # 4. rank 0 verifies all shards and marks the cache complete
    barrier()
    if rank == 0:
        _finalize(out, identity, ranges, packed)
    barrier()
    return out


# --------------------------------------------------------------------------- identity and directory


def _identity(packed, *, vocab_size, teacher_fp, mode, top_k, num_samples, batch_size, teacher_name, seed) -> dict:
    width = top_k if mode == "topk" else min(num_samples, vocab_size)
    return {
        "format": fmt.FORMAT_NAME,
        "format_version": encode.FORMAT_VERSION,
        "complete": False,
        "mode": mode,
        "top_k": top_k if mode == "topk" else None,
        "num_samples": num_samples if mode == "sample" else None,
        "k": top_k if mode == "topk" else None,  # sample mode: the most distinct ids at a position, once complete
        "width": width,
        "vocab_size": int(vocab_size),
        "seq_len": int(packed.seq_len),
        "num_sequences": int(packed.blocks.shape[0]),
        "num_tokens": int(packed.blocks.size),
        "batch_size": int(batch_size),
        "seed": int(seed) if mode == "sample" else None,
        "fingerprints": {
            "teacher": {"name": str(teacher_name), "config_hash": teacher_fp},
            "tokenizer": packed.tokenizer_hash,
            "data": packed.stream_hash,
            "seq_len": int(packed.seq_len),
        },
        "encoding": {
            "layout": "target_* datasets are rank-major [rows, W, L]",
            "ids": "uint32, byte-shuffle",
            "logprobs": "uint16 deltas, bit-shuffle: logprob = -cumsum(target_deltas.T * logprob_steps, axis=-1)",
            "logprob_steps": encode.logprob_steps(width).tolist(),
            "codec": encode.DEFAULT_CODEC,
            "level": encode.DEFAULT_LEVEL,
            "shuffle": True,
            "fletcher32": True,
        },
    }


def _shard_attrs(identity: dict) -> dict:
    enc = identity["encoding"]
    return {
        "format": fmt.FORMAT_NAME,
        "format_version": identity["format_version"],
        "mode": identity["mode"],
        "width": identity["width"],
        "top_k": identity["top_k"],
        "num_samples": identity["num_samples"],
        "vocab_size": identity["vocab_size"],
        "seq_len": identity["seq_len"],
        "logprob_steps": np.asarray(enc["logprob_steps"], dtype=np.float64),
        "logprob_decode": enc["logprobs"],
        "codec": enc["codec"],
        "codec_level": enc["level"],
    }


def _check_existing(out: Path, identity: dict, overwrite: bool) -> str:
    """``"new"``, ``"resume"`` or ``"complete"``; raises UserError for a foreign or different cache."""
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise UserError(f"cache path {out} is a file; choose a directory")
    manifest_path = out / fmt.MANIFEST
    if not manifest_path.is_file():
        foreign = [p.name for p in out.iterdir() if not _is_ours(p)]
        if foreign:
            raise UserError(
                f"{out} is not empty and holds no teacher cache (found {', '.join(sorted(foreign)[:3])}); "
                f"choose an empty or new directory"
            )
        return "new"
    if overwrite:
        return "new"
    manifest = fmt.load_manifest(out)
    diff = fmt.identity_diff(fmt.manifest_identity(manifest), fmt.manifest_identity(identity))
    if diff:
        more = f" (and {len(diff) - 3} more differences)" if len(diff) > 3 else ""
        raise UserError(
            f"{out} holds a different teacher cache: {'; '.join(diff[:3])}{more}; pass --overwrite "
            f"(cache.overwrite=true) to replace it, or choose another directory"
        )
    if manifest.get("complete"):
        fmt.verify_shards(out, manifest, checksums=False)
        return "complete"
    return "resume"


def _is_ours(p: Path) -> bool:
    name = p.name
    return (
        name == fmt.PARTS_DIR
        or name.startswith(fmt.MANIFEST)
        or (name.startswith("shard-") and (".h5" in name or ".json" in name))
    )


def _prepare_dir(out: Path, identity: dict, overwrite: bool, ranges, packed) -> None:
    """Rank 0 only: clear what must go, write the (incomplete) manifest, drop stale files."""
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for p in out.iterdir():
            if _is_ours(p):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    parts = out / fmt.PARTS_DIR
    parts.mkdir(exist_ok=True)
    for p in list(out.glob("*.tmp*")) + list(parts.glob("*.tmp*")):  # left by a killed writer
        p.unlink()
    # shards of an earlier run with another number of processes cover other ranges: drop them
    for info_path in out.glob("shard-*.json"):
        info = fmt.read_json(info_path)
        r = int(info["rank"])
        if r >= len(ranges) or (int(info["seq_start"]), int(info["seq_end"])) != ranges[r]:
            (out / info["file"]).unlink(missing_ok=True)
            info_path.unlink()
    for shard in out.glob("shard-*.h5"):
        if not shard.with_suffix(".json").exists():  # merged but not recorded: rebuilt from its parts
            shard.unlink()
    if not (out / fmt.MANIFEST).is_file() or overwrite:
        manifest = dict(identity, shards=[], source=packed.source, created=_now(), world_size=len(ranges))
        fmt.atomic_write_json(out / fmt.MANIFEST, manifest)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- processes


def _rank_world() -> tuple[int, int]:
    world, rank = launched_world(), launched_rank()
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            # gloo: only barriers travel between ranks; a long timeout because ranks
            # finish their shares at slightly different times on a large dataset
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
        return dist.get_rank(), dist.get_world_size()
    return rank, world


def _rank_ranges(n: int, batch_size: int, world: int) -> list[tuple[int, int]]:
    """Contiguous sequence range of each rank, made of whole batches."""
    nb = math.ceil(n / batch_size)
    out = []
    for r in range(world):
        b0, b1 = r * nb // world, (r + 1) * nb // world
        out.append((min(b0 * batch_size, n), min(b1 * batch_size, n)))
    return out


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _vocab_size(model) -> int:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    return int(model.config.vocab_size)


def _input_device(model) -> torch.device:
    try:
        return model.get_input_embeddings().weight.device
    except Exception:  # noqa: BLE001
        return next(model.parameters()).device


# --------------------------------------------------------------------------- per rank


def _generate_rank(teacher, blocks, out, attrs, rank, start, end, batch_size, mode, W, seed, progress):
    from tqdm.auto import tqdm

    shard = out / fmt.shard_name(rank)
    info_path = out / fmt.shard_info_name(rank)
    if info_path.is_file() and shard.is_file():
        info = fmt.read_json(info_path)
        if (int(info["seq_start"]), int(info["seq_end"])) == (start, end) and shard.stat().st_size == int(info["bytes"]):
            return  # merged by an earlier run
    parts_dir = out / fmt.PARTS_DIR
    parts_dir.mkdir(exist_ok=True)
    batches = [(s, min(s + batch_size, end)) for s in range(start, end, batch_size)]
    done = {fmt.parse_part_name(p.name) for p in parts_dir.glob("part-*.h5")}
    L = int(blocks.shape[1])
    todo = [b for b in batches if b not in done]
    bar = tqdm(
        total=(end - start) * L, initial=(end - start - sum(e - s for s, e in todo)) * L, unit="tok",
        unit_scale=True, desc=f"teacher cache ({mode})", disable=not progress, dynamic_ncols=True,
    )
    t_start = time.perf_counter()
    timing = {"batches": len(todo), "tokens": sum(e - s for s, e in todo) * L, "forward_s": 0.0, "targets_s": 0.0}
    dev = _input_device(teacher)
    # On a CPU the passes over the logits (top-k, softmax) cost as much as a small teacher's
    # forward: the writer thread does them, on another core, while the teacher computes the
    # next batch. On a GPU they are a few % of the forward and stay in line, so that no
    # second batch of [B, L, V] logits is held in GPU memory.
    offload = dev.type == "cpu"
    logits_bytes = batch_size * L * _vocab_size(teacher) * 4
    depth = max(1, min(QUEUE_BATCHES, (1 << 30) // max(logits_bytes, 1))) if offload else QUEUE_BATCHES
    writer = _Writer(parts_dir, attrs, W, mode, depth)
    writer.start()
    try:
        seqs_done = end - start - sum(e - s for s, e in todo)
        for s, e in todo:
            x = torch.from_numpy(np.ascontiguousarray(blocks[s:e])).long().to(dev)
            if offload:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    job = {"logits": teacher(input_ids=x, use_cache=False).logits, "seed": seed}
                timing["forward_s"] += time.perf_counter() - t0
            else:
                job = batch_targets(teacher, x, mode=mode, width=W, seed=seed, first_index=s, timing=timing)
            job.update(start=s, end=e, input_ids=blocks[s:e])
            writer.put(job)
            seqs_done += e - s
            bar.set_postfix_str(f"seq {seqs_done}/{end - start}", refresh=False)
            bar.update((e - s) * L)
    finally:
        t_loop = time.perf_counter()
        bar.close()  # first: an error the writer re-raises then starts on a line of its own
        writer.close()
    timing["targets_s"] += writer.targets_s  # CPU: top-k etc. in the writer thread, overlapped
    timing["writer_busy_s"] = writer.busy_s  # (targets +) encoding + writing, overlapped with the teacher
    timing["writer_drain_s"] = time.perf_counter() - t_loop  # what the teacher side waited at the end
    parts = [parts_dir / fmt.part_name(s, e) for s, e in batches]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:  # pragma: no cover - the writer raised, or files were removed under us
        raise RuntimeError(f"parts missing after generation: {missing[:3]}")
    t_merge = time.perf_counter()
    stats = fmt.merge_parts(parts, shard, dict(attrs, seq_start=start, seq_end=end, rank=rank))
    checksum = fmt.file_checksum(shard)
    timing["merge_s"] = time.perf_counter() - t_merge
    timing["total_s"] = time.perf_counter() - t_start
    info = {
        "file": shard.name,
        "rank": rank,
        "seq_start": start,
        "seq_end": end,
        "rows": end - start,
        "bytes": shard.stat().st_size,
        "checksum": checksum,
        "stats": stats,
        "timing": {k: round(v, 4) if isinstance(v, float) else v for k, v in timing.items()},
    }
    fmt.atomic_write_json(info_path, info)
    for p in parts:
        p.unlink()


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
        ``ids`` int64 ``[B, L, W]``, ``logprobs`` float32 ``[B, L, W]`` sorted descending
        (log-softmax at T=1 over the full vocabulary), ``counts`` int64 ``[B, L, W]`` or
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
    lse_all = torch.empty(B, L, dtype=torch.float32, device=dev)
    ent_all = torch.empty(B, L, dtype=torch.float32, device=dev)
    if mode == "topk":
        flat = logits.reshape(B * L, V)
        for r0 in range(0, B * L, rows):
            z = flat[r0 : r0 + rows].float()
            vals, idx = torch.topk(z, width, dim=-1, sorted=True)
            p = torch.softmax(z, -1)
            lse, ent = _lse_entropy(z, p, vals[:, 0], idx[:, 0])
            ids.view(B * L, width)[r0 : r0 + rows] = idx
            lps.view(B * L, width)[r0 : r0 + rows] = vals - lse[:, None]
            lse_all.view(-1)[r0 : r0 + rows] = lse
            ent_all.view(-1)[r0 : r0 + rows] = ent
    else:
        for b in range(B):
            gen = torch.Generator(device=dev)
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
                lse_all[b, t0 : t0 + rows] = lse
                ent_all[b, t0 : t0 + rows] = ent
    if not torch.isfinite(lse_all).all():
        _raise_bad_logits(first_index, B)
    valid = counts > 0 if counts is not None else None
    mass = torch.where(valid, lps.exp(), 0.0).sum(-1) if valid is not None else lps.exp().sum(-1)
    distinct = valid.sum(-1) if valid is not None else torch.full((B, L), width, device=dev)
    stats = {
        "positions": B * L,
        "entropy_sum": float(ent_all.double().sum()),
        "mass_sum": float(mass.double().sum()),
        "distinct_sum": int(distinct.sum()),
        "distinct_max": int(distinct.max()),
    }
    return {
        "ids": ids.cpu().numpy(),
        "logprobs": lps.cpu().numpy(),
        "counts": counts.cpu().numpy() if counts is not None else None,
        "stats": stats,
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


def _distinct_draws(z, p, lse, n, gen):
    """``n`` draws per row of ``p`` [T, V] -> distinct ids, counts and log-probs [T, n],
    sorted by log-prob descending (ties: smaller id first), padding (-1, 0, -inf) at the end."""
    draws = torch.multinomial(p, n, replacement=True, generator=gen)  # [T, n]
    s, _ = draws.sort(-1)
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    group = first.long().cumsum(-1) - 1  # index of each draw's distinct id
    counts = torch.zeros_like(s).scatter_add_(1, group, torch.ones_like(s))
    uniq = torch.full_like(s, -1).scatter_(1, group, s)
    valid = counts > 0
    lp = torch.where(valid, z.gather(1, uniq.clamp(min=0)) - lse[:, None], float("-inf"))
    order = torch.sort(lp, dim=-1, descending=True, stable=True).indices
    return uniq.gather(1, order), counts.gather(1, order), lp.gather(1, order)


class _Writer(threading.Thread):
    """Encodes finished batches and writes them as part files, off the teacher's thread.

    A job holds either the sparse targets or (CPU teachers) the batch's logits, whose
    targets are then computed here."""

    def __init__(self, parts_dir: Path, attrs: dict, width: int, mode: str, depth: int = QUEUE_BATCHES):
        super().__init__(name="moedistill-cache-writer", daemon=True)
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.parts_dir, self.attrs, self.mode, self.width = parts_dir, attrs, mode, width
        self.steps = encode.logprob_steps(width)
        self.error: BaseException | None = None
        self.committed = 0
        self.busy_s = 0.0
        self.targets_s = 0.0
        self.kill_after = int(os.environ.get(_KILL_ENV, "0") or 0)

    def run(self):
        while True:
            job = self.q.get()
            if job is None:
                return
            if self.error is not None:
                continue  # drain so that put() never blocks on a dead writer
            t = time.perf_counter()
            try:
                self._write(job)
            except BaseException as e:  # noqa: BLE001 - re-raised in the teacher's thread
                self.error = e
            self.busy_s += time.perf_counter() - t

    def _write(self, job):
        if "logits" in job:
            t = time.perf_counter()
            with torch.inference_mode():
                job.update(sparse_targets(job.pop("logits"), mode=self.mode, width=self.width, seed=job["seed"],
                                          first_index=job["start"]))
            self.targets_s += time.perf_counter() - t
        arrays = {"input_ids": job["input_ids"].astype(encode.ID_DTYPE)}
        arrays.update(encode.encode_targets(job["ids"], job["logprobs"], self.steps, job["counts"], self.attrs["num_samples"]))
        attrs = dict(self.attrs, seq_start=job["start"], seq_end=job["end"])
        attrs.update({f"stat_{k}": v for k, v in job["stats"].items()})
        fmt.write_part(self.parts_dir / fmt.part_name(job["start"], job["end"]), arrays, attrs)
        self.committed += 1
        if self.kill_after and self.committed >= self.kill_after:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    def put(self, job):
        if self.error is not None:
            raise self.error
        self.q.put(job)

    def close(self):
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise self.error


# --------------------------------------------------------------------------- finish


def _finalize(out: Path, identity: dict, ranges, packed) -> None:
    """Rank 0: collect every shard's record, verify the shards, write the complete manifest."""
    shards, total = [], fmt.empty_stats()
    for r, (s, e) in enumerate(ranges):
        info_path = out / fmt.shard_info_name(r)
        if not info_path.is_file():
            raise RuntimeError(f"rank {r} left no {info_path.name}; its generation failed")
        info = fmt.read_json(info_path)
        fmt.add_stats(total, info["stats"])
        shards.append({k: info.get(k) for k in ("file", "rank", "seq_start", "seq_end", "rows", "bytes", "checksum", "timing")})
    manifest = dict(identity, shards=shards, source=packed.source, created=_now(), world_size=len(ranges))
    summary = fmt.summarise_stats(total)
    manifest["stats"] = summary
    if manifest["mode"] == "sample":
        manifest["k"] = max(1, summary["max_distinct"])
    fmt.verify_shards(out, manifest, checksums=True)
    manifest["complete"] = True
    fmt.atomic_write_json(out / fmt.MANIFEST, manifest)
    for r in range(len(ranges)):
        (out / fmt.shard_info_name(r)).unlink(missing_ok=True)
    try:
        (out / fmt.PARTS_DIR).rmdir()
    except OSError:
        pass
    size = sum(s["bytes"] for s in shards)
    print(
        f"teacher cache {out}: {manifest['num_sequences']} sequences x {manifest['seq_len']} tokens, "
        f"{size / max(manifest['num_tokens'], 1):.1f} bytes/token, mean mass {summary['mean_mass']:.3f}, "
        f"mean entropy {summary['mean_entropy']:.3f} nats",
        file=sys.stderr,
    )
