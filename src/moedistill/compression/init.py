"""Zero-shot initialisation of the compressed experts from the teacher's weights.

For one MoE layer and one projection with teacher weights ``W_i`` ([out, in], i < E):

- shared core ``C``: the mean of the ``W_i`` (``core="mean"``), or their mean weighted by
  how often the router picked each expert on calibration data (``core="frequency"``);
- wrapper ``B_i A_i``: the rank-r truncated SVD of ``D_i = W_i - C`` (``svd="plain"``),
  which minimises ``||D_i - B_i A_i||_F`` (Eckart-Young; exact at full rank); or, with
  ``svd="activation"`` (SVD-LLM, D²-MoE), the rank-r ``M`` minimising the error on the
  expert's own routed inputs ``X_i`` [n, in]: ``||(D_i - M) X_i^T||_F``. With the Gram
  matrix ``G = X^T X + damping * mean(diag) * 1 = S S^T`` (Cholesky) this is
  ``||(D_i - M) S||_F``, so take the SVD ``D_i S = U Σ V^T`` and un-whiten:
  ``M = U_r Σ_r V_r^T S^{-1}``. For gate and up the inputs are the hidden states routed
  to expert i; for down they are the expert's intermediate activations act(gate) * up.

The singular values are split evenly between the factors (``B = U sqrt(Σ)``,
``A = sqrt(Σ) V^T [S^{-1}]``) so neither factor dwarfs the other when training starts.
Factors are computed once at the largest rank needed and sliced for smaller ranks: the
first r columns of a truncated SVD are the rank-r truncated SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from moedistill.compression.modeling_moedistill import (
    ARCHITECTURES,
    PROJECTIONS,
    CompressedExperts,
    find_moe_blocks,
)
from moedistill.errors import UserError

CORES = ("mean", "frequency")
SVDS = ("plain", "activation")
DEFAULT_DAMPING = 1e-2  # relative to the mean diagonal of each Gram matrix


# --------------------------------------------------------------------------- teacher experts


def teacher_expert_weights(experts: nn.Module) -> dict[str, torch.Tensor]:
    """The stacked expert weights of one teacher layer as ``{proj: [E, out, in]}`` (views, no copy)."""
    I = experts.intermediate_dim
    gate_up = experts.gate_up_proj  # [E, 2I, H], gate rows first (the forward's chunk(2))
    return {"gate": gate_up[:, :I], "up": gate_up[:, I:], "down": experts.down_proj}


def expert_dims(model_or_config) -> tuple[int, int, int]:
    """``(experts E, hidden H, expert intermediate I)`` of a teacher model, or of its config alone
    (so a bad rank is caught before a large teacher loads)."""
    if isinstance(model_or_config, nn.Module):
        blocks = find_moe_blocks(model_or_config)
        if not blocks:
            raise UserError(
                f"{type(model_or_config).__name__} has no MoE layers with stacked experts; "
                f"compress needs a Qwen3-MoE or Mixtral model"
            )
        ex = blocks[0][1].experts
        return ex.num_experts, ex.hidden_dim, ex.intermediate_dim
    c = model_or_config
    if c.model_type == "qwen3_moe":
        return c.num_experts, c.hidden_size, c.moe_intermediate_size
    if c.model_type == "mixtral":
        return c.num_local_experts, c.hidden_size, c.intermediate_size
    raise UserError(f"cannot compress a {c.model_type!r} model; supported: {', '.join(ARCHITECTURES)}")


def full_rank(model_or_config) -> int:
    """The rank at which every wrapper is exact: min(hidden, intermediate) of the experts."""
    _, H, I = expert_dims(model_or_config)
    return min(H, I)


def rank_for_ratio(ratio: float, num_experts: int, hidden: int, intermediate: int) -> int:
    """Largest wrapper rank whose expert parameters are at most ``ratio`` of the teacher's.

    Per layer the teacher has ``3 E I H`` expert parameters; the student ``3 I H`` (cores)
    plus ``3 E r (H + I)`` (wrappers), so ``ratio = 1/E + r (H + I) / (I H)``.
    """
    floor = 1.0 / num_experts
    if ratio < floor:
        raise UserError(
            f"compress.compression_ratio={ratio} is below {floor:.4g}, what the shared core alone costs "
            f"with {num_experts} experts; raise it or set compress.rank=0"
        )
    r = math.floor((ratio - floor) * intermediate * hidden / (hidden + intermediate) + 1e-9)
    return min(r, min(hidden, intermediate))


def expert_ratio(rank: int, num_experts: int, hidden: int, intermediate: int) -> float:
    """Student / teacher expert parameters at ``rank`` (see ``rank_for_ratio``)."""
    return 1.0 / num_experts + rank * (hidden + intermediate) / (intermediate * hidden)


def resolve_rank(model_or_config, rank: int | None, compression_ratio: float | None) -> int:
    """Rank from exactly one of ``rank`` / ``compression_ratio``; UserError otherwise."""
    if (rank is None) == (compression_ratio is None):
        raise UserError("give exactly one of compress.rank or compress.compression_ratio (set the other to null)")
    E, H, I = expert_dims(model_or_config)
    if rank is None:
        return rank_for_ratio(compression_ratio, E, H, I)
    if rank < 0 or rank > min(H, I):
        raise UserError(
            f"compress.rank={rank} is outside [0, {min(H, I)}] (full rank = min(hidden, expert intermediate)); "
            f"pick a rank in range"
        )
    return int(rank)


# --------------------------------------------------------------------------- calibration


@dataclass
class CalibrationStats:
    """The teacher's routing on calibration data, one entry per MoE layer (``find_moe_blocks`` order).

    counts[l]:   [E] float64, how often layer l's router put each expert in a token's top-k.
    gram_in[l]:  [E, H, H] float32, ``X^T X`` of the hidden states routed to each expert.
    gram_mid[l]: [E, I, I] float32, the same for each expert's intermediate activations
                 ``act(gate) * up`` (the inputs of its down projection).
    The Gram lists are empty when they were not collected.
    """

    counts: list[torch.Tensor]
    gram_in: list[torch.Tensor] = field(default_factory=list)
    gram_mid: list[torch.Tensor] = field(default_factory=list)
    tokens: int = 0
    sequences: int = 0

    @property
    def has_gram(self) -> bool:
        return bool(self.gram_in)


class _StopForward(Exception):
    """Raised by a hook after the last layer a calibration pass needs."""


def _input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def collect_calibration_stats(
    model: nn.Module,
    input_ids,
    *,
    gram: bool = True,
    batch_size: int = 8,
    max_gram_bytes: int = 8 << 30,
) -> CalibrationStats:
    """Run the teacher on calibration blocks and record what the initialisation needs.

    Args:
        model: the teacher (Qwen3-MoE or Mixtral, stacked experts).
        input_ids: int [N, L] packed calibration blocks.
        gram: also accumulate the per-expert Gram matrices (activation-aware SVD).
        max_gram_bytes: Gram matrices of a 30B teacher do not fit at once (E [H^2 + I^2]
            floats per layer); layers are then processed in groups, one forward pass per
            group, each stopped right after the group's last layer.
    """
    blocks = [b for _, b in find_moe_blocks(model)]
    if not blocks:
        raise UserError(
            f"{type(model).__name__} has no MoE layers with stacked experts; "
            "compress needs a Qwen3-MoE or Mixtral model"
        )
    x_all = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    E = blocks[0].experts.num_experts
    H, I = blocks[0].experts.hidden_dim, blocks[0].experts.intermediate_dim
    counts = [torch.zeros(E, dtype=torch.float64) for _ in blocks]
    gram_in: list[torch.Tensor | None] = [None] * len(blocks)
    gram_mid: list[torch.Tensor | None] = [None] * len(blocks)

    per_layer = E * (H * H + I * I) * 4
    group = max(1, max_gram_bytes // per_layer) if gram else len(blocks)
    groups = [list(range(s, min(s + group, len(blocks)))) for s in range(0, len(blocks), group)]

    def hook(l: int, with_gram: bool, stop_after: bool):
        def fn(module, args, kwargs):
            hidden = args[0] if len(args) > 0 else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            if first_pass:
                valid = index[index < E]
                counts[l] += torch.bincount(valid.reshape(-1).cpu(), minlength=E).double()
            if with_gram:
                _accumulate_gram(module, hidden, index, gram_in[l], gram_mid[l])
            if stop_after:
                raise _StopForward

        return fn

    model_was_training = model.training
    model.eval()
    try:
        for g, layers in enumerate(groups):
            first_pass = g == 0
            for l in layers if gram else []:
                dev = blocks[l].experts.down_proj.device
                gram_in[l] = torch.zeros(E, H, H, dtype=torch.float32, device=dev)
                gram_mid[l] = torch.zeros(E, I, I, dtype=torch.float32, device=dev)
            handles = []
            hooked = range(len(blocks)) if first_pass else layers
            for l in hooked:
                stop = (not first_pass) and l == layers[-1]
                handles.append(
                    blocks[l].experts.register_forward_pre_hook(hook(l, gram and l in layers, stop), with_kwargs=True)
                )
            desc = "calibration" if len(groups) == 1 else f"calibration {g + 1}/{len(groups)}"
            try:
                for i in tqdm(range(0, len(x_all), batch_size), desc=desc, unit="batch", leave=False):
                    try:
                        model(input_ids=x_all[i : i + batch_size].to(_input_device(model)), use_cache=False)
                    except _StopForward:
                        pass
            finally:
                for h in handles:
                    h.remove()
    finally:
        model.train(model_was_training)
    return CalibrationStats(
        counts=counts,
        gram_in=[t for t in gram_in if t is not None],
        gram_mid=[t for t in gram_mid if t is not None],
        tokens=int(x_all.numel()),
        sequences=len(x_all),
    )


def _accumulate_gram(experts: nn.Module, hidden, index, gram_in, gram_mid):
    """Add ``X^T X`` of each expert's routed inputs, and of its intermediate activations, in place."""
    W = teacher_expert_weights(experts)
    for e in torch.unique(index).tolist():
        if e >= experts.num_experts:
            continue
        rows = (index == e).any(dim=-1)
        x = hidden[rows]
        gate = torch.nn.functional.linear(x, W["gate"][e])
        up = torch.nn.functional.linear(x, W["up"][e])
        mid = (experts.act_fn(gate) * up).float()
        x = x.float()
        gram_in[e] += x.T @ x
        gram_mid[e] += mid.T @ mid


