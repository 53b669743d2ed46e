"""Multi-stage schedules: each stage its own length, parameter groups, learning rate and loss.

A stage is run as its own ``DistillationTrainer(...).train()`` on the same student. That
is what makes a boundary clean: the optimizer, its state and the scheduler are built
afresh for the stage's parameter groups (frozen parameters never enter the optimizer,
and a multi-GPU wrapper sees the right trainable set), and resuming inside a stage is the
Trainer's own exact resume (weights, optimizer, scheduler, RNG, data position).
Steps count globally across stages: stage k covers global steps
``(start_step, start_step + max_steps]``. Each stage shuffles with ``data_seed + k``.

Files in the run directory::

    stages.json                     the plan: per stage its name, global start/end step,
                                    lr, loss settings, directory, and whether it is done
    log.jsonl                       every log entry, with the global ``step``, ``stage``
                                    (index) and ``stage_name``: one x-axis for plots
    NN-<name>/checkpoint-<n>/       HF checkpoints, n = step within the stage; each has a
                                    stage.json (stage, global step); the last one of a
                                    stage is written at the stage's end
    final/                          the student after the last stage (save_pretrained)
    tensorboard/                    with report_to tensorboard: one run for all stages, global
                                    steps on the x-axis, ``train/stage`` the stage index

Resume from any checkpoint (``resume=<dir>`` or ``"latest"``): the stages before its
stage are skipped, its stage continues from that step, the later stages follow. Only
complete checkpoints count (``checkpoint.json`` present, see ``moedistill.integrity``);
the one resumed from is verified (sizes, checksums) before anything in the run directory
changes, and so are the parameter-group rules and the vocabularies: a bad setting stops
the run before a previous run's checkpoints are cleared. ``final/`` is written to a
temporary directory and renamed into place.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from moedistill import signals
from moedistill.config import Config, LossConfig, ParamGroupsConfig, StageConfig
from moedistill.dist import barrier
from moedistill.errors import UserError
from moedistill.files import (
    DiskFullError,
    atomic_write_json,
    atomic_write_text,
    disk_full_as_error,
    model_bytes,
    replace_dir,
)
from moedistill.integrity import check_targets_vocab, is_complete, verify_checkpoint
from moedistill.param_groups import assign
from moedistill.targets import eval_kl_key
from moedistill.trainer import CHECKPOINT_STAGE_FILE, DistillationTrainer, load_weights

logger = logging.getLogger(__name__)

STAGES_FILE = "stages.json"
LOG_FILE = "log.jsonl"
FINAL_DIR = "final"
LOSS_KEYS = ("alpha", "temperature", "tail", "chunk_size")


@dataclass
class Stage:
    """One resolved stage: everything its trainer needs."""

    index: int
    name: str
    max_steps: int
    start_step: int  # global steps done before this stage
    learning_rate: float
    loss: LossConfig
    param_groups: ParamGroupsConfig
    param_groups_key: str  # config key named in errors about the rules

    @property
    def end_step(self) -> int:
        return self.start_step + self.max_steps

    @property
    def dirname(self) -> str:
        return f"{self.index + 1:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', self.name)}"

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "name": self.name,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "max_steps": self.max_steps,
            "learning_rate": self.learning_rate,
            **dataclasses.asdict(self.loss),
            "dir": self.dirname,
        }


def steps_per_epoch(num_examples: int, args) -> int:
    """Optimizer steps in one pass over ``num_examples`` items, as the Trainer counts them."""
    batches = num_examples / (args.per_device_train_batch_size * max(args.world_size, 1))
    batches = math.floor(batches) if args.dataloader_drop_last else math.ceil(batches)
    ga = args.gradient_accumulation_steps
    return max(batches // ga + int(batches % ga > 0), 1)


def plan_stages(cfg: Config, args, num_examples: int, loss_overrides: dict | None = None) -> list[Stage]:
    """Resolve ``cfg.stages`` into ``Stage`` objects with global step ranges.

    Stage values override the top-level ones (``param_groups``, ``training.learning_rate``,
    ``loss.*``); ``loss_overrides`` (e.g. ``{"alpha": 0.0}`` for a CE baseline) override both.
    Epoch-based lengths become step counts here, so the plan is known before training.
    With no stages, one stage named ``train`` covers ``training.max_steps`` or
    ``training.num_train_epochs``.
    """
    loss_overrides = dict(loss_overrides or {})
    unknown = set(loss_overrides) - set(LOSS_KEYS)
    if unknown:
        raise UserError(f"loss_overrides has unknown keys {sorted(unknown)}; use {', '.join(LOSS_KEYS)}")
    per_epoch = steps_per_epoch(num_examples, args)
    specs = cfg.stages
    if not specs:
        if args.max_steps and args.max_steps > 0:
            specs = [StageConfig(name="train", max_steps=args.max_steps)]
        else:
            specs = [StageConfig(name="train", num_train_epochs=args.num_train_epochs)]
    stages, start = [], 0
    for i, sc in enumerate(specs):
        n = sc.max_steps if sc.max_steps is not None else math.ceil(sc.num_train_epochs * per_epoch)
        loss = dataclasses.replace(
            cfg.loss, **{k: getattr(sc, k) for k in ("alpha", "temperature", "tail") if getattr(sc, k) is not None}
        )
        loss = dataclasses.replace(loss, **loss_overrides)
        own_groups = bool(cfg.stages) and sc.param_groups is not None
        stages.append(
            Stage(
                index=i,
                name=sc.name,
                max_steps=int(n),
                start_step=start,
                learning_rate=sc.learning_rate if sc.learning_rate is not None else args.learning_rate,
                loss=loss,
                param_groups=sc.param_groups if own_groups else cfg.param_groups,
                param_groups_key=f"stages[{i}].param_groups" if own_groups else "param_groups",
            )
        )
        start += int(n)
    return stages


# --------------------------------------------------------------------------- run directory


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_plan(run_dir: Path, stages: list[Stage], done: set[int]) -> None:
    plan = {"stages": [{**s.to_dict(), "done": s.index in done} for s in stages]}
    atomic_write_json(run_dir / STAGES_FILE, plan, indent=2)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(global step, path) of every complete checkpoint that records its stage, oldest first."""
    found = []
    for marker in Path(run_dir).glob(f"*/checkpoint-*/{CHECKPOINT_STAGE_FILE}"):
        info = _read_json(marker)
        if info and "global_step" in info and is_complete(marker.parent):
            found.append((int(info["global_step"]), marker.parent))
    return sorted(found)


