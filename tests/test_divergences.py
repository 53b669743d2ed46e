"""Every ``loss.divergence`` of the chunked engine against plain float64 references.

The references are written out here independently of moedistill.losses: textbook
full-vocabulary formulas (dense teachers, ``renormalize`` as a full-vocabulary teacher that
is 0 off the stored ids), the (|S| + 1)-outcome coarsening for ``tail``, and for ``sample``
the importance-weighted estimate of an f-divergence written with its generator f. Autograd
differentiates them; the loss must agree in value and gradient. forward_kl is covered by
test_losses.py (and is the same code as before the other divergences existed).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from test_losses import assert_matches, make_batch, sample_targets, value_and_grad

from moedistill.errors import UserError
from moedistill.losses import (
    DEFAULT_BETA,
    DIVERGENCES,
    dense_distillation_loss,
    distillation_loss,
    fused_linear_dense_distillation_loss,
    fused_linear_distillation_loss,
)

OTHERS = ("reverse_kl", "jsd", "skew_kl", "tvd")
ALL = ("forward_kl", *OTHERS)
TEMPERATURES = (1.0, 2.0, 0.5)
BETA = {"jsd": 0.3, "skew_kl": 0.2}  # not the defaults, so that beta is seen to reach the loss


def sparse_modes(div):
    return ("tail", "sample") if div == "reverse_kl" else ("renormalize", "tail", "sample")


# --------------------------------------------------------------------------- references


def divergence(name, beta, q, p):
    """D(q || p) over the last dim, textbook forms; q is the teacher, p the student."""
    def kl(a, b):
        return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)

    if name == "forward_kl":
        return kl(q, p)
    if name == "reverse_kl":
        return kl(p, q)
    if name == "tvd":
        return 0.5 * (q - p).abs().sum(-1)
    m = beta * q + (1 - beta) * p
    if name == "jsd":
        return beta * kl(q, m) + (1 - beta) * kl(p, m)
    return kl(q, m)  # skew_kl


def generator(name, beta, t):
    """f with D(q || p) = sum_v p f(q / p), and f'(1)."""
    if name == "forward_kl":
        return t * t.log(), 1.0
    if name == "reverse_kl":
        return -t.log(), -1.0
    if name == "tvd":
        return 0.5 * (t - 1).abs(), 0.0
    if name == "jsd":
        mix = beta * t + 1 - beta
        return beta * t * t.log() - mix * mix.log(), 0.0
    return t * (t / (beta * t + 1 - beta)).log(), 1 - beta  # skew_kl


def tail_teacher(lp, V, T):
    """The ``tail`` mode's teacher over S + bucket (the documented spread of the tail)."""
    q_in = lp.exp()
    r = max(1.0 - float(q_in.sum()), 0.0)
    free = V - len(lp)
    w_tail = 0.0
    if r > 0 and free > 0:
        q_min = float(q_in.min()) if len(lp) else math.inf
        n = min(max(r / q_min, 1.0), free)
        w_tail = n * (r / n) ** (1.0 / T)
    w = torch.cat([q_in ** (1.0 / T), q_in.new_tensor([w_tail])])
    return w / w.sum()


def reference(logits, labels, ids, lps, *, divergence_name, beta, alpha, temperature, tail, counts=None):
    """The blended loss with divergence D, float64, one position at a time."""
    T, V = temperature, logits.shape[-1]
    z, y = logits.reshape(-1, V).double(), labels.reshape(-1)
    ids, lps = ids.reshape(-1, ids.shape[-1]), lps.reshape(-1, lps.shape[-1]).double()
    counts = None if counts is None else counts.reshape(-1, counts.shape[-1]).double()
    mask = y != -100
    n = int(mask.sum())
    ce = F.cross_entropy(z[mask], y[mask], reduction="sum")
    p_all = F.softmax(z / T, -1)
    total_d = z.new_zeros(())
    for pos in mask.nonzero().flatten().tolist():
        sel = (ids[pos] >= 0) & (lps[pos] > -math.inf)
        if counts is not None:
            sel &= counts[pos] > 0
        i, lp, p = ids[pos][sel], lps[pos][sel], p_all[pos]
        if tail == "renormalize":
            if len(i) == 0:
                continue
            q = torch.zeros(V, dtype=torch.float64).index_put((i,), torch.softmax(lp / T, 0))
            total_d = total_d + divergence(divergence_name, beta, q, p)
        elif tail == "tail":
            Q = tail_teacher(lp, V, T)
            P = torch.cat([p[i], (1 - p[i].sum()).reshape(1)])
            if V == len(i):
                Q, P = Q[:-1], P[:-1]
            total_d = total_d + divergence(divergence_name, beta, Q, P)
        else:  # sample: sum_S w_i rho_i f~(1 / rho_i), f~(t) = f(t) - f'(1)(t - 1)
            c = counts[pos][sel]
            iw = c * (lp * (1.0 / T - 1.0)).exp()
            w = iw / iw.sum()
            q_hat = (lp / T).exp() / (iw.sum() / c.sum())
            rho = p[i] / q_hat
            f, f1 = generator(divergence_name, beta, 1 / rho)
            total_d = total_d + (w * rho * (f - f1 * (1 / rho - 1))).sum()
    ce, d = ce / n, total_d / n
    return (1 - alpha) * ce + alpha * T * T * d, ce, d


