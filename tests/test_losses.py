"""The chunked distillation loss against plain float64 references written out densely here.

The references build every distribution over the full vocabulary with ordinary torch ops
and let autograd differentiate them; the loss under test must agree in value and gradient.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from moedistill.errors import UserError
from moedistill.losses import dense_distillation_loss, distillation_loss

TEMPERATURES = (1.0, 2.0, 0.5)


# --------------------------------------------------------------------------- data


def make_batch(B=2, L=7, V=40, K=8, seed=0, mask_frac=0.3, pad_frac=0.0):
    """Random student logits, shifted labels with some -100, top-K teacher targets."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, V, generator=g) * 2.0
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[torch.rand(B, L, generator=g) < mask_frac] = -100
    teacher_logits = torch.randn(B, L, V, generator=g) * 3.0
    lp_full = F.log_softmax(teacher_logits, dim=-1)
    lps, ids = lp_full.topk(K, dim=-1)
    if pad_frac:
        pad = torch.rand(B, L, K, generator=g) < pad_frac
        ids = ids.masked_fill(pad, -1)
        lps = lps.masked_fill(pad, -math.inf)
    return logits, labels, ids, lps, teacher_logits


def sample_targets(lp_full, n_draws, seed=0):
    """Distinct ids of n_draws draws per position from exp(lp_full), with counts; padded."""
    g = torch.Generator().manual_seed(seed)
    *lead, V = lp_full.shape
    flat = lp_full.reshape(-1, V)
    draws = torch.multinomial(flat.exp(), n_draws, replacement=True, generator=g)
    counts = torch.zeros_like(flat).scatter_add_(1, draws, torch.ones_like(draws, dtype=flat.dtype))
    K = int((counts > 0).sum(1).max())
    c, ids = counts.topk(K, dim=1)
    lps = flat.gather(1, ids)
    ids = ids.masked_fill(c == 0, -1)
    lps = lps.masked_fill(c == 0, -math.inf)
    return ids.reshape(*lead, K), lps.reshape(*lead, K), c.reshape(*lead, K)


# --------------------------------------------------------------------------- references


def reference(logits, labels, ids, lps, *, alpha, temperature, tail, counts=None, denom=None):
    """Plain float64 version of the documented loss, one position at a time."""
    T = temperature
    V = logits.shape[-1]
    z = logits.reshape(-1, V).double()
    y = labels.reshape(-1)
    ids = ids.reshape(-1, ids.shape[-1])
    lps = lps.reshape(-1, lps.shape[-1]).double()
    counts = None if counts is None else counts.reshape(-1, counts.shape[-1]).double()
    mask = y != -100
    n = int(mask.sum())
    denom = n if denom is None else denom
    if n == 0:
        zero = z.sum() * 0
        return zero, zero, zero
    ce = F.cross_entropy(z[mask], y[mask], reduction="sum")
    logp = F.log_softmax(z / T, dim=-1)
    kl = z.new_zeros(())
    for pos in mask.nonzero().flatten().tolist():
        sel = (ids[pos] >= 0) & (lps[pos] > -math.inf)
        if tail == "sample":
            sel &= counts[pos] > 0
        i, lp = ids[pos][sel], lps[pos][sel]
        if tail == "renormalize":
            if len(i) == 0:
                continue
            q = torch.softmax(lp / T, 0)
            kl = kl + (q * (q.log() - logp[pos, i])).sum()
        elif tail == "tail":
            p = logp[pos].exp()
            p_in = p[i]
            p_tail = 1.0 - p_in.sum()
            q_in = lp.exp()
            r = max(1.0 - float(q_in.sum()), 0.0)
            free = V - len(i)
            if r > 0 and free > 0:
                q_min = float(q_in.min()) if len(i) else math.inf
                n_tail = min(max(r / q_min, 1.0), free)
                w_tail = n_tail * (r / n_tail) ** (1.0 / T)
            else:
                w_tail = 0.0
            w = torch.cat([q_in ** (1.0 / T), q_in.new_tensor([w_tail])])
            q = w / w.sum()
            pt = torch.cat([p_in, p_tail.reshape(1)])
            keep = q > 0
            kl = kl + (q[keep] * (q[keep].log() - pt[keep].log())).sum()
        else:  # sample
            c = counts[pos][sel]
            iw = c * (lp * (1.0 / T - 1.0)).exp()
            w = iw / iw.sum()
            log_zhat = (iw.sum() / c.sum()).log()
            kl = kl + (w * (lp / T - log_zhat - logp[pos, i])).sum()
    ce, kl = ce / denom, kl / denom
    return (1 - alpha) * ce + alpha * T * T * kl, ce, kl


