"""Streaming generation of the teacher cache.

The teacher runs batch after batch under ``torch.inference_mode``; per position the
log-softmax (T=1, full vocabulary), the top-k (or the N draws) and the statistics are
computed on the teacher's device (``sparsify.py``), and only the small sparse result goes
to the CPU. A background thread encodes it and writes one crash-safe part file per batch
(``writer.py``); a bounded queue keeps memory flat and lets the teacher run while the
disk works. ``moedistill.commands.cache`` runs this from a config.

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
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed
from tqdm.auto import tqdm

from moedistill import files, signals
from moedistill.cache import encode
from moedistill.cache.layout import (
    FORMAT_NAME,
    MANIFEST,
    PARTS_DIR,
    VERIFIED,
    add_stats,
    empty_stats,
    identity_diff,
    load_manifest,
    manifest_identity,
    parse_part_name,
    part_name,
    read_json,
    shard_info_name,
    shard_name,
    summarise_stats,
)
from moedistill.cache.reader import verify_shards
from moedistill.cache.sparsify import batch_targets, sparse_targets
from moedistill.cache.writer import merge_parts, write_part
from moedistill.dist import barrier, launched_rank, launched_world
from moedistill.errors import UserError
from moedistill.fingerprints import model_fingerprint, tokenizer_hash
from moedistill.integrity import check_context
from moedistill.locking import LOCK_FILE, lock_on_rank0

QUEUE_BATCHES = 4  # finished batches waiting for the writer thread
# what the manifest's "shards" list keeps of each rank's shard-RRRRR.json
_SHARD_RECORD_KEYS = ("file", "rank", "seq_start", "seq_end", "rows", "bytes", "checksum", "timing")
_KILL_ENV = "MOEDISTILL_TEST_KILL_AFTER_PARTS"  # tests: SIGKILL this process after N parts are committed


# --------------------------------------------------------------------------- entry point


def report_complete(out: Path) -> None:
    """Say (once, on rank 0) that the cache at ``out`` is complete and is used as it is."""
    if rank_world()[0] == 0:
        print(f"teacher cache {out} is complete; nothing to do", file=sys.stderr)


def generate_cache(
    teacher,
    tokenizer,
    packed,
    out_dir,
    *,
    mode: str = "topk",
    top_k: int = 64,
    num_samples: int = 64,
    sample_logprobs: bool = True,
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
        sample_logprobs: sample mode: store the drawn ids' log-probs too (the loss needs them
            at a temperature other than 1); ``False`` keeps ids and counts only.
        batch_size: sequences per teacher forward (also the unit of resumption).
        overwrite: replace an existing cache of a different configuration.
        teacher_name: recorded in the manifest (default: the model's ``name_or_path``).
        seed: seeds the draws of sample mode (per sequence: the result does not depend
            on batch boundaries, resumption or the number of processes).
    Returns:
        ``Path(out_dir)``. Under torchrun every rank writes its shard and rank 0 the manifest.
    """
    out = Path(out_dir)
    vocab_size = _check_inputs(teacher, tokenizer, packed, mode=mode, top_k=top_k, num_samples=num_samples,
                               batch_size=batch_size)
    teacher_name = teacher_name or str(getattr(teacher.config, "_name_or_path", "") or type(teacher).__name__)
    identity = cache_identity(
        packed, vocab_size=vocab_size, teacher_fp=model_fingerprint(teacher), mode=mode, top_k=top_k,
        num_samples=num_samples, batch_size=batch_size, teacher_name=teacher_name, seed=seed,
        sample_logprobs=sample_logprobs,
    )
    rank, world = rank_world()
    ranges = _rank_ranges(int(packed.blocks.shape[0]), batch_size, world)

    # 1. every rank reads the existing directory and decides the same way: a complete cache is
    # used as it is, without the lock (any number of readers)
    try:
        state = _check_existing(out, identity, overwrite)
    except UserError:
        if not out.is_dir():
            raise
        state = None  # decided again under the lock: another process may be rewriting the directory
    if state == "complete":
        report_complete(out)
        return out
    # one writer: rank 0 takes the directory's lock (all ranks stop, one line, if another process holds it)
    with lock_on_rank0(out, "teacher cache"):
        if _check_existing(out, identity, overwrite) == "complete":  # finished by another process meanwhile
            report_complete(out)
            return out
        _write_cache(teacher, packed, out, identity, overwrite=overwrite, ranges=ranges, rank=rank,
                     batch_size=batch_size, mode=mode, seed=seed, progress=progress)
    return out