def dense_reference(logits, teacher_logits, labels, *, divergence_name, beta, alpha, temperature):
    T, V = temperature, logits.shape[-1]
    mask = labels.reshape(-1) != -100
    z = logits.reshape(-1, V)[mask].double()
    q = F.softmax(teacher_logits.reshape(-1, V)[mask].double() / T, -1)
    ce = F.cross_entropy(z, labels.reshape(-1)[mask], reduction="mean")
    d = divergence(divergence_name, beta, q, F.softmax(z / T, -1)).mean()
    return (1 - alpha) * ce + alpha * T * T * d, ce, d


def sparse_inputs(tail, k=8, seed=0, V=40, mask_frac=0.3, n_draws=40):
    logits, labels, ids, lps, teacher = make_batch(V=V, K=k, seed=seed, mask_frac=mask_frac,
                                                   pad_frac=0.2 if k < V else 0.0)
    counts = None
    if tail == "sample":
        ids, lps, counts = sample_targets(F.log_softmax(teacher, -1), n_draws, seed=seed)
    return logits, labels, ids, lps, counts, teacher


# --------------------------------------------------------------------------- the references themselves


@pytest.mark.parametrize("div", ALL)
def test_generator_form_equals_textbook_form(div):
    """The two reference forms agree (so the sample reference estimates the same divergence)."""
    g = torch.Generator().manual_seed(0)
    q, p = (F.softmax(torch.randn(5, 30, generator=g, dtype=torch.float64) * 2, -1) for _ in range(2))
    f, f1 = generator(div, BETA.get(div), q / p)
    torch.testing.assert_close((p * f).sum(-1), divergence(div, BETA.get(div), q, p))
    torch.testing.assert_close((p * (f - f1 * (q / p - 1))).sum(-1), divergence(div, BETA.get(div), q, p))


# --------------------------------------------------------------------------- against the references


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("div", ALL)
def test_dense_matches_reference(div, temperature):
    logits, labels, _, _, teacher = make_batch(seed=4)
    kw = dict(divergence=div, beta=BETA.get(div), alpha=0.6, temperature=temperature)
    ref_kw = dict(divergence_name=div, beta=BETA.get(div), alpha=0.6, temperature=temperature)
    assert_matches(
        lambda x: dense_distillation_loss(x, teacher, labels, chunk_size=3, **kw),
        lambda x: dense_reference(x, teacher, labels, **ref_kw),
        logits,
    )


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize(("div", "tail"), [(d, t) for d in OTHERS for t in sparse_modes(d)])
def test_sparse_matches_reference(div, tail, temperature):
    logits, labels, ids, lps, counts, _ = sparse_inputs(tail, seed=int(temperature * 10))
    kw = dict(alpha=0.6, temperature=temperature, tail=tail)
    assert_matches(
        lambda x: distillation_loss(x, labels, ids, lps, target_counts=counts, divergence=div, beta=BETA.get(div),
                                    chunk_size=5, **kw),
        lambda x: reference(x, labels, ids, lps, counts=counts, divergence_name=div, beta=BETA.get(div), **kw),
        logits,
    )


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize(("div", "tail"), [(d, t) for d in ALL for t in sparse_modes(d) if t != "sample"])
def test_k_equals_v_is_the_dense_divergence(div, tail, temperature):
    V = 40
    logits, labels, ids, lps, teacher = make_batch(V=V, K=V, seed=5)
    lp_full = F.log_softmax(teacher, -1)
    kw = dict(divergence=div, beta=BETA.get(div), alpha=0.5, temperature=temperature)
    assert_matches(
        lambda x: distillation_loss(x, labels, ids, lps, tail=tail, **kw),
        lambda x: dense_reference(x, lp_full, labels, divergence_name=div, beta=BETA.get(div), alpha=0.5,
                                  temperature=temperature),
        logits,
    )
    sparse = distillation_loss(logits, labels, ids, lps, tail=tail, **kw)
    dense = dense_distillation_loss(logits, teacher, labels, **kw)
    assert float(sparse.kl) == pytest.approx(float(dense.kl), rel=1e-4)