# --------------------------------------------------------------------------- factors


@dataclass
class LayerFactors:
    """Zero-shot factors of one MoE layer, at rank ``max_rank`` (slice for less).

    core[p]: [out, in];  B[p]: [E, out, max_rank];  A[p]: [E, max_rank, in]
    singular_values[p]: [E, max_rank] of the (whitened) deltas, descending.
    All float32 on the teacher layer's device.
    """

    core: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    A: dict[str, torch.Tensor]
    singular_values: dict[str, torch.Tensor]


def _shared_core(W: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``W`` [E, out, in] float64 -> the (weighted) mean over experts [out, in]."""
    if weights is None:
        return W.mean(dim=0)
    w = (weights / weights.sum()).to(W)
    return torch.einsum("e,eoi->oi", w, W)


def _whitening(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """Lower Cholesky factor S of ``gram + damping * mean(diag) * 1`` (float64)."""
    g = gram.double()
    n = g.shape[-1]
    scale = g.diagonal().mean()
    if not torch.isfinite(scale) or scale <= 0:  # expert never routed: plain SVD
        return torch.eye(n, dtype=torch.float64, device=g.device)
    g = g + damping * scale * torch.eye(n, dtype=torch.float64, device=g.device)
    S, info = torch.linalg.cholesky_ex(g)
    if info.item() != 0:  # numerically indefinite despite damping: damp harder once
        S = torch.linalg.cholesky(g + scale * torch.eye(n, dtype=torch.float64, device=g.device))
    return S


@torch.no_grad()
def layer_factors(
    experts: nn.Module,
    *,
    max_rank: int,
    core: str = "mean",
    svd: str = "plain",
    counts: torch.Tensor | None = None,
    gram_in: torch.Tensor | None = None,
    gram_mid: torch.Tensor | None = None,
    damping: float = DEFAULT_DAMPING,
) -> LayerFactors:
    """Shared cores and truncated-SVD wrappers of one teacher layer (see the module docstring)."""
    W_all = teacher_expert_weights(experts)
    out = LayerFactors({}, {}, {}, {})
    for p in PROJECTIONS:
        W = W_all[p].double()
        C = _shared_core(W, counts if core == "frequency" else None)
        D = W - C
        Bs, As, Ss = [], [], []
        for e in range(W.shape[0]):
            if svd == "activation":
                gram = (gram_mid if p == "down" else gram_in)[e]
                S = _whitening(gram, damping)
                U, sv, Vh = torch.linalg.svd(D[e] @ S, full_matrices=False)
                Vh = torch.linalg.solve_triangular(S, Vh, upper=False, left=False)  # Vh S^{-1}
            else:
                U, sv, Vh = torch.linalg.svd(D[e], full_matrices=False)
            U, sv, Vh = U[:, :max_rank], sv[:max_rank], Vh[:max_rank]
            root = sv.sqrt()
            Bs.append(U * root)
            As.append(root[:, None] * Vh)
            Ss.append(sv)
        out.core[p] = C.float()
        out.B[p] = torch.stack(Bs).float()
        out.A[p] = torch.stack(As).float()
        out.singular_values[p] = torch.stack(Ss).float()
    return out


def compute_factors(
    teacher: nn.Module,
    *,
    max_rank: int,
    core: str = "mean",
    svd: str = "plain",
    stats: CalibrationStats | None = None,
    damping: float = DEFAULT_DAMPING,
    desc: str | None = None,
) -> list[LayerFactors]:
    """``layer_factors`` for every MoE layer of ``teacher``."""
    _check_method(core, svd, stats)
    blocks = [b for _, b in find_moe_blocks(teacher)]
    result = []
    for l, block in enumerate(tqdm(blocks, desc=desc or f"{core}+{svd} SVD", unit="layer", leave=False)):
        result.append(
            layer_factors(
                block.experts,
                max_rank=max_rank,
                core=core,
                svd=svd,
                counts=stats.counts[l] if stats is not None else None,
                gram_in=stats.gram_in[l] if svd == "activation" else None,
                gram_mid=stats.gram_mid[l] if svd == "activation" else None,
                damping=damping,
            )
        )
    return result


def _check_method(core: str, svd: str, stats: CalibrationStats | None):
    if core not in CORES:
        raise UserError(f"core={core!r} must be one of {', '.join(CORES)}")
    if svd not in SVDS:
        raise UserError(f"svd={svd!r} must be one of {', '.join(SVDS)}")
    if core == "frequency" and (stats is None or sum(float(c.sum()) for c in stats.counts) == 0):
        raise UserError(
            "core='frequency' needs calibration data (routing counts); pass calibration= or use core='mean'"
        )
    if svd == "activation" and (stats is None or not stats.has_gram):
        raise UserError(
            "svd='activation' needs calibration data with Gram matrices; pass calibration= or use svd='plain'"
        )


# --------------------------------------------------------------------------- the student


def _architecture(teacher: nn.Module):
    model_type = getattr(teacher.config, "model_type", None)
    if model_type in ARCHITECTURES:
        return model_type, ARCHITECTURES[model_type]
    if any(model_type == classes[0].model_type for classes in ARCHITECTURES.values()):
        raise UserError(f"this model is already compressed ({model_type}); compress the original teacher instead")
    raise UserError(
        f"cannot compress a {model_type!r} model; supported: {', '.join(ARCHITECTURES)} "
        "(transformers 5 stacked experts)"
    )


def student_config(teacher: nn.Module, compression: dict):
    """The compressed config: the teacher's config, our ``model_type``, and ``compression``."""
    _, (config_cls, *_rest) = _architecture(teacher)
    d = teacher.config.to_dict()
    for k in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "compression"):
        d.pop(k, None)
    cfg = config_cls(**d, compression=compression)
    cfg.architectures = [_rest[0].__name__]
    return cfg


