"""The fused linear loss against the unfused path it replaces, in float64.

The reference is ``distillation_loss(hidden @ W.T + b, ...)`` (itself checked against
plain dense references in test_losses.py) differentiated by autograd through the matmul;
one case also goes all the way to test_losses.py's per-position reference. The fused loss
must give the same value and the same gradients w.r.t. hidden, weight and bias.
"""

import pytest
import torch
import torch.nn.functional as F
from test_losses import make_batch, reference, sample_targets

from moedistill.errors import UserError
from moedistill.losses import (
    dense_distillation_loss,
    distillation_loss,
    fused_linear_dense_distillation_loss,
    fused_linear_distillation_loss,
    fused_linear_teacher_loss,
)
from moedistill.targets import DenseTargets, SampledTargets, TopKTargets

B, L, H, V = 2, 7, 12, 40


def linear_inputs(seed=0, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed + 100)
    hidden = (torch.randn(B, L, H, generator=g) * 1.5).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.7).to(dtype).requires_grad_(True)
    b = (torch.randn(V, generator=g) * 0.3).to(dtype).requires_grad_(True) if bias else None
    return hidden, weight, b


def targets_for(tail, k, seed=0, mask_frac=0.3):
    _, labels, ids, lps, teacher_logits = make_batch(B=B, L=L, V=V, K=k, seed=seed, mask_frac=mask_frac)
    counts = None
    if tail == "sample":
        ids, lps, counts = sample_targets(F.log_softmax(teacher_logits.double(), -1), n_draws=16, seed=seed)
    return labels, ids, lps, counts, teacher_logits


def grads(loss, tensors):
    loss.backward()
    out = [None if t is None else (None if t.grad is None else t.grad.clone()) for t in tensors]
    for t in tensors:
        if t is not None:
            t.grad = None
    return out


def assert_close_rel(a, b, rtol):
    """max |a - b| <= rtol * max |b| (relative to the tensor's scale, so near-zero entries
    of a large gradient do not need their own relative precision)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    scale = b.abs().max().clamp_min(1e-30)
    err = (a - b).abs().max()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} x {scale:.3g}"


def unfused(hidden, weight, b, labels, ids, lps, counts, **kw):
    logits = hidden @ weight.t() if b is None else hidden @ weight.t() + b
    return distillation_loss(logits, labels, ids, lps, target_counts=counts, **kw)


@pytest.mark.parametrize("k", [8, V])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("tail", ["renormalize", "tail", "sample"])
def test_matches_unfused_in_float64(tail, temperature, k):
    labels, ids, lps, counts, _ = targets_for(tail, k)
    kw = dict(alpha=0.6, temperature=temperature, tail=tail, chunk_size=5)  # 5 does not divide the positions
    tensors = linear_inputs()
    ref = unfused(*tensors, labels, ids, lps, counts, **kw)
    ref_g = grads(ref.total, tensors)
    ours = fused_linear_distillation_loss(tensors[0], tensors[1], labels, ids, lps, target_counts=counts,
                                          lm_head_bias=tensors[2], **kw)
    our_g = grads(ours.total, tensors)
    for a, b in zip(ours, ref):
        assert_close_rel(a, b, 1e-6)
    for a, b in zip(our_g, ref_g):
        assert_close_rel(a, b, 1e-6)


def test_matches_the_per_position_reference():
    """All the way down: the fused loss against test_losses.py's dense float64 reference."""
    labels, ids, lps, _, _ = targets_for("tail", 8, seed=3)
    hidden, weight, b = linear_inputs(seed=3)
    ours = fused_linear_distillation_loss(hidden, weight, labels, ids, lps, alpha=0.5, temperature=2.0,
                                          tail="tail", lm_head_bias=b)
    logits = (hidden @ weight.t() + b).detach()
    ref = reference(logits, labels, ids, lps, alpha=0.5, temperature=2.0, tail="tail")
    for a, r in zip(ours, ref):
        assert abs(float(a.detach()) - float(r)) <= 1e-5 * abs(float(r)) + 1e-7


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_dense_teacher_matches_unfused(temperature):
    labels, _, _, _, teacher_logits = targets_for("renormalize", 8)
    tensors = linear_inputs(seed=1)
    kw = dict(alpha=0.3, temperature=temperature, chunk_size=4)
    ref = dense_distillation_loss(tensors[0] @ tensors[1].t() + tensors[2], teacher_logits.double(), labels, **kw)
    ref_g = grads(ref.total, tensors)
    ours = fused_linear_dense_distillation_loss(tensors[0], tensors[1], teacher_logits.double(), labels,
                                                lm_head_bias=tensors[2], **kw)
    our_g = grads(ours.total, tensors)
    for a, b in zip([*ours, *our_g], [*ref, *ref_g]):
        assert_close_rel(a, b, 1e-6)


