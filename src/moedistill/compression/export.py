"""Export a compressed student back to a plain Qwen3-MoE / Mixtral checkpoint.

Every expert is multiplied out, ``W_i = C + B_i A_i``, into the stacked layout of the
original model (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]); everything else
is copied. The result is an ordinary transformers checkpoint (``model_type`` qwen3_moe
or mixtral, no ``auto_map``) that loads without moedistill installed, so serving
engines can run the recovered model. It has the teacher's size again: the export trades
the compression for compatibility.

The export streams: tensors are written in the model's order into safetensors shards of
at most ``max_shard_bytes`` with a ``model.safetensors.index.json`` (what
``from_pretrained`` reads for a sharded checkpoint). Nothing is held whole: the student is
built on the meta device and its tensors are read from the checkpoint one at a time, one
layer's expert factors at most; each shard is written tensor by tensor (the header first,
:func:`write_safetensors`) and the dense experts a few experts at a time as they are
multiplied out. The peak is the largest single tensor (embedding or lm_head) plus one
layer's factors, whatever the number of layers (48 dense layers of Qwen3-30B-A3B would be
~57 GB in bf16; the compressed student ~15 GB).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from moedistill.compression.init import copy_non_experts, finish_transplant
from moedistill.compression.modeling_moedistill import (
    ARCHITECTURES,
    CompressedExperts,
    count_parameters,
    find_moe_blocks,
)
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
    """One layer's experts multiplied out: ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] in ``dtype``
    (in memory; the export streams the same chunks, :func:`dense_expert_chunks`, to disk instead)."""
    return tuple(torch.cat(list(dense_expert_chunks(ex, which, dtype, chunk))) for which in ("gate_up", "down"))


@torch.no_grad()
def dense_expert_chunks(ex: CompressedExperts, which: str, dtype: torch.dtype, chunk: int = 8):
    """``gate_up_proj`` (``which="gate_up"``, [c, 2I, H]) or ``down_proj`` ([c, H, I]) ``chunk`` experts at a time.

    ``C + B_i A_i`` in float32 (bf16 checkpoints would lose the low-rank part to rounding),
    cast to ``dtype`` per chunk, so the float32 temporaries stay small. The chunks, in order,
    are the stacked tensor's bytes in order (expert-major), so they can be written as made."""
    projs = ("gate", "up") if which == "gate_up" else ("down",)
    cores = [ex.core(p).float() for p in projs]
    for s in range(0, ex.num_experts, chunk):
        parts = []
        for p, C in zip(projs, cores):
            B, A = ex.wrapper(p)
            parts.append(C + B[s : s + chunk].float() @ A[s : s + chunk].float())
        yield (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).to(dtype)


# safetensors dtype names, in the order of its Rust enum (save_file sorts by it, descending)
_ST_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
              torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
              torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64"}
_ST_RANK = {d: i for i, d in enumerate(_ST_DTYPES)}
_ST_TORCH = {v: k for k, v in _ST_DTYPES.items()}