def build_student(teacher: nn.Module, factors: list[LayerFactors], rank: int, compression: dict) -> nn.Module:
    """A compressed model whose experts are ``factors`` sliced to ``rank``; everything else is copied from ``teacher``.

    The teacher is left untouched: its non-expert tensors are cloned (small next to the
    experts), so training the student never writes into the teacher.
    """
    _, (_, model_cls, *_) = _architecture(teacher)
    compression = {**compression, "rank": int(rank)}
    config = student_config(teacher, compression)
    dtype = teacher.get_input_embeddings().weight.dtype
    with torch.device("meta"):
        student = model_cls(config)
    copy_non_experts(teacher, student)
    # The compressed experts, on the device of the teacher layer they replace.
    for (_, block), (_, t_block), f in zip(find_moe_blocks(student), find_moe_blocks(teacher), factors):
        t_ex = t_block.experts
        ex = CompressedExperts(
            t_ex.num_experts, t_ex.hidden_dim, t_ex.intermediate_dim, rank, teacher.config.hidden_act
        )
        ex = ex.to(device=t_ex.down_proj.device)
        with torch.no_grad():
            for p in PROJECTIONS:
                ex.core(p).copy_(f.core[p])
                B, A = ex.wrapper(p)
                B.copy_(f.B[p][..., :rank])
                A.copy_(f.A[p][:, :rank])
        block.experts = ex.to(dtype)
    finish_transplant(student)
    student.generation_config = teacher.generation_config
    student.config.dtype = dtype
    student.eval()
    return student