def test_teacher_loss_dispatch():
    labels, ids, lps, counts, teacher_logits = targets_for("sample", 8)
    hidden, weight, _ = linear_inputs(bias=False)
    kw = dict(alpha=0.5, temperature=2.0)
    for targets, tail in [(TopKTargets(ids, lps), "tail"), (SampledTargets(ids, lps, counts), "sample"),
                          (DenseTargets(teacher_logits.double()), "renormalize")]:
        ours = fused_linear_teacher_loss(hidden, weight, labels, targets, tail=tail, **kw)
        logits = hidden @ weight.t()
        if isinstance(targets, DenseTargets):
            ref = dense_distillation_loss(logits, targets.logits, labels, **kw)
        else:
            ref = distillation_loss(logits, labels, ids, lps, tail=tail, target_counts=counts, **kw)
        assert_close_rel(ours.total, ref.total, 1e-6)


@pytest.mark.parametrize("tail", ["renormalize", "tail"])
def test_all_masked_rows_give_zero_and_zero_gradients(tail):
    labels, ids, lps, _, _ = targets_for(tail, 8)
    labels = torch.full_like(labels, -100)
    hidden, weight, b = linear_inputs()
    ours = fused_linear_distillation_loss(hidden, weight, labels, ids, lps, alpha=0.5, temperature=2.0,
                                          tail=tail, lm_head_bias=b)
    assert float(ours.total) == float(ours.ce) == float(ours.kl) == 0.0
    g = grads(ours.total, (hidden, weight, b))
    assert all(t is not None and bool((t == 0).all()) for t in g)  # zeros, not None: DDP waits for every weight


def test_masked_positions_get_exactly_zero_hidden_gradient():
    labels, ids, lps, _, _ = targets_for("renormalize", 8, mask_frac=0.5)
    hidden, weight, b = linear_inputs()
    ours = fused_linear_distillation_loss(hidden, weight, labels, ids, lps, alpha=0.5, temperature=1.0,
                                          lm_head_bias=b)
    gh, _, _ = grads(ours.total, (hidden, weight, b))
    assert bool((gh[labels == -100] == 0).all()) and bool((gh[labels != -100] != 0).any())


def test_frozen_weight_gets_no_gradient():
    labels, ids, lps, _, _ = targets_for("tail", 8)
    hidden, weight, b = linear_inputs()
    weight.requires_grad_(False)
    b.requires_grad_(False)
    kw = dict(alpha=0.5, temperature=2.0, tail="tail")
    ref = unfused(hidden, weight, b, labels, ids, lps, None, **kw)
    (ref_gh,) = grads(ref.total, (hidden,))
    ours = fused_linear_distillation_loss(hidden, weight, labels, ids, lps, lm_head_bias=b, **kw)
    (our_gh,) = grads(ours.total, (hidden,))
    assert weight.grad is None and b.grad is None
    assert_close_rel(our_gh, ref_gh, 1e-6)
    # nothing requires grad: values only, no autograd node
    with torch.no_grad():
        nograd = fused_linear_distillation_loss(hidden, weight, labels, ids, lps, lm_head_bias=b, **kw)
    assert not nograd.total.requires_grad
    assert_close_rel(nograd.total, ref.total.detach(), 1e-6)


def test_tied_embeddings():
    """The lm_head weight is the input embedding: both uses add into one gradient."""
    labels, ids, lps, _, _ = targets_for("tail", 8)
    g = torch.Generator().manual_seed(5)
    emb = (torch.randn(V, H, generator=g) * 0.5).double().requires_grad_(True)
    proj = (torch.randn(H, H, generator=g) * 0.3).double().requires_grad_(True)
    tokens = torch.randint(0, V, (B, L), generator=g)
    kw = dict(alpha=0.5, temperature=2.0, tail="tail", chunk_size=3)

    def body():
        return torch.tanh(F.embedding(tokens, emb) @ proj)

    ref = distillation_loss(body() @ emb.t(), labels, ids, lps, **kw)
    ref_g = grads(ref.total, (emb, proj))
    ours = fused_linear_distillation_loss(body(), emb, labels, ids, lps, **kw)
    our_g = grads(ours.total, (emb, proj))
    for a, b in zip(our_g, ref_g):
        assert_close_rel(a, b, 1e-6)


