"""The distillation loss: cross-entropy on the labels blended with a divergence to the teacher.

    L = (1 - alpha) * CE(student, labels) + alpha * T^2 * D(q_T, p_T),   D = KL(q_T || p_T) by default

``p_T = softmax(z / T)`` over the student's full vocabulary; ``q_T`` is the teacher at
temperature T. Offline, the teacher comes from the cache as sparse log-probabilities
(``distillation_loss``); online, or with ``k = V``, from full teacher logits
(``dense_distillation_loss``). Both are pure functions on tensors, no Trainer inside.

Why chunked, and why a custom autograd function: at V = 151,936 the student's logits for
4,096 positions are 2.5 GB in float32. Upcasting them whole (bf16 -> fp32) doubles that,
``log_softmax`` keeps another copy for backward, and its backward makes one more; a
dense teacher of the same shape (the original prototype scattered the top-k into a
full-vocabulary tensor) adds several more. Here the counted positions are processed ``chunk_size`` at a
time: each chunk is upcast to fp32 into a reused work buffer, normalised with one fused
softmax per temperature, and its gradient w.r.t. the logits is written straight into one
buffer of the input's dtype. The backward pass only scales that buffer, so fwd+bwd holds the
logits, their gradient and a few chunk-sized fp32 temporaries -- never a second [B, T, V]
tensor. The price: the backward runs once (``retain_graph`` double backward is refused)
and the loss has no second derivative. ``benchmarks/bench_loss.py`` measures it against
plain CE and against that prototype's dense rebuild.

How each ``tail`` mode builds q_T from the stored ids S (log-probs ``lp`` at T=1 over
the full vocabulary, padding (``moedistill.targets.PAD_ID`` / ``PAD_LOGPROB``) ignored):

* ``renormalize`` (the original prototype's behaviour): q_T(i) = exp(lp_i / T) / sum_{j in S} exp(lp_j / T).
  The mass outside S is dropped and the student is pulled towards S only.
* ``tail``: both distributions get one extra bucket for everything outside S, and KL is
  taken between these coarsened (|S| + 1)-outcome distributions (a lower bound on the
  full KL by the data-processing inequality; exact when the tail is empty).
  Student bucket: p_T(tail) = sum_{j not in S} p_T(j), the exact tempered mass outside S,
  summed directly over the masked row (not ``1 - sum_S``, which cancels catastrophically).
  Teacher bucket, tempered the same way (temper first, then sum over the tail): the
  tail's mass at T=1 is r = 1 - sum_S exp(lp_i), but how it spreads over the V - |S|
  unseen ids is unknown, and sum_tail q_j^(1/T) depends on that. We assume it is spread
  evenly over  n = clamp(r / q_min, 1, V - |S|)  ids, where q_min = min_S exp(lp_i):
  as few ids as the top-k order allows (no unseen id may beat a stored one), so the
  bucket's unnormalised tempered weight is  n * (r / n)^(1/T)  and
  q_T(tail) = that / (sum_S exp(lp_i / T) + that). Why this choice: it is exact at T=1
  for any spread; it vanishes when r = 0 or |S| = V (so k = V gives the plain full KL);
  for T > 1 it is the smallest tail weight consistent with the stored top-k (for T < 1
  the largest), i.e. it errs towards ``renormalize`` instead of inventing mass; and
  unlike treating the tail as ONE token (weight r^(1/T), far too small at T = 2) it
  keeps the flattening that tempering really causes in a long tail.
* ``sample`` (random-sampling KD, Anshumann et al. 2025): S holds the distinct ids of
  N draws from the teacher at T=1 with their ``target_counts`` c_i. The weights
  w_i = c_i q_i^(1/T - 1) / sum_j c_j q_j^(1/T - 1)  (= c_i / N at T = 1) are the
  self-normalised importance weights that turn draws from q into an estimate of
  expectations under q_T. KL is the estimate of  sum_v q_T(v) log(q_T(v) / p_T(v)):
  sum_S w_i (log q_T(i) - log p_T(i)), with log q_T(i) = lp_i / T - log Z_T from the
  stored log-probs and Z_T = sum_v q_v^(1/T) estimated by (1/N) sum_S c_i q_i^(1/T - 1)
  (exactly 1 at T = 1). Only the -sum w log p_T part has a gradient; it is unbiased at
  T = 1 and consistent otherwise, and the estimate converges to the exact KL as N grows.

Divergences (``divergence``; ``beta`` for jsd and skew_kl, in (0, 1)). With m = beta q + (1 - beta) p:

* ``forward_kl`` (default): KL(q || p), everything above; its code is unchanged by the others.
* ``reverse_kl``: KL(p || q) = sum p log(p / q) (MiniLLM; mode-seeking).
* ``jsd``: beta KL(q || m) + (1 - beta) KL(p || m), TRL's generalized JSD (default beta 0.5;
  its beta -> 0 / 1 limits, divided by beta / 1 - beta, are forward / reverse KL, which is why
  the ends are refused here: use those names).
* ``skew_kl``: KL(q || m), DistiLLM's skew KL (default beta 0.1; beta -> 0 is forward KL).
* ``tvd``: (1/2) sum |q - p| (DistillKit's tvd).

All five are f-divergences, D = sum_v p_v f(q_v / p_v) with f convex and f(1) = 0. The other
four are computed term by term in the standardised form d(q, p) = p f~(q / p), f~(t) = f(t) -
f'(1)(t - 1) (f'(1) = -1 reverse, 0 jsd, 1 - beta skew, 0 tvd): each term is >= 0 and 0 only at
p = q, and the terms sum to the same D whenever both sides sum to 1 over the outcomes (so the
two forms differ only where the estimate below is not normalised). Gradient: with g = dd/dp
per outcome, d D / d u_j = p_j (g_j - sum_k p_k g_k) (the softmax's Jacobian); per outcome
(s = log(p / q)): reverse d = p s - p + q, g = s; jsd g = (1 - beta) log(p / m); skew
g = (1 - beta)(1 - q / m); tvd g = sign(p - q) / 2 (0 at p = q, a subgradient). What each mode makes of them:

* dense teacher (online, or any k = V): the plain full-vocabulary divergence, exact.
* ``renormalize``: D between the renormalised teacher (q_T on S as above, exactly 0 outside S)
  and the full student. The student's mass outside S enters as one bucket p_T(tail) (summed
  exactly, as in ``tail``), and for a q of 0 the bucket is no coarsening at all (sum over the
  outside ids of p_j f(0) = f(0) p_T(tail)), so jsd / skew_kl / tvd are exact for that target;
  the approximation is the target itself, which drops the teacher's mass outside S.
  reverse_kl would be infinite (p log(p / 0)) and is refused (``check_divergence``).
* ``tail``: D between the coarsened (|S| + 1)-outcome distributions of the ``tail`` mode.
  Every f-divergence only shrinks under coarsening (data processing), so at T = 1 each is a
  lower bound of the full divergence, and exact when the tail is empty or |S| = V; at T != 1
  the teacher bucket carries the documented spread assumption. reverse_kl's bucket term is
  p_tail log(p_tail / q_tail): finite wherever the tail mass r > 0; where r rounds to 0 with
  ids still outside S, q_tail is taken as the smallest normal float32 (a large, finite
  penalty on the student's tail, like the clamp of p_tail above).
* ``sample``: with rho_i = p_T(i) / q_T(i) (q_T from the stored log-probs and Z_T as above),
  D = E_{q_T}[rho f~(1 / rho)] is estimated by sum_S w_i rho_i f~(1 / rho_i) = sum_S w_i
  d(q_i, p_i) / q_i: unbiased at T = 1 in value and gradient (w_i = c_i / N, Z_T = 1),
  consistent otherwise. The standardised f~ matters here: the plain reverse-KL term rho log rho
  is minimised at rho = 1/e, so against a fixed set of draws (a cache is fixed) it would pull
  the student's mass off the drawn ids; rho log rho - rho + 1 (its expectation is the same, as
  E_q[rho] = 1) is minimised at p = q on every drawn id. The spread of the estimate grows with
  sum_v p_v^2 / q_v: reverse_kl, which weighs the student's mass where the teacher has little,
  sees an id the teacher rarely draws only through the rare draws that hit it (a strongly
  peaked teacher needs N >> 1 / q_v for that id; tests/test_divergences.py shows both cases).
  On a sample cache, ``tail`` gives the deterministic coarsened bound instead (exact at T=1;
  its spread assumption presumes top-k order, which sampled ids do not have).

Why T^2 for every divergence: near p = q each f-divergence is f''(1)/2 * chi^2(q, p), and for
logit differences delta the tempered chi^2 falls as |delta|^2 / T^2, so T^2 keeps the gradient's
scale across temperatures (Hinton's argument for KL holds for all the smooth ones). f''(1) is 1
for both KLs, beta(1 - beta) for jsd (1/4 at 0.5) and (1 - beta)^2 for skew_kl, so the same alpha
weighs the divergences differently; tvd is not smooth at p = q and its gradient falls only as
1 / T, so T^2 raises its weight by T. Evaluation always reports the KL (the trainer's kl_* metrics).

Masking and means: a position whose label is -100 counts in neither term. CE and KL are
sums over counted positions divided by ``num_items_in_batch`` when given (the trainer
passes the number of counted positions of the whole optimizer step, so summing
micro-batch losses gives the loss, and gradient, of one big batch) or else by the number
of counted positions here. No counted position: every part is 0 and the gradient is 0.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple

import torch

from moedistill.errors import UserError
from moedistill.targets import DenseTargets, HiddenTargets, SampledTargets, SparseTargets, Targets

IGNORE_INDEX = -100
TAIL_MODES = ("renormalize", "tail", "sample")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")
# beta when none is given: TRL's generalized JSD default, DistiLLM's skew.
DEFAULT_BETA = {"jsd": 0.5, "skew_kl": 0.1}
# On CPU, a chunk's fp32 buffer is capped at this size (about 220 positions at V = 151,936).
# The work buffers are new pages on every call, and on CPU touching fresh pages costs about
# as much as the arithmetic: at 1,024 x 151,936 fwd+bwd took 1.5 s with 128-256 positions
# per chunk and 2.5 s with 1,024 (2 shared cores; with 32-64 per-op overhead dominated).
CPU_CHUNK_BYTES = 128 * 2**20

__all__ = [
    "LossOutput", "teacher_loss", "distillation_loss", "dense_distillation_loss", "fused_linear_teacher_loss",
    "fused_linear_distillation_loss", "fused_linear_dense_distillation_loss", "check_divergence", "IGNORE_INDEX",
    "TAIL_MODES", "DIVERGENCES", "DEFAULT_BETA", "PositionStats", "position_stats",
]


class LossOutput(NamedTuple):
    """``total`` carries the gradient; ``ce`` and ``kl`` are its unweighted, detached parts
    (total = (1 - alpha) * ce + alpha * T^2 * kl), all 0-dim float32 tensors, for logging.
    ``kl`` is the divergence term D: the KL for ``forward_kl`` (the default), else the chosen one."""

    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


# --------------------------------------------------------------------------- public API


def teacher_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    targets: Targets,
    *,
    alpha: float,
    temperature: float,
    tail: str = "renormalize",
    divergence: str = "forward_kl",
    beta: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> LossOutput:
    """The blended loss against any kind of teacher targets (``moedistill.targets``).

    ``DenseTargets`` -> :func:`dense_distillation_loss` (``tail`` does not apply);
    ``TopKTargets`` / ``SampledTargets`` -> :func:`distillation_loss` with their ids,
    log-probs (and counts). Shapes and the other arguments as there."""
    if isinstance(targets, DenseTargets):
        return dense_distillation_loss(
            student_logits, targets.logits, labels, alpha=alpha, temperature=temperature, divergence=divergence,
            beta=beta, num_items_in_batch=num_items_in_batch, chunk_size=chunk_size,
        )
    if not isinstance(targets, SparseTargets):
        raise TypeError(f"targets must be TopKTargets, SampledTargets or DenseTargets, got {type(targets).__name__}")
    return distillation_loss(
        student_logits, labels, targets.ids, targets.logprobs, alpha=alpha, temperature=temperature, tail=tail,
        divergence=divergence, beta=beta, target_counts=getattr(targets, "counts", None),
        num_items_in_batch=num_items_in_batch, chunk_size=chunk_size,
    )


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    tail: str = "renormalize",
    divergence: str = "forward_kl",
    beta: float | None = None,
    target_counts: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> LossOutput:
    """Blended CE + divergence loss against sparse teacher targets from the cache.

    Args:
        student_logits: [B, T, V], any float dtype (bf16 is fine: only chunks are upcast).
        labels: [B, T] int64, already shifted (labels[t] is the token after t); -100 = ignore.
        target_ids: [B, T, W] int64 (W: the targets' width, stored entries per position), distinct per
            position; PAD_ID (-1) = padding.
        target_logprobs: [B, T, W] float32, the teacher's log-softmax at T=1 over its full
            vocabulary for those ids; -inf at padding.
        alpha: weight of the KL term in [0, 1]; 0 gives exactly the mean CE.
        temperature: T > 0, applied to student and teacher alike.
        tail: ``renormalize`` | ``tail`` | ``sample``, see the module docstring.
        divergence: ``forward_kl`` (the default, KL(q_T || p_T)) | ``reverse_kl`` | ``jsd`` |
            ``skew_kl`` | ``tvd``, see the module docstring; ``reverse_kl`` needs ``tail`` or ``sample``.
        beta: in (0, 1), ``jsd``'s mixture weight or ``skew_kl``'s skew; None: ``DEFAULT_BETA``.
            Only those two take one.
        target_counts: [B, T, W] draw counts (float or int; 0 at padding); ``sample`` only.
        num_items_in_batch: divisor for the sums (counted positions of the whole
            optimizer step); default: the counted positions of this call.
        chunk_size: the most positions upcast to fp32 at a time; the loss holds 2-4 such
            [chunk, V] fp32 buffers. On CPU it uses fewer positions when a buffer would pass
            CPU_CHUNK_BYTES: there, touching fresh pages and stalling thread barriers cost
            more than the arithmetic, and mid-sized chunks measured fastest.

    Returns:
        LossOutput(total, ce, kl). Gradients flow to ``student_logits`` only.
    """
    _check_scalars(alpha, temperature, chunk_size)
    if tail not in TAIL_MODES:
        raise UserError(f"tail={tail!r} is not a loss mode; use one of {', '.join(TAIL_MODES)}")
    beta = check_divergence(divergence, beta, tail)
    flat, lab, vocab = _flatten_student(student_logits, labels)
    teacher = _sparse_teacher(labels, target_ids, target_logprobs, target_counts, tail, temperature, vocab,
                              divergence, beta)
    return _run(student_logits, flat, lab, teacher, alpha, temperature, num_items_in_batch, chunk_size)


def dense_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    divergence: str = "forward_kl",
    beta: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> LossOutput:
    """The same loss with the teacher's full logits at hand (online teacher, or k = V).

    q_T = softmax(teacher_logits / T) over the full vocabulary, so the divergence is the plain
    full-vocabulary one (forward KL(q_T || p_T) by default). Chunked like ``distillation_loss``:
    neither tensor is upcast whole.

    Args:
        student_logits: [B, T, V], any float dtype.
        teacher_logits: [B, T, V], any float dtype, same positions; no gradient flows to it.
        labels: [B, T] int64, already shifted; -100 = ignore.
        alpha, temperature, divergence, beta, num_items_in_batch, chunk_size: as in
            ``distillation_loss`` (every divergence works with a dense teacher).

    Returns:
        LossOutput(total, ce, kl).
    """
    _check_scalars(alpha, temperature, chunk_size)
    beta = check_divergence(divergence, beta, None)
    flat, lab, vocab = _flatten_student(student_logits, labels)
    if teacher_logits.shape != student_logits.shape:
        raise UserError(
            f"teacher logits {tuple(teacher_logits.shape)} differ from student logits "
            f"{tuple(student_logits.shape)}; teacher and student must share the vocabulary and positions"
        )
    teacher = _DenseTeacher(_LogitsSource(teacher_logits.detach().reshape(-1, vocab)), temperature, divergence, beta)
    return _run(student_logits, flat, lab, teacher, alpha, temperature, num_items_in_batch, chunk_size)


def fused_linear_distillation_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    tail: str = "renormalize",
    divergence: str = "forward_kl",
    beta: float | None = None,
    target_counts: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = 1024,
    lm_head_bias: torch.Tensor | None = None,
) -> LossOutput:
    """``distillation_loss(hidden @ lm_head_weight.T + lm_head_bias, ...)`` without the logits.

    Why: the student's logits are the largest activation of a training step. At
    V = 151,936 and 4 x 2,048 positions they are 2.5 GB in bf16 (5 GB in fp32), and their
    gradient as much again; ``distillation_loss`` never copies them, but the lm_head still
    makes them whole and autograd keeps their gradient until the lm_head's backward. Here
    the lm_head runs inside the loss, one chunk of counted positions at a time: the chunk's
    logits go straight into the engine's fp32 work buffer, and the moment the chunk's
    d loss / d logits is known it becomes d loss / d hidden (``g @ W``, written into one
    [N, H] buffer) and d loss / d W (``g.T @ h``, added into one fp32 [V, H] buffer), and the
    chunk is dropped. Fwd+bwd then holds the weight's gradient (which any path must produce),
    a [N, H] gradient (H / V of the logits: 1.3% at H = 2,048) and the chunk-sized
    temporaries: 2-4 buffers of 96 MiB of fp32 each on CPU, 256 MiB on GPU (165 and 441 positions at
    V = 151,936; 4x that with a frozen lm_head, which has no weight gradient to hold). The three
    matmuls are those of the lm_head's forward and backward, so the time is about the
    same; nothing is recomputed. Like ``distillation_loss`` the backward runs once.

    Args:
        hidden: [B, T, H] (or [..., H] matching labels), the final hidden states, any
            float dtype. Under autocast the matmuls run in the autocast dtype, as the
            lm_head's would; otherwise in the promoted dtype of hidden and weight.
        lm_head_weight: [V, H], the output layer's weight (the input embedding when tied).
            No weight gradient is computed when it does not require grad (a frozen head).
        lm_head_bias: [V] or None.
        labels, target_ids, target_logprobs, alpha, temperature, tail, divergence, beta,
        target_counts, num_items_in_batch, chunk_size: as in :func:`distillation_loss`.

    Returns:
        LossOutput(total, ce, kl); gradients flow to hidden, weight and bias.
    """
    _check_scalars(alpha, temperature, chunk_size)
    if tail not in TAIL_MODES:
        raise UserError(f"tail={tail!r} is not a loss mode; use one of {', '.join(TAIL_MODES)}")
    beta = check_divergence(divergence, beta, tail)
    flat_h, lab, vocab = _flatten_hidden(hidden, lm_head_weight, lm_head_bias, labels)
    teacher = _sparse_teacher(labels, target_ids, target_logprobs, target_counts, tail, temperature, vocab,
                              divergence, beta)
    return _run_linear(hidden, flat_h, lm_head_weight, lm_head_bias, lab, teacher, alpha, temperature,
                       num_items_in_batch, chunk_size)


def fused_linear_dense_distillation_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    divergence: str = "forward_kl",
    beta: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = 1024,
    lm_head_bias: torch.Tensor | None = None,
) -> LossOutput:
    """``dense_distillation_loss(hidden @ W.T + b, teacher_logits, ...)`` without the
    student's logits (an online teacher's logits still exist whole); see
    :func:`fused_linear_distillation_loss`."""
    _check_scalars(alpha, temperature, chunk_size)
    beta = check_divergence(divergence, beta, None)
    flat_h, lab, vocab = _flatten_hidden(hidden, lm_head_weight, lm_head_bias, labels)
    if tuple(teacher_logits.shape) != (*labels.shape, vocab):
        raise UserError(
            f"teacher logits {tuple(teacher_logits.shape)} do not match labels {tuple(labels.shape)} + "
            f"[{vocab}] (the lm_head's vocabulary); teacher and student must share the vocabulary and positions"
        )
    teacher = _DenseTeacher(_LogitsSource(teacher_logits.detach().reshape(-1, vocab)), temperature, divergence, beta)
    return _run_linear(hidden, flat_h, lm_head_weight, lm_head_bias, lab, teacher, alpha, temperature,
                       num_items_in_batch, chunk_size)


def fused_linear_teacher_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    targets: Targets,
    *,
    alpha: float,
    temperature: float,
    tail: str = "renormalize",
    divergence: str = "forward_kl",
    beta: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = 1024,
    lm_head_bias: torch.Tensor | None = None,
) -> LossOutput:
    """:func:`teacher_loss` with the lm_head fused in: dense or sparse targets alike."""
    common = dict(alpha=alpha, temperature=temperature, divergence=divergence, beta=beta,
                  num_items_in_batch=num_items_in_batch, chunk_size=chunk_size, lm_head_bias=lm_head_bias)
    if isinstance(targets, DenseTargets):
        return fused_linear_dense_distillation_loss(hidden, lm_head_weight, targets.logits, labels, **common)
    if not isinstance(targets, SparseTargets):
        raise TypeError(f"targets must be TopKTargets, SampledTargets or DenseTargets, got {type(targets).__name__}")
    return fused_linear_distillation_loss(
        hidden, lm_head_weight, labels, targets.ids, targets.logprobs, tail=tail,
        target_counts=getattr(targets, "counts", None), **common,
    )


class PositionStats(NamedTuple):
    """Evaluation's view of each counted position (label != -100), in order; [n] tensors on the
    student's device.

    ``nll`` float32: -log p(label) at T = 1. ``kl`` float32: KL(teacher || model) at T = 1 --
    exact for dense or hidden targets, the ``tail`` bound for top-k ones, the ``sample``
    estimate for sampled ones; None without targets. ``confidence`` float32: the model's top-1
    probability. ``prediction`` int64: its argmax. ``teacher_prediction`` int64: the teacher's
    argmax (PAD_ID where sparse targets store no id); None without targets."""

    nll: torch.Tensor
    kl: torch.Tensor | None
    confidence: torch.Tensor
    prediction: torch.Tensor
    teacher_prediction: torch.Tensor | None


def position_stats(
    student: torch.Tensor,
    labels: torch.Tensor,
    targets: Targets | HiddenTargets | None = None,
    *,
    lm_head_weight: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> PositionStats:
    """Per-position evaluation metrics at T = 1 from the loss's own chunked engine, no gradient.

    Why here: evaluation's KL must be the loss's KL, and at V = 151,936 its full-vocabulary
    work must be chunked like the loss's. This runs the same engine (``_forward``, alpha = 1,
    T = 1, forward KL; top-k targets in ``tail`` mode, i.e. ``kl_lower_bound``) and collects
    each chunk's rows instead of only their sums: it holds a few [chunk, V] fp32 buffers, never
    an [N, V] one.

    Args:
        student: the model's logits [B, T, V], any float dtype; or, with ``lm_head_weight``, its
            final hidden states [B, T, H], whose logits are then made a chunk at a time (as the
            fused loss makes them) and never exist whole.
        labels: [B, T] int64, already shifted; -100 = not counted.
        targets: ``TopKTargets`` / ``SampledTargets`` (a cache), ``DenseTargets`` /
            ``HiddenTargets`` (an online teacher, same positions and vocabulary), or None.
        lm_head_weight, lm_head_bias: the student's output layer, [V, H] and [V] or None.
        chunk_size: the most positions per chunk; on CPU at most CPU_CHUNK_BYTES of fp32 each.
    """
    _check_scalars(1.0, 1.0, chunk_size)
    with torch.no_grad(), torch.autocast(student.device.type, enabled=False):
        if lm_head_weight is None:
            flat, lab, vocab = _flatten_student(student, labels)
            source = _LogitsSource(flat)
        else:
            flat_h, lab, vocab = _flatten_hidden(student, lm_head_weight, lm_head_bias, labels)
            source = _LinearSource(flat_h, lm_head_weight, lm_head_bias,
                                   _matmul_dtype(student, lm_head_weight, lm_head_bias), False, False, False)
        if student.device.type == "cpu":
            # _LinearSource gives a frozen head 4x the buffers (for matmul speed); here a dense
            # teacher adds two more of them: CPU_CHUNK_BYTES keeps all of them near 0.5 GB
            chunk_size = min(int(chunk_size), max(1, CPU_CHUNK_BYTES // (4 * vocab)))
        teacher = _eval_teacher(targets, labels, vocab)
        rows, denom = _counted(lab, None)
        collect = []
        _forward(source, lab, rows, teacher, 1.0, 1.0, denom, int(chunk_size), collect=collect)
    if not collect:  # nothing counted
        empty = torch.zeros(0, device=source.device)
        none = None if targets is None else empty.long()
        return PositionStats(empty, None if targets is None else empty, empty, empty.long(), none)
    nll, kl, conf, pred, t_pred = (list(col) for col in zip(*collect))
    cat = torch.cat
    return PositionStats(cat(nll), None if targets is None else cat(kl), cat(conf), cat(pred),
                         None if targets is None else cat(t_pred))


def _eval_teacher(targets, labels, vocab):
    """``position_stats``' teacher at T = 1 for ``targets``."""
    if targets is None:
        return _NoTeacher()
    if isinstance(targets, DenseTargets):
        if tuple(targets.logits.shape) != (*labels.shape, vocab):
            raise UserError(f"teacher logits {tuple(targets.logits.shape)} do not match labels {tuple(labels.shape)} "
                            f"+ [{vocab}]; teacher and student must share the vocabulary and positions")
        return _DenseTeacher(_LogitsSource(targets.logits.detach().reshape(-1, vocab)), 1.0)
    if isinstance(targets, HiddenTargets):
        h, w, b = targets.hidden, targets.weight, targets.bias
        flat_t, _, v = _flatten_hidden(h, w, b, labels)
        if v != vocab:
            raise UserError(f"the teacher's lm_head has {v} outputs, the student's {vocab}; teacher and student "
                            f"must share the vocabulary")
        return _DenseTeacher(_LinearSource(flat_t, w, b, _matmul_dtype(h, w, b), False, False, False), 1.0)
    if isinstance(targets, SparseTargets):
        sampled = isinstance(targets, SampledTargets)
        return _sparse_teacher(labels, targets.ids, targets.logprobs, getattr(targets, "counts", None),
                               "sample" if sampled else "tail", 1.0, vocab, "forward_kl", None)
    raise TypeError(f"targets must be TopKTargets, SampledTargets, DenseTargets or HiddenTargets, "
                    f"got {type(targets).__name__}")


