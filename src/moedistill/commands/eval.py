"""``moedistill eval``: perplexity, agreement, KL and calibration of one model on the eval split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moedistill.cache import open_cache
from moedistill.commands import common  # called qualified, so patching common.X reaches every verb
from moedistill.config import Config
from moedistill.errors import UserError
from moedistill.evaluate import evaluate_model
from moedistill.files import atomic_write_text
from moedistill.models import config_or_none


def eval_blocks(cfg: Config, tokenizer) -> np.ndarray:
    """The packed blocks of ``cfg.data.eval_split`` that evaluation uses (``eval.max_sequences`` first)."""
    n = cfg.eval.max_sequences or cfg.data.eval_max_sequences
    return common.prepare_split(cfg, tokenizer, cfg.data.eval_split, max_sequences=n).blocks


def open_eval_cache(cfg: Config, path):
    """The teacher cache at ``path``, checked like ``train`` checks its caches: the teacher, the
    tokenizer, seq_len and the token stream of ``data.eval_split`` (as its eval cache holds it)."""
    tok = common.teacher_tokenizer(cfg)
    packed = common.prepare_split(cfg, tok, cfg.data.eval_split, max_sequences=cfg.data.eval_max_sequences)
    ds = open_cache(path, expect={"teacher": cfg.teacher.name, "tokenizer": tok, "seq_len": cfg.data.seq_len})
    if ds.manifest["fingerprints"]["data"] != packed.stream_hash:
        raise UserError(
            f"--cache {path} holds other data ({ds.manifest.get('source')}) than the eval split "
            f"'{cfg.data.eval_split}' of {cfg.data.dataset} ({packed.num_tokens:,} tokens); pass the eval split's "
            f"cache (e.g. {Path(cfg.output_dir) / 'cache' / ('topk-' + cfg.data.eval_split)})"
        )
    return ds


def eval_from_config(
    cfg: Config, model: str | None = None, cache: str | None = None, output: str | None = None
) -> dict:
    """Evaluate ``model`` (default: the trained top-k student) on the eval split.

    The teacher is used online (loaded from ``cfg.teacher``: the KL is ``kl_exact``); with
    ``cache`` (a cache of the eval split) the teacher is not loaded at all and the KL is
    the top-k ``kl_lower_bound``.
    """
    name = model or str(Path(cfg.output_dir) / "train" / "topk" / "final")
    if output and Path(output).is_dir():  # before the evaluation, not after it
        raise UserError(f"--output {output} is a directory; give a file path, e.g. {Path(output) / 'eval.json'}")
    targets = open_eval_cache(cfg, cache) if cache else None
    if config_or_none(name, cfg.student.trust_remote_code) is None:  # stop before the teacher runs, not after
        common.load_student(cfg, name)  # fails with the loader's own message
    if cache:
        blocks = np.stack([targets[i]["input_ids"].numpy() for i in range(len(targets))])
    else:
        blocks = eval_blocks(cfg, common.teacher_tokenizer(cfg))

    def teacher():  # loaded for its pass over the blocks, dropped before the student loads
        return common.load_teacher(cfg, with_tokenizer=False)[0]

    if cfg.eval.max_sequences:
        blocks = blocks[: cfg.eval.max_sequences]
    metrics = evaluate_model(lambda: common.load_student(cfg, name), blocks, teacher=None if cache else teacher,
                             teacher_targets=targets,
                             batch_size=cfg.eval.batch_size, ece_bins=cfg.eval.ece_bins,
                             chunk_size=cfg.loss.chunk_size, work_dir=cfg.output_dir)
    metrics["model"] = name
    metrics["split"] = cfg.data.eval_split
    metrics["targets"] = (
        {"cache": str(cache), "mode": targets.mode, "data": targets.manifest["fingerprints"]["data"]} if cache
        else {"teacher": cfg.teacher.name}
    )
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output, json.dumps(metrics, indent=2) + "\n")
    summary = {k: v for k, v in metrics.items() if k != "expert_load"}
    print(json.dumps(summary, indent=2))
    return metrics
