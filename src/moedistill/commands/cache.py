"""``moedistill cache``: the teacher cache a config describes, built, resumed or reused.

``generate_from_config(cfg, split)`` writes ``cache_dir(cfg, split)`` with
``moedistill.cache.generate_cache``. A complete cache of exactly this configuration is
reused without loading the teacher's weights: its identity is checked from the
teacher's config file, the tokenizer and the packed data alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch

from moedistill.cache.generate import _check_existing as check_existing
from moedistill.cache.generate import cache_identity, generate_cache, report_complete
from moedistill.cache.layout import MANIFEST, identity_diff, load_manifest, manifest_identity
from moedistill.cache.reader import verify_shards
from moedistill.commands import common  # called qualified, so patching common.X reaches every verb
from moedistill.config import Config
from moedistill.fingerprints import config_fingerprint, tokenizer_hash
from moedistill.integrity import check_context
from moedistill.models import config_or_none

# the generate_cache arguments that are part of the cache's identity (``overwrite`` is not)
_IDENTITY_ARGS = ("mode", "top_k", "num_samples", "sample_logprobs", "batch_size", "teacher_name", "seed")


def cache_dir(cfg: Config, split: str | None = None) -> Path:
    """Where the cache of ``split`` lives: ``cache.dir`` or ``<cache.root>/<mode>`` (root
    default ``<output_dir>/cache``), with ``-<split>`` appended for a split other than ``data.split``."""
    root = Path(cfg.cache.root) if cfg.cache.root else Path(cfg.output_dir) / "cache"
    base = Path(cfg.cache.dir) if cfg.cache.dir else root / cfg.cache.mode
    if split is None or split == cfg.data.split:
        return base
    return base.with_name(f"{base.name}-{split}")


def generate_from_config(cfg: Config, split: str | None = None) -> Path:
    """Build (or resume, or reuse) the teacher cache described by ``cfg``; returns its directory.

    ``split`` defaults to ``cfg.data.split`` (with ``data.max_sequences``); another split
    (e.g. ``cfg.data.eval_split``) uses ``data.eval_max_sequences`` and its own directory.
    A complete cache with the same identity is reused without loading the teacher.
    """
    split = split or cfg.data.split
    max_sequences = cfg.data.max_sequences if split == cfg.data.split else cfg.data.eval_max_sequences
    out = cache_dir(cfg, split)
    tokenizer = common.teacher_tokenizer(cfg)
    _check_teacher_context(cfg)
    kwargs = _generate_kwargs(cfg)
    packed = common.open_split(cfg, tokenizer, split, max_sequences)  # the token store, if built already
    if packed is None:  # a cache of another configuration is refused before the store is built for it
        _refuse_other_cache(out, cfg, tokenizer, kwargs)
        packed = common.prepare_split(cfg, tokenizer, split, max_sequences)
    if not cfg.cache.overwrite and _reusable(out, cfg, packed, kwargs):
        return out
    teacher, _ = common.load_teacher(cfg, with_tokenizer=False)
    if cfg.teacher.device_map is None:
        teacher.to(_default_device())
    return generate_cache(teacher, tokenizer, packed, out, **kwargs)


def _generate_kwargs(cfg: Config) -> dict:
    return dict(
        mode=cfg.cache.mode,
        top_k=cfg.cache.top_k,
        num_samples=cfg.cache.num_samples,
        sample_logprobs=cfg.cache.sample_logprobs,
        batch_size=cfg.cache.batch_size,
        overwrite=cfg.cache.overwrite,
        teacher_name=cfg.teacher.name,
        seed=cfg.seed,
    )


def _check_teacher_context(cfg: Config) -> None:
    """data.seq_len within the teacher's context, from its config file (before any data or weights)."""
    config = config_or_none(cfg.teacher.name, cfg.teacher.trust_remote_code)
    if config is not None:
        check_context(config, cfg.data.seq_len, f"teacher {cfg.teacher.name}")


def _reusable(out: Path, cfg: Config, packed, kwargs: dict) -> bool:
    """True if ``out`` already holds a complete cache of exactly this configuration
    (checked from the teacher's config file, without loading its weights)."""
    if not (out / MANIFEST).is_file():
        return False
    try:
        config = config_or_none(cfg.teacher.name, cfg.teacher.trust_remote_code)
        if config is None:
            return False
        manifest = load_manifest(out)
        want = cache_identity(
            packed, vocab_size=int(config.vocab_size), teacher_fp=config_fingerprint(config),
            **{k: kwargs[k] for k in _IDENTITY_ARGS},
        )
    except Exception:  # noqa: BLE001 - any doubt: take the full path, which loads the teacher and checks properly
        return False
    if not manifest.get("complete") or identity_diff(manifest_identity(manifest), want, complete=True):
        return False
    verify_shards(out, manifest, checksums=False)
    report_complete(out)
    return True


def _refuse_other_cache(out: Path, cfg: Config, tokenizer, kwargs: dict) -> None:
    """The refusal ``generate_cache`` would give a cache in ``out`` that differs from this run in
    anything but the data (teacher, tokenizer, seq_len, mode, k, ...), given before the token
    store is built, so that a refused command writes nothing. Same data is assumed here; the
    data itself is checked once the store exists."""
    if cfg.cache.overwrite or not (out / MANIFEST).is_file():
        return
    try:
        config = config_or_none(cfg.teacher.name, cfg.teacher.trust_remote_code)
        manifest = load_manifest(out)
        n, L = int(manifest["num_sequences"]), int(cfg.data.seq_len)
        stub = SimpleNamespace(seq_len=L, blocks=SimpleNamespace(shape=(n, L), size=n * L),
                               tokenizer_hash=tokenizer_hash(tokenizer), stream_hash=manifest["fingerprints"]["data"])
        want = cache_identity(stub, vocab_size=int(config.vocab_size), teacher_fp=config_fingerprint(config),
                              **{k: kwargs[k] for k in _IDENTITY_ARGS})
    except Exception:  # noqa: BLE001 - any doubt: generate_cache checks it properly once the data is there
        return
    check_existing(out, want, overwrite=False)


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