@pytest.mark.parametrize("div", ALL)
def test_tail_is_a_lower_bound_and_renormalize_is_not_one(div):
    """At T=1 the tail bucket is exact coarsening: below the full divergence (data processing)."""
    logits, labels, ids, lps, teacher = make_batch(K=6, seed=6, mask_frac=0.0)
    kw = dict(divergence=div, beta=BETA.get(div), alpha=1.0, temperature=1.0)
    full = dense_distillation_loss(logits, teacher, labels, **kw).kl
    bound = distillation_loss(logits, labels, ids, lps, tail="tail", **kw).kl
    assert 0 < float(bound) <= float(full) * (1 + 1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("div", OTHERS)
def test_sample_estimate_converges_to_the_dense_divergence(div, temperature):
    """Consistent (unbiased at T=1); a teacher of moderate spread (min q ~ 6e-4): the estimate's
    spread grows with sum_v p_v^2 / q_v, so an id the teacher almost never draws needs N >> 1/q_v."""
    V = 30
    logits, labels, _, _, teacher = make_batch(B=1, L=4, V=V, seed=14, mask_frac=0.0)
    teacher = teacher / 3
    lp_full = F.log_softmax(teacher, -1)
    kw = dict(divergence=div, beta=BETA.get(div), alpha=1.0, temperature=temperature)
    exact = float(dense_distillation_loss(logits, teacher, labels, **kw).kl)
    errors = []
    for n_draws in (30, 300_000):
        ids, lps, counts = sample_targets(lp_full, n_draws, seed=n_draws)
        est = distillation_loss(logits, labels, ids, lps, target_counts=counts, tail="sample", **kw)
        errors.append(abs(float(est.kl) - exact))
    assert errors[-1] < errors[0]
    assert errors[-1] < 0.02 * exact + 1e-3


# --------------------------------------------------------------------------- masking, chunks, accumulation


@pytest.mark.parametrize("div", OTHERS)
def test_all_masked_gives_zero(div):
    logits, labels, ids, lps, teacher = make_batch(seed=9)
    labels = torch.full_like(labels, -100)
    counts = torch.ones_like(lps)
    kw = dict(alpha=0.5, temperature=2.0, divergence=div)
    for tail in (*sparse_modes(div), "dense"):
        x = logits.clone().requires_grad_(True)
        if tail == "dense":
            out = dense_distillation_loss(x, teacher, labels, **kw)
        else:
            out = distillation_loss(x, labels, ids, lps, tail=tail, target_counts=counts, **kw)
        assert [float(v.detach()) for v in out] == [0.0, 0.0, 0.0]
        out.total.backward()
        assert not x.grad.any()


@pytest.mark.parametrize("div", OTHERS)
def test_masked_positions_and_empty_targets(div):
    """A -100 position gets exactly zero gradient; one with only padding targets gives D = 0 and
    only its CE gradient."""
    logits, labels, ids, lps, counts, _ = sparse_inputs("renormalize", seed=10)
    labels[0, 0] = -100
    labels[0, 1] = 3
    ids[0, 1], lps[0, 1] = -1, -math.inf
    counts = torch.ones_like(lps)
    for tail in sparse_modes(div):
        kw = dict(alpha=0.5, temperature=2.0, tail=tail, divergence=div)
        _, g = value_and_grad(lambda x: distillation_loss(x, labels, ids, lps, target_counts=counts, **kw), logits)
        assert not g[0, 0].any()
        if tail != "tail":  # the tail bucket still teaches "all mass outside S" there
            n = int((labels != -100).sum())
            ce_grad = 0.5 * (F.softmax(logits[0, 1], -1) - F.one_hot(labels[0, 1], 40)) / n
            torch.testing.assert_close(g[0, 1], ce_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("div", OTHERS)
def test_chunked_and_accumulated_equal_one_call(div):
    logits, labels, ids, lps, teacher = make_batch(B=4, L=5, seed=12)
    counts = torch.randint(1, 4, ids.shape).float()
    for tail in (*sparse_modes(div), "dense"):
        def loss(x, sl=slice(None), chunk=10_000, num_items=None, tail=tail):
            kw = dict(alpha=0.5, temperature=0.5, divergence=div, chunk_size=chunk, num_items_in_batch=num_items)
            if tail == "dense":
                return dense_distillation_loss(x, teacher[sl], labels[sl], **kw)
            return distillation_loss(x, labels[sl], ids[sl], lps[sl], tail=tail, target_counts=counts[sl], **kw)

        vals, grad = value_and_grad(loss, logits)
        v, g = value_and_grad(lambda x: loss(x, chunk=3), logits)
        assert v == pytest.approx(vals, rel=1e-6)
        torch.testing.assert_close(g, grad, rtol=1e-6, atol=1e-8)
        acc = logits.clone().requires_grad_(True)
        n_items = torch.tensor(int((labels != -100).sum()))
        total = 0.0
        for sl in (slice(0, 2), slice(2, 4)):
            part = loss(acc[sl], sl, num_items=n_items)
            part.total.backward()
            total += float(part.total.detach())
        assert total == pytest.approx(vals[0], rel=1e-6)
        torch.testing.assert_close(acc.grad, grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("div", OTHERS)
def test_bf16_logits_and_no_grad(div):
    logits, labels, ids, lps, teacher = make_batch(seed=13)
    lo = logits.bfloat16()
    for tail in ("tail", "dense"):
        def loss(x, tail=tail):
            kw = dict(alpha=0.5, temperature=2.0, divergence=div)
            if tail == "dense":
                return dense_distillation_loss(x, teacher.bfloat16(), labels, **kw)
            return distillation_loss(x, labels, ids, lps, tail=tail, **kw)

        v16, g16 = value_and_grad(loss, lo)
        v32, g32 = value_and_grad(loss, lo.float())
        assert g16.dtype == torch.bfloat16
        assert v16 == pytest.approx(v32, rel=1e-5)
        torch.testing.assert_close(g16.float(), g32, rtol=2e-2, atol=1e-4)
        with torch.no_grad():
            assert [float(v) for v in loss(lo.float())] == pytest.approx(v32, rel=1e-6)


@pytest.mark.parametrize("div", OTHERS)
def test_dense_teacher_with_masked_vocab_stays_finite(div):
    logits, labels, _, _, teacher = make_batch(seed=19)
    teacher[..., :5] = -math.inf
    vals, g = value_and_grad(
        lambda x: dense_distillation_loss(x, teacher, labels, alpha=1.0, temperature=2.0, divergence=div), logits
    )
    assert all(math.isfinite(v) for v in vals) and torch.isfinite(g).all()
    if div != "reverse_kl":  # reverse KL is infinite there; the loss floors q at the smallest normal float
        ref = dense_reference(logits, teacher, labels, divergence_name=div, beta=DEFAULT_BETA.get(div), alpha=1.0,
                              temperature=2.0)
        assert vals[2] == pytest.approx(float(ref[2]), rel=1e-5)


# --------------------------------------------------------------------------- the fused lm_head


@pytest.mark.parametrize("div", OTHERS)
def test_fused_linear_matches_unfused(div):
    B, L, H, V = 2, 7, 12, 40
    for tail in (*sparse_modes(div), "dense"):
        for temperature in (1.0, 2.0):
            logits, labels, ids, lps, counts, teacher = sparse_inputs(tail if tail != "dense" else "tail", seed=3)
            g = torch.Generator().manual_seed(7)
            tensors = [(torch.randn(B, L, H, generator=g) * 1.5).double().requires_grad_(True),
                       (torch.randn(V, H, generator=g) * 0.7).double().requires_grad_(True),
                       (torch.randn(V, generator=g) * 0.3).double().requires_grad_(True)]
            kw = dict(alpha=0.6, temperature=temperature, divergence=div, beta=BETA.get(div), chunk_size=5)
            z = tensors[0] @ tensors[1].t() + tensors[2]
            if tail == "dense":
                ref = dense_distillation_loss(z, teacher.double(), labels, **kw)
            else:
                ref = distillation_loss(z, labels, ids, lps, tail=tail, target_counts=counts, **kw)
            ref.total.backward()
            ref_g = [t.grad.clone() for t in tensors]
            for t in tensors:
                t.grad = None
            if tail == "dense":
                ours = fused_linear_dense_distillation_loss(tensors[0], tensors[1], teacher.double(), labels,
                                                            lm_head_bias=tensors[2], **kw)
            else:
                ours = fused_linear_distillation_loss(tensors[0], tensors[1], labels, ids, lps, tail=tail,
                                                      target_counts=counts, lm_head_bias=tensors[2], **kw)
            ours.total.backward()
            for a, b in zip(ours, ref):
                assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-6, abs=1e-9)
            for t, b in zip(tensors, ref_g):
                assert (t.grad - b).abs().max() <= 1e-6 * b.abs().max()


# --------------------------------------------------------------------------- the arguments


def test_beta_defaults_and_user_errors():
    logits, labels, ids, lps, teacher = make_batch(seed=16)
    kw = dict(alpha=0.5, temperature=2.0)
    for div, beta in DEFAULT_BETA.items():
        a = distillation_loss(logits, labels, ids, lps, divergence=div, **kw)
        b = distillation_loss(logits, labels, ids, lps, divergence=div, beta=beta, **kw)
        assert float(a.total) == float(b.total)
    assert float(distillation_loss(logits, labels, ids, lps, divergence="forward_kl", **kw).total) == float(
        distillation_loss(logits, labels, ids, lps, **kw).total)
    with pytest.raises(UserError, match="infinite with tail=renormalize"):
        distillation_loss(logits, labels, ids, lps, divergence="reverse_kl", **kw)
    with pytest.raises(UserError, match="not a divergence"):
        dense_distillation_loss(logits, teacher, labels, divergence="kl", **kw)
    for div, beta in (("jsd", 0.0), ("jsd", 1.0), ("skew_kl", 1.0), ("skew_kl", -0.1)):
        with pytest.raises(UserError, match=r"outside \(0, 1\)"):
            distillation_loss(logits, labels, ids, lps, divergence=div, beta=beta, **kw)
    with pytest.raises(UserError, match="no meaning"):
        distillation_loss(logits, labels, ids, lps, divergence="tvd", beta=0.5, **kw)


# --------------------------------------------------------------------------- config and trainer


def test_config_knows_the_same_divergences():
    import moedistill.config as config

    assert config.DIVERGENCES == DIVERGENCES and set(config.BETA_DIVERGENCES) == set(DEFAULT_BETA)
    cfg = config.load_config("tiny", ["loss.divergence=skew_kl", "loss.beta=0.25"])
    assert (cfg.loss.divergence, cfg.loss.beta) == ("skew_kl", 0.25)
    assert config.load_config("tiny").loss.divergence == "forward_kl"


@pytest.mark.parametrize("overrides, needle", [
    (["loss.divergence=kl"], "loss.divergence='kl' must be one of forward_kl"),
    (["loss.divergence=reverse_kl", "loss.tail=renormalize"], "infinite with loss.tail=renormalize"),
    (["loss.divergence=reverse_kl", "loss.tail=tail", "stages=[{name: a, max_steps: 2, tail: renormalize}]"],
     "infinite with stages[0].tail=renormalize"),
    (["loss.divergence=tvd", "loss.beta=0.5"], "applies only to jsd and skew_kl"),
    (["loss.beta=0.5"], "applies only to jsd and skew_kl, not loss.divergence=forward_kl"),
    (["loss.divergence=jsd", "loss.beta=1"], "must be in (0, 1) for loss.divergence=jsd"),
    (["loss.divergence=skew_kl", "loss.beta=0"], "must be in (0, 1) for loss.divergence=skew_kl"),
])
def test_config_refuses_with_one_line(overrides, needle):
    from moedistill.config import load_config

    with pytest.raises(UserError) as e:
        load_config("tiny", overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_trainer_trains_the_divergence_and_evaluates_kl(tmp_path):
    from test_trainer import make_items, targs, tiny_moe

    from moedistill.config import LossConfig
    from moedistill.losses import teacher_loss
    from moedistill.targets import from_batch
    from moedistill.trainer import DistillationTrainer, collate

    data = make_items(tiny_moe(0), n=4)
    batch = collate([data[i] for i in range(4)])
    student = tiny_moe(1)
    metrics = {}
    for div in ("forward_kl", "jsd"):
        loss = LossConfig(alpha=0.6, temperature=2.0, tail="tail", divergence=div, chunk_size=5)
        trainer = DistillationTrainer(student, targs(tmp_path), train_dataset=data, eval_dataset=data, loss=loss)
        with torch.no_grad():
            total = trainer.compute_loss(student, batch)
            expected = teacher_loss(student(input_ids=batch["input_ids"]).logits, batch["labels"], from_batch(batch),
                                    alpha=0.6, temperature=2.0, tail="tail", divergence=div)
        assert float(total) == pytest.approx(float(expected.total), rel=1e-6)
        metrics[div] = trainer.evaluate()
    assert metrics["jsd"]["eval_loss"] != pytest.approx(metrics["forward_kl"]["eval_loss"], rel=1e-3)
    for key in ("eval_ce", "eval_kl_lower_bound"):  # the metric is KL at T = 1 whatever is trained
        assert metrics["jsd"][key] == pytest.approx(metrics["forward_kl"][key], rel=1e-6)
