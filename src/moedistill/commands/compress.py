"""``moedistill compress``: teacher -> zero-shot checkpoint-0 (+ the compression report).

Writes ``<output_dir>/compressed/checkpoint-0`` (weights, config with ``compression``,
tokenizer, and ``modeling_moedistill.py`` for ``trust_remote_code``) and
``<output_dir>/compressed/report.{json,md,png}``. A checkpoint-0 made with the same
settings (teacher identity, rank, method, calibration data) is reused, not recomputed;
the settings hash lives in ``config.compression.settings_hash``. ``report_ranks`` is not
part of the settings (it changes the report, not the checkpoint): to redo the report
alone, delete ``checkpoint-0``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from transformers import AutoConfig

from moedistill.commands import common  # called qualified, so patching common.X reaches every verb
from moedistill.compression.init import (
    DEFAULT_DAMPING,
    allocate_ranks,
    allocation_cap,
    check_rank_allocation,
    compress_layers,
    compression_record,
    finish_student,
    full_rank,
    layer_spectrum,
    load_layer_factors,
    new_student,
    rank_gains,
    resolve_rank,
)
from moedistill.compression.modeling_moedistill import find_moe_blocks
from moedistill.compression.report import REPORT_SEQUENCES, VARIANTS, build_report, write_report
from moedistill.config import Config
from moedistill.errors import UserError
from moedistill.files import atomic_dir, disk_full_as_error, model_bytes
from moedistill.locking import DirectoryLock
from moedistill.models import config_or_none, resolve

SETTINGS_VERSION = 2  # bump when the initialisation changes so old checkpoint-0s are not reused


def checkpoint_dir(cfg) -> Path:
    """``<compress.dir>/checkpoint-0``; ``compress.dir`` defaults to ``<output_dir>/compressed``."""
    return Path(cfg.compress.dir or Path(cfg.output_dir) / "compressed") / "checkpoint-0"


def _teacher_identity(cfg) -> dict:
    """What identifies the teacher's weights without reading them: files, sizes and mtimes, or the hub revision."""
    path = Path(resolve(cfg.teacher.name))
    if path.is_dir():
        files = sorted(
            (f.name, f.stat().st_size, f.stat().st_mtime_ns)
            for f in path.iterdir()
            if f.suffix in (".safetensors", ".bin", ".json") and not f.name.startswith("tokenizer")
        )
        return {"path": str(path.resolve()), "files": files}
    try:
        c = AutoConfig.from_pretrained(cfg.teacher.name, trust_remote_code=cfg.teacher.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load teacher {cfg.teacher.name!r}: {str(e).splitlines()[0]}; check teacher.name"
        ) from None
    return {"hub": cfg.teacher.name, "revision": getattr(c, "_commit_hash", None)}


def _uses_calibration(cfg) -> bool:
    c = cfg.compress
    return c.core == "frequency" or c.svd == "activation" or c.rank_allocation != "uniform"


def settings(cfg) -> dict:
    """Everything checkpoint-0 depends on; equal settings -> the existing checkpoint is reused."""
    c, d = cfg.compress, cfg.data
    s = {
        "version": SETTINGS_VERSION,
        "teacher": _teacher_identity(cfg),
        "teacher_dtype": cfg.teacher.dtype,
        "rank": c.rank,
        "compression_ratio": c.compression_ratio,
        "core": c.core,
        "svd": c.svd,
        "damping": DEFAULT_DAMPING if c.svd == "activation" else None,
    }
    if c.rank_allocation != "uniform":  # absent for uniform: earlier checkpoint-0s keep their hash
        s["rank_allocation"] = c.rank_allocation
    if _uses_calibration(cfg):
        s["calibration"] = {
            "dataset": d.dataset,
            "dataset_config": d.dataset_config,
            "split": d.split,
            "text_field": d.text_field,
            "max_samples": d.max_samples,
            "seq_len": d.seq_len,
            "sequences": c.calibration_sequences,
        }
    return s


