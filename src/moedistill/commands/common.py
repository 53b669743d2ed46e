"""What several verbs resolve from a config the same way: the teacher, its tokenizer, a split."""

from __future__ import annotations

import logging

from moedistill.config import Config
from moedistill.data import PackedData, prepare
from moedistill.dist import launched_rank
from moedistill.models import get_model, load_tokenizer, whole_under_zero3


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




def prepare_split(cfg: Config, tokenizer, split: str | None = None, max_sequences: int | None = None) -> PackedData:
    """The packed blocks of ``split`` (default ``data.split``) under ``cfg.data``: its dataset,
    seq_len, text field and ``max_samples`` documents; ``max_sequences`` first blocks."""
    d = cfg.data
    return prepare(
        tokenizer, d.dataset, seq_len=d.seq_len, dataset_config=d.dataset_config, split=split or d.split,
        text_field=d.text_field, max_samples=d.max_samples, max_sequences=max_sequences,
    )
