"""Budgeted rank allocation (``compress.rank_allocation``): the same parameters as a uniform rank,
spread over layers and experts; per-expert ranks in the model, saved, loaded and exported.

References: an exhaustive search over every allocation of a small budget; hand-computed
proportional ranks; the dense per-expert weights ``C + B_e[:, :r_e] A_e[:r_e]`` built from the
factors computed at the cap; the uniform student's parameter count."""

from __future__ import annotations

import itertools
import json

import pytest
import test_compression as tc
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import moedistill.compression as mc
from moedistill.compression import modeling_moedistill as mm
from moedistill.compression.export import export_checkpoint
from moedistill.compression.init import (
    allocate_ranks,
    allocation_cap,
    collect_calibration_stats,
    compute_factors,
    full_rank,
    layer_spectrum,
    rank_gains,
)
from moedistill.compression.modeling_moedistill import PROJECTIONS, CompressedExperts, count_parameters, find_moe_blocks
from moedistill.errors import UserError

one_thread = tc.one_thread  # its fixture: one intra-op thread for these tiny matmuls
H, I, E, V = tc.H, tc.I, tc.E, tc.V


@pytest.fixture(scope="module")
def teacher():
    return tc._teacher("qwen3_moe")  # test_compression's small Qwen3-MoE: 2 layers, 4 experts, full rank 16


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, V, (8, 24), generator=torch.Generator().manual_seed(3))


X = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(7))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=X).logits


def test_allocation_is_the_best_choice_of_the_budget():
    """The chosen ranks maximise the total gain over every allocation with the same number of
    components (exhaustive search), for gains non-increasing within each expert."""
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        gains = torch.rand(2, 3, 4, generator=g, dtype=torch.float64).sort(-1, descending=True).values
        if trial == 0:
            gains[0, 0] = gains[1, 2] = 0.5  # ties: deterministic, still optimal
        for rank in (1, 2, 3):
            ranks = allocate_ranks(gains, rank)
            assert sum(map(sum, ranks)) == 2 * 3 * rank

            def value(alloc):
                return sum(float(gains[l, e, :r].sum()) for l, row in enumerate(alloc) for e, r in enumerate(row))

            best = max(value([c[:3], c[3:]]) for c in itertools.product(range(5), repeat=6) if sum(c) == 6 * rank)
            assert value(ranks) == pytest.approx(best, rel=1e-12)
            assert allocate_ranks(gains, rank) == ranks


def test_frequency_ranks_are_proportional_to_routing_frequency():
    # layer 0: shares 3/4 and 1/4 -> 3 and 1 of 4 components; layer 1: 1/2 each -> 2 and 2
    counts = [torch.tensor([30, 10]), torch.tensor([7, 7])]
    assert allocate_ranks(rank_gains("frequency", counts, cap=8), 2) == [[3, 1], [2, 2]]
    # an expert never routed to gets nothing; the cap bounds the busiest
    assert allocate_ranks(rank_gains("frequency", [torch.tensor([9, 0, 1])], cap=2), 1) == [[2, 0, 1]]


