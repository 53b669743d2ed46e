"""DistillationTrainer: a ``transformers.Trainer`` that trains a student on a teacher's targets.

Glue only; the math lives in ``moedistill.losses``. What it overrides, and why:

- ``compute_loss``: the blended loss. With ``loss.fused_linear`` the student's lm_head call
  is replaced, for the forward, by ``fused_linear_teacher_loss`` on the hidden states it
  receives (so the model's own forward, wrappers, DDP and the router aux loss are
  unchanged): the lm_head's weight is applied chunk by chunk inside the loss and the
  [B, T, V] logits never exist. Offline mode
  reads the teacher's sparse targets from the batch (``target_ids`` / ``target_logprobs`` [/ ``target_counts``] of an
  ``open_cache`` dataset) and calls ``distillation_loss``; online mode runs a teacher
  model beside the student under ``no_grad`` and calls ``dense_distillation_loss`` on
  its full logits. The student never gets ``labels=`` (HF models would shift them a
  second time; ours are already shifted). An MoE student whose config sets
  ``output_router_logits`` adds its load-balancing loss x ``router_aux_loss_coef``.
  A NaN/inf loss stops the run with a message naming the step and the batch (the
  training set is wrapped in ``IndexedDataset`` so that a batch knows its sequences).
- ``get_batch_samples``: counts the prediction targets of the whole optimizer step as
  ``labels != -100`` over the full label tensor. The Trainer's own count drops
  position 0 for causal LMs (it expects unshifted labels); ours are shifted, so every
  non-masked label is a target. The loss is a sum over positions divided by that
  count, so gradient accumulation gives the gradient of one big batch.
- ``create_optimizer``: regex parameter groups (``moedistill.param_groups``).
- ``log``: adds ``ce_loss``, ``kl_loss`` (and ``router_aux_loss``) averaged over the
  logging window like the Trainer's ``loss``, plus ``stage`` / ``global_step`` when the
  trainer runs one stage of a schedule.
- ``evaluate``: token-weighted CE, KL to the teacher at temperature 1 and perplexity.
- ``_save_checkpoint`` / ``train``: every checkpoint ends with ``checkpoint.json`` (sizes
  and checksums, ``moedistill.integrity``), written before old checkpoints are rotated
  away; a resume verifies it first, so a checkpoint cut short by a crash or a full disk
  is never loaded. ``resume_from_checkpoint=True`` takes the latest complete one.

Before step 1 the teacher's vocabulary (the cache's, or the online teacher's) is checked
against the student's: an id the student has no logit for is a UserError.

Items are stacked by ``collate``; ``remove_unused_columns`` is forced off so the targets
reach the loss.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, Trainer
from transformers.trainer_optimizer import is_optimizer_factory
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from moedistill import integrity
from moedistill.config import LossConfig, ParamGroupsConfig
from moedistill.errors import UserError
from moedistill.files import atomic_write_json, disk_full_as_error, model_bytes
from moedistill.losses import IGNORE_INDEX, fused_linear_teacher_loss, teacher_loss
from moedistill.models import whole_under_zero3
from moedistill.param_groups import assign, format_table, freeze, optimizer_groups
from moedistill.targets import KL_NAMES, PAD_VALUES, DenseTargets, SampledTargets, from_batch

logger = logging.getLogger(__name__)

# Inside every checkpoint a trainer of one stage writes: which stage, which step (read by
# moedistill.stages to resume in the right stage). Checksummed with the rest by checkpoint.json.
CHECKPOINT_STAGE_FILE = "stage.json"


class NonFiniteLossError(UserError):
    """The loss became NaN or inf; training stops rather than train on garbage."""


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose dict items also carry ``index``, their position in it.

    The trainer wraps its training set in it so that a batch knows which sequences it
    holds (``inputs["index"]``) and an error can name them."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return {**item, "index": int(i)} if isinstance(item, dict) else item


class _EvalShard(torch.utils.data.Dataset):
    """Process ``rank``'s share of ``dataset``: items rank, rank + world, ..., then
    copies of item 0 with every label -100 up to ceil(len / world) items."""

    def __init__(self, dataset, world: int, rank: int):
        self.dataset = dataset
        self.indices = list(range(rank, len(dataset), world))
        self.length = -(-len(dataset) // world)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if i < len(self.indices):
            return self.dataset[self.indices[i]]
        item = dict(self.dataset[0])
        item["labels"] = torch.full_like(torch.as_tensor(item["labels"]), IGNORE_INDEX)
        return item


def check_fused_engine(engine: str | None) -> None:
    """``loss.fused_linear`` under ``engine`` ("FSDP1" / "FSDP2" / "DeepSpeed" when one shards the
    model, else None). FSDP2 holds the root unit's parameters (the lm_head with them) gathered
    through the model's forward, which is where the fused loss runs, and reduces the weight's
    gradient the fused loss returns like any other; tested with 2 processes against one
    (tests/test_reliability.py). FSDP1 and DeepSpeed are refused until tested the same way: ZeRO-3
    gathers the lm_head weight only inside the lm_head's own forward."""
    if engine and engine != "FSDP2":
        raise UserError(
            f"loss.fused_linear=true is not supported under {engine} yet (the lm_head weight is sharded "
            f"across processes and is not gathered where the fused loss reads it); set loss.fused_linear=false"
            + ("" if engine != "FSDP1" else " or use FSDP2 (fsdp_version: 2)")
        )