def write_safetensors(path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], produce,
                      metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file tensor by tensor, each as soon as it is made: at most one tensor in memory.

    Args:
        specs: ``name -> (dtype, shape)`` of every tensor in the file.
        produce: ``produce(name)`` -> the tensor, or an iterable of chunks whose bytes, in order,
            are the tensor's (e.g. slices along dim 0); called once per name, in file order.
        metadata: the header's ``__metadata__`` (str -> str).
    Returns:
        the bytes of tensor data written.

    ``safetensors.torch.save_file`` takes a dict of whole tensors and serialises the file in memory
    first (a byte copy of everything); the format is simple enough to stream: an 8-byte little-endian
    header length, a JSON header (``dtype``, ``shape``, ``data_offsets`` per tensor, padded with spaces
    to 8 bytes), then the raw little-endian bytes. The header, the tensor order (dtype descending,
    then name) and so the bytes are those ``save_file`` writes for the same tensors and metadata.
    """
    order = sorted(specs, key=lambda n: (-_ST_RANK[specs[n][0]], n))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset, sizes = 0, {}
    for n in order:
        dt, shape = specs[n]
        sizes[n] = math.prod(shape) * dt.itemsize
        header[n] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + sizes[n]]}
        offset += sizes[n]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for n in order:
            out = produce(n)
            written = 0
            for t in (out,) if isinstance(out, torch.Tensor) else out:
                if t.dtype != specs[n][0]:
                    raise ValueError(f"{n}: got {t.dtype}, the header says {specs[n][0]}")
                b = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(b))
                written += b.nbytes
            if written != sizes[n]:
                raise ValueError(f"{n}: wrote {written} bytes, the header says {sizes[n]}")
    return offset


class _FileTensors:
    """A checkpoint's tensors read one at a time from its safetensors files (plain reads, no mmap,
    so only the tensor asked for is in memory): ``model.safetensors`` or the index's shards."""

    def __init__(self, ckpt: Path):
        index = ckpt / "model.safetensors.index.json"
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
                 else ["model.safetensors"])
        self.where: dict[str, tuple[Path, int, torch.dtype, list[int], int]] = {}
        for name in files:
            path = ckpt / name
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            for k, v in header.items():
                if k != "__metadata__":
                    a, b = v["data_offsets"]
                    self.where[k] = (path, 8 + n + a, _ST_TORCH[v["dtype"]], v["shape"], b - a)

    def dtype(self, name: str) -> torch.dtype:
        return self.where[name][2]

    def get(self, name: str) -> torch.Tensor:
        path, start, dt, shape, nbytes = self.where[name]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(start)
            if f.readinto(memoryview(buf.numpy())) != nbytes:
                raise UserError(f"cannot load model {str(path.parent)!r}: {path.name} is cut short; rebuild the "
                                f"checkpoint if it was damaged")
        return buf.view(dt).reshape(shape)

    def load(self, module: nn.Module, prefix: str) -> None:
        """Give ``module``'s (meta) parameters their values from the file (one layer's experts)."""
        for n, p in list(module.named_parameters(recurse=False)):
            module._parameters[n] = nn.Parameter(self.get(prefix + n), requires_grad=False)

    def release(self, module: nn.Module) -> None:
        module.to_empty(device="meta")


class _ModelTensors:
    """The same interface over a student loaded whole (a checkpoint not in safetensors)."""

    def __init__(self, model: nn.Module):
        self.state = model.state_dict()

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]

    def load(self, module: nn.Module, prefix: str) -> None:
        pass

    def release(self, module: nn.Module) -> None:
        pass


