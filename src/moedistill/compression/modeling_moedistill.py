"""Compressed MoE experts: one shared core plus a low-rank wrapper per expert.

For every MoE layer and each projection P in (gate, up, down) the teacher's expert
weights W_i (i = 0..E-1) are replaced by

    W_i  ~  C_P + B_{P,i} A_{P,i}        C_P: [out, in]   B: [out, r]   A: [r, in]

and the forward pass computes ``C_P x + B_{P,i} (A_{P,i} x)`` for the tokens routed
to expert i, never materialising W_i. Because the core is shared, its matmul runs once
per token instead of once per (token, expert) pair: ``C_gate x`` and ``C_up x`` are
computed for all tokens up front, and ``C_down`` is applied once to the routing-weighted
sum of the experts' intermediate activations (by linearity this equals the sum of the
per-expert outputs).

The model classes subclass the transformers originals (Qwen3-MoE, Mixtral) and swap
only ``mlp.experts``; attention, norms, the router (``mlp.gate``) and the load-balancing
loss are the originals' code. Each has its own ``model_type`` so a checkpoint-0 loads
with ``AutoModelForCausalLM.from_pretrained`` once this module is imported (importing
``moedistill.compression`` or ``moedistill.models`` does it), or with
``trust_remote_code=True`` from this file, which ``save_pretrained`` copies beside the
weights.

This file imports nothing from moedistill on purpose: it must work on its own, and every
other module may import it (a leaf of the import graph).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.activations import ACT2FN
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralForCausalLM
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM

PROJECTIONS = ("gate", "up", "down")


class CompressedExperts(nn.Module):
    """Drop-in replacement for ``Qwen3MoeExperts`` / ``MixtralExperts``.

    Parameters (E experts, hidden H, expert intermediate I, rank r)::

        shared_core_gate [I, H]   wrapper_gate_A [E, r, H]   wrapper_gate_B [E, I, r]
        shared_core_up   [I, H]   wrapper_up_A   [E, r, H]   wrapper_up_B   [E, I, r]
        shared_core_down [H, I]   wrapper_down_A [E, r, I]   wrapper_down_B [E, H, r]

    Called like the original: ``experts(hidden_states [T, H], top_k_index [T, k] int,
    top_k_weights [T, k])`` -> ``[T, H]`` in the dtype of ``hidden_states``. An index equal
    to ``num_experts`` is skipped, as in the original (expert-parallel padding).

    Per-expert ranks (``expert_ranks``, a budgeted allocation of ``moedistill compress``):
    expert ``e`` uses the first ``expert_ranks[e]`` of the ``r = max(expert_ranks)`` rank
    components; its other columns of B and rows of A are zero. Zero padding needs no mask:
    with ``A[e, j] = 0`` and ``B[e, :, j] = 0`` the component adds nothing to the output and
    its gradients, ``g^T (A x)`` and ``(g B)^T x``, are exactly zero, so every optimizer that
    maps a zero gradient on a zero weight to zero (SGD, Adam/AdamW with weight decay, Lion)
    keeps them zero (tests/test_compression.py trains and checks). The padding costs memory
    and compute of rank ``r``; :meth:`num_parameters` counts only the allocated components.
    """

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, rank: int, hidden_act: str = "silu",
                 expert_ranks: list[int] | None = None):
        super().__init__()
        if expert_ranks is not None:
            expert_ranks = tuple(int(r) for r in expert_ranks)
            if len(expert_ranks) != num_experts or min(expert_ranks, default=0) < 0:
                raise ValueError(f"expert_ranks must be {num_experts} ranks >= 0, got {list(expert_ranks)}")
            if rank != max(expert_ranks, default=0):
                raise ValueError(f"rank={rank} must be max(expert_ranks)={max(expert_ranks, default=0)}")
            if len(set(expert_ranks)) == 1:
                expert_ranks = None  # uniform after all
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.rank = rank
        self.expert_ranks = expert_ranks  # None: every expert has rank ``rank``
        self.act_fn = ACT2FN[hidden_act]
        E, H, I, r = num_experts, hidden_dim, intermediate_dim, rank
        self.shared_core_gate = nn.Parameter(torch.empty(I, H))
        self.shared_core_up = nn.Parameter(torch.empty(I, H))
        self.shared_core_down = nn.Parameter(torch.empty(H, I))
        self.wrapper_gate_A = nn.Parameter(torch.empty(E, r, H))
        self.wrapper_gate_B = nn.Parameter(torch.empty(E, I, r))
        self.wrapper_up_A = nn.Parameter(torch.empty(E, r, H))
        self.wrapper_up_B = nn.Parameter(torch.empty(E, I, r))
        self.wrapper_down_A = nn.Parameter(torch.empty(E, r, I))
        self.wrapper_down_B = nn.Parameter(torch.empty(E, H, r))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02):
        """Random core, random A, zero B: every expert starts equal to the core (like LoRA).

        Only used when a model is built from a config; checkpoint-0 is initialised from
        the teacher by ``moedistill.compression.compress_model``.
        """
        with torch.no_grad():
            for p in (self.shared_core_gate, self.shared_core_up, self.shared_core_down):
                nn.init.normal_(p, std=std)
            for proj in PROJECTIONS:
                nn.init.normal_(getattr(self, f"wrapper_{proj}_A"), std=std)
                nn.init.zeros_(getattr(self, f"wrapper_{proj}_B"))
            self.zero_padding()

    @torch.no_grad()
    def zero_padding(self) -> None:
        """Zero the rank components beyond each expert's own rank (nothing for uniform ranks)."""
        if self.expert_ranks is None:
            return
        for e, r in enumerate(self.expert_ranks):
            for proj in PROJECTIONS:
                B, A = self.wrapper(proj)
                B[e, :, r:] = 0
                A[e, r:] = 0

    def num_parameters(self) -> int:
        """Parameters the experts really have: the cores plus each expert's own rank components
        (the zero padding of per-expert ranks not counted)."""
        per_rank = 3 * (self.hidden_dim + self.intermediate_dim)
        ranks = self.expert_ranks or (self.rank,) * self.num_experts
        return 3 * self.hidden_dim * self.intermediate_dim + per_rank * sum(ranks)

    def extra_repr(self) -> str:
        ranks = "" if self.expert_ranks is None else f" (per expert {min(self.expert_ranks)}-{self.rank})"
        return (
            f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
            f"rank={self.rank}{ranks}"
        )

    def core(self, proj: str) -> torch.Tensor:
        return getattr(self, f"shared_core_{proj}")

    def wrapper(self, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B [E, out, r], A [E, r, in])`` of projection ``proj``."""
        return getattr(self, f"wrapper_{proj}_B"), getattr(self, f"wrapper_{proj}_A")

    @torch.no_grad()
    def dense_weight(self, proj: str, expert: int | None = None) -> torch.Tensor:
        """W = C + B A for one expert ``[out, in]`` or all ``[E, out, in]`` (export and tests only)."""
        B, A = self.wrapper(proj)
        if expert is not None:
            B, A = B[expert], A[expert]
        return self.core(proj) + B @ A

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Routed pairs (token, expert) sorted by expert once; each expert's wrappers are two
        matmuls on its contiguous segment, the cores one matmul over all tokens.

        Cost: linear in the routed pairs (one gather of their inputs, one scatter-add of
        their outputs), plus two small matmuls per non-empty expert and projection; no
        [E, ...]-sized gradient per expert (the factors are unbound once, and unbind's
        backward stacks the E gradients once)."""
        I, E = self.intermediate_dim, self.num_experts
        n_tokens, k = top_k_index.shape
        # The core's share of gate and up, once per token for all experts.
        core_gate_up = F.linear(hidden_states, torch.cat([self.shared_core_gate, self.shared_core_up]))
        with torch.no_grad():
            flat = top_k_index.reshape(-1)
            # stable: within an expert, pairs stay in token order; index E (padding) sorts last
            order = torch.sort(flat, stable=True).indices
            counts = torch.bincount(flat, minlength=E + 1)[:E].tolist()
            order = order[: sum(counts)]
            token = order // k
        weight = top_k_weights.reshape(-1)[order]
        gate_up = core_gate_up.index_select(0, token)  # [S, 2I]; index_select: its backward is index_add_
        if self.rank > 0:
            x = hidden_states.index_select(0, token)  # [S, H]: every routed pair's input, grouped by expert
            gate_up = gate_up + self._grouped_low_rank(x, counts, ("gate", "up"))
        # chunk, not two slices: its backward is one concatenation, where each slice's wrote a zeroed
        # [S, 2I] gradient and autograd summed the two
        gate, up = gate_up.chunk(2, dim=1)
        h = self.act_fn(gate) * up
        h = h * weight[:, None].to(h.dtype)
        # Sums are kept in the dtype of hidden_states (fp32 under autocast, like the originals'
        # output); under autocast the matmuls return bf16/fp16, cast on the way in.
        mixed = hidden_states.new_zeros(n_tokens, I).index_add_(0, token, h.to(hidden_states.dtype))
        out = F.linear(mixed, self.shared_core_down).to(hidden_states.dtype)  # C_down once, on the mixture
        if self.rank > 0:
            out = out.index_add(0, token, self._grouped_low_rank(h, counts, ("down",)).to(out.dtype))
        return out

    def _grouped_low_rank(self, x: torch.Tensor, counts: list[int], projections: tuple[str, ...]) -> torch.Tensor:
        """``B_e A_e x`` for each row of ``x`` (grouped by expert, ``counts[e]`` rows each),
        for every projection in ``projections``, concatenated along the last dimension."""
        outs = [_GroupedLowRank.apply(x, *self.wrapper(p), counts) for p in projections]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