def copy_non_experts(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` (built on the meta device) clones of every ``src`` tensor outside ``mlp.experts``.

    Parameters and buffers (persistent or not, e.g. rotary ``inv_freq``) are matched by
    name; the two models must share their architecture apart from the experts.
    """
    state = {n: p.detach().clone() for n, p in src.named_parameters() if ".experts." not in n}
    _, unexpected = dst.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise RuntimeError(f"tensors without a place in {type(dst).__name__}: {unexpected[:5]}")
    src_buffers = dict(src.named_buffers())
    for name, _ in list(dst.named_buffers()):
        module_name, _, buf = name.rpartition(".")
        dst.get_submodule(module_name)._buffers[buf] = src_buffers[name].clone()


def finish_transplant(model: nn.Module) -> None:
    """Re-tie the embeddings and check that no meta tensor is left."""
    model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__} has uninitialised tensors: {left[:5]}")


def compress_model(
    teacher: nn.Module,
    *,
    rank: int | None = None,
    compression_ratio: float | None = None,
    core: str = "mean",
    svd: str = "plain",
    calibration=None,
    damping: float = DEFAULT_DAMPING,
    batch_size: int = 8,
) -> nn.Module:
    """Compress ``teacher``'s experts into a shared core plus rank-r wrappers (zero-shot).

    Args:
        teacher: ``Qwen3MoeForCausalLM`` or ``MixtralForCausalLM`` (transformers 5).
        rank: wrapper rank r, 0 <= r <= min(hidden, expert intermediate); or
        compression_ratio: target student/teacher ratio of expert parameters (-> largest r that fits).
        core: ``"mean"`` or ``"frequency"`` (routing-frequency-weighted mean; needs calibration).
        svd: ``"plain"`` or ``"activation"`` (whitened by the routed inputs; needs calibration).
        calibration: int [N, L] token blocks, or ``CalibrationStats`` already collected.
        damping: relative ridge added to each Gram matrix before the Cholesky factorisation.
    Returns:
        the student (``MoedistillQwen3MoeForCausalLM`` / ``MoedistillMixtralForCausalLM``) in eval
        mode, with the teacher's dtype and devices; ``student.config.compression`` records the method.
    """
    r = resolve_rank(teacher, rank, compression_ratio)
    stats = calibration
    if calibration is not None and not isinstance(calibration, CalibrationStats):
        stats = collect_calibration_stats(teacher, calibration, gram=svd == "activation", batch_size=batch_size)
    factors = compute_factors(teacher, max_rank=r, core=core, svd=svd, stats=stats, damping=damping)
    compression = compression_record(teacher, r, core=core, svd=svd, stats=stats, damping=damping)
    return build_student(teacher, factors, r, compression)


def compression_record(
    teacher, rank: int, *, core: str, svd: str, stats: CalibrationStats | None, damping: float
) -> dict:
    """What goes into ``config.compression`` of a student."""
    ex = find_moe_blocks(teacher)[0][1].experts
    return {
        "method": "shared_core+wrapper",
        "rank": int(rank),
        "core": core,
        "svd": svd,
        "damping": damping if svd == "activation" else None,
        "calibration_sequences": stats.sequences if stats is not None else 0,
        "calibration_tokens": stats.tokens if stats is not None else 0,
        "expert_compression_ratio": expert_ratio(rank, ex.num_experts, ex.hidden_dim, ex.intermediate_dim),
        "teacher_model_type": _architecture(teacher)[0],
        "teacher": str(getattr(teacher.config, "_name_or_path", "") or ""),
    }
