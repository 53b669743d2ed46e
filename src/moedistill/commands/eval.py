"""``moedistill eval``: perplexity, agreement, KL and calibration of one model on the eval split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moedistill.cache import open_cache
from moedistill.commands import common  # called qualified, so patching common.X reaches every verb
from moedistill.config import Config
from moedistill.evaluate import count_parameters, evaluate_model
from moedistill.files import atomic_write_text


def eval_blocks(cfg: Config, tokenizer) -> np.ndarray:
    """The packed blocks of ``cfg.data.eval_split`` that evaluation uses (``eval.max_sequences`` first)."""
    n = cfg.eval.max_sequences or cfg.data.eval_max_sequences
    return common.prepare_split(cfg, tokenizer, cfg.data.eval_split, max_sequences=n).blocks


def eval_from_config(
    cfg: Config, model: str | None = None, cache: str | None = None, output: str | None = None
) -> dict:
    """Evaluate ``model`` (default: the trained top-k student) on the eval split.

    The teacher is used online (loaded from ``cfg.teacher``: the KL is ``kl_exact``); with
    ``cache`` (a cache of the eval split) the teacher is not loaded at all and the KL is
    the top-k ``kl_lower_bound``.
    """
    name = model or str(Path(cfg.output_dir) / "train" / "topk" / "final")
    student = common.load_student(cfg, name)
    teacher, targets = None, None
    if cache:
        targets = open_cache(cache)
        blocks = np.stack([targets[i]["input_ids"].numpy() for i in range(len(targets))])
    else:
        teacher, tok = common.load_teacher(cfg)
        blocks = eval_blocks(cfg, tok)
    if cfg.eval.max_sequences:
        blocks = blocks[: cfg.eval.max_sequences]
    metrics = evaluate_model(student, blocks, teacher=teacher, teacher_targets=targets,
                             batch_size=cfg.eval.batch_size, ece_bins=cfg.eval.ece_bins)
    metrics["model"] = name
    metrics["parameters"] = count_parameters(student)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output, json.dumps(metrics, indent=2) + "\n")
    summary = {k: v for k, v in metrics.items() if k != "expert_load"}
    print(json.dumps(summary, indent=2))
    return metrics