def fused_linear_head(model):
    """The student's output layer for ``loss.fused_linear``, or a UserError saying why not."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise UserError(
            f"loss.fused_linear=true needs a student whose output layer is an nn.Linear, got "
            f"{type(head).__name__}; set loss.fused_linear=false"
        )
    config = getattr(model, "config", None)
    for key in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, key, None) not in (None, 1.0):
            raise UserError(
                f"loss.fused_linear=true would skip the student's {key}={getattr(config, key)} applied after "
                f"the lm_head; set loss.fused_linear=false"
            )
    return head


@contextmanager
def _forward_replaced(module, fn):
    """``module(x)`` calls ``fn(x)`` for the block. Where accelerate has hooked the module
    (``_old_forward``: a device map or offload), ``fn`` replaces the hooked function, so the
    hook still moves the weights and inputs first; otherwise the instance's ``forward``.
    Either is put back afterwards, also after an exception."""
    name = "_old_forward" if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__ else "forward"
    had = name in module.__dict__
    old = module.__dict__.get(name)
    setattr(module, name, fn)
    try:
        yield
    finally:
        if had:
            setattr(module, name, old)
        else:
            delattr(module, name)


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    """Stack a list of items into a batch.

    Every tensor-like field is stacked along a new batch dim: ``input_ids`` / ``labels``
    [L] -> [B, L]; ``target_*`` [L, W] -> [B, L, W]. Items of different widths W (sampled
    targets) are padded on the W axis to the widest item with the padding markers of
    ``moedistill.targets``. Non-tensor fields are dropped.
    """
    batch = {}
    for key, first in features[0].items():
        if isinstance(first, (str, bytes)) or first is None:
            continue
        tensors = [torch.as_tensor(f[key]) for f in features]
        if key in PAD_VALUES and len({t.shape[-1] for t in tensors}) > 1:
            width = max(t.shape[-1] for t in tensors)
            tensors = [F.pad(t, (0, width - t.shape[-1]), value=PAD_VALUES[key]) for t in tensors]
        batch[key] = torch.stack(tensors)
    return batch


def load_weights(model, checkpoint) -> None:
    """Copy the weights saved in ``checkpoint`` into ``model`` (a plain, unwrapped HF model).

    Through ``from_pretrained``, which converts transformers 5's per-expert Hub layout back
    to stacked expert tensors; a plain ``load_state_dict`` of the files would silently skip
    them (huggingface/transformers#48805). Costs a second copy of the weights on the CPU."""
    logger.info("loading the student's weights from %s", checkpoint)
    dtype = next(model.parameters()).dtype
    with whole_under_zero3(always=True):
        loaded = type(model).from_pretrained(checkpoint, dtype=dtype, device_map="cpu")
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded


def _refresh_fsdp2_grad_dtypes(model) -> None:
    """After a stage changed which parameters train, let FSDP2 see it. ``fully_shard`` fixes each
    unit's gradient dtype when it first runs, from the parameters that require grad then: a unit
    frozen in a wrappers-only stage gets none, and when the next stage unfreezes it, its reduced
    bf16/fp16 gradients (mixed precision) are assigned to the float32 parameters uncast
    ("attempting to assign a gradient with dtype BFloat16 to a tensor with grad_dtype Float").
    A model not yet sharded (the first stage) has nothing to refresh."""
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)  # torch's FSDPModule
        group = get_state()._fsdp_param_group if get_state is not None else None
        if group is not None:
            group._init_mp_dtypes()


