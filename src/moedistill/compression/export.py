"""Export a compressed student back to a plain Qwen3-MoE / Mixtral checkpoint.

Every expert is multiplied out, ``W_i = C + B_i A_i``, into the stacked layout of the
original model (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]); everything else
is copied. The result is an ordinary transformers checkpoint (``model_type`` qwen3_moe
or mixtral, no ``auto_map``) that loads without moedistill installed, so serving
engines can run the recovered model. It has the teacher's size again: the export trades
the compression for compatibility.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moedistill.compression.init import copy_non_experts, finish_transplant
from moedistill.compression.modeling_moedistill import ARCHITECTURES, CompressedExperts, find_moe_blocks
from moedistill.errors import UserError
from moedistill.files import atomic_dir, disk_full_as_error, model_bytes
from moedistill.models import get_model, load_tokenizer, parse_dtype


def plain_config(student: nn.Module):
    """The teacher-architecture config of a compressed student (``compression`` dropped)."""
    base = _plain_classes(student)
    d = student.config.to_dict()
    for k in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "compression"):
        d.pop(k, None)
    cfg = base[0](**d)
    cfg.architectures = [base[1].__name__]
    return cfg


def _plain_classes(student: nn.Module):
    model_type = student.config.model_type
    for key, (config_cls, _, plain_cfg, plain_model) in ARCHITECTURES.items():
        if model_type == config_cls.model_type:
            return plain_cfg, plain_model
    raise UserError(
        f"model_type {model_type!r} is not a moedistill compressed model; export takes a checkpoint "
        f"written by `moedistill compress` or `train` (model_type moedistill_qwen3_moe or moedistill_mixtral)"
    )


@torch.no_grad()
def to_plain_model(student: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain ``Qwen3MoeForCausalLM`` / ``MixtralForCausalLM`` equal to ``student`` (``W_i = C + B_i A_i``)."""
    config = plain_config(student)
    _, model_cls = _plain_classes(student)
    with torch.device("meta"):
        dense = model_cls(config)
    copy_non_experts(student, dense)
    for (_, block), (_, s_block) in zip(find_moe_blocks(dense), find_moe_blocks(student)):
        ex: CompressedExperts = s_block.experts
        # Multiply out in float32 so bf16 checkpoints do not lose the low-rank part to rounding.
        W = {
            p: (ex.core(p).float() + ex.wrapper(p)[0].float() @ ex.wrapper(p)[1].float())
            for p in ("gate", "up", "down")
        }
        block.experts.gate_up_proj = nn.Parameter(torch.cat([W["gate"], W["up"]], dim=1).to(ex.shared_core_down.dtype))
        block.experts.down_proj = nn.Parameter(W["down"].to(ex.shared_core_down.dtype))
    finish_transplant(dense)
    dense.generation_config = student.generation_config
    if dtype is not None:
        dense = dense.to(dtype)
    dense.config.dtype = dense.get_input_embeddings().weight.dtype
    return dense.eval()


def export_checkpoint(ckpt, out, dtype=None) -> Path:
    """``moedistill export CKPT OUT``: write ``ckpt`` (compressed) to ``out`` as a plain HF checkpoint.

    Args:
        ckpt: directory of a compressed checkpoint (checkpoint-0 or a training checkpoint).
        out: output directory (created; an existing non-empty one is an error).
        dtype: ``"float32" | "bfloat16" | "float16"`` or None to keep the checkpoint's dtype.
    Returns:
        ``Path(out)``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"export target {out} is a file; choose a new directory")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"export target {out} exists and is not empty; choose a new directory or remove it")
    if not Path(ckpt).is_dir():
        raise UserError(
            f"checkpoint {ckpt} is not a directory; pass the checkpoint directory (e.g. .../compressed/checkpoint-0)"
        )
    student, _ = get_model(str(ckpt), with_tokenizer=False)
    _plain_classes(student)  # a clear error before any work if this is not ours
    dense = to_plain_model(student, dtype=parse_dtype(dtype))
    # whole or absent: a crash mid-export leaves only <out>.tmp; a full disk one line (and no <out>.tmp)
    tokenizer_bytes = sum(f.stat().st_size for f in Path(ckpt).glob("tokenizer*") if f.is_file())
    needed = model_bytes(dense) + tokenizer_bytes + (1 << 20)
    with disk_full_as_error(out, needed=needed), atomic_dir(out) as tmp:
        dense.save_pretrained(tmp)
        if any((Path(ckpt) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            load_tokenizer(str(ckpt)).save_pretrained(tmp)
        else:
            print(f"[export] no tokenizer in {ckpt}; copy one into {out} before serving")
    n_student = sum(p.numel() for p in student.parameters())
    n_dense = sum(p.numel() for p in dense.parameters())
    print(f"[export] {ckpt} -> {out}: {type(dense).__name__}, {n_student:,} -> {n_dense:,} parameters, "
          f"dtype {dense.dtype}")
    return out