@pytest.mark.parametrize("grouped", [True, False])
def test_per_expert_ranks_equal_dense_reference_and_padding_stays_zero(grouped, monkeypatch):
    """Forward equals the dense experts C + B_e[:, :r_e] A_e[:r_e]; the padding's gradients are exactly
    zero, and after AdamW steps with weight decay the padding is still exactly zero."""
    monkeypatch.setattr(mm, "USE_GROUPED_MM", grouped)
    torch.manual_seed(1)
    ranks = [0, 1, 3, 5]
    ex = CompressedExperts(E, H, I, 5, expert_ranks=ranks)
    with torch.no_grad():
        for p in PROJECTIONS:
            for t in ex.wrapper(p):
                t.normal_(std=0.3)
    ex.zero_padding()
    assert ex.num_parameters() == 3 * H * I + 3 * (H + I) * sum(ranks)
    assert ex.num_parameters() < sum(p.numel() for p in ex.parameters())
    T, k = 12, 2
    x = torch.randn(T, H)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w = torch.rand(T, k)

    def reference():
        out = torch.zeros(T, H, dtype=torch.float64)
        for t in range(T):
            for j in range(k):
                e, r = int(idx[t, j]), ranks[int(idx[t, j])]
                W = {p: (ex.core(p) + ex.wrapper(p)[0][e, :, :r] @ ex.wrapper(p)[1][e, :r]).double()
                     for p in PROJECTIONS}
                xt = x[t].double()
                h = F.silu(W["gate"] @ xt) * (W["up"] @ xt)
                out[t] += w[t, j].double() * (W["down"] @ h)
        return out

    opt = torch.optim.AdamW(ex.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        y = ex(x, idx, w)
        assert (y.double() - reference()).abs().max() <= 1e-5 * reference().abs().max()
        opt.zero_grad()
        y.square().sum().backward()
        for e, r in enumerate(ranks):
            for p in PROJECTIONS:
                B, A = ex.wrapper(p)
                assert torch.count_nonzero(B.grad[e, :, r:]) == 0 and torch.count_nonzero(A.grad[e, r:]) == 0
                if step == 0 and 0 < r and e in idx:
                    assert torch.count_nonzero(A.grad[e, :r]) > 0
        opt.step()
        for e, r in enumerate(ranks):
            for p in PROJECTIONS:
                B, A = ex.wrapper(p)
                assert torch.count_nonzero(B[e, :, r:]) == 0 and torch.count_nonzero(A[e, r:]) == 0


def test_per_expert_ranks_refused_when_inconsistent():
    with pytest.raises(ValueError, match="must be 4 ranks"):
        CompressedExperts(E, H, I, 2, expert_ranks=[1, 2])
    with pytest.raises(ValueError, match="must be max"):
        CompressedExperts(E, H, I, 3, expert_ranks=[1, 2, 2, 2])
    assert CompressedExperts(E, H, I, 2, expert_ranks=[2] * E).expert_ranks is None  # uniform after all


@pytest.mark.parametrize("mode", ["frequency", "frequency_energy"])
def test_allocated_checkpoint_0_same_parameters_factors_save_load_export(mode, teacher, calib, tmp_path):
    rank = 3
    uniform = mc.compress_model(teacher, rank=rank, core="frequency", svd="activation", calibration=calib)
    student = mc.compress_model(teacher, rank=rank, core="frequency", svd="activation", calibration=calib,
                                rank_allocation=mode)
    ranks = student.config.compression["ranks"]
    assert student.config.compression["rank_allocation"] == mode and student.config.compression["rank"] == rank
    assert sum(map(sum, ranks)) == 2 * E * rank and len({r for row in ranks for r in row}) > 1
    assert count_parameters(student) == count_parameters(uniform)
    cap = allocation_cap(rank, full_rank(teacher))
    assert max(map(max, ranks)) <= cap
    # each expert is the factors at the cap truncated to its own rank
    stats = collect_calibration_stats(teacher, calib)
    factors = compute_factors(teacher, max_rank=cap, core="frequency", svd="activation", stats=stats)
    for l, (_, block) in enumerate(find_moe_blocks(student)):
        ex = block.experts
        for e in range(E):
            r = ranks[l][e]
            for p in PROJECTIONS:
                want = factors[l].core[p] + factors[l].B[p][e, :, :r] @ factors[l].A[p][e, :r]
                torch.testing.assert_close(ex.dense_weight(p, e), want, rtol=1e-5, atol=1e-6)
    if mode == "frequency_energy":  # greedy on the spectrum keeps at least the uniform ranks' energy
        gains = rank_gains(mode, stats.counts, [layer_spectrum(f, cap) for f in factors], cap=cap)
        kept = sum(float(gains[l, e, :r].sum()) for l, row in enumerate(ranks) for e, r in enumerate(row))
        assert kept >= float(gains[:, :, :rank].sum())
    ckpt, out = tmp_path / "ckpt", tmp_path / "export"
    student.save_pretrained(ckpt)
    assert json.loads((ckpt / "config.json").read_text())["compression"]["ranks"] == ranks
    loaded = AutoModelForCausalLM.from_pretrained(ckpt)
    assert [b.experts.expert_ranks for _, b in find_moe_blocks(loaded)] == [
        None if len(set(r)) == 1 else tuple(r) for r in ranks]
    ref = _logits(student)
    assert torch.equal(_logits(loaded), ref)
    export_checkpoint(ckpt, out)
    dense = AutoModelForCausalLM.from_pretrained(out)
    assert type(dense) is Qwen3MoeForCausalLM
    assert float((_logits(dense) - ref).norm() / ref.norm()) <= 1e-5


def test_rank_allocation_user_errors(teacher):
    with pytest.raises(UserError, match="needs calibration data"):
        mc.compress_model(teacher, rank=2, rank_allocation="frequency")
    with pytest.raises(UserError, match="must be one of uniform, frequency, frequency_energy"):
        mc.compress_model(teacher, rank=2, rank_allocation="energy", calibration=X)


def test_compress_command_allocates_reports_the_ranks_and_keys_the_settings(teacher, tmp_path, monkeypatch):
    """`moedistill compress compress.rank_allocation=frequency_energy`: checkpoint-0 with per-expert ranks
    at the uniform rank's parameters, the ranks in report.md / report.json, a settings hash of its own
    (the uniform checkpoint-0 of the same directory is not reused for it)."""
    from moedistill.commands import compress as ck
    from moedistill.config import load_config
    from moedistill.models import TINY_TEACHER, load_tokenizer

    tok = load_tokenizer(str(TINY_TEACHER))
    teacher_dir = tmp_path / "teacher"
    torch.manual_seed(0)
    big = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**teacher.config.to_dict(), "vocab_size": len(tok)})).eval()
    big.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    monkeypatch.setattr(ck, "REPORT_SEQUENCES", 4)
    over = [f"output_dir={tmp_path / 'run'}", f"teacher.name={teacher_dir}", "data.seq_len=32", "data.max_samples=200",
            "compress.rank=2", "compress.calibration_sequences=4", "compress.report_ranks=[2]", "eval.batch_size=4"]
    uniform = ck.compress_from_config(load_config("tiny", [*over, "compress.rank_allocation=uniform"]))
    h_uniform = json.loads((uniform / "config.json").read_text())["compression"]["settings_hash"]
    ckpt = ck.compress_from_config(load_config("tiny", [*over, "compress.rank_allocation=frequency_energy"]))
    comp = json.loads((ckpt / "config.json").read_text())["compression"]
    assert comp["settings_hash"] != h_uniform and comp["rank_allocation"] == "frequency_energy"
    assert sum(map(sum, comp["ranks"])) == 2 * E * 2
    report = json.loads((ckpt.parent / "report.json").read_text())
    assert report["checkpoint_0"]["ranks"] == comp["ranks"]
    md = (ckpt.parent / "report.md").read_text()
    assert "Ranks allocated by `frequency_energy` within the parameters of rank 2" in md
    assert "the same variant at uniform rank 2: perplexity" in md
    assert "Per-expert ranks: the errors on the weights only" in md
    student = AutoModelForCausalLM.from_pretrained(ckpt)
    assert count_parameters(student) == 3 * H * I * 2 + 3 * (H + I) * 2 * E * 2 + sum(
        p.numel() for n, p in student.named_parameters() if ".experts." not in n)