class DistillationTrainer(Trainer):
    """Trainer for knowledge distillation into ``model`` (the student).

    Args:
        model: the student (any HF causal LM).
        args: ``TrainingArguments``; ``remove_unused_columns`` is set False.
        teacher: None for offline mode (targets come from the dataset), or a causal LM
            with the student's vocabulary for online mode.
        loss: alpha, temperature, tail, divergence, beta and chunk_size of the loss (``LossConfig``);
            evaluation reports KL whatever the divergence (``eval_loss`` is the training objective).
        param_groups: regex learning-rate rules; None trains every parameter at the base lr.
        param_groups_key: the config key named in error messages about the rules.
        stage_index, stage_name, step_offset: set when this trainer runs one stage of a
            schedule; logs then carry ``stage`` and ``global_step`` = offset + step.
        **kwargs: passed to ``transformers.Trainer`` (train_dataset, eval_dataset,
            callbacks, processing_class, ...); ``data_collator`` defaults to ``collate``.
    """

    # compute_loss divides by num_items_in_batch of the whole accumulated step
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model,
        args,
        *,
        teacher=None,
        loss: LossConfig | None = None,
        param_groups: ParamGroupsConfig | None = None,
        param_groups_key: str = "param_groups",
        stage_index: int | None = None,
        stage_name: str | None = None,
        step_offset: int = 0,
        **kwargs,
    ):
        if args.remove_unused_columns:
            args.remove_unused_columns = False  # the targets are not forward() arguments of the student
        kwargs.setdefault("data_collator", collate)
        train = kwargs.get("train_dataset")
        # before step 1: ids the student lacks would fail deep in the loss
        integrity.check_targets_vocab(model, teacher=teacher, datasets=(train, kwargs.get("eval_dataset")))
        if isinstance(train, torch.utils.data.Dataset) and not isinstance(train, torch.utils.data.IterableDataset):
            kwargs["train_dataset"] = IndexedDataset(train)
        self.loss_config = loss or LossConfig()
        self.teacher = teacher
        self.stage_index, self.stage_name, self.step_offset = stage_index, stage_name, step_offset
        self.param_plan = assign(model, param_groups or ParamGroupsConfig(), where=param_groups_key)
        freeze(model, self.param_plan)
        _refresh_fsdp2_grad_dtypes(model)
        if self.param_plan.trainable == 0:
            where = f"stage {stage_name!r}" if stage_name else "the run"
            raise UserError(f"{param_groups_key} freezes every parameter in {where}; give some rule lr_multiplier > 0")
        super().__init__(model=model, args=args, **kwargs)
        self._zero3_frozen_inputs(model)
        self._lm_head = self._fused_head(model) if self.loss_config.fused_linear else None
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            if getattr(teacher, "hf_device_map", None) is None:
                teacher.to(self.args.device)
        self._parts = None  # [ce, kl, router aux] summed since the last training log
        self._parts_since = None  # global step at the start of that window
        self._has_aux = False
        if self.is_world_process_zero():
            title = f"parameter groups{f' (stage {stage_name})' if stage_name else ''}:"
            logger.info(
                format_table(
                    self.param_plan, learning_rate=args.learning_rate, weight_decay=args.weight_decay, title=title
                )
            )

    def engine(self) -> dict:
        """What trains: ``{"engine": "single" | "ddp" | "fsdp" | "deepspeed-zero<N>", "world_size",
        "mixed_precision": "no" | "bf16" | "fp16", "dtype"}`` (the student's parameter dtype)."""
        if self.is_deepspeed_enabled:
            engine = f"deepspeed-zero{self.accelerator.state.deepspeed_plugin.zero_stage}"
        elif self.is_fsdp_enabled:
            engine = f"fsdp{self._fsdp_version()}"
        else:
            engine = "ddp" if self.args.world_size > 1 else "single"
        precision = "bf16" if self.args.bf16 else ("fp16" if self.args.fp16 else "no")
        dtype = next(iter(self.accelerator.unwrap_model(self.model).parameters())).dtype
        return {"engine": engine, "world_size": self.args.world_size, "mixed_precision": precision,
                "dtype": str(dtype).removeprefix("torch.")}

    def _fsdp_version(self) -> int:
        """The FSDP version accelerate runs (1 where no plugin says otherwise, its default)."""
        return getattr(getattr(self.accelerator.state, "fsdp_plugin", None), "fsdp_version", 1)

    def _zero3_frozen_inputs(self, model) -> None:
        """Under DeepSpeed ZeRO-3 with frozen parameters (e.g. a wrappers-only stage), make the
        embeddings' output require grad. ZeRO-3 gathers a module's partitioned weights for its
        backward and frees them again by hooks on the module's inputs and outputs that count
        only tensors requiring grad; behind a frozen embedding the first layers' inputs
        require none, and their trainable experts' weights were freed before their gradients
        were accumulated. Costs the input gradients of the frozen layers in front."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if not self.is_deepspeed_enabled or plugin is None or plugin.zero_stage != 3 or self.param_plan.frozen == 0:
            return
        target = self.accelerator.unwrap_model(model)
        if hasattr(target, "enable_input_require_grads"):
            target.enable_input_require_grads()

    # ------------------------------------------------------------------ loss

    def _fused_head(self, model):
        fsdp = f"FSDP{self._fsdp_version()}" if self.is_fsdp_enabled else None
        check_fused_engine(fsdp or ("DeepSpeed" if self.is_deepspeed_enabled else None))
        return fused_linear_head(model)

    def _targets(self, inputs):
        """The teacher's targets of a batch: the online teacher's logits (``DenseTargets``),
        else the batch's cached targets (``TopKTargets`` / ``SampledTargets``)."""
        if self.teacher is not None:
            input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
            dev = self.teacher.device
            with torch.no_grad():
                teacher_logits = self.teacher(
                    input_ids=input_ids.to(dev),
                    attention_mask=None if attention_mask is None else attention_mask.to(dev),
                    use_cache=False,
                ).logits.to(input_ids.device)
            return DenseTargets(teacher_logits)
        targets = from_batch(inputs)
        if targets is None:
            raise UserError(
                "the batch has no teacher targets (target_ids); train on a cache from "
                "moedistill.cache.open_cache or pass teacher= for online distillation"
            )
        return targets

    def _student_loss(self, model, inputs, targets, **loss_kw):
        """Student forward and the blended loss -> (logits, router aux loss or None, loss parts).

        With ``loss.fused_linear`` the loss is computed inside the lm_head's call (its forward
        is swapped for the fused loss during the student's forward, inside any wrapper: DDP
        then sees the lm_head's weight used by the forward's output, and accelerate's device
        hooks still run), the model's ``logits`` are the loss, and the first value returned
        is the final hidden states instead of the logits."""
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        if self._lm_head is None:
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            parts = self._distill(outputs.logits, inputs, targets, **loss_kw)
            return outputs.logits, getattr(outputs, "aux_loss", None), parts
        box = {}

        def fused_head(hidden):
            box["hidden"] = hidden
            box["parts"] = self._distill(hidden, inputs, targets, **loss_kw)
            return box["parts"].total

        with _forward_replaced(self._lm_head, fused_head):
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if "parts" not in box:
            raise RuntimeError("loss.fused_linear: the student's forward never called its output layer")
        return box["hidden"], getattr(outputs, "aux_loss", None), box["parts"]

    def _distill(self, logits, inputs, targets, *, alpha, temperature, tail, num_items_in_batch,
                 divergence="forward_kl", beta=None):
        """The blended loss of one micro-batch -> (total, ce, kl) from ``moedistill.losses``;
        with ``loss.fused_linear``, ``logits`` are the final hidden states and the lm_head's
        weight (and bias) go into the loss (see ``_student_loss``)."""
        kw = dict(alpha=alpha, temperature=temperature, tail=tail, divergence=divergence, beta=beta,
                  num_items_in_batch=num_items_in_batch, chunk_size=self.loss_config.chunk_size)
        if self._lm_head is not None:
            head = self._lm_head
            return fused_linear_teacher_loss(logits, head.weight, inputs["labels"], targets, lm_head_bias=head.bias,
                                             **kw)
        return teacher_loss(logits, inputs["labels"], targets, **kw)

    def _where(self, inputs) -> str:
        """``step N (stage 'x', its step n), batch of training sequences [i, j, ...]`` for error messages."""
        step = self.step_offset + self.state.global_step + 1
        where = f" (stage {self.stage_name!r}, its step {self.state.global_step + 1})" if self.stage_name else ""
        index = inputs.get("index")
        batch = f", batch of training sequences {index.tolist()}" if torch.is_tensor(index) else ""
        rank = f" on process {self.args.process_index}" if self.args.world_size > 1 else ""
        return f"step {step}{where}{batch}{rank}"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.loss_config
        lp = inputs.get("target_logprobs")
        if model.training and lp is not None and (torch.isnan(lp).any() or torch.isposinf(lp).any()):
            # the loss would count such a target as padding and train on without a word
            raise NonFiniteLossError(
                f"the teacher targets hold NaN/+inf log-probabilities at {self._where(inputs)}; "
                f"check the dataset (a moedistill cache: `moedistill inspect --verify`)"
            )
        targets = self._targets(inputs)  # first: the teacher's activations are gone before the student's are kept
        logits, aux, parts = self._student_loss(model, inputs, targets, alpha=cfg.alpha, temperature=cfg.temperature,
                                                tail=cfg.tail, divergence=cfg.divergence, beta=cfg.beta,
                                                num_items_in_batch=num_items_in_batch)
        loss = parts.total
        aux_term = None
        if aux is not None:
            # The load-balancing loss is a per-micro-batch mean: weigh it by this micro-batch's
            # share of the step's targets so that an accumulated step sums to about one mean.
            coef = float(getattr(self.accelerator.unwrap_model(model).config, "router_aux_loss_coef", 0.0))
            share = 1.0
            if num_items_in_batch is not None:
                share = inputs["labels"].ne(-100).sum() / torch.as_tensor(num_items_in_batch).clamp(min=1)
            aux_term = coef * aux.to(loss.device) * share
            loss = loss + aux_term
        if model.training:
            if not torch.isfinite(loss.detach()).all():
                raise NonFiniteLossError(
                    f"the training loss is {loss.item()} at {self._where(inputs)} (ce={parts.ce.item():.4g}, "
                    f"kl={parts.kl.item():.4g}); lower the learning rate, use bf16 instead of fp16, "
                    f"or check the cache with `moedistill inspect --verify`"
                )
            self._accumulate(parts, aux_term)
        if self.args.average_tokens_across_devices and self.args.world_size > 1 and num_items_in_batch is not None:
            # num_items_in_batch counts every process's targets; DDP averages gradients over processes
            loss = loss * self.accelerator.num_processes
        if return_outputs:
            if self._lm_head is not None:  # predict(): the logits after all, made here without a graph
                with torch.no_grad():
                    logits = F.linear(logits, self._lm_head.weight, self._lm_head.bias)
            return loss, {"logits": logits}
        return loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches:
            return batches, None
        # labels are already shifted: every label != -100 is a prediction target (position 0 included)
        num_items = sum(b["labels"].ne(-100).sum() for b in batches).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            num_items = self.accelerator.gather(num_items).sum()
        return batches, num_items

    # ------------------------------------------------------------------ checkpoints

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:  # the latest COMPLETE checkpoint, not merely the newest directory
            found = integrity.latest_checkpoint(self.args.output_dir)
            if found is None:
                raise UserError(
                    f"no complete checkpoint to resume from in {self.args.output_dir}; start without resuming"
                )
            resume_from_checkpoint = str(found)
        if resume_from_checkpoint:
            integrity.verify_checkpoint(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _stage_record(self) -> dict | None:
        """What ``stage.json`` says: this trainer's stage and how far it got (None outside a schedule)."""
        if self.stage_index is None:
            return None
        return {
            "index": self.stage_index,
            "name": self.stage_name,
            "stage_step": self.state.global_step,
            "global_step": self.step_offset + self.state.global_step,
            "stage_done": self.state.global_step >= self.state.max_steps,
        }

    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial=trial)
        ckpt = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            integrity.unmark_checkpoint(ckpt)  # rewritten in place: incomplete until marked again
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotate old checkpoints away only once this one is complete
        try:
            # a full disk: one line; the directory stays without checkpoint.json, so it is never resumed from
            with disk_full_as_error(ckpt, needed=self._checkpoint_bytes):
                super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every process's files (RNG states, shards) are written
        if self.args.should_save:
            record = self._stage_record()
            if record is not None:  # part of the checkpoint: written before checkpoint.json checksums it
                atomic_write_json(os.path.join(ckpt, CHECKPOINT_STAGE_FILE), record, indent=2)
            integrity.mark_checkpoint(ckpt, {"global_step": self.step_offset + self.state.global_step})
            rotate_checkpoints(
                output_dir=run_dir, save_total_limit=limit, best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _checkpoint_bytes(self) -> int:
        """About the bytes of one checkpoint: weights, optimizer state, tokenizer (~80 bytes a token), small files."""
        state = self.optimizer.state.values() if self.optimizer is not None else ()
        optimizer = sum(v.numel() * v.element_size() for st in state for v in st.values() if torch.is_tensor(v))
        return model_bytes(self.model) + optimizer + 80 * len(self.processing_class or ()) + (1 << 20)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # transformers 5.x saves MoE checkpoints in the Hub layout (one tensor per expert) but the
        # Trainer's resume reads them back with a plain load_state_dict, which silently leaves the
        # fused expert tensors untouched (huggingface/transformers#48805). Load through
        # from_pretrained, which converts, and copy the weights in. Costs a second copy on the CPU.
        if not self._copy_weights_from(resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        # load_best_model_at_end reads the best checkpoint the same broken way: same remedy
        best = self.state.best_model_checkpoint
        if best is None or not self._copy_weights_from(best):
            super()._load_best_model()
        else:
            logger.info("loaded the best checkpoint %s (%s %s)", best, self.args.metric_for_best_model,
                        self.state.best_metric)

    def _copy_weights_from(self, checkpoint: str, model=None) -> bool:
        """Load the student's weights from ``checkpoint`` via ``from_pretrained``; False where
        that path does not apply (DeepSpeed, FSDP, PEFT, no config.json) and the Trainer's own must."""
        unwrapped = self.accelerator.unwrap_model(self.model if model is None else model)
        plain = not (self.is_deepspeed_enabled or self.is_fsdp_enabled) and type(unwrapped).__name__ != "PeftModel"
        if not (plain and isinstance(unwrapped, PreTrainedModel)
                and os.path.isfile(os.path.join(checkpoint, "config.json"))):
            return False
        load_weights(unwrapped, checkpoint)
        return True

    # ------------------------------------------------------------------ optimizer

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        groups = optimizer_groups(
            opt_model, self.param_plan, learning_rate=self.args.learning_rate, weight_decay=self.args.weight_decay
        )
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
            raise UserError(
                f"training.optim={self.args.optim} builds its own parameter groups, which would bypass the "
                f"param_groups rules; use a standard optimizer such as adamw_torch"
            )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # ------------------------------------------------------------------ logging

    def _accumulate(self, parts, aux_term):
        zero = parts.total.new_zeros(())
        vals = torch.stack(
            [parts.ce.detach().float(), parts.kl.detach().float(),
             (zero if aux_term is None else aux_term.detach()).float()]
        )
        self._has_aux = self._has_aux or aux_term is not None
        if self._parts is None:
            self._parts, self._parts_since = vals, self.state.global_step
        else:
            self._parts = self._parts + vals

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._parts is not None:
            parts = self._parts
            if self.args.world_size > 1:
                # with a global target count each process holds its share; otherwise a local mean
                parts = self.accelerator.reduce(parts, "sum" if self.args.average_tokens_across_devices else "mean")
            steps = max(self.state.global_step - self._parts_since, 1)
            ce, kl, aux = (parts / steps).tolist()
            logs["ce_loss"], logs["kl_loss"] = ce, kl
            if self._has_aux:
                logs["router_aux_loss"] = aux
            self._parts = None
        if "learning_rate" in logs and self.optimizer is not None:
            # the Trainer reports the first group's lr; report the base lr (multiplier 1) instead
            mult = self.optimizer.param_groups[0].get("lr_multiplier")
            if mult:
                logs["learning_rate"] = logs["learning_rate"] / mult
        if self.stage_index is not None:
            logs["stage"] = self.stage_index
            logs["global_step"] = self.step_offset + self.state.global_step
        super().log(logs, start_time)

    # ------------------------------------------------------------------ evaluation

    def _eval_loader(self, dataset):
        """The eval DataLoader; under several processes, each sequence is counted exactly once.

        accelerate evens out the last batch by repeating sequences, which would weigh them
        twice in the metrics. Instead each process takes every ``world_size``-th sequence and
        pads its share to the common length with items whose labels are all -100 (they
        count in no term), so every process runs the same number of forward passes (FSDP
        and ZeRO-3 need that)."""
        world = self.args.world_size
        if world <= 1:
            return self.get_eval_dataloader(dataset)
        return torch.utils.data.DataLoader(
            _EvalShard(dataset, world, self.args.process_index),
            batch_size=self.args.per_device_eval_batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Token-weighted means over the eval set.

        Returns ``{prefix}_loss`` (the training objective at this trainer's alpha and
        temperature), ``{prefix}_ce`` (cross-entropy with the labels, nats/token),
        the KL(teacher || student) at temperature 1 under the name of what it is
        (``moedistill.targets.KL_NAMES``): ``{prefix}_kl_exact`` with an online teacher,
        ``{prefix}_kl_lower_bound`` from a top-k cache (the stored ids with the rest of the
        mass as one bucket -- ``tail`` mode, exact when the ids hold all the mass), or
        ``{prefix}_kl_sampled`` from a sample-mode cache; ``{prefix}_perplexity`` = exp(ce),
        ``{prefix}_tokens`` and ``{prefix}_runtime``. A sample-mode objective evaluated
        on a top-k cache falls back to ``tail`` for ``{prefix}_loss``.
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, dict):
            metrics = {}
            for name, ds in dataset.items():
                metrics.update(self.evaluate(ds, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        if dataset is None:
            raise UserError("evaluate() needs an eval dataset; pass eval_dataset= to the trainer or the call")
        cfg = self.loss_config
        loader = self._eval_loader(dataset)
        model = self.model
        was_training = model.training
        model.eval()
        start = time.time()
        sums = torch.zeros(4, dtype=torch.float64, device=self.args.device)  # loss, ce, kl at T=1, targets
        kind = (
            "dense" if self.teacher is not None
            else ("sample" if getattr(dataset, "mode", None) == "sample" else "topk")
        )
        with torch.no_grad(), self.accelerator.autocast():
            for inputs in loader:
                inputs = self._prepare_inputs(inputs)
                n = inputs["labels"].ne(-100).sum()
                targets = self._targets(inputs)
                kind = targets.kind
                # the eval cache may be top-k while training used sampled targets: use what it holds
                sampled = isinstance(targets, SampledTargets)
                tail = cfg.tail if (cfg.tail == "sample") == sampled else ("sample" if sampled else "tail")
                kl_tail = "sample" if sampled else "tail"
                logits, _, parts = self._student_loss(model, inputs, targets, alpha=cfg.alpha,
                                                      temperature=cfg.temperature, tail=tail, divergence=cfg.divergence,
                                                      beta=cfg.beta, num_items_in_batch=None)
                kl1 = parts.kl
                if cfg.temperature != 1.0 or tail != kl_tail or cfg.divergence != "forward_kl":  # the metric is KL
                    kl1 = self._distill(logits, inputs, targets, alpha=1.0, temperature=1.0, tail=kl_tail,
                                        num_items_in_batch=None).kl
                sums += torch.stack([parts.total * n, parts.ce * n, kl1 * n, n.to(parts.total.dtype)]).double()
        model.train(was_training)
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums, "sum")
        loss, ce, kl, n = sums.tolist()
        n_safe = max(n, 1.0)
        metrics = {
            f"{metric_key_prefix}_loss": loss / n_safe,
            f"{metric_key_prefix}_ce": ce / n_safe,
            f"{metric_key_prefix}_{KL_NAMES[kind]}": kl / n_safe,
            f"{metric_key_prefix}_perplexity": math.exp(min(ce / n_safe, 700.0)),
            f"{metric_key_prefix}_tokens": int(n),
            f"{metric_key_prefix}_runtime": round(time.time() - start, 4),
        }
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