def dense_reference(logits, teacher_logits, labels, *, alpha, temperature):
    T = temperature
    V = logits.shape[-1]
    z = logits.reshape(-1, V).double()
    y = labels.reshape(-1)
    mask = y != -100
    n = int(mask.sum())
    ce = F.cross_entropy(z[mask], y[mask], reduction="sum") / n
    logp = F.log_softmax(z[mask] / T, -1)
    logq = F.log_softmax(teacher_logits.reshape(-1, V)[mask].double() / T, -1)
    kl = F.kl_div(logp, logq, log_target=True, reduction="sum") / n
    return (1 - alpha) * ce + alpha * T * T * kl, ce, kl


def value_and_grad(fn, logits):
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x)
    out[0].backward()
    return [float(v.detach()) for v in out], x.grad


def assert_matches(ours, ref, logits, rtol=1e-4):
    (v1, g1), (v2, g2) = value_and_grad(ours, logits), value_and_grad(ref, logits.double())
    for a, b in zip(v1, v2):
        assert a == pytest.approx(b, rel=rtol, abs=1e-6)
    scale = g2.abs().max().item() + 1e-12
    assert (g1.double() - g2).abs().max().item() <= rtol * scale + 1e-9


# --------------------------------------------------------------------------- against the references


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("tail", ["renormalize", "tail"])
@pytest.mark.parametrize("k", [8, 40])
def test_matches_reference(tail, temperature, k):
    logits, labels, ids, lps, _ = make_batch(K=k, seed=k + int(temperature * 10), pad_frac=0.2 if k < 40 else 0.0)
    kw = dict(alpha=0.6, temperature=temperature, tail=tail)
    assert_matches(
        lambda x: distillation_loss(x, labels, ids, lps, chunk_size=5, **kw),
        lambda x: reference(x, labels, ids, lps, **kw),
        logits,
    )


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_sample_matches_reference(temperature):
    logits, labels, _, _, teacher = make_batch(seed=3)
    ids, lps, counts = sample_targets(F.log_softmax(teacher, -1), 50)
    kw = dict(alpha=0.7, temperature=temperature, tail="sample")
    assert_matches(
        lambda x: distillation_loss(x, labels, ids, lps, target_counts=counts, chunk_size=4, **kw),
        lambda x: reference(x, labels, ids, lps, counts=counts, **kw),
        logits,
    )


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_dense_matches_reference(temperature):
    logits, labels, _, _, teacher = make_batch(seed=4)
    kw = dict(alpha=0.5, temperature=temperature)
    assert_matches(
        lambda x: dense_distillation_loss(x, teacher, labels, chunk_size=3, **kw),
        lambda x: dense_reference(x, teacher, labels, **kw),
        logits,
    )


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("tail", ["renormalize", "tail"])
def test_k_equals_v_is_plain_forward_kl(tail, temperature):
    V = 40
    logits, labels, ids, lps, teacher = make_batch(V=V, K=V, seed=5)
    lp_full = F.log_softmax(teacher, -1)
    kw = dict(alpha=0.5, temperature=temperature)
    assert_matches(
        lambda x: distillation_loss(x, labels, ids, lps, tail=tail, **kw),
        lambda x: dense_reference(x, lp_full, labels, **kw),
        logits,
    )
    sparse = distillation_loss(logits, labels, ids, lps, tail=tail, **kw)
    dense = dense_distillation_loss(logits, teacher, labels, **kw)
    assert float(sparse.kl) == pytest.approx(float(dense.kl), rel=1e-4)


