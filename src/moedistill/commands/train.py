"""``moedistill train``: distill the student from the teacher cache, stage by stage.

``train_from_config(cfg)`` resolves what the config names and hands it to
``moedistill.stages.run_stages``:

- the student: ``cfg.student.name``, or ``<output_dir>/compressed/checkpoint-0`` (built
  with ``moedistill.commands.compress.compress_from_config`` when missing);
- the training cache: ``cfg.cache.dir`` or ``<output_dir>/cache/<mode>``, generated with
  ``moedistill.commands.cache.generate_from_config`` unless a complete cache of exactly
  this teacher, data and settings is there;
- the eval cache: top-k targets of ``cfg.data.eval_split`` in
  ``<output_dir>/cache/topk-<eval_split>`` (generated likewise), used for the
  validation CE / KL / perplexity before, during (if ``training.eval_strategy`` says so)
  and after training;
- ``TrainingArguments`` from ``cfg.training`` plus ``output_dir=<output_dir>/train/<run_name>``,
  ``seed`` and ``remove_unused_columns=False``.

The run directory holds ``stages.json``, ``log.jsonl``, the stage checkpoints, ``final/``
(the trained student with the tokenizer) and ``metrics.json`` (see ``moedistill.stages``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

from transformers import TrainingArguments

from moedistill.cache import open_cache
from moedistill.cache.layout import load_manifest, sample_logprobs
from moedistill.commands import common  # called qualified, so patching common.X reaches every verb
from moedistill.commands.cache import cache_dir as cache_path
from moedistill.commands.cache import generate_from_config
from moedistill.commands.compress import checkpoint_dir, compress_from_config
from moedistill.config import Config, check_counts_only
from moedistill.dist import barrier, launched_rank, launched_world
from moedistill.errors import UserError
from moedistill.files import atomic_write_json
from moedistill.integrity import check_context, check_vocab, config_vocab, output_vocab
from moedistill.locking import lock_on_rank0
from moedistill.models import config_or_none
from moedistill.stages import (
    check_may_start,
    check_stages,
    initial_eval,
    locate_checkpoint,
    plan_stages,
    read_log,
    run_stages,
)
from moedistill.targets import eval_kl_key
from moedistill.trainer import check_fused_engine, fused_linear_head

logger = logging.getLogger(__name__)


def with_cache_mode(cfg: Config, mode: str) -> Config:
    """A copy of ``cfg`` reading (and if needed writing) the default cache of ``mode``
    under ``<output_dir>/cache``."""
    c = copy.deepcopy(cfg)
    c.cache.mode = mode
    c.cache.dir = None
    return c


def _cache(cfg: Config, split: str | None, what: str):
    """Generate (or reuse, when complete and identical) the cache of ``split`` and open it."""
    path = Path(generate_from_config(cfg, split=split))
    logger.info("%s cache: %s", what, path)
    expect = {"teacher": cfg.teacher.name, "seq_len": cfg.data.seq_len, "mode": cfg.cache.mode}
    return open_cache(path, expect=expect), path


def _load_student(cfg: Config, student):
    if student is not None:
        return student, cfg.student.name or "<in-memory student>"
    name = cfg.student.name
    if name is None:
        ckpt = checkpoint_dir(cfg)
        if not (ckpt / "config.json").is_file():
            # under torchrun one process compresses; the others wait and load its checkpoint
            if launched_rank() == 0:
                logger.info("no checkpoint-0 in %s: compressing the teacher first", ckpt)
                ckpt = Path(compress_from_config(cfg))
            barrier()
        name = str(ckpt)
    return common.load_student(cfg, name), name


def _check_student(cfg: Config, model, student_name: str, args, loss_overrides) -> None:
    """Before any cache is generated or run directory touched: data.seq_len within the
    student's context, every id of the teacher's vocabulary a student logit, every
    parameter-group rule of every stage matching some parameter, and ``loss.fused_linear``
    possible with this student and engine."""
    check_context(model.config, cfg.data.seq_len, f"student {student_name}")
    teacher_config = config_or_none(cfg.teacher.name, cfg.teacher.trust_remote_code)
    if teacher_config is not None:  # an unloadable teacher is reported by the cache step
        check_vocab(output_vocab(model), config_vocab(teacher_config), student=f"student {student_name}",
                    teacher=f"teacher {cfg.teacher.name}")
    check_stages(model, plan_stages(cfg, args, 1, loss_overrides))  # lengths do not matter here
    if cfg.loss.fused_linear:
        fused_linear_head(model)


def check_cache_serves_loss(cfg: Config, cache_dir: str | None = None, loss_overrides: dict | None = None) -> None:
    """A sample cache without log-probs (``cache_dir``'s manifest says so, or ``cfg`` would
    generate one) serves only T = 1 forward KL: a UserError for any other loss, before any work."""
    if cache_dir:
        counts_only = sample_logprobs(load_manifest(Path(cache_dir))) is False
    else:
        counts_only = cfg.cache.mode == "sample" and not cfg.cache.sample_logprobs
    if counts_only:
        check_counts_only(cfg, str(cache_dir or cache_path(cfg)), loss_overrides)


def sharding_engine(cfg: Config) -> str | None:
    """"FSDP1", "FSDP2" or "DeepSpeed" when the launch (accelerate's environment) or the training
    settings ask for one, else None: known before the Trainer (or anything else) exists."""
    env = lambda key: os.environ.get(key, "").lower() in ("1", "true")  # noqa: E731
    if env("ACCELERATE_USE_FSDP"):
        return f"FSDP{os.environ.get('FSDP_VERSION', '1')}"  # accelerate launch's default version is 1
    if cfg.training.get("fsdp"):  # fsdp_config read as TrainingArguments reads it: a dict or a JSON file,
        fsdp_config = cfg.training.get("fsdp_config") or {}  # keys with or without the "fsdp_" prefix
        if isinstance(fsdp_config, str):
            try:
                fsdp_config = json.loads(Path(fsdp_config).read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"training.fsdp_config={fsdp_config}: cannot read it as JSON ({e})") from None
        version = {k.removeprefix("fsdp_"): v for k, v in dict(fsdp_config).items()}.get("version", 2)
        return f"FSDP{version}"  # TrainingArguments' default: 2
    if cfg.training.get("deepspeed") or env("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed"
    return None


def training_arguments(cfg: Config, run_dir: Path):
    """``TrainingArguments`` from ``cfg.training`` with the keys moedistill owns filled in."""
    kwargs = dict(cfg.training)
    kwargs.setdefault("per_device_eval_batch_size", cfg.eval.batch_size)
    try:
        args = TrainingArguments(output_dir=str(run_dir), seed=cfg.seed, remove_unused_columns=False, **kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"config: training settings rejected by transformers: {str(e).splitlines()[0]}") from None
    launched = launched_world()
    if launched > 1 and args.world_size != launched:
        # without a GPU and without use_cpu, transformers trains each process on its own: N
        # copies of the run would write the same directory
        raise UserError(
            f"launched as {launched} processes but transformers set up training for {args.world_size} "
            f"(no GPU visible and training.use_cpu={args.use_cpu}); set training.use_cpu=true to train on CPUs, "
            f"or launch where each process has a GPU"
        )
    if args.use_cpu and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        logger.warning("training.use_cpu=true: accelerate runs FSDP on GPUs only, so this CPU run is plain DDP")
    return args


def train_from_config(
    cfg: Config,
    resume: str | None = None,
    *,
    student=None,
    cache_dir: str | None = None,
    run_name: str = "topk",
    loss_overrides: dict | None = None,
) -> dict:
    """Distill the student named by ``cfg`` through ``cfg.stages``.

    Args:
        cfg: a validated ``Config``.
        resume: None (fresh run), ``"latest"`` or a checkpoint directory of this run.
        student: an in-memory model to train instead of loading ``cfg.student``.
        cache_dir: the training cache, overriding ``cfg.cache.dir`` / the default location.
        run_name: the run directory is ``<output_dir>/train/<run_name>``.
        loss_overrides: ``{"alpha"|"temperature"|"tail"|"chunk_size": value}``, applied over
            ``cfg.loss`` and every stage (e.g. ``{"alpha": 0.0}`` for a CE-only baseline).
    Returns:
        ``{"run_dir", "final_dir", "student", "cache", "stages", "initial_eval",
        "final_eval", "train_metrics", "engine", "log_history"}`` (``engine``: which engine
        trained, the world size, the mixed precision and the student's dtype); the same (minus the history) is
        written to ``<run_dir>/metrics.json``.
    """
    common.setup_logging()
    run_dir = Path(cfg.output_dir) / "train" / run_name
    args = training_arguments(cfg, run_dir)  # under torchrun this sets up the process group
    # one writer per run directory, to the end (caches and checkpoint-0 take their own locks as they are written)
    with lock_on_rank0(run_dir, "run directory"):
        return _train(cfg, resume, args, run_dir, student=student, cache_dir=cache_dir, loss_overrides=loss_overrides)


def _train(cfg: Config, resume, args, run_dir: Path, *, student, cache_dir, loss_overrides) -> dict:
    """What :func:`train_from_config` does, with the run directory locked."""
    # these need only the run dir: a mistyped output_dir or a finished run stops here, before
    # hours of compression and caching
    if resume:
        locate_checkpoint(run_dir, resume)
    else:
        check_may_start(run_dir, cfg.overwrite)
    if cfg.loss.fused_linear:
        check_fused_engine(sharding_engine(cfg))
    check_cache_serves_loss(cfg, cache_dir, loss_overrides)
    model, student_name = _load_student(cfg, student)
    tokenizer = common.teacher_tokenizer(cfg)
    _check_student(cfg, model, student_name, args, loss_overrides)
    if cache_dir:  # a given cache is used as it is (open_cache still checks teacher and seq_len)
        train_path = Path(cache_dir)
        train_ds = open_cache(train_path, expect={"teacher": cfg.teacher.name, "seq_len": cfg.data.seq_len})
    else:
        train_ds, train_path = _cache(cfg, None, "training")
    # top-k whatever the training cache: students trained on top-k and on sampled targets
    # are then measured against the same eval targets
    eval_ds, _ = _cache(with_cache_mode(cfg, "topk"), cfg.data.eval_split, "eval")
    stages = plan_stages(cfg, args, len(train_ds), loss_overrides)
    logger.info(
        "training %s on %s (%d sequences); %d stage(s), %d steps; run dir %s",
        student_name, train_path, len(train_ds), len(stages), stages[-1].end_step, run_dir,
    )
    out = run_stages(
        model, stages, args, run_dir, train_dataset=train_ds, eval_dataset=eval_ds, resume=resume,
        overwrite=cfg.overwrite,
        processing_class=tokenizer,
    )
    history = read_log(run_dir)
    # a resumed run finds its starting point in the log (the step-0 evaluation)
    initial = out.get("initial_eval") or initial_eval(history)
    result = {
        "run_dir": str(run_dir),
        "final_dir": out["final_model"],
        "student": student_name,
        "cache": str(train_path),
        "stages": out["stages"],
        "initial_eval": initial,
        "final_eval": out.get("final_eval"),
        "train_metrics": out["train_metrics"],
        "engine": out.get("engine"),
    }
    if "stopped_at" in out:
        result["stopped_at"] = out["stopped_at"]
    if args.process_index == 0:
        atomic_write_json(run_dir / "metrics.json", result, indent=2)
    result["log_history"] = history
    first, last = result["initial_eval"], result["final_eval"]
    if first and last:
        kl = eval_kl_key(last)
        logger.info(
            "validation: %s to the teacher %.4f -> %.4f, CE %.4f -> %.4f, perplexity %.2f -> %.2f",
            kl.removeprefix("eval_"), first[kl], last[kl], first["eval_ce"], last["eval_ce"],
            first["eval_perplexity"], last["eval_perplexity"],
        )
    return result
