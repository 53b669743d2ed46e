"""Evaluation metrics against independent computations."""

import gc
import math
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moedistill.errors import UserError
from moedistill.evaluate import evaluate_model, evaluate_models
from moedistill.losses import position_stats
from moedistill.targets import TopKTargets


def _small_moe(seed=0, vocab=64):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    return Qwen3MoeForCausalLM(cfg).eval()


def test_perplexity_matches_hf_loss_and_self_kl_is_zero():
    model = _small_moe()
    x = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=x, labels=x).loss.item()  # HF shifts internally
    m = evaluate_model(model, x.numpy(), teacher=model, batch_size=2)
    assert math.isclose(m["ce"], ref, rel_tol=1e-5)
    assert math.isclose(m["perplexity"], math.exp(ref), rel_tol=1e-5)
    assert abs(m["kl_exact"]) < 1e-6 and m["agreement"] == 1.0
    assert m["tokens"] == 3 * 15
    # expert load: one distribution per layer, summing to 1
    assert len(m["expert_load"]) == 2
    for frac in m["expert_load"].values():
        assert math.isclose(sum(frac), 1.0, rel_tol=1e-9) and len(frac) == 4


def test_kl_against_other_model_matches_dense_reference():
    a, b = _small_moe(0), _small_moe(1)
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    m = evaluate_model(a, x.numpy(), teacher=b)
    with torch.no_grad():
        t = F.log_softmax(b(input_ids=x).logits.double(), -1)[:, :-1]
        s = F.log_softmax(a(input_ids=x).logits.double(), -1)[:, :-1]
    ref = (t.exp() * (t - s)).sum(-1).mean().item()
    assert math.isclose(m["kl_exact"], ref, rel_tol=1e-4)
    agree = (t.argmax(-1) == s.argmax(-1)).double().mean().item()
    assert math.isclose(m["agreement"], agree)


def test_sparse_kl_with_all_ids_equals_full_kl_and_is_lower_bound_for_topk():
    g = torch.Generator().manual_seed(0)
    t = F.log_softmax(torch.randn(5, 50, generator=g) * 2, -1)
    z = torch.randn(5, 50, generator=g) * 2
    s = F.log_softmax(z, -1)
    full = (t.exp() * (t - s)).sum(-1)
    labels = torch.zeros(5, dtype=torch.long)
    ids = torch.arange(50).expand(5, 50)
    torch.testing.assert_close(position_stats(z, labels, TopKTargets(ids, t)).kl, full, atol=1e-5, rtol=1e-5)
    top_lp, top_ids = t.topk(8, -1)
    part = position_stats(z, labels, TopKTargets(top_ids, top_lp)).kl
    assert torch.all(part <= full + 1e-6) and torch.all(part >= 0)


def test_kls_at_qwen3_vocabulary_match_float64():
    # At V = 151,936 an fp32 softmax sums to 1 only to ~1e-5: a KL written as sum q (log q - z) +
    # logsumexp(z) was off by 3e-4 per position here (bf16 logits of spread 5), and the top-k bound
    # by -1e-5 on average until the student's coarsened masses were divided by their sum
    from moedistill.targets import DenseTargets

    g = torch.Generator().manual_seed(7)
    t = (torch.randn(16, 151_936, generator=g) * 5).bfloat16()
    s = (t.float() + torch.randn(16, 151_936, generator=g) * 0.5).bfloat16()
    labels = torch.zeros(16, dtype=torch.long)
    tl, sl = F.log_softmax(t.double(), -1), F.log_softmax(s.double(), -1)
    got = position_stats(s, labels, DenseTargets(t)).kl.double()
    ref = (tl.exp() * (tl - sl)).sum(-1)
    assert (got - ref).abs().max() < 2e-5, (got - ref).abs().max()
    lp, ids = tl.topk(64, -1)
    got = position_stats(s, labels, TopKTargets(ids, lp.float())).kl.double()
    s_k, q_rest = sl.gather(1, ids), 1 - lp.exp().sum(-1)
    ref = (lp.exp() * (lp - s_k)).sum(-1) + q_rest * (q_rest.log() - (1 - s_k.exp().sum(-1)).log())
    assert (got - ref).mean().abs() < 2e-6 and (got - ref).abs().max() < 1e-5, (got - ref)