@torch.no_grad()
def write_plain_shards(student: nn.Module, out: Path, dtype: torch.dtype, max_shard_bytes: int = 2 << 30,
                       tensors=None) -> int:
    """Write ``student``'s plain (dense-expert) state dict into ``out`` as shards + index, layer by layer.

    Tensors go in the model's order into ``model-0000i-of-0000N.safetensors`` of at most
    ``max_shard_bytes`` each (a larger tensor gets a shard of its own; a layer's ``gate_up_proj``
    and ``down_proj`` start a new shard together if they do not fit) and
    ``model.safetensors.index.json``; one shard: ``model.safetensors``, no index, as
    ``save_pretrained`` writes it. Tensor names are the plain model's: the compressed experts
    ``<layer>.mlp.experts.{shared_core,wrapper}_*`` become ``gate_up_proj`` and ``down_proj``.
    ``tensors`` (``_FileTensors`` / ``_ModelTensors``) gives the student's values; ``student`` may
    then be on the meta device. Returns the bytes written.

    Each shard is written tensor by tensor (:func:`write_safetensors`) and each dense expert
    tensor chunk by chunk, so besides one layer's expert factors the memory holds one tensor
    (the largest is the embedding or lm_head) or one chunk of experts, whatever the number of
    layers and the shard size.
    """
    tensors = tensors or _ModelTensors(student)
    experts = {f"{name}.experts.": block.experts for name, block in find_moe_blocks(student)}
    tied = bool(getattr(student.config, "tie_word_embeddings", False))
    # the plan: name -> (dtype, shape), and what makes it
    plan: list[tuple[str, torch.dtype, tuple[int, ...], object]] = []
    done = set()
    for name, t in student.state_dict().items():
        prefix = next((p for p in experts if name.startswith(p)), None)
        if prefix is None:
            if not (tied and name == "lm_head.weight"):
                dt = dtype if t.is_floating_point() else t.dtype
                plan.append((name, dt, tuple(t.shape), name))
        elif prefix not in done:
            done.add(prefix)
            ex = experts[prefix]
            E, I, H = ex.num_experts, ex.intermediate_dim, ex.hidden_dim
            plan.append((prefix + "gate_up_proj", dtype, (E, 2 * I, H), (prefix, "gate_up")))
            plan.append((prefix + "down_proj", dtype, (E, H, I), (prefix, "down")))
    shards: list[list[int]] = []
    size = total = 0
    for i, (name, dt, shape, how) in enumerate(plan):
        nbytes = math.prod(shape) * dt.itemsize
        if isinstance(how, tuple) and how[1] == "gate_up":  # reserve the layer's pair
            nbytes_pair = nbytes + math.prod(plan[i + 1][2]) * dtype.itemsize
            if shards and shards[-1] and size + nbytes_pair > max_shard_bytes:
                shards.append([])
                size = 0
        if not shards or (shards[-1] and size + nbytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
        total += nbytes

    by_name = {p[0]: p for p in plan}
    loaded = {"prefix": None, "left": 0}  # the layer whose expert factors are in memory

    def produce(name):
        _, dt, _, how = by_name[name]
        if isinstance(how, str):
            t = tensors.get(how)
            return t.to(dt) if t.is_floating_point() else t
        return experts_chunks(*how, dt)

    def experts_chunks(prefix, which, dt):
        ex = experts[prefix]
        if loaded["prefix"] != prefix:
            if loaded["prefix"] is not None:
                tensors.release(experts[loaded["prefix"]])
            tensors.load(ex, prefix)
            loaded.update(prefix=prefix, left=2)
        yield from dense_expert_chunks(ex, which, dt)
        loaded["left"] -= 1
        if loaded["left"] == 0:
            tensors.release(ex)
            loaded["prefix"] = None

    n = len(shards)
    weight_map = {}
    for k, idx in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        part = out / f"part-{k:05d}.safetensors"
        specs = {plan[i][0]: (plan[i][1], plan[i][2]) for i in idx}
        write_safetensors(part, specs, produce, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(specs, fname))
    for k in range(n):  # the final names only once every shard is whole
        fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out / f"part-{k:05d}.safetensors", out / fname)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {p[0]: weight_map[p[0]] for p in plan}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def _open_student(ckpt: Path):
    """``(student, tensors)``: the compressed model built on the meta device and its weights read from
    the checkpoint's safetensors one tensor at a time when needed (a checkpoint whose files do not hold
    every tensor under the model's names is loaded whole instead, as ``get_model`` does)."""
    if not (ckpt / "config.json").is_file():
        raise UserError(f"{ckpt} is not a checkpoint (no config.json); pass a compressed checkpoint directory "
                        f"(e.g. .../compressed/checkpoint-0 or a run's final/)")
    try:
        config = AutoConfig.from_pretrained(str(ckpt))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model {str(ckpt)!r}: {first}; check the path, or rebuild the "
                        f"checkpoint if it was damaged") from None
    with torch.device("meta"):
        student = AutoModelForCausalLM.from_config(config)
    _plain_classes(student)  # a clear error before any work if this is not ours
    try:
        tensors = _FileTensors(ckpt)
    except (OSError, ValueError, KeyError, struct.error):
        tensors = None
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tensors is None or not set(student.state_dict()) - ({"lm_head.weight"} if tied else set()) <= set(
            tensors.where):
        student, _ = get_model(str(ckpt), with_tokenizer=False)
        return student, _ModelTensors(student)
    student.generation_config = (GenerationConfig.from_pretrained(str(ckpt))
                                 if (ckpt / "generation_config.json").is_file()
                                 else GenerationConfig.from_model_config(config))
    return student, tensors


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
    under_file = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if under_file is not None:
        raise UserError(f"export target {out} is under {under_file}, which is a file; choose a new directory")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"export target {out} exists and is not empty; choose a new directory or remove it")
    if not Path(ckpt).is_dir():
        raise UserError(
            f"checkpoint {ckpt} is not a directory; pass the checkpoint directory (e.g. .../compressed/checkpoint-0)"
        )
    student, tensors = _open_student(Path(ckpt))
    dt = parse_dtype(dtype) or tensors.dtype(
        next(n for n, p in student.named_parameters() if p is student.get_input_embeddings().weight))
    config = plain_config(student)
    config.dtype = dt
    # whole or absent: a crash mid-export leaves only <out>.tmp; a full disk one line (and no <out>.tmp)
    tokenizer_bytes = sum(f.stat().st_size for f in Path(ckpt).glob("tokenizer*") if f.is_file())
    n_student = count_parameters(student)  # per-expert ranks: without their zero padding, as the report counts
    n_dense = sum(p.numel() for n, p in student.named_parameters() if ".experts." not in n) + sum(
        3 * b.experts.num_experts * b.experts.intermediate_dim * b.experts.hidden_dim
        for _, b in find_moe_blocks(student)
    )
    needed = n_dense * torch.finfo(dt).bits // 8 + tokenizer_bytes + (1 << 20)
    with disk_full_as_error(out, needed=needed), atomic_dir(out) as tmp:
        Path(tmp).mkdir(parents=True)
        write_plain_shards(student, Path(tmp), dt, max_shard_bytes, tensors)
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
