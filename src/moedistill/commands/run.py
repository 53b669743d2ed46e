"""``moedistill run``: the whole job on one config.

    compress teacher -> checkpoint-0
    cache teacher logits of the train split: top-k and sampled
    distill: student A from the top-k cache, student B from the sampled cache,
             and a CE-only baseline (alpha = 0), all from the same checkpoint-0, same steps
    evaluate teacher, checkpoint-0 and the three students on the validation split
    report: report.md + PNGs in <output_dir>

Every step reuses what an earlier run left in ``output_dir`` when its settings match
(checkpoint-0, caches), so a second run skips the teacher entirely.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from moedistill.commands import common  # called qualified, so patching common.X reaches every verb
from moedistill.commands.cache import generate_from_config
from moedistill.commands.compress import compress_from_config
from moedistill.commands.eval import eval_blocks
from moedistill.commands.train import check_cache_serves_loss, sharding_engine, train_from_config, with_cache_mode
from moedistill.config import Config
from moedistill.evaluate import evaluate_models
from moedistill.files import atomic_write_json, atomic_write_text
from moedistill.integrity import CHECKPOINT_MANIFEST
from moedistill.report import write_report
from moedistill.stages import check_may_start, list_checkpoints
from moedistill.trainer import check_fused_engine

# in output_dir, written as a fresh run starts: `run --resume` continues only the trainings it checkpointed
RUN_FILE = "run.json"
SAMPLE_STUDENT_LOSS = {"tail": "sample"}  # the sampled student's loss overrides


def _log(msg: str):
    print(f"[moedistill run] {msg}", flush=True)


def run(cfg: Config, resume: bool = False) -> Path:
    """Run the pipeline; returns the path of ``report.md``.

    ``resume`` (after an interrupt): each training the interrupted run checkpointed continues
    from its latest checkpoint (one that had finished only writes final/ and evaluates
    again); the others start afresh."""
    out = Path(cfg.output_dir)
    names = ["topk", *(["sample"] if cfg.run.sample_student else []), *(["ce"] if cfg.run.ce_baseline else [])]
    if not resume:  # before the teacher is compressed or cached: no training would refuse to start
        for name in names:
            check_may_start(out / "train" / name, cfg.overwrite)
    if cfg.loss.fused_linear:
        check_fused_engine(sharding_engine(cfg))
    if cfg.run.sample_student:  # the sampled student's check, which `train` makes too late for `run`
        check_cache_serves_loss(with_cache_mode(cfg, "sample"), loss_overrides=SAMPLE_STUDENT_LOSS)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write_json(out / RUN_FILE, {"started": time.time()})
    t0 = time.time()
    timings = {}

    def step(name, fn):
        s = time.time()
        _log(f"{name} ...")
        r = fn()
        timings[name] = round(time.time() - s, 1)
        _log(f"{name} done in {timings[name]:.0f}s")
        return r

    ckpt0 = step("compress", lambda: compress_from_config(cfg))
    cfg = copy.deepcopy(cfg)
    cfg.student.name = cfg.student.name or str(ckpt0)
    topk_cfg = with_cache_mode(cfg, "topk")
    step("cache top-k", lambda: generate_from_config(topk_cfg))
    # label -> (config, run name, loss overrides applied over cfg.loss and every stage)
    runs = {"distilled (top-k)": (topk_cfg, "topk", None)}
    if cfg.run.sample_student:
        sample_cfg = with_cache_mode(cfg, "sample")
        step("cache sampled", lambda: generate_from_config(sample_cfg))
        runs["distilled (sampled)"] = (sample_cfg, "sample", SAMPLE_STUDENT_LOSS)
    if cfg.run.ce_baseline:
        runs["CE-only"] = (topk_cfg, "ce", {"alpha": 0.0})

    results = {}
    for label, (c, run_name, overrides) in runs.items():
        results[label] = step(
            f"train {run_name}",
            lambda c=c, run_name=run_name, overrides=overrides: train_from_config(
                c, run_name=run_name, loss_overrides=overrides,
                resume="latest" if resume and _checkpointed_since_start(out, run_name) else None,
            ),
        )

    rows, curves, bounds = step("evaluate", lambda: _evaluate_all(cfg, ckpt0, results))
    settings = {
        "config": cfg.to_dict(),
        "timings_s": timings,
        "total_s": round(time.time() - t0, 1),
    }
    notes = [f"{k}: {v:.0f}s" for k, v in timings.items()]
    path = write_report(out, rows, curves=curves, boundaries=bounds, notes=notes, settings=settings)
    _log(f"report: {path} ({time.time() - t0:.0f}s in all)")
    print((out / "report.md").read_text().split("## Models on the validation split")[1].split("`gap closed`")[0])
    return path


def _checkpointed_since_start(out: Path, run_name: str) -> bool:
    """Whether the run that wrote ``<out>/run.json`` saved a checkpoint of training ``run_name``
    (an older one is an earlier run's, which a fresh training replaces)."""
    marker = out / RUN_FILE
    found = list_checkpoints(out / "train" / run_name)
    if not marker.is_file() or not found:
        return False
    return (found[-1][1] / CHECKPOINT_MANIFEST).stat().st_mtime >= marker.stat().st_mtime


def _evaluate_all(cfg: Config, ckpt0: Path, results: dict):
    blocks = eval_blocks(cfg, common.teacher_tokenizer(cfg))
    # One model in memory at a time: the teacher runs first, once, and keeps its final hidden
    # states on disk (in a temporary directory under output_dir) for every student; each student
    # is then loaded, evaluated against them and dropped (moedistill.evaluate, "_TeacherOutputs").
    paths = {"teacher": None, "checkpoint-0": str(ckpt0), **{k: v["final_dir"] for k, v in results.items()}}

    def load_teacher():
        return common.load_teacher(cfg, with_tokenizer=False)[0]

    models = {name: load_teacher if path is None else (lambda path=path: common.load_student(cfg, path))
              for name, path in paths.items()}
    metrics = evaluate_models(models, blocks, teacher=load_teacher, batch_size=cfg.eval.batch_size,
                              ece_bins=cfg.eval.ece_bins, desc="evaluate", chunk_size=cfg.loss.chunk_size,
                              work_dir=cfg.output_dir)
    rows = []
    for name, m in metrics.items():
        m.pop("expert_load", None)
        rows.append({"name": name, "parameters": m.pop("parameters"), "path": paths[name], **m})
    curves, bounds = {}, {}
    for name, r in results.items():
        curves[name] = r.get("log_history", [])
        bounds[name] = [(b["start_step"], b["name"]) for b in r.get("stages", [])]
    atomic_write_text(Path(cfg.output_dir, "eval.json"), json.dumps(rows, indent=2) + "\n")
    return rows, curves, bounds