class _LogitsOnly(torch.nn.Module):
    """A model whose output layer evaluation cannot see: it takes the logits path."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, **kw):
        return self.model(input_ids=input_ids, **kw)


def _reference(student, x, ece_bins, teacher=None, k=None):
    """Every metric from full float64 log-softmaxes (the pre-chunking definition, written plainly)."""
    with torch.no_grad():
        s = F.log_softmax(student(input_ids=x).logits.double(), -1)[:, :-1].reshape(-1, 64)
        t = F.log_softmax(teacher(input_ids=x).logits.double(), -1)[:, :-1].reshape(-1, 64)
    y = x[:, 1:].reshape(-1)
    conf, pred = s.max(-1)
    conf = conf.exp()
    bins = (conf * ece_bins).long().clamp(max=ece_bins - 1)
    ece = sum(abs(((pred == y) & (bins == b)).sum().item() - conf[bins == b].sum().item())
              for b in range(ece_bins)) / len(y)
    out = {"ce": -s.gather(1, y[:, None]).mean().item(), "ece": ece, "tokens": len(y)}
    if k is None:
        out["kl_exact"] = (t.exp() * (t - s)).sum(-1).mean().item()
        out["agreement"] = (t.argmax(-1) == pred).double().mean().item()
    else:  # coarsened to the top-k ids + one bucket
        lp, ids = t.topk(k, -1)
        s_k = s.gather(1, ids)
        q_rest, p_rest = 1 - lp.exp().sum(-1), 1 - s_k.exp().sum(-1)
        kl = (lp.exp() * (lp - s_k)).sum(-1) + q_rest * (q_rest.log() - p_rest.log())
        out["kl_lower_bound"] = kl.mean().item()
        out["agreement"] = (ids[:, 0] == pred).double().mean().item()
    out["perplexity"] = math.exp(out["ce"])
    return out, (t[:, :k] if k else None)


@pytest.mark.parametrize("fused", [True, False])
def test_metrics_equal_a_float64_reference_online_and_from_topk_targets(fused):
    student, teacher = _small_moe(0), _small_moe(1)
    x = torch.randint(0, 64, (5, 12), generator=torch.Generator().manual_seed(5))
    wrap = (lambda m: m) if fused else _LogitsOnly
    ref, _ = _reference(student, x, 7, teacher=teacher)
    # chunk_size 7: chunks cross the blocks' boundaries and skip their uncounted last positions
    got = evaluate_model(wrap(student), x.numpy(), teacher=wrap(teacher), batch_size=2, ece_bins=7, chunk_size=7)
    for key, value in ref.items():
        assert math.isclose(got[key], value, rel_tol=1e-5, abs_tol=1e-6), (key, got[key], value)
    with torch.no_grad():
        t = F.log_softmax(teacher(input_ids=x).logits, -1)
    lp, ids = t.topk(6, -1)
    items = [{"target_ids": ids[i], "target_logprobs": lp[i]} for i in range(len(x))]
    ref, _ = _reference(student, x, 7, teacher=teacher, k=6)
    got = evaluate_model(wrap(student), x.numpy(), teacher_targets=items, batch_size=3, ece_bins=7, chunk_size=7)
    for key, value in ref.items():
        assert math.isclose(got[key], value, rel_tol=1e-5, abs_tol=1e-6), (key, got[key], value)


def test_models_are_loaded_one_at_a_time_and_the_teacher_runs_once(tmp_path):
    x = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(6)).numpy()
    calls, alive = [], []

    def loader(seed):
        def load():
            gc.collect()
            calls.append(seed)
            assert all(r() is None for r in alive), "an earlier model is still in memory"
            held = list(tmp_path.glob("moedistill-eval-*/*"))
            if seed != 9:  # the teacher's final hidden states, one file per batch: H, not V, per position
                assert len(held) == 2 and sum(f.stat().st_size for f in held) < 4 * 10 * 32 * 4 + 4096
            m = _small_moe(seed)
            alive.append(weakref.ref(m))
            return m
        return load

    teacher = loader(9)
    got = evaluate_models({"a": loader(0), "teacher": teacher, "b": loader(1)}, x, teacher=teacher, batch_size=3,
                          work_dir=tmp_path)
    assert calls == [9, 0, 1] and list(got) == ["a", "teacher", "b"]
    assert not list(tmp_path.iterdir())  # the teacher's outputs are removed afterwards
    t = _small_moe(9)
    assert abs(got["teacher"]["kl_exact"]) < 1e-6 and got["teacher"]["agreement"] == 1.0
    for name, seed in (("a", 0), ("b", 1)):
        single = evaluate_model(_small_moe(seed), x, teacher=t, batch_size=3)
        for key in ("perplexity", "kl_exact", "agreement", "ece", "expert_load", "parameters"):
            assert got[name][key] == single[key], key


def test_ece_by_hand():
    # A model that always puts probability p on token 0 of a 2-token vocabulary.
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, **kw):
            logit = math.log(0.8 / 0.2)
            z = torch.zeros(*input_ids.shape, 2)
            z[..., 0] = logit
            return type("O", (), {"logits": z})()

    x = np.array([[0, 0, 1, 0, 1]])  # labels: 0 1 0 1 -> accuracy 0.5 at confidence 0.8
    m = evaluate_model(Fixed(), x, ece_bins=10)
    assert math.isclose(m["ece"], 0.3, rel_tol=1e-6)


def test_damaged_weights_are_an_error_not_an_infinite_perplexity():
    model = _small_moe()
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # e.g. a corrupted final/ that still loads
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(4)).numpy()
    with pytest.raises(UserError, match="gives non-finite log-probabilities"):
        evaluate_model(model, x, teacher=_small_moe(1))