# --------------------------------------------------------------------------- checks


def _check_scalars(alpha, temperature, chunk_size):
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"alpha={alpha} is outside [0, 1]; alpha weighs KL against CE, e.g. alpha=0.5")
    if not temperature > 0:
        raise UserError(f"temperature={temperature} must be > 0, e.g. temperature=2.0")
    if int(chunk_size) < 1:
        raise UserError(f"chunk_size={chunk_size} must be >= 1 (positions per chunk), e.g. 1024")


def check_divergence(divergence: str, beta: float | None, tail: str | None) -> float | None:
    """The ``beta`` the divergence will use (None for those without one), or a UserError.

    ``tail`` is the sparse teacher's mode, None for a dense teacher. Refused: an unknown name;
    a beta for a divergence that takes none, or outside (0, 1); ``reverse_kl`` with
    ``renormalize`` (the renormalised teacher is 0 outside the stored ids, where the student
    is not, so KL(p_T || q_T) is infinite)."""
    if divergence not in DIVERGENCES:
        raise UserError(f"divergence={divergence!r} is not a divergence; use one of {', '.join(DIVERGENCES)}")
    if divergence == "reverse_kl" and tail == "renormalize":
        raise UserError("divergence=reverse_kl is infinite with tail=renormalize (the renormalised teacher is 0 "
                        "outside the stored ids); use tail=tail, or tail=sample with a sample cache")
    if divergence not in DEFAULT_BETA:
        if beta is not None:
            raise UserError(f"beta={beta} has no meaning for divergence={divergence}; only jsd and skew_kl take "
                            f"one: leave beta unset (null)")
        return None
    if beta is None:
        return DEFAULT_BETA[divergence]
    if not 0.0 < beta < 1.0:
        hint = "forward_kl" if divergence == "skew_kl" or beta <= 0 else "reverse_kl"
        raise UserError(f"beta={beta} is outside (0, 1) for divergence={divergence}; e.g. beta="
                        f"{DEFAULT_BETA[divergence]}, or divergence={hint} for the limit")
    return float(beta)