def _write_cache(teacher, packed, out: Path, identity: dict, *, overwrite, ranges, rank, batch_size, mode, seed,
                 progress) -> None:
    """Steps 2-4 of :func:`generate_cache`, with the cache directory locked."""
    # 2. once every rank has read it, rank 0 prepares the directory; the others wait
    barrier()
    if rank == 0:
        _prepare_dir(out, identity, overwrite, ranges, packed)
    barrier()
    # 3. every rank generates its batches and merges them into its shard
    start, end = ranges[rank]
    attrs = _shard_attrs(identity)
    # a full disk (part, shard, record or manifest): one line with the space the rest needs; what was
    # written whole stays and is resumed from, what was cut short is gone (files.atomic_path)
    with files.disk_full_as_error(out, needed=lambda: _bytes_to_finish(out, attrs, rank, start, end, batch_size)):
        _generate_rank(teacher, packed.blocks, out, attrs, rank, start, end, batch_size, mode,
                       identity["width"], seed, progress and rank == 0)
        # 4. rank 0 verifies all shards and marks the cache complete
        barrier()
        if rank == 0:
            _finalize(out, identity, ranges, packed)
        barrier()


def _bytes_to_finish(out: Path, attrs: dict, rank: int, start: int, end: int, batch_size: int) -> int:
    """About the bytes this rank still writes: its missing parts, then its shard (as large as
    all its parts, which stay until the shard is recorded), plus the records."""
    records = 1 << 16
    if (out / shard_info_name(rank)).is_file():
        return records
    batches = [(s, min(s + batch_size, end)) for s in range(start, end, batch_size)]
    have = [out / PARTS_DIR / part_name(s, e) for s, e in batches]
    sizes = [p.stat().st_size for p in have if p.is_file()]
    if sizes:
        per_batch = sum(sizes) / len(sizes)
    else:  # nothing written yet: the uncompressed size, an upper bound
        L, W = int(attrs["seq_len"]), int(attrs["width"])
        per_batch = batch_size * L * (4 + W * (4 + 2 + (2 if attrs["mode"] == "sample" else 0)))
    return int(per_batch * (len(batches) - len(sizes)) + per_batch * len(batches)) + records


def _check_inputs(teacher, tokenizer, packed, *, mode, top_k, num_samples, batch_size) -> int:
    """UserError for settings or data the teacher cannot serve; returns its vocabulary size."""
    if mode not in ("topk", "sample"):
        raise UserError(f"cache mode {mode!r} must be topk or sample")
    if batch_size < 1:
        raise UserError(f"cache batch_size={batch_size} must be >= 1")
    check_context(teacher.config, int(packed.seq_len), "teacher")
    V = _vocab_size(teacher)
    if mode == "topk" and not 1 <= top_k <= V:
        raise UserError(f"cache top_k={top_k} must be between 1 and the teacher's vocabulary size {V}; set cache.top_k")
    if mode == "sample" and num_samples < 1:
        raise UserError(f"cache num_samples={num_samples} must be >= 1; set cache.num_samples")
    if tokenizer is not None and tokenizer_hash(tokenizer) != packed.tokenizer_hash:
        raise UserError(
            "the packed data was tokenised with another tokenizer than the teacher's; "
            "prepare it with the teacher's tokenizer"
        )
    blocks = packed.blocks
    if blocks.size and (int(blocks.max()) >= V or int(blocks.min()) < 0):
        raise UserError(
            f"token id {int(blocks.max())} is outside the teacher's vocabulary of {V}; "
            f"the data was tokenised for another model"
        )
    return V


