"""Export a compressed student back to a plain Qwen3-MoE / Mixtral checkpoint.

Every expert is multiplied out, ``W_i = C + B_i A_i``, into the stacked layout of the
original model (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]); everything else
is copied. The result is an ordinary transformers checkpoint (``model_type`` qwen3_moe
or mixtral, no ``auto_map``) that loads without moedistill installed, so serving
engines can run the recovered model. It has the teacher's size again: the export trades
the compression for compatibility.

The export streams: tensors are written in the model's order into safetensors shards of
at most ``max_shard_bytes`` with a ``model.safetensors.index.json`` (what
``from_pretrained`` reads for a sharded checkpoint); one layer's experts are multiplied
out at a time, so the memory beyond the loaded student is about one layer's dense experts
plus one shard, whatever the number of layers (48 dense layers of Qwen3-30B-A3B would be
~57 GB in bf16).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from moedistill.compression.init import copy_non_experts, finish_transplant
from moedistill.compression.modeling_moedistill import ARCHITECTURES, CompressedExperts, find_moe_blocks
from moedistill.errors import UserError
from moedistill.files import atomic_dir, disk_full_as_error
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
        gate_up, down = dense_experts(ex, ex.shared_core_down.dtype)
        block.experts.gate_up_proj = nn.Parameter(gate_up)
        block.experts.down_proj = nn.Parameter(down)
    finish_transplant(dense)
    dense.generation_config = student.generation_config
    if dtype is not None:
        dense = dense.to(dtype)
    dense.config.dtype = dense.get_input_embeddings().weight.dtype
    return dense.eval()


@torch.no_grad()
def dense_experts(ex: CompressedExperts, dtype: torch.dtype, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's experts multiplied out: ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] in ``dtype``.

    ``C + B_i A_i`` in float32 (bf16 checkpoints would lose the low-rank part to rounding),
    ``chunk`` experts at a time written into the ``dtype`` result, so the float32
    temporaries stay small."""
    E, I, H = ex.num_experts, ex.intermediate_dim, ex.hidden_dim
    dev = ex.shared_core_down.device
    gate_up = torch.empty(E, 2 * I, H, dtype=dtype, device=dev)
    down = torch.empty(E, H, I, dtype=dtype, device=dev)
    for p, target, rows in (("gate", gate_up, slice(0, I)), ("up", gate_up, slice(I, 2 * I)),
                            ("down", down, slice(None))):
        C = ex.core(p).float()
        B, A = ex.wrapper(p)
        for s in range(0, E, chunk):
            target[s : s + chunk, rows] = (C + B[s : s + chunk].float() @ A[s : s + chunk].float()).to(dtype)
    return gate_up, down


class _ShardWriter:
    """Tensors -> ``model-0000i-of-0000N.safetensors`` of at most ``max_bytes`` each (a larger tensor gets
    a shard of its own) and ``model.safetensors.index.json`` (one shard: ``model.safetensors``, no
    index, as ``save_pretrained`` writes it); holds at most one shard in memory."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.shards: list[list[str]] = []

    def reserve(self, nbytes: int) -> None:
        """Flush first if ``nbytes`` more would overflow the shard (call before building large tensors)."""
        if self.buffer and self.size + nbytes > self.max_bytes:
            self.flush()

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        self.reserve(nbytes)
        self.buffer[name] = t.detach().cpu().contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if self.buffer:
            save_file(self.buffer, self.out / f"part-{len(self.shards):05d}.safetensors", metadata={"format": "pt"})
            self.shards.append(list(self.buffer))
            self.buffer, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        n, weight_map = len(self.shards), {}
        if n == 1:  # one shard: the plain layout save_pretrained writes (model.safetensors, no index)
            os.replace(self.out / "part-00000.safetensors", self.out / "model.safetensors")
            return
        for i, names in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / f"part-{i:05d}.safetensors", self.out / name)
            weight_map.update(dict.fromkeys(names, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


@torch.no_grad()
def write_plain_shards(student: nn.Module, out: Path, dtype: torch.dtype, max_shard_bytes: int = 2 << 30) -> int:
    """Write ``student``'s plain (dense-expert) state dict into ``out`` as shards + index, layer by layer.

    Returns the bytes written. Tensor names are the plain model's: the compressed experts
    ``<layer>.mlp.experts.{shared_core,wrapper}_*`` become ``gate_up_proj`` and ``down_proj``."""
    experts = {f"{name}.experts.": block.experts for name, block in find_moe_blocks(student)}
    tied = bool(getattr(student.config, "tie_word_embeddings", False))
    writer = _ShardWriter(Path(out), max_shard_bytes)
    done = set()
    for name, t in student.state_dict().items():
        prefix = next((p for p in experts if name.startswith(p)), None)
        if prefix is None:
            if not (tied and name == "lm_head.weight"):
                writer.add(name, t.to(dtype) if t.is_floating_point() else t)
            continue
        if prefix in done:
            continue
        done.add(prefix)
        ex = experts[prefix]
        writer.reserve(3 * ex.num_experts * ex.intermediate_dim * ex.hidden_dim * torch.finfo(dtype).bits // 8)
        gate_up, down = dense_experts(ex, dtype)
        writer.add(prefix + "gate_up_proj", gate_up)
        writer.add(prefix + "down_proj", down)
        del gate_up, down
    writer.close()
    return writer.total


def export_checkpoint(ckpt, out, dtype=None, max_shard_bytes: int = 2 << 30) -> Path:
    """``moedistill export CKPT OUT``: write ``ckpt`` (compressed) to ``out`` as a plain HF checkpoint.

    Args:
        ckpt: directory of a compressed checkpoint (checkpoint-0 or a training checkpoint).
        out: output directory (created; an existing non-empty one is an error).
        dtype: ``"float32" | "bfloat16" | "float16"`` or None to keep the checkpoint's dtype.
        max_shard_bytes: the largest shard (a layer's dense experts, bigger, get one of their own).
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
    dt = parse_dtype(dtype) or student.get_input_embeddings().weight.dtype
    config = plain_config(student)
    config.dtype = dt
    # whole or absent: a crash mid-export leaves only <out>.tmp; a full disk one line (and no <out>.tmp)
    tokenizer_bytes = sum(f.stat().st_size for f in Path(ckpt).glob("tokenizer*") if f.is_file())
    n_student = sum(p.numel() for p in student.parameters())
    n_dense = n_student + sum(
        3 * b.experts.num_experts * b.experts.intermediate_dim * b.experts.hidden_dim
        - sum(p.numel() for p in b.experts.parameters())
        for _, b in find_moe_blocks(student)
    )
    needed = n_dense * torch.finfo(dt).bits // 8 + tokenizer_bytes + (1 << 20)
    with disk_full_as_error(out, needed=needed), atomic_dir(out) as tmp:
        Path(tmp).mkdir(parents=True)
        write_plain_shards(student, Path(tmp), dt, max_shard_bytes)
        config.save_pretrained(tmp)
        if student.generation_config is not None:
            student.generation_config.save_pretrained(tmp)
        if any((Path(ckpt) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            load_tokenizer(str(ckpt)).save_pretrained(tmp)
        else:
            print(f"[export] no tokenizer in {ckpt}; copy one into {out} before serving")
    print(f"[export] {ckpt} -> {out}: {config.architectures[0]}, {n_student:,} -> {n_dense:,} parameters, "
          f"dtype {dt}")
    return out