def _flatten_student(student_logits, labels):
    """[..., V] logits and [...] labels -> [N, V] view (copy only if not viewable), [N] labels, V."""
    if not student_logits.is_floating_point():
        raise UserError(f"student logits must be floating point, got {student_logits.dtype}")
    if student_logits.dim() < 2 or tuple(student_logits.shape[:-1]) != tuple(labels.shape):
        raise UserError(
            f"student logits {tuple(student_logits.shape)} do not match labels {tuple(labels.shape)} + [V]; "
            f"labels must be the shifted next-token ids for the same positions"
        )
    vocab = student_logits.shape[-1]
    try:
        flat = student_logits.view(-1, vocab)
    except RuntimeError:
        warnings.warn("student logits are not viewable as [N, V]; copying them (pass contiguous logits to save memory)")
        flat = student_logits.reshape(-1, vocab)
    return flat, _check_labels(labels.reshape(-1), vocab), vocab


def _check_labels(lab, vocab):
    bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= vocab))
    if bool(bad.any()):
        raise UserError(
            f"label {int(lab[bad][0])} is outside the vocabulary [0, {vocab}) and is not -100; "
            f"check the tokenizer and the label shifting"
        )
    return lab


def _sparse_teacher(labels, target_ids, target_logprobs, target_counts, tail, temperature, vocab, divergence, beta):
    lead = tuple(labels.shape)
    if target_ids.shape[:-1] != lead or target_logprobs.shape != target_ids.shape:
        raise UserError(
            f"target_ids {tuple(target_ids.shape)} / target_logprobs {tuple(target_logprobs.shape)} "
            f"do not match labels {lead} + [W]; pass the cache item's targets for the same positions"
        )
    if tail == "sample":
        if target_counts is None:
            raise UserError("tail='sample' needs target_counts; use a sample-mode cache or another loss.tail")
        if target_counts.shape != target_ids.shape:
            raise UserError(
                f"target_counts {tuple(target_counts.shape)} must match target_ids {tuple(target_ids.shape)}"
            )
    width = target_ids.shape[-1]
    if target_ids.numel() and int(target_ids.max()) >= vocab:
        raise UserError(
            f"target id {int(target_ids.max())} is outside the student's vocabulary of {vocab}; "
            f"the cache was made with a different tokenizer or vocabulary size"
        )
    return _SparseTeacher(
        target_ids.reshape(-1, width),
        target_logprobs.reshape(-1, width),
        None if target_counts is None else target_counts.reshape(-1, width),
        tail,
        temperature,
        vocab,
        divergence,
        beta,
    )