def locate_checkpoint(run_dir: Path, resume: str) -> Path:
    """The verified checkpoint ``resume`` names ("latest": the newest complete one in ``run_dir``).

    Needs only the run directory, so ``moedistill train --resume`` makes this check before
    any compression or cache work. An incomplete, truncated or corrupted checkpoint is a
    UserError naming the file (``moedistill.integrity.verify_checkpoint``)."""
    if resume in ("latest", "last", True):
        found = list_checkpoints(run_dir)
        if not found:
            raise UserError(f"no checkpoint to resume from in {run_dir}; check output_dir, or run without "
                            f"--resume to start the run")
        path = found[-1][1]
    else:
        path = Path(resume)
        if not (path / "trainer_state.json").is_file() and not path.name.startswith("checkpoint-"):
            raise UserError(f"{resume} is not a training checkpoint (no trainer_state.json); pass a checkpoint-N dir")
    verify_checkpoint(path)  # a checkpoint-N whose save was cut short: "incomplete", naming what is missing
    return path


def find_checkpoint(run_dir: Path, resume: str, stages: list[Stage]) -> tuple[Stage, Path, int]:
    """Resolve ``resume`` ("latest" or a checkpoint dir) -> (its stage, path, step within the stage),
    after :func:`locate_checkpoint` and :func:`check_same_plan`."""
    path = locate_checkpoint(run_dir, resume)
    check_same_plan(run_dir, stages)
    info = _read_json(path / CHECKPOINT_STAGE_FILE) or {}
    by_name = {s.name: s for s in stages}
    by_dir = {s.dirname: s for s in stages}
    stage = by_name.get(info.get("name")) or by_dir.get(path.parent.name)
    if stage is None or ("index" in info and info["index"] != stage.index):
        raise UserError(
            f"checkpoint {path} belongs to stage {info.get('name', path.parent.name)!r}, which is not stage "
            f"{info.get('index', '?')} of this config's stages ({', '.join(s.name for s in stages)}); "
            f"resume with the config the run was started with"
        )
    state = _read_json(path / "trainer_state.json") or {}
    return stage, path, int(state.get("global_step", 0))