def test_num_items_in_batch_and_accumulation():
    """Two micro-batches with the step's target count sum to the loss and gradient of one."""
    labels, ids, lps, _, _ = targets_for("renormalize", 8)
    hidden, weight, b = linear_inputs()
    kw = dict(alpha=0.5, temperature=2.0, lm_head_bias=b)
    whole = fused_linear_distillation_loss(hidden, weight, labels, ids, lps, **kw)
    whole_g = grads(whole.total, (hidden, weight, b))
    n = int(labels.ne(-100).sum())
    total = 0.0
    for i in range(B):
        part = fused_linear_distillation_loss(hidden[i : i + 1], weight, labels[i : i + 1], ids[i : i + 1],
                                              lps[i : i + 1], num_items_in_batch=n, **kw)
        part.total.backward()
        total += float(part.total)
    assert abs(total - float(whole.total)) <= 1e-12 * abs(float(whole.total))
    for t, ref in zip((hidden, weight, b), whole_g):
        assert_close_rel(t.grad, ref, 1e-9)


def test_backward_scales_and_runs_once():
    labels, ids, lps, _, _ = targets_for("renormalize", 8)
    hidden, weight, b = linear_inputs()
    kw = dict(alpha=0.5, temperature=2.0, lm_head_bias=b)
    g1 = grads(fused_linear_distillation_loss(hidden, weight, labels, ids, lps, **kw).total, (hidden, weight, b))
    out = fused_linear_distillation_loss(hidden, weight, labels, ids, lps, **kw)
    g3 = grads(out.total * 3.0, (hidden, weight, b))
    for a, r in zip(g3, g1):
        assert_close_rel(a, 3.0 * r, 1e-12)
    with pytest.raises(RuntimeError):
        out = fused_linear_distillation_loss(hidden, weight, labels, ids, lps, **kw)
        out.total.backward(retain_graph=True)
        out.total.backward()


@pytest.mark.parametrize("tail", ["renormalize", "tail"])
def test_bf16_weights_and_bf16_autocast_within_bf16_tolerance(tail):
    labels, ids, lps, _, _ = targets_for(tail, 8)
    kw = dict(alpha=0.5, temperature=2.0, tail=tail)
    ref_t = linear_inputs(dtype=torch.float32)
    ref = unfused(*ref_t, labels, ids, lps, None, **kw)
    ref_g = grads(ref.total, ref_t)
    # bf16 weights and hidden states: gradients come back in bf16
    bf = [t.detach().bfloat16().requires_grad_(True) for t in ref_t]
    ours = fused_linear_distillation_loss(bf[0], bf[1], labels, ids, lps, lm_head_bias=bf[2], **kw)
    our_g = grads(ours.total, bf)
    assert [g.dtype for g in our_g] == [torch.bfloat16] * 3
    assert abs(float(ours.total) - float(ref.total)) <= 2e-2 * abs(float(ref.total))
    for a, r in zip(our_g, ref_g):
        assert_close_rel(a.float(), r, 3e-2)
    # fp32 weights under CPU autocast: matmuls in bf16, gradients in fp32 (the master weights' dtype)
    fp = [t.detach().clone().requires_grad_(True) for t in ref_t]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fused_linear_distillation_loss(fp[0], fp[1], labels, ids, lps, lm_head_bias=fp[2], **kw)
        auto_ref = unfused(*fp, labels, ids, lps, None, **kw)  # the unfused path under the same autocast
    our_g = grads(ours.total, fp)
    auto_g = grads(auto_ref.total, fp)
    assert [g.dtype for g in our_g] == [torch.float32] * 3
    assert abs(float(ours.total) - float(auto_ref.total)) <= 1e-2 * abs(float(auto_ref.total))
    for a, r, exact in zip(our_g, auto_g, ref_g):
        assert_close_rel(a, r, 3e-2)
        assert_close_rel(a, exact, 3e-2)


def test_user_errors():
    labels, ids, lps, _, _ = targets_for("renormalize", 8)
    hidden, weight, b = linear_inputs()
    kw = dict(alpha=0.5, temperature=2.0)
    with pytest.raises(UserError, match="do not fit"):
        fused_linear_distillation_loss(hidden, weight[:, :-1], labels, ids, lps, **kw)
    with pytest.raises(UserError, match="do not match labels"):
        fused_linear_distillation_loss(hidden[:, :-1], weight, labels, ids, lps, **kw)
    with pytest.raises(UserError, match="bias"):
        fused_linear_distillation_loss(hidden, weight, labels, ids, lps, lm_head_bias=b[:-1], **kw)
    with pytest.raises(UserError, match="outside the student's vocabulary"):
        fused_linear_distillation_loss(hidden, weight[:10], labels.clamp(max=9), ids, lps, **kw)
    with pytest.raises(UserError, match="lm_head weight is on meta"):
        fused_linear_distillation_loss(hidden, weight.detach().to("meta"), labels, ids, lps, **kw)
    with pytest.raises(UserError, match="tail="):
        fused_linear_distillation_loss(hidden, weight, labels, ids, lps, tail="nope", **kw)