def _flatten_hidden(hidden, weight, bias, labels):
    """[..., H] hidden, [V, H] weight, [V] bias and [...] labels -> [N, H] hidden, [N] labels, V."""
    for name, t in (("hidden states", hidden), ("lm_head weight", weight)):
        if not t.is_floating_point():
            raise UserError(f"{name} must be floating point, got {t.dtype}")
    if weight.dim() != 2 or hidden.dim() < 2 or hidden.shape[-1] != weight.shape[1]:
        raise UserError(
            f"hidden states {tuple(hidden.shape)} and lm_head weight {tuple(weight.shape)} do not fit: "
            f"the weight must be [V, H] with H the hidden states' last dimension"
        )
    if tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise UserError(
            f"hidden states {tuple(hidden.shape)} do not match labels {tuple(labels.shape)} + [H]; "
            f"labels must be the shifted next-token ids for the same positions"
        )
    for name, t in (("lm_head weight", weight), ("lm_head bias", bias)):
        if t is not None and t.device != hidden.device:
            raise UserError(
                f"the {name} is on {t.device} but the hidden states on {hidden.device}; the fused loss needs "
                f"the lm_head where the last layer runs (a device_map split or offload puts it elsewhere): "
                f"set loss.fused_linear=false"
            )
    vocab = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise UserError(f"lm_head bias {tuple(bias.shape)} does not match the weight's vocabulary ({vocab},)")
    lab = _check_labels(labels.reshape(-1), vocab)
    return hidden.reshape(-1, hidden.shape[-1]), lab, vocab