# what a resumed run must share with the run it continues, per stage
PLAN_KEYS = ("name", "start_step", "end_step", "max_steps", "learning_rate", "alpha", "temperature", "tail",
             "divergence", "beta")


def check_same_plan(run_dir: Path, stages: list[Stage]) -> None:
    """UserError if ``stages`` is not the schedule the run in ``run_dir`` was started with
    (its stages.json): a resume that silently changed a stage's length, learning rate or
    loss would give neither the old run nor the new one."""
    plan = _read_json(Path(run_dir) / STAGES_FILE)
    if not plan or "stages" not in plan:
        return  # written by rank 0 before any checkpoint; absent only for hand-made run dirs
    # a key the plan lacks was added after that run started (e.g. divergence): its default then
    known = set(PLAN_KEYS).intersection(*plan["stages"]) if plan["stages"] else set(PLAN_KEYS)
    keys = [k for k in PLAN_KEYS if k in known or k in ("name", "start_step", "end_step")]
    was = [{k: s.get(k) for k in keys} for s in plan["stages"]]
    now = [{k: d.get(k) for k in keys} for d in (s.to_dict() for s in stages)]
    if was == now:
        return
    diff = next(
        (f"stage {i + 1}: {k} was {a.get(k)!r}, now {b.get(k)!r}" for i, (a, b) in enumerate(zip(was, now))
         for k in keys if a.get(k) != b.get(k)),
        f"{len(was)} stages before, {len(now)} now",
    )
    raise UserError(f"--resume would continue {run_dir} with another schedule ({diff}); resume with the settings "
                    f"the run was started with, or start a new run (another output_dir)")