class _GroupedLowRank(torch.autograd.Function):
    """``y[rows of expert e] = (x[rows of e] @ A[e].T) @ B[e].T`` for rows grouped by expert.

    One autograd node whose backward returns the gradients of ``x``, ``A`` and ``B``
    together, as ``F.linear``'s does. Why not autograd over per-expert views: a slice ``A[e]``
    writes a zero gradient the size of all of ``A`` per expert (cost ~ E^2); ``A.unbind(0)``
    avoids that but its gradient reaches the parameter in a later node, after DeepSpeed
    ZeRO-3 has already released the gathered parameter (the accumulation then fails on a
    0-element weight). Under autocast both matmuls of a segment run in the autocast dtype,
    as ``F.linear`` would; the factors' gradients come back in their own dtype.

    Two engines, equal to rounding (tests/test_compression.py): torch's grouped matmul
    (``F.grouped_mm``, offsets = cumulative ``counts``) where ``_use_grouped_mm`` allows it,
    else one pair of matmuls per non-empty expert. In the first, the products with ``A``
    are grouped, the backward's too: ``dA_e = (g_e B_e)^T x_e`` is a 2-D x 2-D grouped
    product whose result is the whole [E, r, in] gradient (zero for an expert without rows),
    so the loop's concatenations, zero-filled buffers and per-expert copies disappear.
    grouped_mm wants every row stride a multiple of 16 bytes: ``A`` is used as stored or
    transposed (strides ``in``; ``in`` and ``out`` must be multiples of 16 bytes) and ``t``
    [S, r] comes padded that way (a view). ``B``'s rows are ``r`` long, so grouped_mm would
    need a transposed copy of it in the forward and again in the backward whenever ``r`` is
    not a multiple of 16 bytes (rank 135 in fp32): its three products (``y = t B^T``,
    ``g B``, ``dB_e = g_e^T t_e``) are ``torch.mm`` per non-empty expert on views of ``B``,
    written into their rows of one preallocated output (``_per_expert_mm``), which is the
    loop grouped_mm runs on the CPU anyway, without the copies: 0.82x the CPU time of the
    experts' fwd+bwd at Qwen3-30B-A3B's dimensions (one thread), bitwise the same results.
    """

    @staticmethod
    def forward(ctx, x, B, A, counts):
        ctx.counts = counts
        dt = _compute_dtype(x)
        if _use_grouped_mm(x, B, A, dt, counts):
            offs = _offsets(counts, x.device)
            t = F.grouped_mm(_aligned(x.to(dt)), _aligned(A.to(dt).mT), offs=offs)  # [S, r], rows padded
            y = _per_expert_mm(t, B.to(dt).mT, counts, t.new_empty(t.shape[0], B.shape[1]))  # [S, out]
            ctx.save_for_backward(x, B, A, t)
            return y
        ts, ys = [], []
        for e, seg in enumerate(x.split(counts)):
            if seg.shape[0]:
                t = F.linear(seg, A[e])  # [n_e, r]
                ts.append(t)
                ys.append(F.linear(t, B[e]))
        if ys:
            t, y = torch.cat(ts), torch.cat(ys)
        else:  # no routed rows at all
            t, y = x.new_zeros(0, A.shape[1], dtype=dt), x.new_zeros(0, B.shape[1], dtype=dt)
        ctx.save_for_backward(x, B, A, t)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, B, A, t = ctx.saved_tensors
        need_x, need_B, need_A = ctx.needs_input_grad[:3]
        dt = t.dtype
        gy = gy.to(dt)
        if _use_grouped_mm(x, B, A, dt, ctx.counts):
            offs = _offsets(ctx.counts, x.device)
            g = gy  # [S, out]
            gB = gA = gx = None
            if need_B:  # [E, out, r]
                gB = _per_expert_mm_T(g, t, ctx.counts, g.new_empty(B.shape)).to(B.dtype)
            gt = _per_expert_mm(g, B.to(dt), ctx.counts, _padded_rows(g, B.shape[2]))  # [S, r]
            if need_A:
                gA = F.grouped_mm(_aligned(gt.T), _aligned(x.to(dt)), offs=offs).to(A.dtype)  # [E, r, in]
            if need_x:
                gx = F.grouped_mm(_aligned(gt), _aligned(A.to(dt)), offs=offs).to(x.dtype)  # [S, in]
            return gx, gB, gA, None
        gB = torch.zeros_like(B) if need_B else None
        gA = torch.zeros_like(A) if need_A else None
        gxs, off = [], 0
        for e, n in enumerate(ctx.counts):
            if n == 0:
                continue
            g, rows = gy[off:off + n], slice(off, off + n)
            off += n
            if need_B:
                gB[e] = g.T @ t[rows]
            gt = g @ B[e].to(dt)  # [n_e, r]
            if need_A:
                gA[e] = gt.T @ x[rows].to(dt)
            if need_x:
                gxs.append(gt @ A[e].to(dt))
        gx = None
        if need_x:
            gx = torch.cat(gxs).to(x.dtype) if gxs else torch.zeros_like(x)
        return gx, gB, gA, None