def _run_linear(hidden, flat_h, weight, bias, lab, teacher, alpha, temperature, num_items_in_batch, chunk_size):
    rows, denom = _counted(lab, num_items_in_batch)
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    device_type = hidden.device.type
    dtype = _matmul_dtype(hidden, weight, bias)

    def compute():
        with torch.autocast(device_type, enabled=False):  # the dtypes are chosen above
            source = _LinearSource(flat_h, weight, bias, dtype, *need)
            total, ce, kl = _forward(source, lab, rows, teacher, alpha, temperature, denom, int(chunk_size))
        if rows.numel() == 0:  # nothing counted: zero gradients (DDP expects one for every used weight)
            source.start()
        grads = (source.grad_h, source.grad_w, source.grad_b)
        return total, ce, kl, grads

    if any(need):
        total, ce, kl = _FusedLinearLoss.apply(hidden, weight, bias, compute)
    else:
        total, ce, kl, _ = compute()
    return LossOutput(total, ce, kl)


def _matmul_dtype(hidden, weight, bias):
    """The lm_head's matmul dtype: the autocast dtype under autocast, as the lm_head would run
    there; otherwise the promoted dtype of hidden, weight and bias."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return dtype if bias is None else torch.promote_types(dtype, bias.dtype)


class _FusedLinearLoss(torch.autograd.Function):
    """Like ``_PrecomputedGradLoss`` for (hidden, weight, bias): the gradients are made in
    forward, backward scales them and casts the weight's to its dtype."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, compute: Callable):
        total, ce, kl, grads = compute()
        ctx.grads = grads
        ctx.meta = [(t.shape, t.dtype) if t is not None else None for t in (hidden, weight, bias)]
        ctx.mark_non_differentiable(ce, kl)
        return total, ce, kl

    @staticmethod
    def backward(ctx, g_total, _g_ce, _g_kl):
        if ctx.grads is False:
            raise RuntimeError("distillation loss: backward can run only once (its gradient buffers are consumed)")
        grads, ctx.grads = ctx.grads, False
        out = []
        scale = float(g_total)
        for g, meta in zip(grads, ctx.meta):
            if g is None:
                out.append(None)
                continue
            if scale != 1.0:
                g.mul_(scale)  # a Python float: GradScaler's 65536 is inf in fp16
            out.append(g.view(meta[0]) if g.dtype == meta[1] else g.to(meta[1]).view(meta[0]))
        return (*out, None)


# --------------------------------------------------------------------------- the chunked engine


def _run(student_logits, flat, lab, teacher, alpha, temperature, num_items_in_batch, chunk_size):
    rows, denom = _counted(lab, num_items_in_batch)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    source = _LogitsSource(flat, lab, need_grad)

    def compute():
        total, ce, kl = _forward(source, lab, rows, teacher, alpha, temperature, denom, int(chunk_size))
        return total, ce, kl, source.grad if rows.numel() else None

    if need_grad:
        total, ce, kl = _PrecomputedGradLoss.apply(student_logits, compute)
    else:
        total, ce, kl, _ = compute()
    return LossOutput(total, ce, kl)


def _counted(lab, num_items_in_batch):
    """The counted rows (label != -100) and the divisor of the sums."""
    rows = (lab != IGNORE_INDEX).nonzero().squeeze(1)
    if num_items_in_batch is None:
        return rows, float(rows.numel())
    denom = float(num_items_in_batch)
    if denom <= 0 and rows.numel() > 0:
        raise ValueError(f"num_items_in_batch={denom} but this batch has {rows.numel()} counted positions")
    return rows, denom


class _PrecomputedGradLoss(torch.autograd.Function):
    """Runs ``compute`` (which returns the loss parts and d total / d logits) in forward;
    backward only scales the stored gradient, in place, so it costs no extra [N, V]."""

    @staticmethod
    def forward(ctx, logits, compute: Callable):
        total, ce, kl, grad = compute()
        ctx.grad = grad
        ctx.shape = logits.shape
        ctx.dtype, ctx.device = logits.dtype, logits.device
        ctx.mark_non_differentiable(ce, kl)
        return total, ce, kl

    @staticmethod
    def backward(ctx, g_total, _g_ce, _g_kl):
        if ctx.grad is False:
            raise RuntimeError("distillation loss: backward can run only once (its gradient buffer is consumed)")
        grad, ctx.grad = ctx.grad, False
        if grad is None:  # nothing counted
            return torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device), None
        scale = float(g_total)
        if scale != 1.0:
            grad.mul_(scale)  # a Python float: GradScaler's 65536 is inf in fp16
        return grad.view(ctx.shape), None



