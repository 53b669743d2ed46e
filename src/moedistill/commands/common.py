"""What several verbs resolve from a config the same way: the teacher, its tokenizer, a split."""

from __future__ import annotations

import logging
from pathlib import Path

from moedistill.config import Config
from moedistill.data import PackedData, from_store
from moedistill.dist import launched_rank
from moedistill.fingerprints import tokenizer_hash
from moedistill.models import get_model, load_tokenizer, whole_under_zero3
from moedistill.sources import resolve_split
from moedistill.store import ensure_store, open_store, store_fingerprint


def setup_logging() -> None:
    """Show moedistill's INFO lines (parameter-group tables, stage banners) unless the app configured logging."""
    root = logging.getLogger("moedistill")
    if not root.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        root.addHandler(handler)
        # under torchrun only rank 0 reports progress; the others still show warnings and errors
        root.setLevel(logging.INFO if launched_rank() == 0 else logging.WARNING)


def teacher_tokenizer(cfg: Config):
    """The teacher's tokenizer: every split is tokenised with it."""
    return load_tokenizer(cfg.teacher.name, cfg.teacher.trust_remote_code)


def load_teacher(cfg: Config, *, with_tokenizer: bool = True):
    """``(teacher, tokenizer or None)`` as ``cfg.teacher`` describes it (dtype, device_map, remote code)."""
    t = cfg.teacher
    return get_model(
        t.name, dtype=t.dtype, device_map=t.device_map, trust_remote_code=t.trust_remote_code,
        with_tokenizer=with_tokenizer,
    )


def load_student(cfg: Config, name: str):
    """The student at ``name`` in ``cfg.student.dtype`` (no tokenizer: the teacher's is used)."""
    with whole_under_zero3():
        model, _ = get_model(
            name, dtype=cfg.student.dtype, trust_remote_code=cfg.student.trust_remote_code, with_tokenizer=False
        )
    return model


def split_source(cfg: Config, split: str | None = None):
    """The ``moedistill.sources.Source`` of ``split`` (default ``data.split``) under ``cfg.data``."""
    d = cfg.data
    return resolve_split(
        d.dataset, split or d.split, dataset_config=d.dataset_config, text_field=d.text_field, splits=d.splits,
        train_split=d.split, eval_split=d.eval_split, eval_fraction=d.eval_fraction, max_samples=d.max_samples,
        bad_records=d.bad_records,
    )


def store_dir(cfg: Config, split: str | None = None) -> Path:
    """The token store of ``split``: ``<data.store>/<split>`` (default ``<output_dir>/data/<split>``)."""
    root = Path(cfg.data.store) if cfg.data.store else Path(cfg.output_dir) / "data"
    return root / (split or cfg.data.split)


def open_split(cfg: Config, tokenizer, split: str | None = None, max_sequences: int | None = None):
    """Like :func:`prepare_split` when the split's token store is complete and current; None
    (nothing built) when it would have to be built."""
    split = split or cfg.data.split
    source = split_source(cfg, split)
    store = open_store(store_dir(cfg, split), store_fingerprint(source, tokenizer, cfg.data.seq_len))
    return None if store is None else from_store(store, tokenizer_hash(tokenizer), max_sequences)


def prepare_split(cfg: Config, tokenizer, split: str | None = None, max_sequences: int | None = None) -> PackedData:
    """The packed blocks of ``split`` (default ``data.split``) under ``cfg.data``, first
    ``max_sequences`` of them: a view of the split's token store, built first if it is absent or
    its fingerprint differs (under a launcher by process 0 while the others wait)."""
    split = split or cfg.data.split
    store = ensure_store(store_dir(cfg, split), split_source(cfg, split), tokenizer, seq_len=cfg.data.seq_len,
                         workers=cfg.data.prepare_workers)
    return from_store(store, tokenizer_hash(tokenizer), max_sequences)