def read_log(run_dir) -> list[dict]:
    """The entries of ``<run_dir>/log.jsonl``, oldest first ([] if there is none).

    The log is appended one line per entry (``StageCallback.on_log``), so a crash in the
    middle of a write can leave its last line cut short: that line is dropped."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    entries = []
    for i, line in enumerate(lines):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise UserError(f"{path} line {i + 1} is not JSON: the log was edited or damaged; "
                            f"restore it or start the run afresh") from None
    return entries


def initial_eval(history: list[dict]) -> dict | None:
    """The ``eval_*`` metrics logged at step 0 (a fresh run's starting point), or None."""
    return next(({k: v for k, v in e.items() if k.startswith("eval_")}
                 for e in history if e.get("step") == 0 and eval_kl_key(e)), None)


def _trim_log(run_dir: Path, upto_step: int) -> None:
    """Drop log entries past ``upto_step`` (logged by the interrupted run after the checkpoint)."""
    if not (run_dir / LOG_FILE).is_file():
        return
    keep = [e for e in read_log(run_dir) if e.get("step", 0) <= upto_step]
    atomic_write_text(run_dir / LOG_FILE, "".join(json.dumps(e) + "\n" for e in keep))


def previous_results(run_dir: Path) -> list[Path]:
    """What an earlier run left in ``run_dir`` that a fresh run would remove (checkpoints, final/)."""
    run_dir = Path(run_dir)
    found = sorted(p for p in run_dir.glob("*/checkpoint-*") if p.is_dir())
    return found + [p for p in (run_dir / FINAL_DIR,) if p.is_dir()]


def check_may_start(run_dir: Path, overwrite: bool) -> None:
    """UserError if a fresh run in ``run_dir`` would delete an earlier run's results without ``overwrite``."""
    old = previous_results(run_dir)
    if old and not overwrite:
        what = f"{len(old)} checkpoint(s)" if old[-1].name != FINAL_DIR else f"final/ and {len(old) - 1} checkpoint(s)"
        raise UserError(f"{run_dir} holds an earlier run ({what}); pass --resume to continue it, --overwrite "
                        f"(overwrite=true) to replace it, or choose another output_dir")


def _clear_previous(run_dir: Path, stages: list[Stage]) -> None:
    """A fresh start must not leave an older run's checkpoints where ``--resume latest`` finds them."""
    old = [p for p in run_dir.glob("*/checkpoint-*") if p.is_dir()]
    if old:
        logger.warning(
            "starting a fresh run in %s: removing %d checkpoint(s) of the previous run (pass resume to continue it)",
            run_dir,
            len(old),
        )
    for d in {p.parent for p in old} | {run_dir / s.dirname for s in stages} | {run_dir / FINAL_DIR}:
        shutil.rmtree(d, ignore_errors=True)
    for f in (LOG_FILE, STAGES_FILE):
        (run_dir / f).unlink(missing_ok=True)


class StageCallback(TrainerCallback):
    """Writes log.jsonl with global steps and saves a checkpoint at the stage's end.

    (The trainer itself writes each checkpoint's ``stage.json``, before ``checkpoint.json``.)"""

    def __init__(self, stage: Stage, run_dir: Path):
        self.stage, self.run_dir = stage, Path(run_dir)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = True  # a checkpoint at every stage boundary
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            entry = {
                "step": self.stage.start_step + state.global_step,
                "stage": self.stage.index,
                "stage_name": self.stage.name,
                "stage_step": state.global_step,
                **{k: v for k, v in logs.items() if k not in ("stage", "global_step")},
            }
            with open(self.run_dir / LOG_FILE, "a") as f:
                f.write(json.dumps(entry) + "\n")
        return control


class StopOnSignal(TrainerCallback):
    """On SIGTERM / SIGINT (``moedistill.signals``): when the optimizer step in progress ends,
    save a checkpoint and stop. Every process stops at the same step (``signals.agreed``: one
    scalar all-reduce per step under torchrun); ``run_stages`` then raises ``Interrupted``."""

    def on_step_end(self, args, state, control, **kwargs):
        if signals.agreed(args.device):
            control.should_save = True
            control.should_training_stop = True
        return control


def _interrupted(signum: int, st: Stage, trainer, run_dir: Path) -> signals.Interrupted:
    """What a stage stopped by a signal kept: the checkpoint of its last step (or the latest complete one)."""
    step = trainer.state.global_step
    ckpt = run_dir / st.dirname / f"checkpoint-{step}"
    if not is_complete(ckpt):  # pragma: no cover - StopOnSignal saves it; a callback may have stopped the stage first
        found = list_checkpoints(run_dir)
        ckpt = found[-1][1] if found else None
    where = f"at global step {st.start_step + step} (stage {st.name!r}, its step {step})"
    kept = f"; checkpoint {ckpt} written" if ckpt is not None else "; no checkpoint was written"
    return signals.Interrupted(signum, where + kept, checkpoint=ckpt, everywhere=True)


# --------------------------------------------------------------------------- driver


def check_stages(model, stages: list[Stage], *, train_dataset=None, eval_dataset=None, teacher=None) -> None:
    """The checks a stage's trainer would make, made up front: every rule of every stage
    takes a parameter and some parameter trains; the teacher's ids (cache or online
    teacher) all have a student logit. Raises UserError; changes nothing."""
    for st in stages:
        plan = assign(model, st.param_groups, where=st.param_groups_key)
        if plan.trainable == 0:
            raise UserError(f"{st.param_groups_key} freezes every parameter in stage {st.name!r}; "
                            f"give some rule lr_multiplier > 0")
    check_targets_vocab(model, teacher=teacher, datasets=(train_dataset, eval_dataset))


def run_stages(
    model,
    stages: list[Stage],
    args,
    run_dir,
    *,
    train_dataset,
    eval_dataset=None,
    teacher=None,
    resume: str | None = None,
    overwrite: bool = False,
    callbacks=(),
    processing_class=None,
) -> dict:
    """Train ``model`` through ``stages`` and save it to ``<run_dir>/final``.

    Args:
        model: the student; trained in place.
        stages: from ``plan_stages``.
        args: base ``TrainingArguments``; each stage gets a copy with its own
            ``output_dir`` (``<run_dir>/NN-<name>``), ``max_steps``, ``learning_rate``
            and ``data_seed`` (base + stage index).
        train_dataset / eval_dataset: cache datasets (items per the cache contract).
        teacher: a model for online distillation, or None (targets from the dataset).
        resume: None (fresh run), ``"latest"`` or a checkpoint directory.
        overwrite: a fresh run may remove an earlier run's checkpoints and final/ here
            (after every check has passed); without it, such a run dir is a UserError.
        callbacks: extra ``TrainerCallback``s for every stage's trainer.
    Returns:
        ``{"run_dir", "final_model" (None if stopped early), "stages", "train_metrics", "engine"
        (``DistillationTrainer.engine()``: which engine, world size, mixed precision, dtype),
        "initial_eval" (fresh runs with an eval set), "final_eval" (with an eval set),
        "stopped_at" (global step, only if a callback stopped a stage early)}``.
    """
    run_dir = Path(run_dir)
    first, ckpt = 0, None
    if resume:
        stage, ckpt, stage_step = find_checkpoint(run_dir, resume, stages)
        first = stage.index
    check_stages(model, stages[first:], train_dataset=train_dataset, eval_dataset=eval_dataset, teacher=teacher)
    if not resume:
        check_may_start(run_dir, overwrite)
    if resume:
        logger.info("resuming stage %s at its step %d (global step %d) from %s", stage.name, stage_step,
                    stage.start_step + stage_step, ckpt)
        if stage_step >= stage.max_steps:
            # Written at the stage's end: that stage is over. Resuming its trainer would train one
            # more step; the next stage starts from these weights with a fresh optimizer, as it does
            # in an uninterrupted run.
            load_weights(model, ckpt)
            first, ckpt = first + 1, None
    done = set(range(first))
    main = args.process_index == 0  # under torchrun every rank runs this; only rank 0 touches the run dir
    if main:
        _prepare_run_dir(run_dir, stages, done, resume_step=stage.start_step + stage_step if resume else None)
    barrier()  # no rank starts writing the stage dirs before rank 0 has cleared them
    result = {
        "run_dir": str(run_dir), "final_model": None, "stages": [s.to_dict() for s in stages], "train_metrics": {}
    }
    trainer = None
    if first == len(stages):  # resumed from the last stage's end: only final/ (and the evaluation) remain
        trainer = _stage_trainer(
            model, stages[-1], args, run_dir, teacher=teacher, train_dataset=train_dataset,
            eval_dataset=eval_dataset, callbacks=callbacks, processing_class=processing_class, eval_on_start=False,
        )
        result["engine"] = trainer.engine()
    # SIGTERM / SIGINT: StopOnSignal ends the stage in progress at a checkpoint, then Interrupted
    with signals.deferred():
        for st in stages[first:]:
            del trainer  # free the previous stage's optimizer state before building the next
            trainer = _stage_trainer(
                model, st, args, run_dir, teacher=teacher, train_dataset=train_dataset, eval_dataset=eval_dataset,
                callbacks=callbacks, processing_class=processing_class,
                eval_on_start=(eval_dataset is not None and resume is None and st.index == 0)
                or (args.eval_on_start and st.index == first),
                purge_step=(stage.start_step + stage_step + 1) if (resume and st.index == first) else None,
            )
            result["engine"] = trainer.engine()
            logger.info(
                "stage %d/%d %r: global steps %d-%d, lr %.3g, alpha %g, temperature %g, tail %s; engine %s x%d, "
                "mixed precision %s, %s weights",
                st.index + 1, len(stages), st.name, st.start_step + 1, st.end_step, st.learning_rate,
                st.loss.alpha, st.loss.temperature, st.loss.tail, *result["engine"].values(),
            )
            out = trainer.train(resume_from_checkpoint=str(ckpt) if (ckpt is not None and st.index == first) else None)
            stop = signals.agreed(trainer.args.device)  # every process, also when the signal came after the last step
            if stop:
                raise _interrupted(stop, st, trainer, run_dir)
            if eval_dataset is not None and resume is None and st.index == 0:
                result["initial_eval"] = _first_eval(trainer.state.log_history)
            result["train_metrics"] = dict(out.metrics)
            if trainer.state.global_step < st.max_steps:
                result["stopped_at"] = st.start_step + trainer.state.global_step
                logger.warning("stage %r stopped early at global step %d; later stages not run", st.name,
                               result["stopped_at"])
                return result
            done.add(st.index)
            if main:
                write_plan(run_dir, stages, done)
    result["final_model"] = str(_save_final(trainer, run_dir))
    if eval_dataset is not None:
        result["final_eval"] = trainer.evaluate()
    return result


def _prepare_run_dir(run_dir: Path, stages: list[Stage], done: set[int], resume_step: int | None) -> None:
    """Rank 0, after every check passed: a resumed run drops the log past its checkpoint, a
    fresh one clears the previous run; then the plan is written."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_step is not None:
        _trim_log(run_dir, resume_step)
    else:
        _clear_previous(run_dir, stages)
    write_plan(run_dir, stages, done)


TENSORBOARD_DIR = "tensorboard"


class _GlobalSteps:
    """A reporting callback (TensorBoard, W&B, ... from ``transformers.integrations``) seen
    through global steps: every event gets a copy of the trainer's state whose
    ``global_step`` is the run's (stage start + the stage's step), so the stages of a run
    form one curve on one x-axis instead of each restarting at step 1."""

    def __init__(self, callback, offset: int):
        self.callback, self.offset = callback, offset

    def __getattr__(self, name):
        attr = getattr(self.callback, name)
        if not name.startswith("on_") or not callable(attr):
            return attr

        def event(args, state, control, **kwargs):
            seen = copy.copy(state)
            seen.global_step = state.global_step + self.offset
            return attr(args, seen, control, **kwargs)

        return event


def _report_globally(trainer, st: Stage, run_dir: Path, purge_step: int | None) -> None:
    """One continuous run per training run in the experiment trackers of ``report_to``:
    global steps on the x-axis (the logs carry ``stage`` as a scalar) and, for TensorBoard,
    one log directory for all stages, ``<run_dir>/tensorboard`` (or TENSORBOARD_LOGGING_DIR).
    A resumed run drops the events past its checkpoint (``purge_step``) so no step shows twice."""
    from transformers.integrations import TensorBoardCallback

    handler = trainer.callback_handler
    for i, cb in enumerate(handler.callbacks):
        if not type(cb).__module__.startswith("transformers.integrations"):
            continue
        if isinstance(cb, TensorBoardCallback) and not os.environ.get("TENSORBOARD_LOGGING_DIR"):
            cb.logging_dir = str(run_dir / TENSORBOARD_DIR)
        if isinstance(cb, TensorBoardCallback) and purge_step is not None and trainer.is_world_process_zero():
            cb.tb_writer = cb._SummaryWriter(log_dir=cb.logging_dir, purge_step=purge_step)
        handler.callbacks[i] = _GlobalSteps(cb, st.start_step)


def _stage_trainer(model, st: Stage, args, run_dir: Path, *, eval_on_start: bool, callbacks, purge_step=None,
                   **kwargs):
    """The trainer of stage ``st``: its own output dir, length, learning rate and shuffling seed.

    ``eval_on_start``: a fresh run evaluates at step 0, the curves' starting point (inside
    train(), after on_train_begin, so loggers such as TensorBoard are set up for the stage's dir)."""
    stage_args = dataclasses.replace(
        args,
        output_dir=str(run_dir / st.dirname),
        max_steps=st.max_steps,
        learning_rate=st.learning_rate,
        data_seed=(args.data_seed if args.data_seed is not None else args.seed) + st.index,
        eval_on_start=eval_on_start,
    )
    trainer = DistillationTrainer(
        model,
        stage_args,
        loss=st.loss,
        param_groups=st.param_groups,
        param_groups_key=st.param_groups_key,
        stage_index=st.index,
        stage_name=st.name,
        step_offset=st.start_step,
        callbacks=[StageCallback(st, run_dir), StopOnSignal(), *callbacks],
        **kwargs,
    )
    _report_globally(trainer, st, run_dir, purge_step)
    return trainer