def settings_hash(s: dict) -> str:
    return hashlib.sha256(json.dumps(s, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _existing(ckpt: Path, want: str) -> bool:
    cfg_file = ckpt / "config.json"
    if not cfg_file.is_file() or not any(ckpt.glob("*.safetensors")):
        return False
    try:
        have = json.loads(cfg_file.read_text()).get("compression", {}).get("settings_hash")
    except (json.JSONDecodeError, AttributeError):
        return False
    return have == want


def compress_from_config(cfg: Config) -> Path:
    """Build (or reuse) checkpoint-0 from ``cfg.teacher`` with ``cfg.compress``; write the report.

    Returns:
        the checkpoint directory ``<cfg.output_dir>/compressed/checkpoint-0``.
    """
    ckpt = checkpoint_dir(cfg)
    s = settings(cfg)
    h = settings_hash(s)
    if _existing(ckpt, h):
        return _reuse(ckpt, h)
    # one writer for <output_dir>/compressed (the reuse check above needs no lock)
    with DirectoryLock(ckpt.parent, "compressed student directory"):
        if _existing(ckpt, h):  # built by another process meanwhile
            return _reuse(ckpt, h)
        return _compress(cfg, ckpt, s, h)


def _reuse(ckpt: Path, h: str) -> Path:
    report = ckpt.parent / "report.md"
    print(f"[compress] reusing {ckpt} (same teacher and settings, hash {h})"
          + (f"; report: {report}" if report.exists() else ""))
    return ckpt


def _compress(cfg, ckpt: Path, s: dict, h: str) -> Path:
    """What :func:`compress_from_config` does when there is nothing to reuse, with the directory locked."""
    c = cfg.compress
    # a bad rank or architecture stops here, before a large teacher loads
    teacher_config = config_or_none(cfg.teacher.name, cfg.teacher.trust_remote_code)
    if teacher_config is not None:
        resolve_rank(teacher_config, c.rank, c.compression_ratio)
    teacher, tokenizer = common.load_teacher(cfg)
    rank = resolve_rank(teacher, c.rank, c.compression_ratio)
    full = full_rank(teacher)
    report_ranks = sorted({r for r in c.report_ranks if 0 <= r <= full})
    skipped = sorted(set(c.report_ranks) - set(report_ranks))
    if skipped:
        print(f"[compress] report ranks {skipped} skipped: outside [0, {full}] (full rank of this teacher)")

    calib = None
    if _uses_calibration(cfg) or report_ranks:
        calib = common.prepare_split(cfg, tokenizer, max_sequences=c.calibration_sequences)

    # One set of factors per variant, at the largest rank any student of that variant needs, checkpoint-0's
    # first; the layers are calibrated and factorised one at a time (one layer's Grams in memory), and
    # checkpoint-0's factors go straight into the student. A budgeted rank allocation needs every layer's
    # spectrum first: this pass keeps the spectra at the cap (and the report's factors, if any), and a
    # second pass makes checkpoint-0's factors again at the allocated ranks (allocation_pass).
    mine = (c.core, c.svd)
    allocated = c.rank_allocation != "uniform" and rank > 0
    if c.rank_allocation != "uniform" and rank == 0:
        print(f"[compress] rank 0: no wrapper parameters for compress.rank_allocation={c.rank_allocation} to spread")
    check_rank_allocation(c.rank_allocation, calibrated=calib is not None)
    cap = allocation_cap(rank, full) if allocated else rank
    variants = {mine: max([rank, cap, *report_ranks])}
    for v in VARIANTS if report_ranks else []:
        variants.setdefault(v, max(report_ranks))
    error_ranks = {v: list(report_ranks) for v in variants} if report_ranks else {}
    error_ranks[mine] = sorted({rank, *error_ranks.get(mine, [])})
    record = compression_record(teacher, rank, core=c.core, svd=c.svd, stats=None, damping=DEFAULT_DAMPING)
    student = None if allocated else new_student(teacher, rank, record)
    spectra = [None] * len(find_moe_blocks(teacher))

    def on_layer(l, v, f):
        if v != mine:
            return
        if allocated:
            spectra[l] = layer_spectrum(f, cap)
        else:
            load_layer_factors(student, l, f)

    result = compress_layers(
        teacher, variants, calibration=None if calib is None else calib.blocks,
        gram=c.svd == "activation" or bool(report_ranks), error_ranks=error_ranks,
        keep=set(variants) if report_ranks else set(), on_layer=on_layer, batch_size=cfg.cache.batch_size,
    )
    ranks = None
    if allocated:
        ranks = allocate_ranks(rank_gains(c.rank_allocation, result.stats.counts, spectra, svd=c.svd, cap=cap), rank)
        student = new_student(teacher, rank, record, ranks=ranks)
        if report_ranks:  # the report kept checkpoint-0's factors at the cap
            for l, f in enumerate(result.factors[mine]):
                load_layer_factors(student, l, f)
        else:
            compress_layers(teacher, {mine: max(map(max, ranks))}, calibration=calib.blocks, keep=set(),
                            on_layer=lambda l, _v, f: load_layer_factors(student, l, f),
                            batch_size=cfg.cache.batch_size, check_fp64=False, desc="compress (allocated ranks)")
    stats, factors = result.stats, result.factors
    if stats is not None:
        print(f"[compress] calibration: {stats.sequences} sequences x {cfg.data.seq_len} tokens of {calib.source}")
    record = compression_record(
        teacher, rank, core=c.core, svd=c.svd, stats=stats if _uses_calibration(cfg) else None, damping=DEFAULT_DAMPING,
        rank_allocation=c.rank_allocation, ranks=ranks,
    )
    record.update({"teacher": cfg.teacher.name, "settings": s, "settings_hash": h, "rank": int(rank)})
    student.config.compression = record
    finish_student(student, teacher)
    _save(student, tokenizer, ckpt)
    alloc = "" if ranks is None else (
        f", {c.rank_allocation} ranks {min(map(min, ranks))}-{max(map(max, ranks))} for the parameters of rank {rank}")
    print(f"[compress] wrote {ckpt} (rank {rank}{alloc}, core={c.core}, svd={c.svd})")

    eval_blocks = common.prepare_split(cfg, tokenizer, cfg.data.eval_split, max_sequences=REPORT_SEQUENCES).blocks
    report = build_report(
        teacher, student, eval_blocks, factors=factors, stats=stats, report_ranks=report_ranks,
        batch_size=cfg.eval.batch_size,
        header={"teacher": cfg.teacher.name, "checkpoint": str(ckpt), "settings": s},
        checkpoint_0={"rank": rank, "core": c.core, "svd": c.svd, "rank_allocation": c.rank_allocation,
                      "ranks": ranks},
        eval_info={"split": cfg.data.eval_split, "sequences": len(eval_blocks), "seq_len": cfg.data.seq_len},
        errors=result.errors, svd_check=result.svd_check,
    )
    write_report(report, ckpt.parent)
    return ckpt


def _save(student, tokenizer, ckpt: Path) -> None:
    """Write into a temporary sibling and rename, so a crash never leaves a checkpoint that looks complete
    (a full disk: one line, and the temporary sibling is removed)."""
    # needed: the weights, the tokenizer's files (~80 bytes per token) and the config files
    needed = lambda: model_bytes(student) + 80 * len(tokenizer or ()) + (1 << 20)  # noqa: E731
    with disk_full_as_error(ckpt, needed=needed), atomic_dir(ckpt) as tmp:
        student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