def test_tail_is_exact_coarsened_kl_at_t1():
    """At T=1 the tail bucket needs no assumption: compare with the full teacher, coarsened."""
    logits, labels, ids, lps, teacher = make_batch(K=6, seed=6, mask_frac=0.0)
    out = distillation_loss(logits, labels, ids, lps, alpha=1.0, temperature=1.0, tail="tail")
    p = F.softmax(logits.double(), -1)
    q = F.softmax(teacher.double(), -1)
    p_in, q_in = p.gather(-1, ids), q.gather(-1, ids)
    P = torch.cat([p_in, 1 - p_in.sum(-1, keepdim=True)], -1)
    Q = torch.cat([q_in, 1 - q_in.sum(-1, keepdim=True)], -1)
    expected = (Q * (Q.log() - P.log())).sum(-1).mean()
    assert float(out.kl) == pytest.approx(float(expected), rel=1e-4)


# --------------------------------------------------------------------------- special cases


def test_alpha_zero_is_cross_entropy():
    logits, labels, ids, lps, _ = make_batch(seed=8)
    for tail in ("renormalize", "tail"):
        (v, *_), g = value_and_grad(
            lambda x: distillation_loss(x, labels, ids, lps, alpha=0.0, temperature=2.0, tail=tail), logits
        )
        (ce,), g_ce = value_and_grad(
            lambda x: [F.cross_entropy(x.reshape(-1, 40), labels.reshape(-1), ignore_index=-100)], logits
        )
        assert v == pytest.approx(ce, rel=1e-6)
        torch.testing.assert_close(g, g_ce, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tail", ["renormalize", "tail", "sample", "dense"])
def test_all_masked_gives_zero(tail):
    logits, labels, ids, lps, teacher = make_batch(seed=9)
    labels = torch.full_like(labels, -100)
    counts = torch.ones_like(lps)
    x = logits.clone().requires_grad_(True)
    if tail == "dense":
        out = dense_distillation_loss(x, teacher, labels, alpha=0.5, temperature=2.0)
    else:
        out = distillation_loss(x, labels, ids, lps, alpha=0.5, temperature=2.0, tail=tail, target_counts=counts)
    assert [float(v.detach()) for v in out] == [0.0, 0.0, 0.0]
    out.total.backward()
    assert x.grad is not None and not x.grad.any()


@pytest.mark.parametrize("tail", ["renormalize", "tail", "sample"])
def test_padding_equals_compact_targets(tail):
    """-1 / -inf entries anywhere in K change nothing; a position with only padding has KL 0."""
    logits, labels, ids, lps, _ = make_batch(K=5, seed=10, mask_frac=0.0)
    counts = torch.randint(1, 5, ids.shape).float()
    g = torch.Generator().manual_seed(0)
    order = torch.rand(*ids.shape[:-1], 9, generator=g).argsort(-1)  # 5 real + 4 padding, shuffled
    pad_ids = torch.cat([ids, torch.full_like(ids[..., :4], -1)], -1).gather(-1, order)
    pad_lps = torch.cat([lps, torch.full_like(lps[..., :4], -math.inf)], -1).gather(-1, order)
    pad_counts = torch.cat([counts, torch.zeros_like(counts[..., :4])], -1).gather(-1, order)
    kw = dict(alpha=0.5, temperature=2.0, tail=tail)
    (v1, *_), g1 = value_and_grad(lambda x: distillation_loss(x, labels, ids, lps, target_counts=counts, **kw), logits)
    (v2, *_), g2 = value_and_grad(
        lambda x: distillation_loss(x, labels, pad_ids, pad_lps, target_counts=pad_counts, **kw), logits
    )
    assert v1 == pytest.approx(v2, rel=1e-5)  # fp32 sums in another order
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)
    # one position with no stored id at all: its KL is 0, its CE still counts
    pad_ids[0, 0] = -1
    pad_lps[0, 0] = -math.inf
    pad_counts[0, 0] = 0
    out = distillation_loss(logits, labels, pad_ids, pad_lps, target_counts=pad_counts, **kw)
    assert all(math.isfinite(float(v)) for v in out)