def _per_expert_mm(a: torch.Tensor, b: torch.Tensor, counts: list[int], out: torch.Tensor) -> torch.Tensor:
    """``out[rows of e] = a[rows of e] @ b[e]`` for rows grouped by expert (``counts``), in place.

    Why not grouped_mm for the products with ``B``: its rows are ``r`` long, and grouped_mm
    takes it only with 16-byte row strides, so at a rank like 135 (fp32) it took a transposed
    copy of every ``B`` in the forward and again in the backward (16% of the experts' fwd+bwd
    CPU time at Qwen3-30B-A3B's dimensions). ``torch.mm`` takes ``B[e]`` and ``B[e].T`` as
    they are and writes into its rows of ``out``: no copy, no concatenation."""
    off = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(a[off : off + n], b[e], out=out[off : off + n])
            off += n
    return out


def _padded_rows(like: torch.Tensor, cols: int) -> torch.Tensor:
    """An empty [rows of ``like``, ``cols``] tensor whose rows are padded to 16 bytes (a view), as grouped_mm wants."""
    step = max(1, 16 // like.element_size())
    return like.new_empty(like.shape[0], -(-cols // step) * step)[:, :cols]


def _per_expert_mm_T(a: torch.Tensor, b: torch.Tensor, counts: list[int], out: torch.Tensor) -> torch.Tensor:
    """``out[e] = a[rows of e].T @ b[rows of e]`` (zero for an expert without rows), in place."""
    off = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(a[off : off + n].T, b[off : off + n], out=out[e])
            off += n
        else:
            out[e].zero_()
    return out


# Set to False to force the per-expert loop (tests compare the two engines).
USE_GROUPED_MM = hasattr(F, "grouped_mm")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` would compute ``x``'s products in: the autocast dtype, if on."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype in _GROUPED_MM_DTYPES:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _use_grouped_mm(x: torch.Tensor, B: torch.Tensor, A: torch.Tensor, dt: torch.dtype, counts: list[int]) -> bool:
    """grouped_mm on the CPU for fp32/bf16/fp16 (CUDA keeps the loop: untested there, and its
    kernels take bf16 only), when there are rows and the ``in``/``out`` rows are 16-byte multiples."""
    if not USE_GROUPED_MM or x.device.type != "cpu" or dt not in _GROUPED_MM_DTYPES or x.shape[0] == 0:
        return False
    step = 16 // torch.empty(0, dtype=dt).element_size()
    return A.shape[2] % step == 0 and B.shape[1] % step == 0 and B.shape[2] > 0


def _offsets(counts: list[int], device: torch.device) -> torch.Tensor:
    """grouped_mm's ``offs``: the end row of each group, int32."""
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy laid out so that grouped_mm takes it: one of the last two strides 1, every
    other stride and the start a multiple of 16 bytes (a size-1 dim's stride counts too). The copy
    is row-major where that fits, else column-major in the last two dims (a transposed factor
    ``A.mT`` [E, in, r] fits only that way when ``r`` is not a multiple of 16 bytes); a tensor
    that fits neither way (``_use_grouped_mm`` rules those shapes out) is an error."""
    size = t.element_size()

    def fits(u: torch.Tensor) -> bool:
        st = u.stride()
        return u.data_ptr() % 16 == 0 and any(
            st[unit] == 1 and all((s * size) % 16 == 0 for i, s in enumerate(st) if i != unit % u.dim())
            for unit in (-1, -2))

    if fits(t):
        return t
    for copy in (t.new_empty(t.shape), t.new_empty(t.mT.shape).mT):  # not .contiguous(): keeps size-1 strides
        if fits(copy):
            return copy.copy_(t)
    raise RuntimeError(f"no layout of a {tuple(t.shape)} {t.dtype} tensor suits grouped_mm")


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every sparse MoE block: a module with a ``gate`` router and an ``experts`` module."""
    blocks = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if isinstance(getattr(module, "gate", None), nn.Module) and isinstance(experts, nn.Module):
            if isinstance(experts, CompressedExperts) or (
                getattr(experts, "gate_up_proj", None) is not None and getattr(experts, "down_proj", None) is not None
            ):
                blocks.append((name, module))
    return blocks


def count_parameters(model: nn.Module) -> int:
    """``model``'s parameters, each ``CompressedExperts`` counted by its ``num_parameters`` (per-expert
    ranks: without the zero padding)."""
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, CompressedExperts):
            total += m.num_parameters() - sum(p.numel() for p in m.parameters())
    return total


def layer_ranks(compression: dict | None, n_layers: int) -> list[list[int] | None]:
    """Per MoE layer: its experts' ranks (``compression["ranks"]``, a budgeted allocation), or None
    (every expert has ``compression["rank"]``)."""
    ranks = (compression or {}).get("ranks")
    if ranks is None:
        return [None] * n_layers
    if len(ranks) != n_layers:
        raise ValueError(f"config.compression['ranks'] lists {len(ranks)} layers; the model has {n_layers} MoE layers")
    return [list(r) for r in ranks]


def _replace_experts(model: nn.Module, config) -> None:
    rank = int((config.compression or {}).get("rank", 0))
    blocks = find_moe_blocks(model)
    for (_, block), ranks in zip(blocks, layer_ranks(config.compression, len(blocks))):
        old = block.experts
        block.experts = CompressedExperts(
            old.num_experts, old.hidden_dim, old.intermediate_dim, rank if ranks is None else max(ranks),
            config.hidden_act, expert_ranks=ranks,
        )


def _without_expert_plans(plan: dict | None) -> dict | None:
    # The originals shard the stacked expert tensors for tensor/expert parallelism; ours have other names.
    return None if plan is None else {k: v for k, v in plan.items() if ".experts" not in k}


# ---------------------------------------------------------------------- Qwen3-MoE


@strict
class MoedistillQwen3MoeConfig(Qwen3MoeConfig):
    """``Qwen3MoeConfig`` plus ``compression``: how checkpoint-0 was made (method, rank, core, svd, ...)."""

    model_type = "moedistill_qwen3_moe"
    base_model_tp_plan = _without_expert_plans(Qwen3MoeConfig.base_model_tp_plan)
    base_model_ep_plan = None
    compression: dict | None = None


class MoedistillQwen3MoeForCausalLM(Qwen3MoeForCausalLM):
    """``Qwen3MoeForCausalLM`` whose experts are ``CompressedExperts`` of rank ``config.compression['rank']``
    (or, per layer and expert, ``config.compression['ranks']``)."""

    config_class = MoedistillQwen3MoeConfig

    def __init__(self, config: MoedistillQwen3MoeConfig):
        super().__init__(config)
        _replace_experts(self, config)


# ---------------------------------------------------------------------- Mixtral


@strict
class MoedistillMixtralConfig(MixtralConfig):
    """``MixtralConfig`` plus ``compression``: how checkpoint-0 was made (method, rank, core, svd, ...)."""

    model_type = "moedistill_mixtral"
    base_model_tp_plan = _without_expert_plans(MixtralConfig.base_model_tp_plan)
    base_model_ep_plan = None
    compression: dict | None = None


class MoedistillMixtralForCausalLM(MixtralForCausalLM):
    """``MixtralForCausalLM`` whose experts are ``CompressedExperts`` of rank ``config.compression['rank']``
    (or, per layer and expert, ``config.compression['ranks']``)."""

    config_class = MoedistillMixtralConfig

    def __init__(self, config: MoedistillMixtralConfig):
        super().__init__(config)
        _replace_experts(self, config)


# teacher model_type -> (compressed config class, compressed model class, plain config class, plain model class)
ARCHITECTURES = {
    "qwen3_moe": (MoedistillQwen3MoeConfig, MoedistillQwen3MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM),
    "mixtral": (MoedistillMixtralConfig, MoedistillMixtralForCausalLM, MixtralConfig, MixtralForCausalLM),
}


def register() -> None:
    """Register the compressed model types with ``AutoConfig`` / ``AutoModelForCausalLM``.

    Runs on import. ``register_for_auto_class`` makes ``save_pretrained`` copy this file
    beside the weights and write ``auto_map``, so ``trust_remote_code=True`` loads a
    checkpoint where moedistill is not installed (transformers then registers the copy's
    classes itself; registering them here too is harmless, ``exist_ok``)."""
    for config_cls, model_cls, _, _ in ARCHITECTURES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
        config_cls.register_for_auto_class("AutoConfig")
        model_cls.register_for_auto_class("AutoModelForCausalLM")


register()
