"""Checks that keep a run from silently going wrong: complete checkpoints, model limits.

Checkpoints. The Hugging Face Trainer writes a checkpoint directory file by file and
nothing says when it is whole: a run killed (or out of disk) half-way through a save
leaves a directory that looks like a checkpoint. ``DistillationTrainer`` therefore
finishes every save with :func:`mark_checkpoint`, which fsyncs the files and then writes
``checkpoint.json`` -- the size and xxh3-128 checksum of every file -- atomically, as the
last file. A directory without it is incomplete; :func:`verify_checkpoint` refuses it, and
refuses a file that is missing, shorter or longer than recorded, or whose bytes changed.
A save into an existing directory first removes the old ``checkpoint.json``, so a
checkpoint being rewritten is never taken for the old, whole one.

Model limits. :func:`check_context` (``seq_len`` against ``max_position_embeddings``) and
:func:`check_vocab` (every id the teacher can emit must have a student logit) turn what
would otherwise be silent garbage (RoPE far past its training length) or an index error
deep inside the loss into one clear line, before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from moedistill.errors import UserError
from moedistill.files import atomic_write_json, file_checksum, fsync_path
from moedistill.locking import LOCK_FILE

CHECKPOINT_MANIFEST = "checkpoint.json"
CHECKPOINT_FORMAT = "moedistill-checkpoint"

# checkpoints verified by this process: (path, manifest mtime) -> True; a resume verifies once
_verified: set[tuple[str, int]] = set()


# --------------------------------------------------------------------------- checkpoints


def _files(ckpt: Path) -> list[Path]:
    return sorted(
        p for p in ckpt.rglob("*")
        if p.is_file() and not p.name.startswith(CHECKPOINT_MANIFEST) and p.name != LOCK_FILE
    )


def unmark_checkpoint(ckpt) -> None:
    """Drop the completion record of ``ckpt`` (before writing into it again)."""
    Path(ckpt, CHECKPOINT_MANIFEST).unlink(missing_ok=True)


def mark_checkpoint(ckpt, info: dict | None = None) -> dict:
    """Record ``ckpt`` as complete: fsync every file, then write ``checkpoint.json``
    (sizes and checksums, plus ``info``) via a temporary file and ``os.replace``."""
    ckpt = Path(ckpt)
    files = {}
    for p in _files(ckpt):
        fsync_path(p)
        files[p.relative_to(ckpt).as_posix()] = {"bytes": p.stat().st_size, "checksum": file_checksum(p)}
    manifest = {"format": CHECKPOINT_FORMAT, "version": 1, **(info or {}), "files": files}
    atomic_write_json(ckpt / CHECKPOINT_MANIFEST, manifest)
    return manifest


def is_complete(ckpt) -> bool:
    """True if ``ckpt`` holds a readable completion record (files not checked)."""
    try:
        m = json.loads(Path(ckpt, CHECKPOINT_MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("format") == CHECKPOINT_FORMAT and isinstance(m.get("files"), dict)


def verify_checkpoint(ckpt, checksums: bool = True) -> dict:
    """Check that ``ckpt`` is a whole checkpoint; returns its ``checkpoint.json``.

    Raises UserError naming the directory or the file: not a directory; no (or a
    damaged) ``checkpoint.json`` -- the save never finished; a recorded file missing,
    truncated or grown; (``checksums``) a file whose bytes changed.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise UserError(
            f"checkpoint {ckpt} does not exist; pass a checkpoint-N directory of this run, "
            "or --resume alone for the latest"
        )
    record = ckpt / CHECKPOINT_MANIFEST
    fix = "resume from an earlier checkpoint (--resume with no value takes the latest complete one)"
    if not record.is_file():
        raise UserError(f"checkpoint {ckpt} is incomplete (no {CHECKPOINT_MANIFEST}: its save was interrupted); {fix}")
    key = (str(ckpt.resolve()), record.stat().st_mtime_ns)
    if checksums and key in _verified:
        return json.loads(record.read_text())
    if not is_complete(ckpt):
        raise UserError(f"checkpoint {ckpt} has a damaged {CHECKPOINT_MANIFEST}; {fix}")
    manifest = json.loads(record.read_text())
    for name, rec in manifest["files"].items():
        f = ckpt / name
        if not f.is_file():
            raise UserError(f"checkpoint file {f} is missing; {fix}")
        size = f.stat().st_size
        if size != int(rec["bytes"]):
            raise UserError(
                f"checkpoint file {f} is truncated or altered: {size} bytes, "
                f"{CHECKPOINT_MANIFEST} says {rec['bytes']}; {fix}"
            )
        if checksums and file_checksum(f) != rec["checksum"]:
            raise UserError(f"checkpoint file {f} is corrupted (checksum differs from {CHECKPOINT_MANIFEST}); {fix}")
    if checksums:
        _verified.add(key)
    return manifest


def latest_checkpoint(output_dir) -> Path | None:
    """The complete ``checkpoint-N`` in ``output_dir`` with the largest N, or None."""
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        suffix = p.name.split("-", 1)[1]
        if suffix.isdigit() and p.is_dir() and is_complete(p):
            found.append((int(suffix), p))
    return max(found)[1] if found else None


# --------------------------------------------------------------------------- model limits


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def context_length(config) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings``), if it says."""
    c = _text_config(config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(c, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_context(config, seq_len: int, what: str) -> None:
    """UserError if ``seq_len`` exceeds the context of the model whose config is ``config``."""
    n = context_length(config)
    if n is not None and seq_len > n:
        raise UserError(
            f"data.seq_len={seq_len} is longer than the {what}'s context of {n} tokens "
            f"(max_position_embeddings); set data.seq_len={n} or less"
        )


def config_vocab(config) -> int:
    """The vocabulary size a model config declares (its text part, for multimodal configs)."""
    return int(_text_config(config).vocab_size)


def output_vocab(model) -> int:
    """Number of logits ``model`` produces per position."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.ndim == 2:
        return int(weight.shape[0])
    return config_vocab(model.config)


def check_targets_vocab(model, *, teacher=None, datasets=()) -> None:
    """UserError if the targets can hold ids ``model`` has no logit for: those of an online
    ``teacher``, else of each dataset that declares a ``vocab_size`` (a teacher cache)."""
    for ds in datasets:
        if teacher is not None:
            vocab, where = output_vocab(teacher), "teacher"
        else:
            vocab = getattr(ds, "vocab_size", None)
            where = f"teacher of the cache {getattr(ds, 'path', '')}".rstrip()
        if vocab:
            check_vocab(output_vocab(model), int(vocab), teacher=where)


def check_vocab(student_vocab: int, teacher_vocab: int, student: str = "student", teacher: str = "teacher") -> None:
    """UserError if the teacher can emit ids the student has no logit for."""
    if teacher_vocab > student_vocab:
        raise UserError(
            f"the {teacher} has a vocabulary of {teacher_vocab} ids but the {student} only {student_vocab}: "
            f"ids {student_vocab}..{teacher_vocab - 1} have no student logit; distill into a student with the "
            f"teacher's vocabulary (e.g. its compressed checkpoint-0)"
        )
