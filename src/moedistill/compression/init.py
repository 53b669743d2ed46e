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

import ctypes
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
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
RANK_ALLOCATIONS = ("uniform", "frequency", "frequency_energy")
RANK_CAP = 4  # a budgeted allocation gives an expert at most 4x the uniform rank (and at most the full rank)
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
    The Gram lists are empty when they were not collected (``compress_layers`` never keeps
    them: it hands one layer's to the factorisation and drops them).
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
    """Raised by the hook that catches the first decoder layer's inputs."""


class ChunkedGrams:
    """One layer's per-expert Grams [E, n, n] stored as separate tensors of ``chunk`` experts each,
    so that the factorisation can free each chunk as soon as it is factorised (``release``).

    Why: a stacked [E, n, n] tensor is one allocation, freed only whole, after the last chunk;
    meanwhile the layer's factors fill in (0.54 GiB at Qwen3-30B-A3B's dimensions and rank 135)
    on top of all its Grams (2.28 GiB). Freed chunk by chunk, the Grams shrink by ~4x what the
    factors grow, so the peak is the Grams plus the first chunk's temporaries.
    Indexing: ``g[e]`` is expert e's Gram (a view), ``g[s:t]`` a view when it lies in one chunk
    (``layer_factors``' and ``fp64_check``'s slices do), a copy otherwise; a released expert raises.
    """

    def __init__(self, num_experts: int, n: int, chunk: int, *, dtype=torch.float32, device=None):
        self.chunk, self.num_experts = int(chunk), int(num_experts)
        self.chunks: list[torch.Tensor | None] = [
            torch.zeros(min(self.chunk, num_experts - s), n, n, dtype=dtype, device=device)
            for s in range(0, num_experts, self.chunk)
        ]
        self.shape = torch.Size((num_experts, n, n))
        self.dtype, self.device = dtype, self.chunks[0].device if self.chunks else device

    def __len__(self) -> int:
        return self.num_experts

    def _chunk(self, k: int) -> torch.Tensor:
        c = self.chunks[k]
        if c is None:
            raise RuntimeError(f"the Grams of experts {k * self.chunk}..{(k + 1) * self.chunk - 1} were released")
        return c

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self.num_experts)
            if step == 1 and stop > start and (start // self.chunk) == ((stop - 1) // self.chunk):
                k = start // self.chunk
                return self._chunk(k)[start - k * self.chunk : stop - k * self.chunk]
            return torch.stack([self[e] for e in range(start, stop, step)]) if stop > start else \
                torch.empty(0, *self.shape[1:], dtype=self.dtype, device=self.device)
        e = int(index) + (self.num_experts if int(index) < 0 else 0)
        return self._chunk(e // self.chunk)[e % self.chunk]

    def release(self, index: slice) -> None:
        """Free the chunks that lie wholly inside the expert slice ``index``."""
        start, stop, _ = index.indices(self.num_experts)
        for k in range(len(self.chunks)):
            if start <= k * self.chunk and min((k + 1) * self.chunk, self.num_experts) <= stop:
                self.chunks[k] = None

    def stacked(self) -> torch.Tensor:
        """All the Grams as one [E, n, n] tensor (a copy)."""
        return torch.cat([self._chunk(k) for k in range(len(self.chunks))])


def _input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def _decoder_layers(model: nn.Module, blocks) -> tuple[nn.ModuleList, list[int | None]]:
    """The decoder's layer list and, per decoder layer, the index of its MoE block in ``blocks`` (or None)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and len(module):
            where = []
            for i in range(len(module)):
                inside = [b for b, (n, _) in enumerate(blocks) if n.startswith(f"{name}.{i}.")]
                where.append(inside[0] if inside else None)
            if sorted(b for b in where if b is not None) == list(range(len(blocks))):
                return module, where
    raise UserError(f"cannot find the decoder layers of {type(model).__name__}; compress needs Qwen3-MoE or Mixtral")


LayerFn = Callable[[int, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], None]


@torch.no_grad()
def calibrate_layers(model: nn.Module, input_ids, on_layer: LayerFn, *, gram: bool = True, batch_size: int = 8,
                     gram_chunk: int | None = None) -> int:
    """Run the teacher layer by layer on calibration blocks (GPTQ style), one MoE layer's statistics at a time.

    The embeddings run once per batch; each decoder layer then runs on the previous one's
    outputs (kept for all batches, N x L x H in the teacher's dtype), so every layer runs
    once however many layers there are. For MoE layer l, ``on_layer(l, counts [E] float64,
    gram_in [E, H, H] | None, gram_mid [E, I, I] | None)`` is called as soon as its last batch
    has run; the Grams (float32, on the layer's device) are dropped when it returns, so
    only one layer's are ever in memory. With ``gram_chunk``, they are handed over as
    ``ChunkedGrams`` of that many experts per tensor, which ``on_layer`` may release chunk by
    chunk (``layer_factors(release_grams=True)``). Returns the number of calibration tokens.
    """
    blocks = find_moe_blocks(model)
    if not blocks:
        raise UserError(
            f"{type(model).__name__} has no MoE layers with stacked experts; "
            "compress needs a Qwen3-MoE or Mixtral model"
        )
    layers, moe_of = _decoder_layers(model, blocks)
    x_all = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    ex0 = blocks[0][1].experts
    E, H, I = ex0.num_experts, ex0.hidden_dim, ex0.intermediate_dim

    # the first decoder layer's inputs (hidden states, masks, rotary embeddings) per batch
    inputs: list[tuple[torch.Tensor, tuple, dict]] = []

    def catch(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append((hidden, tuple(args[1:]), kwargs))
        raise _StopForward

    was_training = model.training
    model.eval()
    try:
        handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for i in range(0, len(x_all), batch_size):
                try:
                    model(input_ids=x_all[i : i + batch_size].to(_input_device(model)), use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        last = max(b for b in moe_of if b is not None) if moe_of else -1
        for i, layer in enumerate(layers):
            if i > moe_of.index(last):
                break  # the layers after the last MoE layer are not needed
            b = moe_of[i]
            # the last MoE layer's outputs are not needed either: its experts' pre-hook ends each batch
            stop = i == moe_of.index(last)
            handle, counts, g_in, g_mid = None, None, None, None
            if b is not None:
                experts = blocks[b][1].experts
                dev = _weight_device(experts)
                counts = torch.zeros(E, dtype=torch.float64)
                if gram and gram_chunk:
                    g_in = ChunkedGrams(E, H, gram_chunk, device=dev)
                    g_mid = ChunkedGrams(E, I, gram_chunk, device=dev)
                elif gram:
                    g_in = torch.zeros(E, H, H, dtype=torch.float32, device=dev)
                    g_mid = torch.zeros(E, I, I, dtype=torch.float32, device=dev)

                def hook(module, args, kwargs):
                    hidden = args[0] if len(args) > 0 else kwargs["hidden_states"]
                    index = args[1] if len(args) > 1 else kwargs["top_k_index"]
                    counts.add_(torch.bincount(index[index < E].reshape(-1).cpu(), minlength=E).double())
                    if gram:
                        _accumulate_gram(module, hidden, index, g_in, g_mid)
                    if stop:
                        raise _StopForward

                handle = experts.register_forward_pre_hook(hook, with_kwargs=True)
            try:
                for j, (hidden, args, kwargs) in enumerate(inputs):
                    try:
                        out = layer(hidden, *args, **kwargs)
                    except _StopForward:
                        continue
                    inputs[j] = (out[0] if isinstance(out, tuple) else out, args, kwargs)
            finally:
                if handle is not None:
                    handle.remove()
            if stop:
                inputs.clear()  # the hidden states are not needed any more
            if b is not None:
                on_layer(b, counts, g_in, g_mid)
                del g_in, g_mid  # before the next layer allocates its own
    finally:
        model.train(was_training)
    return int(x_all.numel())


def _weight_device(experts: nn.Module) -> torch.device:
    return next(experts.parameters()).device


@torch.no_grad()
def collect_calibration_stats(
    model: nn.Module, input_ids, *, gram: bool = True, batch_size: int = 8
) -> CalibrationStats:
    """Every MoE layer's calibration statistics at once (``calibrate_layers`` kept): for small teachers
    and tests. A large teacher's Grams do not fit together (E [H^2 + I^2] floats per layer,
    2.45 GB for one of Qwen3-30B-A3B's); ``compress_layers`` consumes them layer by layer.

    Args:
        model: the teacher (Qwen3-MoE or Mixtral, stacked experts).
        input_ids: int [N, L] packed calibration blocks.
        gram: also accumulate the per-expert Gram matrices (activation-aware SVD).
    """
    n = len(find_moe_blocks(model))
    counts, g_in, g_mid = [None] * n, [None] * n, [None] * n

    def keep(l, c, gi, gm):
        counts[l], g_in[l], g_mid[l] = c, gi, gm

    tokens = calibrate_layers(model, input_ids, keep, gram=gram, batch_size=batch_size)
    return CalibrationStats(counts=counts, gram_in=g_in if gram else [], gram_mid=g_mid if gram else [],
                            tokens=tokens, sequences=len(input_ids))


def _accumulate_gram(experts: nn.Module, hidden, index, gram_in, gram_mid):
    """Add ``X^T X`` of each expert's routed inputs, and of its intermediate activations, in place.

    Routed pairs are sorted by expert once (as in ``CompressedExperts.forward``), so the
    cost is linear in the routed tokens, not tokens x experts."""
    E = experts.num_experts
    W = teacher_expert_weights(experts)
    k = index.shape[-1]
    flat = index.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    n_per = torch.bincount(flat, minlength=E + 1)[:E].tolist()
    x_sorted = hidden.index_select(0, order[: sum(n_per)] // k)
    for e, x in enumerate(x_sorted.split(n_per)):
        if not len(x):
            continue
        gate = torch.nn.functional.linear(x, W["gate"][e])
        up = torch.nn.functional.linear(x, W["up"][e])
        mid = (experts.act_fn(gate) * up).float()
        x = x.float()
        gram_in[e].addmm_(x.T, x)
        gram_mid[e].addmm_(mid.T, mid)


# --------------------------------------------------------------------------- factors


@dataclass
class LayerFactors:
    """Zero-shot factors of one MoE layer, at rank ``max_rank`` (slice for less).

    core[p]: [out, in];  B[p]: [E, out, max_rank];  A[p]: [E, max_rank, in]
    singular_values[p]: [E, max_rank] of the (whitened) deltas, descending.
    All float32 on the teacher layer's device.

    Given ``error_ranks`` (``layer_factors``), the squared reconstruction errors per expert,
    float64 on the CPU: ``sq_errors[p]`` [len(error_ranks), E, 2] (on the weights
    ``||W_i - W^_i||^2``, on the routed inputs ``tr(D G D^T)`` of the residual D; NaN without
    Grams) and ``sq_norms[p]`` [E, 2] (the same of ``W_i``); ``factor_errors`` turns them
    into the report's relative errors.
    """

    core: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    A: dict[str, torch.Tensor]
    singular_values: dict[str, torch.Tensor]
    error_ranks: tuple[int, ...] = ()
    sq_errors: dict[str, torch.Tensor] = field(default_factory=dict)
    sq_norms: dict[str, torch.Tensor] = field(default_factory=dict)


EXPERT_CHUNK = 8  # experts factorised together: [8, 768, 2048] fp32 temporaries are ~50 MB each


@contextmanager
def _lapack_threads(n: int = 1):
    """Run the LAPACK calls (eigh, Cholesky, triangular solves, SVD) on ``n`` CPU threads.

    Why: the reductions behind ``eigh`` of a 768 x 768 matrix are memory-bound; with 2 MKL
    threads on 2 shared cores they spin-wait, measured at 12x the CPU time and 25x the wall
    time of one thread (0.31 s of CPU for 8 matrices on one thread). Matmuls keep the
    caller's threads. No effect on CUDA tensors."""
    old = torch.get_num_threads()
    torch.set_num_threads(min(n, old))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _release_freed_memory() -> None:
    """Hand the C heap's freed memory back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    Why: glibc raises its mmap threshold to the largest block freed (up to 32 MB), so after the
    first layer the factorisation's temporaries come from the heap, and what they leave free
    there stays in the RSS under the next layer's Grams: +0.3 GiB on the second layer of
    Qwen3-30B-A3B's dimensions. Called between layers."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _shared_core(W: torch.Tensor, weights: torch.Tensor | None, chunk: int = EXPERT_CHUNK) -> torch.Tensor:
    """``W`` [E, out, in] (any dtype) -> the (weighted) mean over experts [out, in], float64,
    summed ``chunk`` experts at a time (never a float64 copy of the whole layer)."""
    E = W.shape[0]
    w = (torch.full((E,), 1.0 / E, dtype=torch.float64) if weights is None
         else weights.double() / weights.double().sum()).to(W.device)
    C = torch.zeros(W.shape[1:], dtype=torch.float64, device=W.device)
    for s in range(0, E, chunk):
        C += torch.einsum("e,eoi->oi", w[s : s + chunk], W[s : s + chunk].double())
    return C


def _damping(gram: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, n, n] Grams -> ``(gram, shift [b])``: the whitening Gram is ``gram + shift * 1`` with
    ``shift = damping * mean(diag)``. An expert never routed (mean diag <= 0, or not finite) gets
    the identity: its Gram zeroed (a copy, only then) and shift 1."""
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1)
    ok = torch.isfinite(scale) & (scale > 0)
    if not bool(torch.isfinite(scale).all()):
        gram = torch.where(ok[:, None, None], gram, 0)
    return gram, torch.where(ok, damping * scale, 1.0)


def _damped(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """[b, n, n] Grams -> ``gram + damping * mean(diag) * 1`` (a copy); an expert never routed -> 1."""
    gram, shift = _damping(gram, damping)
    return _plus_diagonal(gram, shift)


def _plus_diagonal(G: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    out = G.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(shift[:, None].to(G.dtype))
    return out


def _cholesky(G: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors of damped Grams [b, n, n]; a numerically indefinite one is damped harder once."""
    with _lapack_threads():
        S, info = torch.linalg.cholesky_ex(G)
        bad = info != 0
        if bool(bad.any()):
            scale = G[bad].diagonal(dim1=-2, dim2=-1).mean(-1)
            S[bad] = torch.linalg.cholesky(G[bad] + scale[:, None, None] * torch.eye(G.shape[-1], dtype=G.dtype,
                                                                                     device=G.device))
    return S


def _dot(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``sum(a[i] * b[i])`` [n] float64 of ``a`` [n, rows, cols]; ``b`` [n, rows, cols], or
    [rows, cols] shared by all, or None for ``||a[i]||^2``. Rows of ``cols`` in float32 (torch's
    reductions; one long float32 dot loses ~1e-3 over a 768 x 2048 matrix), their sums in float64;
    no [n, rows, cols] temporary unless ``b`` is batched."""
    if b is None:
        rows = torch.linalg.vector_norm(a, dim=-1).square()
    elif b.dim() < a.dim():
        rows = torch.einsum("nrc,rc->nr", a, b)
    else:
        rows = (a * b).sum(-1)
    return rows.double().sum(-1)


def truncated_factors(D: torch.Tensor, G: torch.Tensor | None, rank: int, shift: torch.Tensor | None = None,
                      core: torch.Tensor | None = None, core_gram: torch.Tensor | None = None):
    """Rank-``rank`` factors of a batch of deltas, the whole spectrum, and ``tr(W G_d W^T)``.

    ``D`` [b, out, in] float32; ``G`` [b, in, in] Grams of the inputs and ``shift`` [b]: whiten
    with ``G_d = G + shift * 1`` (activation-aware), or G None (plain). ``B A`` minimises
    ``||(D - B A) S||_F`` with ``S S^T = G_d`` (``S = 1`` plain), the rank-r truncated SVD
    ``D S = U Σ V^T`` un-whitened, split ``B = U_r Σ_r^½``.
    Returns ``B [b, out, rank]``, ``A [b, rank, in]``, ``Σ_r`` [b, rank], ``energy [b, min(out, in)]``
    (all the ``σ^2`` of ``D S``, descending: ``||(D - B_r A_r) S||_F^2`` is the sum of those after
    the r-th, for every r, with no further product) and, given ``core`` C [out, in] and G,
    ``tr(W G_d W^T)`` [b] float64 of ``W = D + C`` (``core_gram`` = C^T C when out <= in).

    Why eigh and not ``torch.linalg.svd``: the SVD of ``D S`` is taken through the
    eigendecomposition of its smaller Gram (``D G_d D^T`` [out, out] when out <= in, else
    ``(D S)^T (D S)`` [in, in]), one batched float32 ``eigh`` of a 768 x 768 matrix instead of
    an SVD of 768 x 2048: ~10x less CPU than the float64 SVD, and, unlike a randomized SVD
    (2.4% above optimal at 2 power iterations on the flat spectra of expert deltas), optimal
    to float32 rounding: the factors are ``U_r U_r^T D`` (a projection of ``D`` itself), so
    an eigenvector's rounding error costs the reconstruction only to second order. Exact
    at full rank. For out <= in the whitening needs no factorisation and no damped copy of
    the Gram at all (``U`` comes from ``D (G D^T + shift D^T)``); otherwise one Cholesky
    factor per expert and input statistic.
    """
    b, out, inn = D.shape
    r = min(rank, out, inn)
    tr_w = None
    if out <= inn:
        T = G @ D.transpose(1, 2) if G is not None else D.transpose(1, 2)  # [b, in, out] = G D^T
        if G is not None:
            T += shift[:, None, None].to(T.dtype) * D.transpose(1, 2)  # G_d D^T
        K = D @ T  # [b, out, out] = (DS)(DS)^T
        if G is not None and core is not None:
            # tr(W G_d W^T) = tr(D G_d D^T) + 2 <C^T, G_d D^T> + <C^T C, G> + shift ||C||^2:
            # no [in, in] product per expert
            cg = core_gram if core_gram is not None else core.T @ core
            tr_w = (K.diagonal(dim1=-2, dim2=-1).double().sum(-1) + 2 * _dot(T, core.T.contiguous())
                    + _dot(G, cg) + shift.double() * float(core.double().square().sum()))
        del T
        with _lapack_threads():
            w, U = torch.linalg.eigh(K)
        energy = w.flip(-1)
        U = U.flip(-1)[..., :r]
        sv = energy[..., :r].clamp_min(0).sqrt()
        P = U.transpose(1, 2) @ D  # [b, r, in] = Σ V^T S^{-1}
        root = sv.sqrt()
        inv = torch.where(root > 0, 1 / root.clamp_min(torch.finfo(D.dtype).tiny), 0)
        B, A = U * root[:, None, :], inv[:, :, None] * P
    else:
        S = _cholesky(_plus_diagonal(G, shift)) if G is not None else None  # [b, in, in], the smaller side
        Y = D @ S if S is not None else D  # [b, out, in] = D S
        if S is not None and core is not None:
            WS = core @ S
            WS += Y
            tr_w = _dot(WS)  # ||W S||^2
            del WS
        with _lapack_threads():
            w, V = torch.linalg.eigh(Y.transpose(1, 2) @ Y)  # [b, in, in]
        energy = w.flip(-1)
        V = V.flip(-1)[..., :r]
        sv = energy[..., :r].clamp_min(0).sqrt()
        root = sv.sqrt()
        inv = torch.where(root > 0, 1 / root.clamp_min(torch.finfo(D.dtype).tiny), 0)
        B = (Y @ V) * inv[:, None, :]  # U_r Σ_r^½ = D S V_r Σ_r^-½
        A = root[:, :, None] * V.transpose(1, 2)  # Σ_r^½ V_r^T, then S^{-1} on the right
        if S is not None:
            with _lapack_threads():
                A = torch.linalg.solve_triangular(S, A, upper=False, left=False)
    if r < rank:  # rank above min(out, in): pad with zeros (exact already)
        B = torch.nn.functional.pad(B, (0, rank - r))
        A = torch.nn.functional.pad(A, (0, 0, 0, rank - r))
        sv = torch.nn.functional.pad(sv, (0, rank - r))
    return B, A, sv, energy, tr_w


def _gram_of(p: str, gram_in, gram_mid):
    return gram_mid if p == "down" else gram_in


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
    chunk: int = EXPERT_CHUNK,
    error_ranks=(),
    on_first_chunk: Callable[[LayerFactors], None] | None = None,
    release_grams: bool = False,
) -> LayerFactors:
    """Shared cores and truncated-SVD wrappers of one teacher layer (see the module docstring).

    Batched: ``chunk`` experts at a time in float32 (``truncated_factors``), on the device
    of the teacher layer (the GPU when the model is there); gate and up share their inputs,
    so they share one damped Gram per expert.

    ``error_ranks``: ranks (<= max_rank) whose reconstruction errors to record in
    ``sq_errors`` (on the routed inputs too when the Grams are given). Why here: for the
    activation-aware SVD the error on the routed inputs at rank r is the energy of the
    discarded spectrum, ``tr(D G_d D^T) - sum_{j<r} σ_j^2`` with the damped Gram
    ``G_d = G + shift * 1``, so ``tr(D G D^T) = (discarded) - shift * ||D||^2`` and
    ``tr(W G W^T)`` come from quantities the factorisation already has: no product with a
    Gram beyond the factorisation's own (before: ~1.6 TFLOP per layer of Qwen3-30B-A3B).
    The plain SVD's error on the inputs is not its spectrum's: it is computed directly.

    ``on_first_chunk(f)`` is called once the first ``chunk`` experts' factors and errors are in
    ``f`` (``compress_layers`` runs its float64 spot check of expert 0 there, while the rest of
    the layer's factors have not taken their memory yet).

    ``release_grams``: the Grams are ``ChunkedGrams`` not needed after this call; each chunk of
    them is freed once its experts are factorised (after ``on_first_chunk`` for the first), so
    the Grams shrink while the factors grow. The factors are the same either way.
    """
    if release_grams and not all(isinstance(g, ChunkedGrams) for g in (gram_in, gram_mid) if g is not None):
        raise TypeError("release_grams needs the Grams as ChunkedGrams")
    W_all = teacher_expert_weights(experts)
    E = W_all["gate"].shape[0]
    error_ranks = tuple(int(r) for r in error_ranks)
    if any(r > max_rank for r in error_ranks):
        raise ValueError(f"error ranks {error_ranks} above max_rank={max_rank}")
    C = {p: _shared_core(W_all[p], counts if core == "frequency" else None).float() for p in PROJECTIONS}
    out = LayerFactors(C, {}, {}, {}, error_ranks=error_ranks)
    dev = W_all["gate"].device
    has_gram = gram_in is not None and gram_mid is not None
    aware = svd == "activation"
    core_gram = {p: C[p].T @ C[p] for p in ("gate", "up")} if aware else {}  # C^T C for tr(W G W^T)
    for p in PROJECTIONS:
        o, i = W_all[p].shape[1:]
        out.B[p] = torch.empty(E, o, max_rank, device=dev)
        out.A[p] = torch.empty(E, max_rank, i, device=dev)
        out.singular_values[p] = torch.empty(E, max_rank, device=dev)
        if error_ranks:
            out.sq_errors[p] = torch.full((len(error_ranks), E, 2), math.nan, dtype=torch.float64)
            out.sq_norms[p] = torch.full((E, 2), math.nan, dtype=torch.float64)
    for s in range(0, E, chunk):
        sl = slice(s, min(s + chunk, E))
        grams = {}  # the Grams themselves (no damped copy) and their damping shifts
        if aware:
            grams["in"] = _damping(gram_in[sl].to(dev, torch.float32), damping)
            grams["mid"] = _damping(gram_mid[sl].to(dev, torch.float32), damping)
        for p in PROJECTIONS:
            W = W_all[p][sl].to(torch.float32, copy=True)  # a copy even of a float32 teacher: see sub_ below
            G, shift = grams.get("mid" if p == "down" else "in", (None, None))
            if error_ranks:
                w_sq = _dot(W)
                out.sq_norms[p][sl, 0] = w_sq.cpu()
                G_raw = _gram_of(p, gram_in, gram_mid)[sl].to(dev, torch.float32) if has_gram and not aware else None
                if G_raw is not None:
                    out.sq_norms[p][sl, 1] = _dot(W @ G_raw, W).cpu()
            D = W.sub_(C[p])  # in place: W itself is not needed any more
            del W
            B, A, sv, energy, tr_w = truncated_factors(D, G, max_rank, shift, core=C[p] if aware else None,
                                                      core_gram=core_gram.get(p))
            out.B[p][sl], out.A[p][sl], out.singular_values[p][sl] = B, A, sv
            if not error_ranks:
                continue
            if aware:
                out.sq_norms[p][sl, 1] = (tr_w - shift.double() * w_sq).cpu()
            # tail[:, j] = sum of the energy from the j-th singular value on (index n: 0)
            tail = torch.cat([energy.double().flip(-1).cumsum(-1).flip(-1), energy.new_zeros(len(energy), 1,
                                                                                             dtype=torch.float64)], -1)
            for j, r in enumerate(error_ranks):
                R = torch.baddbmm(D, B[..., :r], A[:, :r], beta=-1)  # B A - D: the residual, sign aside
                r_sq = _dot(R)
                out.sq_errors[p][j, sl, 0] = r_sq.cpu()
                if aware:
                    out.sq_errors[p][j, sl, 1] = (tail[:, min(r, tail.shape[1] - 1)] - shift.double() * r_sq).cpu()
                elif G_raw is not None:
                    out.sq_errors[p][j, sl, 1] = _dot(R @ G_raw, R).cpu()
                del R
            del D, B, A
        del grams, G, shift
        G_raw = None
        if s == 0 and on_first_chunk is not None:
            on_first_chunk(out)
        if release_grams:
            for g in (gram_in, gram_mid):
                if g is not None:
                    g.release(sl)
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
    """``layer_factors`` for every MoE layer of ``teacher``, from statistics already collected."""
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


def _check_method(core: str, svd: str, stats: CalibrationStats | None, *, will_calibrate: bool = False):
    if core not in CORES:
        raise UserError(f"core={core!r} must be one of {', '.join(CORES)}")
    if svd not in SVDS:
        raise UserError(f"svd={svd!r} must be one of {', '.join(SVDS)}")
    if will_calibrate:
        return
    if core == "frequency" and (stats is None or sum(float(c.sum()) for c in stats.counts) == 0):
        raise UserError(
            "core='frequency' needs calibration data (routing counts); pass calibration= or use core='mean'"
        )
    if svd == "activation" and (stats is None or not stats.has_gram):
        raise UserError(
            "svd='activation' needs calibration data with Gram matrices; pass calibration= or use svd='plain'"
        )


# --------------------------------------------------------------------------- errors


@torch.no_grad()
def layer_errors(W_all: dict, core: dict, B: dict, A: dict, gram_in=None, gram_mid=None,
                 chunk: int = EXPERT_CHUNK) -> dict:
    """Relative reconstruction errors of one layer's experts ``W_i ~ C + B_i A_i``, per projection.

    ``{p: sqrt(sum_i ||D_i||^2) / sqrt(sum_i ||W_i||^2)}`` and, given the Grams,
    ``{p_on_inputs: sqrt(sum_i tr(D_i G_i D_i^T)) / sqrt(sum_i tr(W_i G_i W_i^T))}``.
    ``chunk`` experts at a time: ``D`` in float64 for the weight error, the Gram products
    in float32 with float64 sums, so no layer-sized float64 copy (10 GB at Qwen3-30B-A3B's
    dimensions) is ever made.
    """
    row = {}
    for p in PROJECTIONS:
        W = W_all[p]
        G_all = _gram_of(p, gram_in, gram_mid)
        num = den = num_g = den_g = 0.0
        for s in range(0, W.shape[0], chunk):
            Wc = W[s : s + chunk].double()
            D = Wc - core[p].double() - B[p][s : s + chunk].double() @ A[p][s : s + chunk].double()
            num += float(D.square().sum())
            den += float(Wc.square().sum())
            if G_all is not None:
                G = G_all[s : s + chunk].to(W.device, torch.float32)
                D32, W32 = D.float(), Wc.float()
                num_g += float(((D32 @ G) * D32).double().sum())
                den_g += float(((W32 @ G) * W32).double().sum())
        row[p] = math.sqrt(num / den) if den > 0 else 0.0
        if G_all is not None:
            row[f"{p}_on_inputs"] = math.sqrt(max(num_g, 0.0) / den_g) if den_g > 0 else 0.0
    row["mean"] = sum(row[p] for p in PROJECTIONS) / len(PROJECTIONS)
    return row


def factor_errors(f: LayerFactors, rank: int) -> dict:
    """``layer_errors``' row from the squared errors ``layer_factors`` recorded at ``rank`` (no product)."""
    j = f.error_ranks.index(rank)
    row = {}
    for p in PROJECTIONS:
        num, den = f.sq_errors[p][j].sum(0).tolist(), f.sq_norms[p].sum(0).tolist()
        row[p] = math.sqrt(max(num[0], 0.0) / den[0]) if den[0] > 0 else 0.0
        if not math.isnan(num[1]):
            row[f"{p}_on_inputs"] = math.sqrt(max(num[1], 0.0) / den[1]) if den[1] > 0 else 0.0
    row["mean"] = sum(row[p] for p in PROJECTIONS) / len(PROJECTIONS)
    return row


@torch.no_grad()
def fp64_check(W_all: dict, f: LayerFactors, rank: int, *, core: str, svd: str, gram_in=None, gram_mid=None,
               damping: float = DEFAULT_DAMPING, expert: int = 0) -> list[dict]:
    """The batched float32 factors of one expert against the float64 ``torch.linalg.svd`` reference
    (the pre-batching algorithm), per projection: each one's relative error on the routed
    inputs (on the weights for ``svd="plain"``), computed directly in float64, and their
    relative difference; and, where ``f`` recorded errors at ``rank``, the error ``layer_factors``
    derived from the spectrum (``error_spectral``) against the direct one of the same factors."""
    rows = []
    for p in PROJECTIONS:
        D = W_all[p][expert].double() - f.core[p].double()
        G = _gram_of(p, gram_in, gram_mid)
        with _lapack_threads():
            if svd == "activation":
                Gd = _damped(G[expert : expert + 1].double(), damping)[0]
                S = torch.linalg.cholesky(Gd)
                U, sv, Vh = torch.linalg.svd(D @ S, full_matrices=False)
                Vh = torch.linalg.solve_triangular(S, Vh, upper=False, left=False)
                G_err = G[expert].double()
            else:
                U, sv, Vh = torch.linalg.svd(D, full_matrices=False)
                G_err = None
        M64 = (U[:, :rank] * sv[:rank]) @ Vh[:rank]
        M32 = f.B[p][expert, :, :rank].double() @ f.A[p][expert, :rank].double()

        def err(M, D=D, G_err=G_err):
            R = D - M
            if G_err is None:
                return float(R.norm() / (D + f.core[p].double()).norm())
            Wd = D + f.core[p].double()
            return math.sqrt(max(float(torch.einsum("oi,ij,oj->", R, G_err, R)), 0.0)
                             / float(torch.einsum("oi,ij,oj->", Wd, G_err, Wd)))

        e32, e64 = err(M32), err(M64)
        row = {"projection": p, "expert": expert, "error_fp32": e32, "error_fp64": e64,
               "relative_difference": (e32 - e64) / e64 if e64 > 0 else 0.0}
        if rank in f.error_ranks:
            col = 1 if svd == "activation" else 0
            num = float(f.sq_errors[p][f.error_ranks.index(rank), expert, col])
            den = float(f.sq_norms[p][expert, col])
            spectral = math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0
            row.update(error_spectral=spectral, spectral_difference=(spectral - e32) / e32 if e32 > 0 else 0.0)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- rank allocation


def allocation_cap(rank: int, full: int) -> int:
    """The largest rank a budgeted allocation gives one expert: ``RANK_CAP`` x the uniform rank, at most full."""
    return min(full, RANK_CAP * rank)


def layer_spectrum(f: LayerFactors, cap: int) -> dict[str, torch.Tensor]:
    """What ``rank_gains`` needs of one layer's factors: the first ``cap`` singular values per projection
    ([E, cap] float32 on the CPU; a few KB, where the factors are GBs at scale)."""
    return {p: f.singular_values[p][:, :cap].float().cpu().clone() for p in PROJECTIONS}


def rank_gains(mode: str, counts: list, spectra: list[dict] | None = None, *, svd: str = "activation",
               cap: int) -> torch.Tensor:
    """What the ``j``-th rank component of expert ``e`` in MoE layer ``l`` is worth: ``[L, E, cap]`` float64.

    ``frequency``: ``f_le / (j + 1)`` with ``f_le`` the share of layer ``l``'s routed pairs that went to
    expert ``e``. Taking the largest gains gives expert ``e`` about ``f_le / τ`` components for a
    threshold ``τ``: ranks proportional to routing frequency. The threshold is global, so every layer
    gets about the same budget (rounding and the cap move a component or two between layers).

    ``frequency_energy``: from ``spectra`` (per layer, ``layer_spectrum``), the squared error the
    component removes, summed over gate, up and down: greedy on marginal energy per parameter.
    With the activation-aware SVD these are the
    ``σ_j^2`` of ``D_e S_e``, the error on expert ``e``'s routed calibration inputs (its Gram sums
    over the tokens routed to it, so the frequency is in it already, and the layers' own scales
    too); with the plain SVD the weight-space ``σ_j^2`` times ``f_le``. Within an expert the gains
    never increase with ``j``, so the largest ones are a prefix of every expert's components
    (every component of every expert costs ``3 (H + I)`` parameters).

    Measured on the embedded default (checkpoint-0 at rank 4's parameters, whole validation
    split; docs/DISTILLATION.md): the energy summed as is beat the energy divided by each
    layer's total (layers compared by relative error), which spread the budget evenly over layers.
    """
    c = torch.stack([torch.as_tensor(x, dtype=torch.float64).cpu() for x in counts])  # [L, E]
    f = c / c.sum(1, keepdim=True).clamp_min(1)
    j = torch.arange(cap, dtype=torch.float64)
    if mode == "frequency":
        return f[:, :, None] / (j + 1)
    if mode != "frequency_energy":
        raise ValueError(f"no gains for rank allocation {mode!r}")
    gains = torch.zeros(len(counts), c.shape[1], cap, dtype=torch.float64)
    for l, spectrum in enumerate(spectra):
        for p in PROJECTIONS:
            sv = spectrum[p][:, :cap].double().cpu()
            if sv.shape[1] < cap:
                raise ValueError(f"layer {l}'s factors have rank {sv.shape[1]} < the cap {cap}")
            # activation: on the routed inputs already; plain: weight-space, weighted by the routed tokens
            gains[l] += sv.square() if svd == "activation" else c[l][:, None] * sv.square()
    return gains


def allocate_ranks(gains: torch.Tensor, rank: int) -> list[list[int]]:
    """Per layer and expert, how many components: the ``L E rank`` largest ``gains`` [L, E, cap] (the
    same parameters as rank ``rank`` everywhere). Ties go to the lower layer, expert and component
    (a stable sort of the flattened gains), so the result is deterministic."""
    L, E, cap = gains.shape
    budget = min(L * E * rank, gains.numel())
    order = torch.sort(-gains.reshape(-1), stable=True).indices[:budget]
    ranks = torch.zeros(L * E * cap, dtype=torch.int64)
    ranks[order] = 1
    return ranks.view(L, E, cap).sum(-1).tolist()


# --------------------------------------------------------------------------- the pipeline


@dataclass
class CompressionResult:
    """What ``compress_layers`` produced.

    factors:   ``{(core, svd): [LayerFactors per layer]}`` for the variants asked to be kept.
    errors:    ``{(core, svd, rank): [layer_errors row per layer]}`` (with ``layer`` names).
    svd_check: per layer and projection, ``fp64_check`` of the first variant at its rank.
    stats:     the routing counts (no Grams), tokens and sequences of the calibration.
    seconds:   wall seconds per layer (calibration forward + factors + errors).
    """

    factors: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    svd_check: list = field(default_factory=list)
    stats: CalibrationStats | None = None
    seconds: list = field(default_factory=list)


@torch.no_grad()
def compress_layers(
    teacher: nn.Module,
    variants: dict,
    *,
    calibration=None,
    gram: bool | None = None,
    error_ranks: dict | None = None,
    keep: set | None = None,
    on_layer: Callable | None = None,
    damping: float = DEFAULT_DAMPING,
    batch_size: int = 8,
    check_fp64: bool = True,
    desc: str = "compress",
) -> CompressionResult:
    """Calibrate and factorise the teacher's MoE layers one at a time.

    Args:
        variants: ``{(core, svd): max_rank}``, the first one being checkpoint-0's.
        calibration: int [N, L] token blocks (run layer by layer, ``calibrate_layers``), a
            ``CalibrationStats`` already collected, or None (``core="mean"``, ``svd="plain"`` only).
        gram: collect Grams (default: when some variant is activation-aware or ``error_ranks``
            asks for errors; the errors then include those on the routed inputs).
        error_ranks: ``{(core, svd): [ranks]}`` whose reconstruction errors to compute.
        keep: variants whose factors to return (default: all); ``on_layer(l, variant, factors)``
            sees every layer's factors first (``compress_model`` copies them into the student).
    Memory: one layer's Grams (E [H^2 + I^2] float32) and ``EXPERT_CHUNK``-sized temporaries; when
    it calibrates, the Grams come in ``EXPERT_CHUNK``-expert tensors that the last variant frees
    as it factorises them, so the layer's factors take the place of its Grams (given
    ``CalibrationStats``, the caller's Grams stay, and the factors come on top); a tqdm bar counts
    layers with an ETA.
    """
    for core, svd in variants:
        _check_method(core, svd, calibration if isinstance(calibration, CalibrationStats) else None,
                      will_calibrate=calibration is not None and not isinstance(calibration, CalibrationStats))
    error_ranks = error_ranks or {}
    keep = set(variants) if keep is None else set(keep)
    if gram is None:
        gram = any(svd == "activation" for _, svd in variants) or bool(error_ranks)
    blocks = find_moe_blocks(teacher)
    result = CompressionResult(factors={v: [None] * len(blocks) for v in keep})
    result.errors = {(c, s, r): [None] * len(blocks) for (c, s), ranks in error_ranks.items() for r in ranks}
    bar = tqdm(total=len(blocks), desc=desc, unit="layer", leave=False)
    t_last = [time.perf_counter()]

    def process(l, counts, g_in, g_mid):
        name, block = blocks[l]
        _release_freed_memory()  # what the calibration and the previous layer left free in the heap
        W_all = teacher_expert_weights(block.experts)
        last = list(variants)[-1]
        for v, max_rank in variants.items():
            core, svd = v
            check = check_fp64 and v == next(iter(variants)) and max_rank > 0

            def spot_check(f, svd=svd, core=core, max_rank=max_rank):
                result.svd_check.extend({"layer": name, "svd": svd, "rank": max_rank, **row} for row in fp64_check(
                    W_all, f, max_rank, core=core, svd=svd, gram_in=g_in, gram_mid=g_mid, damping=damping))

            ranks = sorted({*error_ranks.get(v, []), *([max_rank] if check else [])})
            f = layer_factors(block.experts, max_rank=max_rank, core=core, svd=svd, counts=counts,
                              gram_in=g_in, gram_mid=g_mid, damping=damping, error_ranks=ranks,
                              on_first_chunk=spot_check if check else None, chunk=EXPERT_CHUNK,
                              # the Grams calibrate_layers made for this layer: the last variant frees them
                              release_grams=v == last and isinstance(g_in, ChunkedGrams))
            for r in error_ranks.get(v, []):
                result.errors[(core, svd, r)][l] = {"layer": name, **factor_errors(f, r)}
            if on_layer is not None:
                on_layer(l, v, f)
            if v in keep:
                result.factors[v][l] = f
            del f
        now = time.perf_counter()
        result.seconds.append(now - t_last[0])
        t_last[0] = now
        bar.set_postfix_str(f"layer {l + 1}/{len(blocks)} {result.seconds[-1]:.1f}s")
        bar.update(1)

    try:
        if calibration is None or isinstance(calibration, CalibrationStats):
            s = calibration
            for l in range(len(blocks)):
                process(l, s.counts[l] if s else None, s.gram_in[l] if s and s.has_gram else None,
                        s.gram_mid[l] if s and s.has_gram else None)
            result.stats = None if s is None else CalibrationStats(counts=s.counts, tokens=s.tokens,
                                                                   sequences=s.sequences)
        else:
            counts = [None] * len(blocks)

            def on_stats(l, c, g_in, g_mid):
                counts[l] = c
                process(l, c, g_in, g_mid)

            tokens = calibrate_layers(teacher, calibration, on_stats, gram=gram, batch_size=batch_size,
                                      gram_chunk=EXPERT_CHUNK)
            result.stats = CalibrationStats(counts=counts, tokens=tokens, sequences=len(calibration))
    finally:
        bar.close()
    return result


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
    student = new_student(teacher, rank, compression)
    for l, f in enumerate(factors):
        load_layer_factors(student, l, f)
    return finish_student(student, teacher)


def new_student(teacher: nn.Module, rank: int, compression: dict, ranks: list[list[int]] | None = None) -> nn.Module:
    """The compressed model with the teacher's non-expert tensors cloned and its experts allocated
    (uninitialised, in the teacher's dtype, on the device of the teacher layer each replaces);
    ``load_layer_factors`` fills them layer by layer, ``finish_student`` completes it.

    ``ranks``: per MoE layer, each expert's rank (a budgeted allocation, recorded in
    ``config.compression["ranks"]``); None: every expert has ``rank``."""
    _, (_, model_cls, *_) = _architecture(teacher)
    compression = {**compression, "rank": int(rank)}
    if ranks is not None:
        compression["ranks"] = [[int(r) for r in layer] for layer in ranks]
    config = student_config(teacher, compression)
    dtype = teacher.get_input_embeddings().weight.dtype
    with torch.device("meta"):
        student = model_cls(config)
    copy_non_experts(teacher, student)
    t_blocks = find_moe_blocks(teacher)
    per_layer = ranks if ranks is not None else [None] * len(t_blocks)
    for (_, block), (_, t_block), mine in zip(find_moe_blocks(student), t_blocks, per_layer, strict=True):
        t_ex = t_block.experts
        with torch.device(_weight_device(t_ex)):
            ex = CompressedExperts(
                t_ex.num_experts, t_ex.hidden_dim, t_ex.intermediate_dim, rank if mine is None else max(mine),
                teacher.config.hidden_act, expert_ranks=mine,
            )
        block.experts = ex.to(dtype)
    return student


@torch.no_grad()
def load_layer_factors(student: nn.Module, layer: int, f: LayerFactors) -> None:
    """Copy ``f`` (sliced to the student's rank, or to each expert's own) into MoE layer ``layer`` of ``student``."""
    ex = find_moe_blocks(student)[layer][1].experts
    for p in PROJECTIONS:
        ex.core(p).copy_(f.core[p])
        B, A = ex.wrapper(p)
        B.copy_(f.B[p][..., : ex.rank])
        A.copy_(f.A[p][:, : ex.rank])
    ex.zero_padding()


def finish_student(student: nn.Module, teacher: nn.Module) -> nn.Module:
    finish_transplant(student)
    student.generation_config = teacher.generation_config
    student.config.dtype = teacher.get_input_embeddings().weight.dtype
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
    rank_allocation: str = "uniform",
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
        rank_allocation: ``"uniform"`` (rank r everywhere), or ``"frequency"`` / ``"frequency_energy"``:
            the same total wrapper parameters (``L E r`` rank components) spread over layers and
            experts by ``rank_gains`` (needs calibration); the ranks go to
            ``config.compression["ranks"]``.
    Returns:
        the student (``MoedistillQwen3MoeForCausalLM`` / ``MoedistillMixtralForCausalLM``) in eval
        mode, with the teacher's dtype and devices; ``student.config.compression`` records the method.
    """
    r = resolve_rank(teacher, rank, compression_ratio)
    check_rank_allocation(rank_allocation, calibrated=calibration is not None)
    record = compression_record(teacher, r, core=core, svd=svd, stats=None, damping=damping)
    ranks = None
    if rank_allocation != "uniform" and r > 0:  # the spectra first, then the same factors again at these ranks
        spectra, first = allocation_pass(teacher, (core, svd), r, calibration, damping=damping,
                                         batch_size=batch_size)
        ranks = allocate_ranks(rank_gains(rank_allocation, first.stats.counts, spectra, svd=svd,
                                          cap=allocation_cap(r, full_rank(teacher))), r)
    student = new_student(teacher, r, record, ranks=ranks)
    result = compress_layers(
        teacher, {(core, svd): r if ranks is None else max(map(max, ranks))}, calibration=calibration, keep=set(),
        on_layer=lambda l, _variant, f: load_layer_factors(student, l, f),
        damping=damping, batch_size=batch_size, check_fp64=False,
    )
    student.config.compression = {
        **compression_record(teacher, r, core=core, svd=svd, stats=result.stats, damping=damping,
                             rank_allocation=rank_allocation, ranks=ranks),
        "rank": int(r),
    }
    return finish_student(student, teacher)


def allocation_pass(teacher: nn.Module, variant: tuple[str, str], rank: int, calibration, **kw):
    """The first of a budgeted allocation's two passes: every layer factorised at the cap, only its
    spectrum kept (``layer_spectrum``), so the memory stays one layer's whatever the depth. Returns
    ``(spectra, CompressionResult)``; the second pass (``compress_layers`` at the allocated ranks) makes
    the same factors again. Why two passes: the ranks of layer 0 depend on the spectra of all layers,
    and keeping every layer's factors at the cap until then would take ~2 GB per layer of
    Qwen3-30B-A3B at ``compression_ratio=0.25`` (rank 135, cap 540)."""
    cap = allocation_cap(rank, full_rank(teacher))
    spectra = [None] * len(find_moe_blocks(teacher))

    def keep_spectrum(l, _variant, f):
        spectra[l] = layer_spectrum(f, cap)

    result = compress_layers(teacher, {variant: cap}, calibration=calibration, gram=variant[1] == "activation",
                             keep=set(), on_layer=keep_spectrum, check_fp64=False, desc="allocate", **kw)
    return spectra, result


def check_rank_allocation(mode: str, *, calibrated: bool) -> None:
    if mode not in RANK_ALLOCATIONS:
        raise UserError(f"compress.rank_allocation={mode!r} must be one of {', '.join(RANK_ALLOCATIONS)}")
    if mode != "uniform" and not calibrated:
        raise UserError(f"compress.rank_allocation={mode} needs calibration data (routing frequencies)")


def compression_record(
    teacher, rank: int, *, core: str, svd: str, stats: CalibrationStats | None, damping: float,
    rank_allocation: str = "uniform", ranks: list[list[int]] | None = None,
) -> dict:
    """What goes into ``config.compression`` of a student (``ranks``: per layer and expert, when allocated)."""
    ex = find_moe_blocks(teacher)[0][1].experts
    return {
        "method": "shared_core+wrapper",
        "rank": int(rank),
        "rank_allocation": rank_allocation,
        **({"ranks": [[int(r) for r in layer] for layer in ranks]} if ranks is not None else {}),
        "core": core,
        "svd": svd,
        "damping": damping if svd == "activation" else None,
        "calibration_sequences": stats.sequences if stats is not None else 0,
        "calibration_tokens": stats.tokens if stats is not None else 0,
        # the same for every allocation: the budget is the uniform rank's parameters
        "expert_compression_ratio": expert_ratio(rank, ex.num_experts, ex.hidden_dim, ex.intermediate_dim),
        "teacher_model_type": _architecture(teacher)[0],
        "teacher": str(getattr(teacher.config, "_name_or_path", "") or ""),
    }