@pytest.mark.parametrize("tail", ["renormalize", "tail", "sample", "dense"])
def test_gradient_accumulation_2x4_equals_1x8(tail):
    logits, labels, ids, lps, teacher = make_batch(B=8, L=5, seed=11)
    counts = torch.randint(0, 4, ids.shape).float()
    counts[..., 0] = 1

    def loss(x, sl, num_items=None):
        kw = dict(alpha=0.5, temperature=2.0, num_items_in_batch=num_items)
        if tail == "dense":
            return dense_distillation_loss(x, teacher[sl], labels[sl], **kw)
        return distillation_loss(x, labels[sl], ids[sl], lps[sl], tail=tail, target_counts=counts[sl], **kw)

    big = logits.clone().requires_grad_(True)
    full = loss(big, slice(None))
    full.total.backward()

    acc = logits.clone().requires_grad_(True)
    n_items = torch.tensor(int((labels != -100).sum()))  # the Trainer passes a tensor
    total = 0.0
    for sl in (slice(0, 4), slice(4, 8)):
        part = loss(acc[sl], sl, n_items)
        part.total.backward()
        total += float(part.total.detach())
    assert total == pytest.approx(float(full.total.detach()), rel=1e-6)
    torch.testing.assert_close(acc.grad, big.grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("tail", ["renormalize", "tail", "sample", "dense"])
def test_chunked_equals_unchunked(tail):
    logits, labels, ids, lps, teacher = make_batch(B=3, L=6, seed=12)
    counts = torch.randint(1, 4, ids.shape).float()

    def loss(x, chunk):
        kw = dict(alpha=0.5, temperature=0.5, chunk_size=chunk)
        if tail == "dense":
            return dense_distillation_loss(x, teacher, labels, **kw)
        return distillation_loss(x, labels, ids, lps, tail=tail, target_counts=counts, **kw)

    vals, grad = value_and_grad(lambda x: loss(x, 10_000), logits)
    for chunk in (1, 3, 7, 18):
        v, g = value_and_grad(lambda x: loss(x, chunk), logits)
        assert v == pytest.approx(vals, rel=1e-6)
        torch.testing.assert_close(g, grad, rtol=1e-6, atol=1e-8)


def test_cpu_chunk_cap_and_non_contiguous_logits(monkeypatch):
    import moedistill.losses as losses

    logits, labels, ids, lps, _ = make_batch(seed=18)
    kw = dict(alpha=0.5, temperature=2.0, tail="tail")
    vals, grad = value_and_grad(lambda x: distillation_loss(x, labels, ids, lps, **kw), logits)
    monkeypatch.setattr(losses, "CPU_CHUNK_BYTES", 2 * 4 * logits.shape[-1])  # 2 positions per chunk
    v, g = value_and_grad(lambda x: distillation_loss(x, labels, ids, lps, **kw), logits)
    assert v == pytest.approx(vals, rel=1e-6)
    torch.testing.assert_close(g, grad, rtol=1e-6, atol=1e-8)
    # [T, B, V] storage seen as [B, T, V]: not viewable as [N, V], copied with a warning
    strided = logits.transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.warns(UserWarning, match="not viewable"):
        v, g = value_and_grad(lambda x: distillation_loss(x, labels, ids, lps, **kw), strided)
    assert v == pytest.approx(vals, rel=1e-6)
    torch.testing.assert_close(g, grad, rtol=1e-6, atol=1e-8)


def test_dense_teacher_with_masked_vocab():
    """Teacher logits of -inf (ids it never predicts) give q = 0 there, not nan."""
    logits, labels, _, _, teacher = make_batch(seed=19)
    teacher[..., :5] = -math.inf
    out = dense_distillation_loss(logits, teacher, labels, alpha=1.0, temperature=2.0)
    mask = labels.reshape(-1) != -100
    logp = F.log_softmax(logits.reshape(-1, 40)[mask].double() / 2, -1)
    q = F.softmax(teacher.reshape(-1, 40)[mask].double() / 2, -1)
    expected = torch.where(q > 0, q * (q.log() - logp), torch.zeros_like(q)).sum(-1).mean()
    assert float(out.kl) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("tail", ["renormalize", "tail", "dense"])
def test_bf16_logits(tail):
    logits, labels, ids, lps, teacher = make_batch(seed=13)
    lo = logits.bfloat16()

    def loss(x):
        if tail == "dense":
            return dense_distillation_loss(x, teacher.bfloat16(), labels, alpha=0.5, temperature=2.0)
        return distillation_loss(x, labels, ids, lps, alpha=0.5, temperature=2.0, tail=tail)

    v16, g16 = value_and_grad(loss, lo)
    v32, g32 = value_and_grad(loss, lo.float())
    assert g16.dtype == torch.bfloat16
    assert v16 == pytest.approx(v32, rel=1e-5)
    torch.testing.assert_close(g16.float(), g32, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sample_estimate_converges_to_exact_kl(temperature):
    V = 30
    logits, labels, _, _, teacher = make_batch(B=1, L=4, V=V, seed=14, mask_frac=0.0)
    lp_full = F.log_softmax(teacher, -1)
    exact = dense_distillation_loss(logits, teacher, labels, alpha=1.0, temperature=temperature).kl
    errors = []
    for n_draws in (30, 3_000, 300_000):
        ids, lps, counts = sample_targets(lp_full, n_draws, seed=n_draws)
        est = distillation_loss(
            logits, labels, ids, lps, target_counts=counts, alpha=1.0, temperature=temperature, tail="sample"
        )
        errors.append(abs(float(est.kl) - float(exact)))
    assert errors[-1] < errors[0]
    assert errors[-1] < 0.01 * float(exact) + 1e-3


def test_backward_scales_and_runs_once():
    logits, labels, ids, lps, _ = make_batch(seed=15)
    _, g = value_and_grad(lambda x: distillation_loss(x, labels, ids, lps, alpha=0.5, temperature=2.0), logits)
    x = logits.clone().requires_grad_(True)
    out = distillation_loss(x, labels, ids, lps, alpha=0.5, temperature=2.0)
    (3.0 * out.total).backward(retain_graph=True)
    torch.testing.assert_close(x.grad, 3.0 * g)
    with pytest.raises(RuntimeError, match="only once"):
        out.total.backward()
    with torch.no_grad():
        again = distillation_loss(logits, labels, ids, lps, alpha=0.5, temperature=2.0)
    assert float(again.total) == pytest.approx(float(out.total.detach()), rel=1e-6)
    assert not out.ce.requires_grad and not out.kl.requires_grad


@pytest.mark.parametrize("tail", ["renormalize", "tail", "sample", "dense"])
def test_no_grad_gives_the_same_values(tail):
    """Evaluation skips the gradient work (and, where it can, the probabilities)."""
    logits, labels, ids, lps, teacher = make_batch(seed=17)
    counts = torch.randint(1, 4, ids.shape).float()

    def loss(x):
        if tail == "dense":
            return dense_distillation_loss(x, teacher, labels, alpha=0.3, temperature=2.0)
        return distillation_loss(x, labels, ids, lps, tail=tail, target_counts=counts, alpha=0.3, temperature=2.0)

    with_grad, _ = value_and_grad(loss, logits)
    with torch.no_grad():
        without = [float(v) for v in loss(logits.clone().requires_grad_(True))]
    assert without == pytest.approx(with_grad, rel=1e-6)


def test_user_errors():
    logits, labels, ids, lps, _ = make_batch(seed=16)
    kw = dict(alpha=0.5, temperature=2.0)
    with pytest.raises(UserError, match="target_counts"):
        distillation_loss(logits, labels, ids, lps, tail="sample", **kw)
    with pytest.raises(UserError, match="not a loss mode"):
        distillation_loss(logits, labels, ids, lps, tail="topk", **kw)
    with pytest.raises(UserError, match="outside the student's vocabulary"):
        distillation_loss(logits, labels, ids + 100, lps, **kw)
    with pytest.raises(UserError, match="alpha"):
        distillation_loss(logits, labels, ids, lps, alpha=1.5, temperature=2.0)
    with pytest.raises(UserError, match="do not match"):
        distillation_loss(logits, labels[:, :-1], ids, lps, **kw)