# --------------------------------------------------------------------------- identity and directory


def cache_identity(packed, *, vocab_size, teacher_fp, mode, top_k, num_samples, batch_size, teacher_name, seed,
                   sample_logprobs=True) -> dict:
    """The manifest of a new (incomplete) cache: everything but its shards; the
    ``layout.IDENTITY_KEYS`` of it decide whether an existing cache is resumed or reused."""
    width = top_k if mode == "topk" else min(num_samples, vocab_size)
    sample = mode == "sample"
    layout = ("target_* datasets are [rows, W * L]: per row the valid entries of the rank-major [W, L] array "
              "(j < target_lengths[t]), then zeros" if sample else "target_* datasets are rank-major [rows, W, L]")
    return {
        "format": FORMAT_NAME,
        "format_version": encode.FORMAT_VERSION,
        "complete": False,
        "mode": mode,
        "top_k": top_k if mode == "topk" else None,
        "num_samples": num_samples if mode == "sample" else None,
        "sample_logprobs": bool(sample_logprobs) if sample else None,
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
            "layout": layout,
            "packed": sample,
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
        "format": FORMAT_NAME,
        "format_version": identity["format_version"],
        "mode": identity["mode"],
        "width": identity["width"],
        "top_k": identity["top_k"],
        "num_samples": identity["num_samples"],
        "packed": bool(enc.get("packed", False)),
        "sample_logprobs": bool(identity.get("sample_logprobs") if identity["mode"] == "sample" else True),
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
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        foreign = [p.name for p in out.iterdir() if not _is_ours(p) and p.name != LOCK_FILE]
        if foreign:
            raise UserError(
                f"{out} is not empty and holds no teacher cache (found {', '.join(sorted(foreign)[:3])}); "
                f"choose an empty or new directory"
            )
        return "new"
    if overwrite:
        return "new"
    manifest = load_manifest(out)
    complete = bool(manifest.get("complete"))  # reused whatever its (readable) format version
    diff = identity_diff(manifest_identity(manifest), manifest_identity(identity), complete=complete)
    if diff:
        more = f" (and {len(diff) - 3} more differences)" if len(diff) > 3 else ""
        raise UserError(
            f"{out} holds a different teacher cache: {'; '.join(diff[:3])}{more}; pass cache.overwrite=true "
            f"(`moedistill cache --overwrite`) to replace it, or choose another directory"
        )
    if manifest.get("complete"):
        verify_shards(out, manifest, checksums=False)
        return "complete"
    return "resume"


def _is_ours(p: Path) -> bool:
    """A file or directory a cache consists of (including the temporary names they are written through)."""
    name = p.name
    return (
        name == PARTS_DIR
        or name.startswith(MANIFEST)
        or name.startswith(VERIFIED)
        or (name.startswith("shard-") and (".h5" in name or ".json" in name))
    )


def _prepare_dir(out: Path, identity: dict, overwrite: bool, ranges, packed) -> None:
    """Rank 0 only: clear what must go, write the (incomplete) manifest, drop stale files."""
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for p in out.iterdir():
            if _is_ours(p):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    parts = out / PARTS_DIR
    parts.mkdir(exist_ok=True)
    for p in list(out.glob("*.tmp*")) + list(parts.glob("*.tmp*")):  # left by a killed writer (files.tmp_name)
        p.unlink()
    # shards of an earlier run with another number of processes cover other ranges: drop them
    for info_path in out.glob("shard-*.json"):
        info = read_json(info_path)
        r = int(info["rank"])
        if r >= len(ranges) or (int(info["seq_start"]), int(info["seq_end"])) != ranges[r]:
            (out / info["file"]).unlink(missing_ok=True)
            info_path.unlink()
    for shard in out.glob("shard-*.h5"):
        if not shard.with_suffix(".json").exists():  # merged but not recorded: rebuilt from its parts
            shard.unlink()
    if not (out / MANIFEST).is_file() or overwrite:
        manifest = dict(identity, shards=[], source=packed.source, created=_now(), world_size=len(ranges))
        files.atomic_write_json(out / MANIFEST, manifest)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- processes


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process; under torchrun the gloo process group is set up first."""
    world, rank = launched_world(), launched_rank()
    if world > 1:
        if not torch.distributed.is_initialized():
            # gloo: only barriers travel between ranks; a long timeout because ranks
            # finish their shares at slightly different times on a large dataset
            torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return rank, world


def _rank_ranges(n: int, batch_size: int, world: int) -> list[tuple[int, int]]:
    """Contiguous sequence range of each rank, made of whole batches."""
    nb = math.ceil(n / batch_size)
    out = []
    for r in range(world):
        b0, b1 = r * nb // world, (r + 1) * nb // world
        out.append((min(b0 * batch_size, n), min(b1 * batch_size, n)))
    return out


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


def _generate_rank(teacher, blocks, out, attrs, rank, start, end, batch_size, mode, width, seed, progress):
    """This rank's sequences ``start..end``: the missing part files, then the merged shard and its record."""
    shard = out / shard_name(rank)
    info_path = out / shard_info_name(rank)
    if info_path.is_file() and shard.is_file():
        info = read_json(info_path)
        same_range = (int(info["seq_start"]), int(info["seq_end"])) == (start, end)
        if same_range and shard.stat().st_size == int(info["bytes"]):
            return  # merged by an earlier run
    parts_dir = out / PARTS_DIR
    parts_dir.mkdir(exist_ok=True)
    batches = [(s, min(s + batch_size, end)) for s in range(start, end, batch_size)]
    done = {parse_part_name(p.name) for p in parts_dir.glob("part-*.h5")}
    todo = [b for b in batches if b not in done]
    t_start = time.perf_counter()
    with signals.deferred():  # SIGTERM / SIGINT: the batches already computed are written, then Interrupted
        timing = _write_parts(teacher, blocks, parts_dir, attrs, todo, end - start, batch_size, mode, width, seed,
                              progress)
    parts = [parts_dir / part_name(s, e) for s, e in batches]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:  # pragma: no cover - the writer raised, or files were removed under us
        raise RuntimeError(f"parts missing after generation: {missing[:3]}")
    t_merge = time.perf_counter()
    stats = merge_parts(parts, shard, dict(attrs, seq_start=start, seq_end=end, rank=rank))
    checksum = files.file_checksum(shard)
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
    files.atomic_write_json(info_path, info)
    for p in parts:
        p.unlink()


def _write_parts(teacher, blocks, parts_dir, attrs, todo, total, batch_size, mode, width, seed, progress) -> dict:
    """Run the teacher over the batches ``todo`` (of this rank's ``total`` sequences) and
    have the writer thread commit one part file each; returns the timing record."""
    L = int(blocks.shape[1])
    seqs_done = total - sum(e - s for s, e in todo)
    bar = tqdm(
        total=total * L, initial=seqs_done * L, unit="tok", unit_scale=True, desc=f"teacher cache ({mode})",
        disable=not progress, dynamic_ncols=True,
    )
    timing = {"batches": len(todo), "tokens": sum(e - s for s, e in todo) * L, "forward_s": 0.0, "targets_s": 0.0}
    dev = _input_device(teacher)
    # On a CPU the passes over the logits (top-k, softmax) cost as much as a small teacher's
    # forward: the writer thread does them, on another core, while the teacher computes the
    # next batch. On a GPU they are a few % of the forward and stay in line, so that no
    # second batch of [B, L, V] logits is held in GPU memory.
    offload = dev.type == "cpu"
    logits_bytes = batch_size * L * _vocab_size(teacher) * 4
    depth = max(1, min(QUEUE_BATCHES, (1 << 30) // max(logits_bytes, 1))) if offload else QUEUE_BATCHES
    writer = _Writer(parts_dir, attrs, width, mode, depth)
    writer.start()
    try:
        for s, e in todo:
            if signals.requested():  # no new batch; those queued are written below
                break
            x = torch.from_numpy(np.ascontiguousarray(blocks[s:e])).long().to(dev)
            if offload:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    job = {"logits": teacher(input_ids=x, use_cache=False).logits, "seed": seed}
                timing["forward_s"] += time.perf_counter() - t0
            else:
                job = batch_targets(teacher, x, mode=mode, width=width, seed=seed, first_index=s, timing=timing)
            job.update(start=s, end=e, input_ids=blocks[s:e])
            writer.put(job)
            seqs_done += e - s
            bar.set_postfix_str(f"seq {seqs_done}/{total}", refresh=False)
            bar.update((e - s) * L)
    finally:
        t_loop = time.perf_counter()
        bar.close()  # first: an error the writer re-raises then starts on a line of its own
        writer.close()
    stop = signals.requested()
    if stop:
        n = math.ceil(total / batch_size)
        kept = n - len(todo) + writer.committed
        raise signals.Interrupted(stop, f"after {kept} of {n} batches of the teacher cache {parts_dir.parent} "
                                        f"(each one written whole; a rerun computes only the rest)")
    timing["targets_s"] += writer.targets_s  # CPU: top-k etc. in the writer thread, overlapped
    timing["writer_busy_s"] = writer.busy_s  # (targets +) encoding + writing, overlapped with the teacher
    timing["writer_drain_s"] = time.perf_counter() - t_loop  # what the teacher side waited at the end
    return timing


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
        arrays.update(encode.encode_targets(job["ids"], job["logprobs"], self.steps, job["counts"],
                                            self.attrs["num_samples"], bool(self.attrs["sample_logprobs"])))
        arrays = encode.to_disk(arrays, bool(self.attrs["packed"]))
        attrs = dict(self.attrs, seq_start=job["start"], seq_end=job["end"])
        attrs.update({f"stat_{k}": v for k, v in job["stats"].items()})
        write_part(self.parts_dir / part_name(job["start"], job["end"]), arrays, attrs)
        self.committed += 1
        if self.kill_after and self.committed >= self.kill_after:
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
    shards, total = [], empty_stats()
    for r in range(len(ranges)):
        info_path = out / shard_info_name(r)
        if not info_path.is_file():
            raise RuntimeError(f"rank {r} left no {info_path.name}; its generation failed")
        info = read_json(info_path)
        add_stats(total, info["stats"])
        shards.append({k: info.get(k) for k in _SHARD_RECORD_KEYS})
    manifest = dict(identity, shards=shards, source=packed.source, created=_now(), world_size=len(ranges))
    summary = summarise_stats(total)
    manifest["stats"] = summary
    if manifest["mode"] == "sample":
        manifest["k"] = max(1, summary["max_distinct"])
    verify_shards(out, manifest, checksums=True)
    manifest["complete"] = True
    files.atomic_write_json(out / MANIFEST, manifest)
    for r in range(len(ranges)):
        (out / shard_info_name(r)).unlink(missing_ok=True)
    try:
        (out / PARTS_DIR).rmdir()
    except OSError:
        pass
    size = sum(s["bytes"] for s in shards)
    print(
        f"teacher cache {out}: {manifest['num_sequences']} sequences x {manifest['seq_len']} tokens, "
        f"{size / max(manifest['num_tokens'], 1):.1f} bytes/token, mean mass {summary['mean_mass']:.3f}, "
        f"mean entropy {summary['mean_entropy']:.3f} nats",
        file=sys.stderr,
    )
