"""Evaluation metrics against independent computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moedistill.errors import UserError
from moedistill.evaluate import _kl_sparse, evaluate_model
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
    s = F.log_softmax(torch.randn(5, 50, generator=g) * 2, -1)
    full = (t.exp() * (t - s)).sum(-1)
    ids = torch.arange(50).expand(5, 50)
    torch.testing.assert_close(_kl_sparse(TopKTargets(ids, t), s), full, atol=1e-5, rtol=1e-5)
    top_lp, top_ids = t.topk(8, -1)
    part = _kl_sparse(TopKTargets(top_ids, top_lp), s)
    assert torch.all(part <= full + 1e-6) and torch.all(part >= 0)


def test_ece_by_hand():
    # A model that always puts probability p on token 0 of a 2-token vocabulary.
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            logit = math.log(0.8 / 0.2)
            z = torch.zeros(*input_ids.shape, 2)
            z[..., 0] = logit
            return type("O", (), {"logits": z})()

    x = np.array([[0, 0, 1, 0, 1]])  # labels: 0 1 0 1 -> accuracy 0.5 at confidence 0.8
    m = evaluate_model(Fixed(), x, ece_bins=10)
    assert math.isclose(m["ece"], 0.3, rel_tol=1e-6)


def test_evaluating_models_together_equals_one_at_a_time():
    from moedistill.evaluate import evaluate_models

    a, b, t = _small_moe(0), _small_moe(1), _small_moe(2)
    x = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(3)).numpy()
    both = evaluate_models({"a": a, "b": b}, x, teacher=t, batch_size=3)
    for name, m in (("a", a), ("b", b)):
        single = evaluate_model(m, x, teacher=t, batch_size=3)
        for key in ("perplexity", "kl_exact", "agreement", "ece"):
            assert math.isclose(both[name][key], single[key], rel_tol=1e-9), key


def test_damaged_weights_are_an_error_not_an_infinite_perplexity():
    model = _small_moe()
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # e.g. a corrupted final/ that still loads
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(4)).numpy()
    with pytest.raises(UserError, match="gives non-finite log-probabilities"):
        evaluate_model(model, x, teacher=_small_moe(1))