def _forward(source, lab, rows, teacher, alpha, temperature, denom, chunk_size, collect=None):
    """Loss parts over the counted ``rows``; the source gets each chunk's d total / d logits.
    ``collect``: a list that gets, per chunk, the rows' (CE, divergence, top-1 probability,
    argmax, teacher's argmax or None) (see ``position_stats``)."""
    device = source.device
    vocab = source.vocab
    n = rows.numel()
    ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    kl_sum = torch.zeros((), dtype=torch.float64, device=device)
    if n == 0:
        return ce_sum.float(), ce_sum.float(), ce_sum.float()
    source.start(n)  # n: the counted positions
    inv_t = 1.0 / temperature
    # d total / d logits = c_ce (softmax(z) - onehot(y)) + c_kl d KL / d u, with u = z / T.
    c_ce = (1.0 - alpha) / denom
    c_kl = alpha * temperature / denom
    labels = lab.index_select(0, rows).unsqueeze(1)
    teacher.select(rows)
    if collect is not None:
        teacher.keep_top = True
    # Chunk-sized fp32 work buffers, allocated once and reused: a fresh [C, V] allocation
    # per chunk costs page faults that take longer than the arithmetic on CPU.
    cap = source.chunk_bytes(device)
    if cap is not None:
        chunk_size = min(chunk_size, max(1, cap // (4 * vocab)))
    rows_per_chunk = min(chunk_size, n)
    work = lambda: torch.empty(rows_per_chunk, vocab, dtype=torch.float32, device=device)  # noqa: E731
    buf_x = work()
    buf_u = work() if (temperature != 1.0 or teacher.masks_probs) else None
    teacher.allocate(work)

    for start, pieces in _chunks(rows.tolist(), chunk_size):
        c = sum(b - a for a, b, _ in pieces)
        sl = slice(start, start + c)
        y = labels[sl]
        x = source.load(buf_x[:c], pieces)  # the only upcast (or the chunk's logits), one chunk at a time
        # One fused softmax per temperature, in place (each row stays in cache across its
        # passes). The log-normaliser comes from the softmax at the row's argmax, where
        # p >= 1/V cannot underflow: lse = z_j - log p_j for any j.
        top = x.argmax(dim=1, keepdim=True)
        x_y, x_top = x.gather(1, y), x.gather(1, top)
        u = torch.mul(x, inv_t, out=buf_u[:c]) if temperature != 1.0 else x
        state = teacher.observe(sl, pieces, u)  # u = z / T, before the softmax overwrites it
        torch.softmax(x, dim=1, out=x)
        p_top = x.gather(1, top)
        lse = x_top - p_top.log()
        ce_rows = lse - x_y
        ce_sum += ce_rows.sum(dtype=torch.float64)
        if temperature != 1.0:
            p_t = torch.softmax(u, dim=1, out=u)
            lse_t = x_top * inv_t - p_t.gather(1, top).log()
        else:
            p_t = buf_u[:c].copy_(x) if teacher.masks_probs else x
            lse_t = lse
        kl_rows, beta = teacher.finish(state, p_t, lse_t)  # tail mode zeroes p_t on the stored ids
        kl_sum += kl_rows.sum(dtype=torch.float64)
        if collect is not None:
            collect.append((ce_rows.squeeze(1), kl_rows, p_top.squeeze(1), top.squeeze(1),
                            teacher.prediction(sl, state)))
        if not source.need_grad:
            continue
        # x holds softmax(z); turn it into this chunk's gradient, g = scale * x, in place.
        # d total / d z = c_ce (p - onehot(y)) + c_kl (beta p_T + teacher scatter or dense term).
        if p_t is x and teacher.signed_beta:  # T = 1, beta of either sign: scale now, not by 1 / scale later
            x.mul_(c_ce + c_kl * beta)
            scale = 1.0
        elif p_t is x:  # T = 1: p_T is p
            scale = c_ce + c_kl * beta
        elif teacher.masks_probs or teacher.signed_beta:  # beta may be negative
            x.mul_(c_ce)
            x.addcmul_(p_t, c_kl * beta)
            scale = 1.0
        else:  # beta >= 0: one lerp pass instead of mul + add
            scale = c_ce + c_kl * beta
            x.lerp_(p_t, (c_kl * beta) / _nonzero(scale))
        inv = 1.0 / _nonzero(scale)
        x.scatter_add_(1, y, (-c_ce * inv) * torch.ones(y.shape, dtype=x.dtype, device=device))
        teacher.add_grad(state, x, c_kl * inv)
        source.store(x, pieces, scale)  # d total / d z = scale * x

    ce = (ce_sum / denom).float()
    kl = (kl_sum / denom).float()
    total = (1.0 - alpha) * ce + alpha * temperature**2 * kl
    return total, ce, kl


def _chunks(rows, chunk_size):
    """Split the sorted counted row indices into chunks; yield (offset, pieces) per chunk,
    pieces = [(row_start, row_end, offset_in_chunk)] for each run of consecutive rows.
    Copying runs is plain memcpy; index_select over [N, V] rows is several times slower on CPU."""
    for start in range(0, len(rows), chunk_size):
        part = rows[start : start + chunk_size]
        pieces, first, prev, at = [], part[0], part[0], 0
        for i in range(1, len(part)):
            if part[i] != prev + 1:
                pieces.append((first, prev + 1, at))
                first, at = part[i], i
            prev = part[i]
        pieces.append((first, prev + 1, at))
        yield start, pieces


def _gather_rows(dst, src, pieces):
    for a, b, at in pieces:
        dst[at : at + b - a].copy_(src[a:b])
    return dst


def _scatter_rows(dst, src, pieces, scale):
    """dst[rows] = src * scale (scale: a float or a [C, 1] tensor), as one fused pass where it can."""
    if isinstance(scale, float) and scale == 1.0:
        fused = False
    elif dst.dtype == src.dtype:
        fused = True
    else:  # mul with a low-precision out= takes a slow path: scale in fp32, then copy
        src.mul_(scale)
        fused = False
    for a, b, at in pieces:
        if fused:
            torch.mul(src[at : at + b - a], scale if isinstance(scale, float) else scale[at : at + b - a], out=dst[a:b])
        else:
            dst[a:b].copy_(src[at : at + b - a])


def _nonzero(x):
    """x with zeros replaced by 1 (a row whose gradient scale is 0 has no gradient at all)."""
    if isinstance(x, float):
        return x if x != 0.0 else 1.0
    return torch.where(x != 0, x, torch.ones_like(x))


# --------------------------------------------------------------------------- sources
#
# A source is where the engine's chunks of logits come from and where their gradient goes.
# ``start()`` runs once before the first chunk; ``load(dst, pieces)`` writes the chunk's
# logits (fp32 [C, V]) into ``dst`` and returns it; ``store(x, pieces, scale)`` receives
# the chunk's d total / d logits as ``scale * x`` (x may be overwritten).


class _LogitsSource:
    """The student's logits exist: chunks are upcast copies; the gradient is one [N, V]
    buffer of the logits' dtype."""

    @staticmethod
    def chunk_bytes(device):
        """The most bytes of one fp32 [C, V] work buffer, or None for ``chunk_size`` as given."""
        return CPU_CHUNK_BYTES if device.type == "cpu" else None

    def __init__(self, flat, lab=None, need_grad=False):
        self.flat, self.lab, self.need_grad = flat, lab, need_grad
        self.device, self.vocab = flat.device, flat.shape[1]
        self.grad = None

    def start(self, n):
        if self.need_grad:
            self.grad = torch.empty_like(self.flat)
            if n < self.flat.shape[0]:  # uncounted positions: exactly zero
                self.grad.index_fill_(0, (self.lab == IGNORE_INDEX).nonzero().squeeze(1), 0)

    def load(self, dst, pieces):
        return _gather_rows(dst, self.flat, pieces)

    def store(self, x, pieces, scale):
        _scatter_rows(self.grad, x, pieces, scale)  # scales and downcasts to the input dtype


class _LinearSource:
    """The logits are ``hidden @ weight.T (+ bias)``, made one chunk at a time; the gradient
    w.r.t. the logits is turned at once into the gradients w.r.t. hidden, weight and bias.

    ``dtype`` is the matmuls' dtype (the autocast dtype under autocast, as the lm_head would
    run there); the weight is cast to it once. The weight's gradient is accumulated in fp32
    (float64 for float64 weights) in one [V, H] buffer, and only when it is wanted."""

    def chunk_bytes(self, device):
        # With a weight gradient to make, the chunk buffers are most of the loss's memory beside
        # it, so they are smaller than _LogitsSource's on CPU and capped on GPUs too (256 MiB:
        # 441 positions at V = 151,936, still a full-speed matmul). On CPU (2 cores, V = 151,936,
        # H = 2,048) a chunk's matmuls cost 16.5 ms per position and matmul at 165 positions (96
        # MiB), 13 at 440 and 12 at 1,024: 96 MiB is the compromise with memory when the weight
        # trains; a frozen head leaves only the chunks, so they get 4x that.
        scale = 1 if self.need_w else 4
        return scale * (3 * CPU_CHUNK_BYTES // 4 if device.type == "cpu" else 2 * CPU_CHUNK_BYTES)

    def __init__(self, hidden, weight, bias, dtype, need_h, need_w, need_b):
        self.h, self.dtype = hidden, dtype
        self.w = weight.detach().to(dtype)
        self.b = None if bias is None else bias.detach().to(dtype)
        self.device, self.vocab = hidden.device, weight.shape[0]
        self.need_h, self.need_w, self.need_b = need_h, need_w, need_b
        self.need_grad = need_h or need_w or need_b
        self.acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.grad_h = self.grad_w = self.grad_b = None
        self._chunk = None

    def start(self, n=None):
        if self.need_h:
            self.grad_h = torch.zeros_like(self.h)  # uncounted positions: exactly zero
        if self.need_w:
            self.grad_w = torch.zeros(self.w.shape, dtype=self.acc_dtype, device=self.device)
        if self.need_b:
            self.grad_b = torch.zeros(self.vocab, dtype=self.acc_dtype, device=self.device)

    def load(self, dst, pieces):
        c = dst.shape[0]
        h = torch.empty(c, self.h.shape[1], dtype=self.dtype, device=self.device)
        _gather_rows(h, self.h, pieces)
        self._chunk = h
        if self.dtype == torch.float32:  # straight into the work buffer
            if self.b is None:
                torch.mm(h, self.w.t(), out=dst)
            else:
                torch.addmm(self.b, h, self.w.t(), out=dst)
        else:  # the lm_head's own dtype, then the engine's single upcast
            z = h @ self.w.t()
            if self.b is not None:
                z += self.b
            dst.copy_(z)
            del z
        return dst

    def store(self, x, pieces, scale):
        if not (isinstance(scale, float) and scale == 1.0):
            x.mul_(scale)  # x is now d total / d logits of the chunk, fp32
        h, self._chunk = self._chunk, None
        if self.need_h:
            g = x if self.dtype == torch.float32 else x.to(self.dtype)
            gh = g @ self.w
            del g
            for a, b, at in pieces:
                self.grad_h[a:b].copy_(gh[at : at + b - a])
        if self.need_w:
            self.grad_w.addmm_(_as(x, self.acc_dtype).t(), _as(h, self.acc_dtype))
        if self.need_b:
            self.grad_b += x.sum(0, dtype=self.acc_dtype)


def _as(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


# --------------------------------------------------------------------------- teachers
#
# A teacher first gets ``select(rows)`` (the counted positions, in order) and ``allocate(work)``
# (a factory of [C, V] fp32 buffers it may keep). Then it sees each chunk twice:
# ``observe(sl, pieces, u)`` (sl: the chunk's slice of the counted positions, pieces: its
# runs of rows, see _chunks) gets u = z / T [C, V] and returns a state;
# ``finish(state, p, lse)`` gets p = p_T = softmax(u) [C, V] and lse = logsumexp(u) [C, 1]
# (so log p_T = u - lse) and returns the per-row divergence and a coefficient beta (a float
# or [C, 1]); d D / d u is then  beta * p  plus what ``add_grad`` adds (a scatter on the
# stored ids, or a dense term). ``masks_probs``: finish zeroes p on the stored ids (the
# engine then gives it a copy at T = 1); ``signed_beta``: beta may be negative.
# ``prediction(sl, state)``: the teacher's top-1 id per row of the chunk (for evaluation; a dense
# teacher keeps it from ``observe`` only when the engine sets ``keep_top``).


class _SparseTeacher:
    keep_top = False

    def __init__(self, ids, logprobs, counts, tail, temperature, vocab, divergence="forward_kl", beta=None):
        self.ids, self.logprobs, self.counts = ids, logprobs, counts
        self.tail, self.inv_t, self.vocab = tail, 1.0 / temperature, vocab
        self.divergence, self.beta = divergence, beta
        forward = divergence == "forward_kl"
        # the other divergences need the student's exact mass outside S in renormalize mode too
        self.masks_probs = tail == "tail" or (not forward and tail == "renormalize")
        self.signed_beta = not forward

    def select(self, rows):
        self.ids = self.ids.index_select(0, rows)
        self.logprobs = self.logprobs.index_select(0, rows)
        if self.counts is not None:
            self.counts = self.counts.index_select(0, rows) if self.tail == "sample" else None

    def allocate(self, work):
        pass

    def observe(self, sl, pieces, u):
        ids = self.ids[sl]
        lp = self.logprobs[sl].float()
        valid = (ids >= 0) & (lp > -math.inf)  # PAD_ID and any other negative id: padding
        counts = None
        if self.counts is not None:
            counts = self.counts[sl].float()
            valid &= counts > 0
        idx = ids.clamp(min=0)  # padding (PAD_ID) points at id 0 and is masked out by `valid`
        return {"idx": idx, "lp": lp, "valid": valid, "counts": counts, "u": u.gather(1, idx)}

    def _sample_weights(self, st):
        """The self-normalised importance weights w and log q_T(i) = lp_i / T - log Z_T on S."""
        lp, valid = st["lp"], st["valid"]
        logw = torch.where(valid, st["counts"].log() + (self.inv_t - 1.0) * lp, torch.full_like(lp, -math.inf))
        lse_w = _safe_lse(logw)
        w = (logw - lse_w).exp()  # self-normalised importance weights
        # log q_T(i) = lp_i / T - log Z_T, Z_T estimated by (1/N) sum c q^(1/T - 1).
        log_q = lp * self.inv_t - (lse_w - st["counts"].sum(1, keepdim=True).clamp_min(1).log())
        return w, log_q

    def _bucket_teacher(self, lp, valid):
        """``tail`` mode's teacher: log q_T on S, log q_T(tail) [C, 1] and |S| per row."""
        ninf = torch.full_like(lp, -math.inf)
        k_valid = valid.sum(1, keepdim=True)
        mass = _safe_lse(torch.where(valid, lp, ninf), empty=-math.inf)  # log sum_S q (T=1)
        log_r = torch.log(-torch.expm1(mass.clamp(max=0.0)))  # log of the tail mass r
        lp_min = torch.where(valid, lp, torch.full_like(lp, math.inf)).amin(1, keepdim=True)
        free = (self.vocab - k_valid).to(lp.dtype)  # ids outside S
        log_n = torch.minimum((log_r - lp_min).clamp(min=0.0), free.clamp(min=1).log())
        has_tail = (log_r > -math.inf) & (free > 0)
        a_tail = torch.where(
            has_tail, log_r * self.inv_t + (1.0 - self.inv_t) * log_n, torch.full_like(log_r, -math.inf)
        )
        logw = torch.where(valid, lp * self.inv_t, ninf)
        log_zq = torch.logaddexp(_safe_lse(logw, empty=-math.inf), a_tail)  # finite: r = 1 if S is empty
        return logw - log_zq, a_tail - log_zq, k_valid

    def finish(self, st, p, lse):
        if self.divergence != "forward_kl":
            return self._finish_other(st, p, lse)
        lp, valid = st["lp"], st["valid"]
        log_p = st["u"] - lse  # log p_T on the stored ids
        ninf = torch.full_like(lp, -math.inf)
        if self.tail in ("renormalize", "sample"):
            if self.tail == "renormalize":
                logw = torch.where(valid, lp * self.inv_t, ninf)
                w = (logw - _safe_lse(logw)).exp()  # q_T on the stored ids, 0 at padding
                log_q = lp * self.inv_t - _safe_lse(logw)
            else:
                w, log_q = self._sample_weights(st)
            st["gamma"] = -w
            return _where_sum(valid, w * (log_q - log_p)), w.sum(1, keepdim=True)
        # tail: coarsened distributions over the stored ids plus one bucket.
        log_q, log_q_tail, _ = self._bucket_teacher(lp, valid)
        q = log_q.exp()
        q_tail = log_q_tail.exp()
        # Student bucket: the sum of p outside S, exactly (zero the stored ids: x + (-x) == 0).
        p_s = p.gather(1, st["idx"])
        p.scatter_add_(1, st["idx"], torch.where(valid, -p_s, torch.zeros_like(p_s)))
        p_tail = p.sum(1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)  # underflow: huge, finite KL
        kl = _where_sum(valid, q * (log_q - log_p))
        kl = kl + torch.where(
            q_tail > 0, q_tail * (log_q_tail - p_tail.log()), torch.zeros_like(q_tail)
        ).squeeze(1)
        # The student's |S| + 1 masses sum to 1 only as well as the fp32 softmax summed its V terms
        # (~1e-5 at V = 151,936), which would read as -log(their sum) in the KL: divide them by it.
        kl = kl + (_where_sum(valid, p_s) + p_tail.squeeze(1)).log()
        # d KL / d u_j = p_j - q_j on S and p_j (1 - q_tail / p_tail) outside S (p is now 0 on S).
        st["gamma"] = torch.where(valid, p_s - q, torch.zeros_like(q))
        return kl, 1.0 - torch.where(q_tail > 0, q_tail / p_tail, torch.zeros_like(q_tail))

    def _finish_other(self, st, p, lse):
        """reverse_kl, jsd, skew_kl, tvd; see the module docstring."""
        lp, valid = st["lp"], st["valid"]
        zero = torch.zeros_like(lp)
        log_p = st["u"] - lse  # log p_T on the stored ids
        p_s = p.gather(1, st["idx"])
        if self.tail == "sample":
            # D = sum_S w_i h(rho_i), rho_i = p_T(i) / q_T(i); d D / d u_j = w_j a_j [j in S] - p_j sum_S w a.
            w, log_q = self._sample_weights(st)
            h, a = _ratio_terms(self.divergence, self.beta, torch.where(valid, log_p - log_q, zero))
            wa = torch.where(valid, w * a, zero)
            st["gamma"] = wa
            return _where_sum(valid, w * h), -wa.sum(1, keepdim=True)
        # renormalize, tail: (|S| + 1)-outcome distributions, the bucket for the mass outside S.
        if self.tail == "tail":
            log_q, log_q_tail, k_valid = self._bucket_teacher(lp, valid)
        else:  # renormalize: q_T is 0 outside S
            logw = torch.where(valid, lp * self.inv_t, torch.full_like(lp, -math.inf))
            log_q = logw - _safe_lse(logw)
            k_valid = valid.sum(1, keepdim=True)
            log_q_tail = torch.full_like(log_p[:, :1], -math.inf)
        tiny = torch.finfo(p.dtype).tiny
        if self.divergence == "reverse_kl":  # a teacher bucket of 0 (its mass rounded away): the smallest normal
            log_q_tail = log_q_tail.clamp(min=math.log(tiny))
        log_q = torch.where(valid, log_q, zero)  # padding: any finite value, masked below
        p.scatter_add_(1, st["idx"], torch.where(valid, -p_s, torch.zeros_like(p_s)))  # exact sum outside S
        p_tail = p.sum(1, keepdim=True).clamp_min(tiny)
        d_s, g_s = _terms(self.divergence, self.beta, log_q, log_q.exp(), log_p, p_s)
        d_b, g_b = _terms(self.divergence, self.beta, log_q_tail, log_q_tail.exp(), p_tail.log(), p_tail)
        bucket = self.vocab - k_valid > 0  # k = V: no bucket
        d_b, g_b = torch.where(bucket, d_b, 0.0), torch.where(bucket, g_b, 0.0)
        a_s = torch.where(valid, p_s * g_s, zero)
        big_a = a_s.sum(1, keepdim=True) + p_tail * g_b  # sum over all outcomes of p dD/dp
        d = _where_sum(valid, d_s) + d_b.squeeze(1)
        # d D / d u_j = p_j (g_j - big_a): a_i - p_i big_a on S, p_j (g_b - big_a) outside S (p is 0 on S now).
        gamma = torch.where(valid, a_s - p_s * big_a, zero)
        coef = g_b - big_a
        if self.tail == "renormalize":  # a position with no stored id has no teacher: D = 0, no gradient
            some = k_valid > 0
            d, gamma, coef = torch.where(some.squeeze(1), d, 0.0), torch.where(some, gamma, 0.0), torch.where(
                some, coef, 0.0)
        st["gamma"] = gamma
        return d, coef

    def add_grad(self, st, g, coef):
        g.scatter_add_(1, st["idx"], torch.where(st["valid"], st["gamma"] * coef, torch.zeros_like(st["gamma"])))

    def prediction(self, sl, st):
        """The stored id of the highest log-prob (PAD_ID where a position has none)."""
        top = torch.where(st["valid"], st["lp"], torch.full_like(st["lp"], -math.inf)).argmax(1, keepdim=True)
        return self.ids[sl].gather(1, top).squeeze(1)


class _NoTeacher:
    """No teacher targets: the divergence is 0 and adds no gradient (the CE alone)."""

    masks_probs = signed_beta = False

    def select(self, rows):
        pass

    def allocate(self, work):
        pass

    def observe(self, sl, pieces, u):
        return None

    def finish(self, st, p, lse):
        return torch.zeros(p.shape[0], dtype=p.dtype, device=p.device), 0.0

    def add_grad(self, st, g, coef):
        pass

    def prediction(self, sl, st):
        return None


class _DenseTeacher:
    """The teacher's full distribution; its logits come a chunk at a time from ``source``: rows of
    its logits (``_LogitsSource``) or its final hidden states times its lm_head (``_LinearSource``)."""

    masks_probs = False
    keep_top = False

    def __init__(self, source, temperature, divergence="forward_kl", beta=None):
        self.source, self.inv_t = source, 1.0 / temperature
        self.divergence, self.beta = divergence, beta
        self.signed_beta = divergence != "forward_kl"

    def select(self, rows):
        pass

    def allocate(self, work):
        self.buf_t, self.buf_q = work(), work()
        if self.signed_beta:
            self.buf_lp = work()  # log p_T: u is gone by finish

    def observe(self, sl, pieces, u):
        c = u.shape[0]
        log_q = self.source.load(self.buf_t[:c], pieces).mul_(self.inv_t)
        torch.log_softmax(log_q, dim=1, out=log_q)
        top = log_q.argmax(1) if self.keep_top else None
        if self.signed_beta:
            q = torch.softmax(log_q, dim=1, out=self.buf_q[:c])
            return {"q": q, "log_q": log_q, "log_p": torch.log_softmax(u, dim=1, out=self.buf_lp[:c]), "top": top}
        # sum_v q (log q - log p), with 0 where q == 0 (a teacher logit of -inf). Not the one pass
        # shorter sum_v q (log q - u) + lse: q's fp32 sum over V ids is 1 only to ~1e-5, and that
        # error times lse (~ the logits' size) read 0.1105 for a KL of 0.1107 at V = 151,936.
        terms = torch.log_softmax(u, dim=1, out=self.buf_q[:c])
        torch.sub(log_q, terms, out=terms)
        q = torch.softmax(log_q, dim=1, out=log_q)  # q takes log q's buffer
        terms.mul_(q)
        terms.masked_fill_(q == 0, 0.0)
        return {"q": q, "kl": terms.sum(1), "top": top}

    def prediction(self, sl, st):
        return st["top"]

    def finish(self, st, p, lse):
        if not self.signed_beta:
            return st["kl"], 1.0
        log_q = st["log_q"]
        if self.divergence == "reverse_kl":  # q = 0 (a teacher logit of -inf): the smallest normal, finite
            log_q.clamp_(min=math.log(torch.finfo(log_q.dtype).tiny))
        d, g = _terms(self.divergence, self.beta, log_q, st["q"], st["log_p"], p)
        a = g.mul_(p)  # p dD/dp; d D / d u = a - p sum(a)
        st["a"] = a
        return d.sum(1), -a.sum(1, keepdim=True)

    def add_grad(self, st, g, coef):
        key = "a" if self.signed_beta else "q"
        sign = 1.0 if self.signed_beta else -1.0
        if isinstance(coef, float):
            g.add_(st[key], alpha=sign * coef)
        else:
            g.addcmul_(st[key], sign * coef)


# --------------------------------------------------------------------------- divergences
#
# Per-outcome terms of the divergences other than forward KL, each in its standardised form
# d(q, p) = p f~(q / p), f~(t) = f(t) - f'(1) (t - 1): >= 0 term by term, 0 only at p = q, and
# summing to the divergence whenever both sides sum to 1 (see the module docstring).


def _terms(divergence, beta, log_q, q, log_p, p):
    """Elementwise (d, dd/dp) for outcomes of teacher mass q and student mass p (any shape);
    q may be 0 (log_q = -inf) except for reverse_kl, whose callers floor it."""
    if divergence == "reverse_kl":  # p log(p / q) - p + q
        s = log_p - log_q
        return p * s - p + q, s
    if divergence == "tvd":  # |p - q| / 2
        diff = p - q
        return diff.abs().mul_(0.5), diff.sign().mul_(0.5)
    # jsd, skew_kl: the mixture m = beta q + (1 - beta) p
    log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log1p(-beta))
    log_qm = torch.where(q > 0, log_q - log_m, torch.zeros_like(log_q))  # log(q / m); q = 0 is multiplied by 0
    if divergence == "jsd":  # beta q log(q / m) + (1 - beta) p log(p / m)
        log_pm = log_p - log_m
        return beta * q * log_qm + (1.0 - beta) * p * log_pm, (1.0 - beta) * log_pm
    # skew_kl: q log(q / m) - (1 - beta)(q - p)
    q_m = torch.where(q > 0, log_qm.exp(), torch.zeros_like(log_qm))
    return q * log_qm - (1.0 - beta) * (q - p), (1.0 - beta) * (1.0 - q_m)


def _ratio_terms(divergence, beta, s):
    """``sample`` mode: (h, a) of s = log(p / q) elementwise, h = d(q, p) / q the estimator's
    term and a = p dh/dp."""
    rho = s.exp()
    if divergence == "reverse_kl":  # rho log rho - rho + 1
        return rho * s - rho + 1.0, rho * s
    if divergence == "tvd":  # |1 - rho| / 2
        return (1.0 - rho).abs() * 0.5, rho * (rho - 1.0).sign() * 0.5
    log_mq = torch.logaddexp(torch.full_like(s, math.log(beta)), s + math.log1p(-beta))  # log(m / q)
    if divergence == "jsd":  # -beta log(m / q) + (1 - beta) rho log(p / m)
        log_pm = s - log_mq
        return -beta * log_mq + (1.0 - beta) * rho * log_pm, (1.0 - beta) * rho * log_pm
    # skew_kl: -log(m / q) - (1 - beta)(1 - rho)
    return -log_mq - (1.0 - beta) * (1.0 - rho), (1.0 - beta) * rho * (1.0 - (-log_mq).exp())


def _safe_lse(logw, empty=0.0):
    """logsumexp over dim 1, keepdim; rows with no finite entry give ``empty`` instead of nan."""
    lse = torch.logsumexp(logw, dim=1, keepdim=True)
    return torch.where(lse > -math.inf, lse, torch.full_like(lse, empty))


def _where_sum(mask, values):
    return torch.where(mask, values, torch.zeros_like(values)).sum(1)