def _first_eval(log_history: list[dict]) -> dict:
    """The step-0 evaluation of a fresh run (``eval_*`` metrics), logged."""
    m = initial_eval(log_history)
    kl = eval_kl_key(m)
    logger.info("validation before training: %s to the teacher %.4f, CE %.4f, perplexity %.2f",
                kl.removeprefix("eval_"), m[kl], m["eval_ce"], m["eval_perplexity"])
    return m


def _save_final(trainer, run_dir: Path) -> Path:
    """``final/``, whole or absent: every process saves into ``final.tmp`` (sharded engines need
    all of them, hence one fixed name and not ``files.atomic_dir``), then rank 0 renames it
    into place. A crash mid-save leaves final.tmp."""
    final, tmp = run_dir / FINAL_DIR, run_dir / (FINAL_DIR + ".tmp")
    if trainer.args.should_save:
        shutil.rmtree(tmp, ignore_errors=True)
    needed = lambda: model_bytes(trainer.model) + 80 * len(trainer.processing_class or ()) + (1 << 20)  # noqa: E731
    try:
        with disk_full_as_error(final, needed=needed):  # a full disk: one line, and no final/
            trainer.save_model(str(tmp))
    except DiskFullError:
        if trainer.args.should_save:
            shutil.rmtree(tmp, ignore_errors=True)  # give back what the partial save took
        raise
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        replace_dir(tmp, final)
    trainer.accelerator.wait_for_everyone()
    return final
