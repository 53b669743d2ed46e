"""Compressed experts: forward vs a dense reference, zero-shot init, save/load, export, report.

Most tests use small random-init Qwen3-MoE / Mixtral models (seconds); one uses the
embedded tiny teacher.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import moedistill.compression as mc
from moedistill.compression.export import export_checkpoint
from moedistill.compression.init import (
    collect_calibration_stats,
    compute_factors,
    rank_for_ratio,
    teacher_expert_weights,
)
from moedistill.compression.modeling_moedistill import CompressedExperts, find_moe_blocks
from moedistill.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CORE_RULE, WRAPPER_RULE = ".*shared_core.*", ".*wrapper.*"  # default.yaml's parameter-group regexes
H, I, E, V = 32, 16, 4, 96  # hidden, expert intermediate, experts, vocab: full rank = 16


def _teacher(arch: str = "qwen3_moe", seed: int = 0, vocab: int = V):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, num_experts_per_tok=2, initializer_range=0.1)
    if arch == "qwen3_moe":
        cfg = Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=I, num_experts=E,
                             norm_topk_prob=True, tie_word_embeddings=True)
        return Qwen3MoeForCausalLM(cfg).eval()
    cfg = MixtralConfig(**common, intermediate_size=I, num_local_experts=E, tie_word_embeddings=False)
    return MixtralForCausalLM(cfg).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on 2 shared cores: a second intra-op thread only waits (10x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def qwen():
    return _teacher("qwen3_moe")


@pytest.fixture(scope="module")
def mixtral():
    return _teacher("mixtral", seed=1)


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, V, (6, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def stats(qwen, calib):
    return collect_calibration_stats(qwen, calib)


X = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(7))


def _logits(model, x=X, **kw):
    with torch.no_grad():
        return model(input_ids=x, **kw)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


# --------------------------------------------------------------------------- the module


@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_equals_dense_experts_reference(rank, dtype):
    """C x + B_i (A_i x) per routed token == the original module run on W_i = C + B_i A_i."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    torch.manual_seed(0)
    ex = CompressedExperts(E, H, I, rank).to(dtype)
    with torch.no_grad():
        for p in ("gate", "up", "down"):
            ex.wrapper(p)[0].normal_()  # B is zero after reset; make the wrappers matter
    ref = Qwen3MoeExperts(Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E)).to(dtype)
    ref.config._experts_implementation = "eager"
    with torch.no_grad():
        ref.gate_up_proj.copy_(torch.cat([ex.dense_weight("gate"), ex.dense_weight("up")], dim=1))
        ref.down_proj.copy_(ex.dense_weight("down"))
    x = torch.randn(9, H, dtype=dtype)
    idx = torch.stack([torch.randperm(E)[:2] for _ in range(9)])
    idx[0, 1] = E  # the "no expert" sentinel of expert parallelism is skipped by both
    w = torch.rand(9, 2, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert _rel(ex(x, idx, w), ref(x, idx, w)) < tol


@pytest.mark.parametrize("rank,E,H,I,n,k", [(0, E, H, I, 11, 2), (3, E, H, I, 11, 2), (5, 64, 64, 32, 80, 4)])
def test_gradients_equal_a_per_token_dense_reference(rank, E, H, I, n, k):
    """Gradients w.r.t. every factor, the inputs and the routing weights, in float64, against
    W_e = C + B_e A_e applied token by token (an expert left without tokens and the sentinel
    index included): the grouped forward's sort, segments and scatter-add change nothing.
    The 64-expert case (hidden 64): many segments, most experts with a few tokens, some empty."""
    torch.manual_seed(1)
    ex = CompressedExperts(E, H, I, rank).double()
    with torch.no_grad():
        for p in ("gate", "up", "down"):
            ex.wrapper(p)[0].normal_()
    x = torch.randn(n, H, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(E - 1)[:k] for _ in range(n)])  # expert E-1 gets no token
    idx[0, 1] = E
    w = torch.rand(n, k, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(n, H, dtype=torch.float64)
    (ex(x, idx, w) * probe).sum().backward()
    got = {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for name, p in ex.named_parameters()}
    got |= {"x": x.grad.clone(), "w": w.grad.clone()}
    ex.zero_grad(set_to_none=True)
    x.grad = w.grad = None
    dense = {p: ex.core(p) + ex.wrapper(p)[0] @ ex.wrapper(p)[1] for p in ("gate", "up", "down")}  # [E, out, in]
    rows = []
    for t in range(n):
        y = torch.zeros(H, dtype=torch.float64)
        for j in range(k):
            e = int(idx[t, j])
            if e == E:
                continue
            h = F.silu(dense["gate"][e] @ x[t]) * (dense["up"][e] @ x[t])
            y = y + w[t, j] * (dense["down"][e] @ h)
        rows.append(y)
    out_ref = torch.stack(rows)
    torch.testing.assert_close(ex(x, idx, w), out_ref, rtol=1e-12, atol=1e-12)
    (out_ref * probe).sum().backward()
    want = {name: (p.grad if p.grad is not None else torch.zeros_like(p)) for name, p in ex.named_parameters()}
    want |= {"x": x.grad, "w": w.grad}
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10, msg=name)
    if rank:
        assert bool((got["wrapper_gate_A"][E - 1] == 0).all())  # the expert without tokens: no gradient


def test_many_experts_float32_forward_backward_equals_per_expert_reference():
    """64 experts, hidden 64, float32 (the training dtype): output and gradients of the grouped
    forward against a plain loop over experts on the dense W_e, within 1e-5 (relative)."""
    torch.manual_seed(2)
    E, H, I, r, n, k = 64, 64, 32, 8, 256, 8
    ex = CompressedExperts(E, H, I, r)
    with torch.no_grad():
        for p in ("gate", "up", "down"):
            ex.wrapper(p)[0].normal_(std=0.1)
    x = torch.randn(n, H, requires_grad=True)
    w, idx = torch.softmax(torch.randn(n, E), -1).topk(k, -1)
    w = (w / w.sum(-1, keepdim=True)).requires_grad_()

    def per_expert(ex, x, w):
        dense = {p: ex.core(p) + ex.wrapper(p)[0] @ ex.wrapper(p)[1] for p in ("gate", "up", "down")}
        y = torch.zeros_like(x)
        for e in range(E):
            tok, pos = torch.where(idx == e)
            if len(tok):
                h = F.silu(x[tok] @ dense["gate"][e].T) * (x[tok] @ dense["up"][e].T)
                y = y.index_add(0, tok, w[tok, pos, None] * (h @ dense["down"][e].T))
        return y

    results = []
    for fn in (lambda: ex(x, idx, w), lambda: per_expert(ex, x, w)):
        ex.zero_grad(set_to_none=True)
        x.grad = w.grad = None
        y = fn()
        y.square().sum().backward()
        results.append((y.detach(), {n_: p.grad.clone() for n_, p in ex.named_parameters()} | {"x": x.grad.clone(),
                                                                                                 "w": w.grad.clone()}))
    (y, g), (y_ref, g_ref) = results
    assert _rel(y, y_ref) < 1e-5
    for name in g_ref:
        assert _rel(g[name], g_ref[name]) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_engine_equals_the_per_expert_loop(dtype, monkeypatch):
    """_GroupedLowRank's two engines: torch's grouped matmul (fp32/bf16 on the CPU) against the
    per-expert loop (the previous implementation, still the fallback): outputs and the gradients of
    x, every factor and the routing weights, within 1e-5 in fp32 (bf16: its rounding). Ranks not a
    multiple of 16 bytes (B's products per expert on views, t padded), a factor in unaligned storage
    (copied column-major: the layout its transpose needs), experts without tokens, a padding index
    (= num_experts), and one projection whose factors need no gradient."""
    from moedistill.compression import modeling_moedistill as mm

    if not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no F.grouped_mm")
    E, H, I, n, k = 12, 32, 24, 40, 3
    for r in (5, 8, 1):
        torch.manual_seed(r)
        ex = CompressedExperts(E, H, I, r).to(dtype)
        with torch.no_grad():
            for p in ("gate", "up", "down"):
                ex.wrapper(p)[0].normal_(std=0.3)
        ex.wrapper_up_A.requires_grad_(r != 8)  # once: A's gradient not needed
        if r == 5:  # a factor whose storage is not 16-byte aligned, as a memory-mapped checkpoint gives
            a = ex.wrapper_gate_A
            buf = torch.empty(a.numel() + 1, dtype=dtype)
            buf[1:].copy_(a.detach().reshape(-1))
            a.data = buf[1:].view(a.shape)
            assert a.data_ptr() % 16 != 0
        x0 = torch.randn(n, H, dtype=dtype)
        logits = torch.randn(n, E)
        logits[:, [2, 7]] = -1e9  # experts 2 and 7 get no token
        w0, idx = torch.softmax(logits, -1).topk(k, -1)
        idx[::5, -1] = E  # expert-parallel padding: skipped
        w0 = (w0 / w0.sum(-1, keepdim=True)).to(dtype)
        probe = torch.randn(n, H, dtype=dtype)
        got = {}
        for grouped in (True, False):
            monkeypatch.setattr(mm, "USE_GROUPED_MM", grouped)
            ex.zero_grad(set_to_none=True)
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            y = ex(x, idx, w)
            (y.float() * probe.float()).sum().backward()
            got[grouped] = {"y": y.detach(), "x": x.grad, "w": w.grad} | {
                name: p.grad for name, p in ex.named_parameters() if p.grad is not None}
        assert got[True].keys() == got[False].keys() and ("wrapper_up_A" in got[True]) == (r != 8)
        for name, ref in got[False].items():
            assert got[True][name].dtype == ref.dtype and got[True][name].is_contiguous(), name
            if dtype == torch.float32:
                assert _rel(got[True][name], ref) < 1e-5, (r, name)
            else:
                torch.testing.assert_close(got[True][name], ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()),
                                           msg=f"{r} {name}")
        assert bool((got[True]["wrapper_gate_A"][[2, 7]] == 0).all())


def test_grouped_mm_engine_equals_the_per_expert_loop_under_bf16_autocast(monkeypatch):
    """float32 factors under CPU bf16 autocast (the products in bf16, the B products per expert into
    preallocated rows): both engines give the same output and gradients, the factors' gradients in
    float32, to bf16 rounding; an odd rank (135-like: rows not a multiple of 16 bytes)."""
    from moedistill.compression import modeling_moedistill as mm

    if not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no F.grouped_mm")
    E, H, I, r, n, k = 6, 32, 16, 7, 30, 2
    torch.manual_seed(4)
    ex = CompressedExperts(E, H, I, r)
    with torch.no_grad():
        for p in ("gate", "up", "down"):
            ex.wrapper(p)[0].normal_(std=0.3)
    x0 = torch.randn(n, H)
    logits = torch.randn(n, E)
    logits[:, 3] = -1e9  # expert 3 gets no token
    w, idx = torch.softmax(logits, -1).topk(k, -1)
    got = {}
    for grouped in (True, False):
        monkeypatch.setattr(mm, "USE_GROUPED_MM", grouped)
        ex.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ex(x, idx, w)
        y.float().square().sum().backward()
        got[grouped] = {"y": y.detach().float(), "x": x.grad} | {name: p.grad for name, p in ex.named_parameters()}
    for name, ref in got[False].items():
        g = got[True][name]
        assert g.dtype == ref.dtype and (name in ("y",) or g.dtype == torch.float32), name
        torch.testing.assert_close(g, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()), msg=name)
    assert bool((got[True]["wrapper_gate_A"][3] == 0).all()) and bool((got[True]["wrapper_down_B"][3] == 0).all())


def test_grouped_mm_engine_is_used_and_skipped_where_it_cannot_run(monkeypatch):
    """fp32/bf16 with 16-byte rows use grouped_mm; float64 (the per-token reference tests), rows not a
    multiple of 16 bytes (bf16 with in=12) and no routed row at all take the loop, with equal results."""

    if not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no F.grouped_mm")
    calls = []
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for dtype, H, uses in ((torch.float32, 16, True), (torch.float64, 16, False), (torch.bfloat16, 12, False)):
        calls.clear()
        ex = CompressedExperts(4, H, 8, 3).to(dtype)
        x = torch.randn(6, H, dtype=dtype, requires_grad=True)
        ex(x, torch.randint(0, 4, (6, 2)), torch.rand(6, 2, dtype=dtype)).sum().backward()
        assert bool(calls) == uses, (dtype, H)
    calls.clear()
    ex = CompressedExperts(4, 16, 8, 3)
    x = torch.randn(6, 16, requires_grad=True)
    y = ex(x, torch.full((6, 2), 4), torch.rand(6, 2))  # every pair is padding
    y.sum().backward()
    assert not calls and bool((y == 0).all()) and bool((ex.wrapper_gate_A.grad == 0).all())


def test_compressed_parameter_names_and_default_yaml_regexes(qwen):
    student = mc.compress_model(qwen, rank=4)
    names = [n for n, _ in student.named_parameters()]
    core = {n for n in names if re.search(CORE_RULE, n)}
    wrapper = {n for n in names if re.search(WRAPPER_RULE, n)}
    expected_core = {f"model.layers.{l}.mlp.experts.shared_core_{p}" for l in range(2) for p in ("gate", "up", "down")}
    expected_wrapper = {
        f"model.layers.{l}.mlp.experts.wrapper_{p}_{f}" for l in range(2) for p in ("gate", "up", "down") for f in "AB"
    }
    assert core == expected_core and wrapper == expected_wrapper
    # nothing else lives in the experts; the router keeps its name
    assert {n for n in names if ".experts." in n} == core | wrapper
    assert "model.layers.0.mlp.gate.weight" in names


# --------------------------------------------------------------------------- zero-shot init


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("core,svd", [("mean", "plain"), ("frequency", "activation")])
def test_full_rank_student_equals_teacher(arch, core, svd, qwen, mixtral, calib):
    teacher = qwen if arch == "qwen3_moe" else mixtral
    student = mc.compress_model(teacher, rank=I, core=core, svd=svd, calibration=calib)
    assert type(student).__name__.startswith("Moedistill")
    assert _rel(_logits(student).logits, _logits(teacher).logits) <= 1e-5


def test_rank_zero_every_expert_is_the_core(qwen, stats):
    for core in ("mean", "frequency"):
        student = mc.compress_model(qwen, rank=0, core=core, calibration=stats)
        for _, block in find_moe_blocks(student):
            for p in ("gate", "up", "down"):
                dense = block.experts.dense_weight(p)
                assert torch.equal(dense, block.experts.core(p).expand_as(dense))


def test_cores_are_mean_and_routing_frequency_weighted_mean(qwen, calib, stats):
    # reference counts: the router's top-k choices, recounted independently of the hooks
    routers = [b.gate for _, b in find_moe_blocks(qwen)]
    ref = [torch.zeros(E, dtype=torch.float64) for _ in routers]

    def count(l):
        def hook(module, inputs, out):
            ref[l] += torch.bincount(out[2].reshape(-1), minlength=E).double()

        return hook

    handles = [r.register_forward_hook(count(l)) for l, r in enumerate(routers)]
    _logits(qwen, calib)
    for h in handles:
        h.remove()
    for l in range(len(routers)):
        assert torch.equal(stats.counts[l], ref[l]) and stats.counts[l].sum() == 2 * calib.numel()
    f_mean = compute_factors(qwen, max_rank=1, core="mean")
    f_freq = compute_factors(qwen, max_rank=1, core="frequency", stats=stats)
    for l, (_, block) in enumerate(find_moe_blocks(qwen)):
        for p, W in teacher_expert_weights(block.experts).items():
            torch.testing.assert_close(f_mean[l].core[p], W.mean(0))
            w = ref[l] / ref[l].sum()
            torch.testing.assert_close(f_freq[l].core[p], (w[:, None, None].float() * W).sum(0))


def test_plain_svd_error_is_the_discarded_singular_values(qwen):
    r = 5
    student = mc.compress_model(qwen, rank=r)
    for (_, tb), (_, sb) in zip(find_moe_blocks(qwen), find_moe_blocks(student)):
        for p, W in teacher_expert_weights(tb.experts).items():
            W = W.double()
            C = W.mean(0)
            for e in range(E):
                err = (W[e] - sb.experts.dense_weight(p, e).double()).norm()
                discarded = torch.linalg.svdvals(W[e] - C)[r:].norm()
                assert abs(err - discarded) <= 1e-5 * W[e].norm()


def test_activation_svd_is_optimal_on_the_routed_inputs(qwen, stats):
    """Whitened SVD: error on the inputs == discarded whitened singular values, and below plain SVD's."""
    r = 4
    act = compute_factors(qwen, max_rank=r, svd="activation", stats=stats)
    plain = compute_factors(qwen, max_rank=r, svd="plain")
    for l, (_, block) in enumerate(find_moe_blocks(qwen)):
        for p, W in teacher_expert_weights(block.experts).items():
            for e in range(E):
                G = (stats.gram_mid if p == "down" else stats.gram_in)[l][e].double()
                G = G + 1e-2 * G.diagonal().mean() * torch.eye(len(G), dtype=G.dtype)  # the damped Gram it whitens with
                S = torch.linalg.cholesky(G)
                D = W[e].detach().double() - act[l].core[p].double()

                def on_inputs(f):
                    M = f.B[p][e].double() @ f.A[p][e].double()
                    return float(torch.sqrt(torch.trace((D - M) @ G @ (D - M).T)))

                discarded = float(torch.linalg.svdvals(D @ S)[r:].norm())
                assert abs(on_inputs(act[l]) - discarded) <= 1e-4 * discarded
                assert on_inputs(act[l]) <= on_inputs(plain[l]) * (1 + 1e-6)


def test_errors_from_the_spectrum_equal_the_direct_ones(qwen, stats):
    """compress_layers' errors (on the routed inputs from the discarded spectrum, no Gram product) ==
    layer_errors on the same factors (float64 products with the Grams), for activation-aware and plain
    factors, at several ranks and at full rank; its float64 spot check agrees too."""
    from moedistill.compression.init import compress_layers, layer_errors

    variants = {("frequency", "activation"): I, ("mean", "plain"): I}
    ranks = [1, 4, I]
    res = compress_layers(qwen, variants, calibration=stats, error_ranks={v: ranks for v in variants})
    for v in variants:
        for l, (_, block) in enumerate(find_moe_blocks(qwen)):
            f = res.factors[v][l]
            for r in ranks:
                B = {p: f.B[p][..., :r] for p in f.B}
                A = {p: f.A[p][:, :r] for p in f.A}
                ref = layer_errors(teacher_expert_weights(block.experts), f.core, B, A, stats.gram_in[l],
                                   stats.gram_mid[l])
                got = res.errors[(*v, r)][l]
                assert set(got) == {"layer", *ref}
                for key, value in ref.items():
                    assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (v, l, r, key)
                if r == I:  # exact at full rank
                    assert max(got[k] for k in ref) < 1e-5
    assert len(res.svd_check) == 2 * 3  # first variant: one expert per layer and projection
    for row in res.svd_check:  # at full rank (checked here) both errors are rounding: absolute tolerance
        assert abs(row["error_fp32"] - row["error_fp64"]) <= 1e-4 * row["error_fp64"] + 1e-6, row
        assert abs(row["error_spectral"] - row["error_fp32"]) <= 1e-4 * row["error_fp32"] + 1e-6, row


def test_rank_from_compression_ratio():
    # ratio = 1/E + r (H + I) / (I H)
    assert rank_for_ratio(1 / 8, 8, 128, 64) == 0
    assert rank_for_ratio(0.25, 8, 128, 64) == 5  # (0.25 - 0.125) * 8192 / 192 = 5.33
    assert rank_for_ratio(10.0, 8, 128, 64) == 64  # capped at full rank
    with pytest.raises(UserError, match="below"):
        rank_for_ratio(0.1, 8, 128, 64)


def test_student_ratio_matches_the_request_and_user_errors(qwen):
    student = mc.compress_model(qwen, compression_ratio=0.5)
    counts = lambda m: sum(p.numel() for n, p in m.named_parameters() if ".experts." in n)  # noqa: E731
    assert counts(student) / counts(qwen) <= 0.5
    assert student.config.compression["rank"] == rank_for_ratio(0.5, E, H, I)
    with pytest.raises(UserError, match="exactly one"):
        mc.compress_model(qwen, rank=2, compression_ratio=0.5)
    with pytest.raises(UserError, match="outside"):
        mc.compress_model(qwen, rank=I + 1)
    with pytest.raises(UserError, match="calibration"):
        mc.compress_model(qwen, rank=2, core="frequency")
    with pytest.raises(UserError, match="calibration"):
        mc.compress_model(qwen, rank=2, svd="activation")


def test_router_unchanged_teacher_untouched_and_aux_loss(qwen, stats):
    before = {n: p.clone() for n, p in qwen.named_parameters()}
    student = mc.compress_model(qwen, rank=I, core="frequency", svd="activation", calibration=stats)
    for n, p in qwen.named_parameters():
        assert torch.equal(p, before[n]), n
    for (_, tb), (_, sb) in zip(find_moe_blocks(qwen), find_moe_blocks(student)):
        assert torch.equal(tb.gate.weight, sb.gate.weight)
        # a copy: training the student leaves the teacher alone
        assert tb.gate.weight.data_ptr() != sb.gate.weight.data_ptr()
    out_s = _logits(student, output_router_logits=True)
    out_t = _logits(qwen, output_router_logits=True)
    assert out_s.aux_loss is not None and torch.isfinite(out_s.aux_loss)
    assert len(out_s.router_logits) == 2
    torch.testing.assert_close(out_s.aux_loss, out_t.aux_loss)


def test_gradients_reach_core_and_wrappers(qwen, stats):
    student = mc.compress_model(qwen, rank=3, core="frequency", calibration=stats).train()
    logits = student(input_ids=X, output_router_logits=True).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, V), X[:, 1:].reshape(-1)).backward()
    for n, p in student.named_parameters():
        if re.search(CORE_RULE, n) or re.search(WRAPPER_RULE, n):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
    # one optimizer step changes the loss
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    loss0 = F.cross_entropy(student(input_ids=X).logits[:, :-1].reshape(-1, V), X[:, 1:].reshape(-1))
    opt.step()
    loss1 = F.cross_entropy(student(input_ids=X).logits[:, :-1].reshape(-1, V), X[:, 1:].reshape(-1))
    assert loss1.item() != loss0.item()


# --------------------------------------------------------------------------- save, load, export


def test_save_load_and_export_roundtrip(qwen, mixtral, stats, calib, tmp_path):
    """save -> load (Auto classes, get_model) identical; export -> plain transformers (no moedistill) equal."""
    from moedistill.models import get_model

    cases = {}
    for arch, teacher, kw in [("qwen3_moe", qwen, dict(core="frequency", svd="activation", calibration=stats)),
                              ("mixtral", mixtral, dict(calibration=calib, svd="activation"))]:
        student = mc.compress_model(teacher, rank=3, **kw)
        ckpt, out = tmp_path / f"{arch}-ckpt", tmp_path / f"{arch}-export"
        student.save_pretrained(ckpt)
        cfg = json.loads((ckpt / "config.json").read_text())
        assert cfg["model_type"] == f"moedistill_{arch}" and cfg["compression"]["rank"] == 3
        assert cfg["compression"]["core"] == kw.get("core", "mean") and cfg["compression"]["svd"] == "activation"
        ref = _logits(student).logits
        loaded = AutoModelForCausalLM.from_pretrained(ckpt)
        assert type(loaded) is type(student)
        assert torch.equal(_logits(loaded).logits, ref)
        via_get_model, _ = get_model(str(ckpt), with_tokenizer=False)
        assert torch.equal(_logits(via_get_model).logits, ref)
        export_checkpoint(ckpt, out)
        cases[arch] = (ckpt, out, ref)
    with pytest.raises(UserError, match="not empty"):
        export_checkpoint(cases["qwen3_moe"][0], cases["qwen3_moe"][1])
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="is under .*a-file, which is a file"):
        export_checkpoint(cases["qwen3_moe"][0], tmp_path / "a-file" / "sub")
    assert (tmp_path / "a-file").read_text() == ""
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty is not a checkpoint \\(no config.json\\)"):
        export_checkpoint(tmp_path / "empty", tmp_path / "out-of-empty")
    assert not (tmp_path / "out-of-empty").exists()

    torch.save(X, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        x = torch.load({str(tmp_path / 'x.pt')!r})
        res = {{}}
        for arch, ckpt, out in {[(a, str(c), str(o)) for a, (c, o, _) in cases.items()]!r}:
            dense = AutoModelForCausalLM.from_pretrained(out)
            assert dense.config.model_type == arch and "auto_map" not in dense.config.to_dict(), dense.config
            remote = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)
            with torch.no_grad():
                res[arch] = (type(dense).__name__, dense(input_ids=x).logits, remote(input_ids=x).logits)
        assert not any(m.startswith("moedistill") for m in sys.modules), "moedistill was imported"
        torch.save(res, {str(tmp_path / 'res.pt')!r})
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = torch.load(tmp_path / "res.pt")
    for arch, (_, _, ref) in cases.items():
        cls_name, dense_logits, remote_logits = res[arch]
        assert cls_name == {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}[arch]
        assert _rel(dense_logits, ref) <= 1e-5
        assert torch.equal(remote_logits, ref)


def test_export_streams_into_shards_with_an_index(qwen, stats, tmp_path):
    """Small shards: several files and an index that from_pretrained reads; the logits equal the
    compressed model's; no shard exceeds the limit except one holding a single layer's experts."""
    from safetensors import safe_open

    student = mc.compress_model(qwen, rank=3, core="frequency", svd="activation", calibration=stats)
    student.save_pretrained(tmp_path / "ckpt")
    limit = 40_000
    export_checkpoint(tmp_path / "ckpt", tmp_path / "out", max_shard_bytes=limit)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "out" / f).is_file() for f in shards)
    for f in shards:
        with safe_open(tmp_path / "out" / f, "pt") as sf:
            names = list(sf.keys())
            size = sum(torch.Size(sf.get_slice(n).get_shape()).numel() for n in names) * 4  # float32
        assert size <= limit or all(".experts." in n for n in names), (f, names)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(dense).__name__ == "Qwen3MoeForCausalLM"
    assert set(index["weight_map"]) == set(dense.state_dict()) - {"lm_head.weight"}  # tied: saved once
    torch.testing.assert_close(_logits(dense).logits, _logits(student).logits, rtol=1e-5, atol=1e-5)


def test_streamed_safetensors_equal_save_files(tmp_path):
    """write_safetensors, tensor by tensor (whole or in chunks along dim 0), against safetensors' own
    save_file: the same bytes (header, order, padding), so load_file gives the same tensors."""
    from safetensors.torch import load_file, save_file

    from moedistill.compression.export import write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"w.bf16": torch.randn(5, 3, 4, generator=g).bfloat16(), "a.f32": torch.randn(7, generator=g),
               "h.f16": torch.randn(2, 3, generator=g).half(), "d.f64": torch.randn(3, 1, generator=g).double(),
               "i.i64": torch.arange(6).reshape(2, 3), "j.i32": torch.arange(3, dtype=torch.int32),
               "m.bool": torch.tensor([True, False, True]), "u.u8": torch.arange(9, dtype=torch.uint8),
               "s.i8": torch.tensor([-3, 4], dtype=torch.int8), "empty": torch.zeros(0, 4),
               "scalar": torch.tensor(2.5), "b.bf16": torch.randn(1, generator=g).bfloat16()}
    for meta in (None, {"format": "pt"}):
        save_file(tensors, tmp_path / "ref.safetensors", metadata=meta)
        specs = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
        made = []

        def produce(name):
            made.append(name)
            t = tensors[name]
            return t if t.dim() < 2 else iter(t.split(2))  # chunks whose bytes follow each other

        write_safetensors(tmp_path / "ours.safetensors", specs, produce, metadata=meta)
        assert sorted(made) == sorted(tensors)
        assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
        got = load_file(tmp_path / "ours.safetensors")
        assert got.keys() == tensors.keys()
        assert all(got[k].dtype == t.dtype and torch.equal(got[k], t) for k, t in tensors.items())
    with pytest.raises(ValueError, match="header says"):
        write_safetensors(tmp_path / "bad.safetensors", {"x": (torch.float32, (3,))}, lambda n: torch.zeros(2))


def test_export_reads_the_student_one_layer_at_a_time(qwen, stats, tmp_path, monkeypatch):
    """The export builds the student on the meta device and reads its tensors from the file one at a
    time: at most one layer's expert factors are real at any moment, and the output's bytes equal
    those of the whole loaded student's (the fallback path)."""
    from moedistill.compression import export as ex_mod

    student = mc.compress_model(qwen, rank=3, core="frequency", svd="activation", calibration=stats)
    student.save_pretrained(tmp_path / "ckpt")
    seen = []
    load = ex_mod._FileTensors.load

    def spy(self, module, prefix):
        seen.append(prefix)
        assert all(p.is_meta for m in student_ref[0].modules() if isinstance(m, CompressedExperts)
                   and m is not module for p in m.parameters(recurse=False)), "two layers' factors at once"
        load(self, module, prefix)

    student_ref = []
    opener = ex_mod._open_student

    def open_spy(ckpt):
        s, t = opener(ckpt)
        student_ref.append(s)
        assert isinstance(t, ex_mod._FileTensors) and all(p.is_meta for p in s.parameters())
        return s, t

    monkeypatch.setattr(ex_mod._FileTensors, "load", spy)
    monkeypatch.setattr(ex_mod, "_open_student", open_spy)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "out", max_shard_bytes=40_000)
    assert seen == [f"{n}.experts." for n, _ in find_moe_blocks(student)]
    (tmp_path / "ref").mkdir()
    ex_mod.write_plain_shards(student, tmp_path / "ref", torch.float32, 40_000)  # the student loaded whole
    files = sorted(f.name for f in (tmp_path / "out").glob("model*"))
    assert files == sorted(f.name for f in (tmp_path / "ref").glob("model*")) and len(files) > 2
    assert all((tmp_path / "out" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes() for f in files)


def test_export_rejects_a_plain_checkpoint(qwen, tmp_path):
    qwen.save_pretrained(tmp_path / "plain")
    with pytest.raises(UserError, match="not a moedistill compressed model"):
        export_checkpoint(tmp_path / "plain", tmp_path / "out")


# --------------------------------------------------------------------------- moedistill compress


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_compress_from_config_writes_checkpoint_and_report_and_reuses(arch, tmp_path, monkeypatch):
    from moedistill.commands import compress as ck
    from moedistill.config import load_config
    from moedistill.models import TINY_TEACHER, load_tokenizer

    tok = load_tokenizer(str(TINY_TEACHER))
    teacher_dir = tmp_path / "teacher"
    _teacher(arch, vocab=len(tok)).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    monkeypatch.setattr(ck, "REPORT_SEQUENCES", 4)
    cfg = load_config("tiny", [
        f"output_dir={tmp_path / 'run'}", f"teacher.name={teacher_dir}", "data.seq_len=32", "data.max_samples=200",
        "compress.rank=2", "compress.core=frequency", "compress.svd=activation",
        "compress.calibration_sequences=4", "compress.report_ranks=[1,16,99]", "eval.batch_size=4",
    ])
    ckpt = ck.compress_from_config(cfg)
    assert ckpt == tmp_path / "run" / "compressed" / "checkpoint-0"
    assert (ckpt / "tokenizer.json").is_file() and (ckpt / "modeling_moedistill.py").is_file()
    report = json.loads((ckpt.parent / "report.json").read_text())
    assert (ckpt.parent / "report.png").stat().st_size > 0 and (ckpt.parent / "report.md").is_file()
    assert report["checkpoint_0"]["rank"] == 2 and report["parameters"]["expert_compression_ratio"] < 1
    assert len(report["reconstruction_error"]) == 2
    assert {(r["rank"], r["core"], r["svd"]) for r in report["sweep"]} == {
        (r, c, s) for r in (1, 16) for c in ("mean", "frequency") for s in ("plain", "activation")
    }
    for row in report["sweep"]:  # full rank reproduces the teacher
        if row["rank"] == 16:
            # relative: the perplexity is ~5,600 here; fp32 logits and per-batch fp32 sums of the CE
            # reproduce it to ~1e-6
            assert (row["perplexity"] == pytest.approx(report["teacher_eval"]["perplexity"], rel=1e-5)
                    and row["kl_exact"] < 1e-6)
    student, _ = mc_get(ckpt)
    assert student.config.compression["rank"] == 2 and student.config.compression["svd"] == "activation"
    assert student.config.model_type == f"moedistill_{arch}"
    # same settings: reused without loading the teacher; other settings: rebuilt
    mtime = (ckpt / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr("moedistill.commands.common.load_teacher",
                        lambda *a, **k: pytest.fail("teacher loaded on reuse"))
    assert ck.compress_from_config(cfg) == ckpt
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == mtime
    cfg.compress.rank = 1
    cfg.compress.report_ranks = []
    with pytest.raises(pytest.fail.Exception, match="teacher loaded"):
        ck.compress_from_config(cfg)


def mc_get(ckpt):
    from moedistill.models import get_model

    return get_model(str(ckpt))


def test_tiny_teacher_full_rank_roundtrip(tiny):
    teacher, tok = tiny
    calib = torch.randint(0, teacher.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    student = mc.compress_model(teacher, rank=min(teacher.config.hidden_size, teacher.config.moe_intermediate_size),
                                core="frequency", svd="activation", calibration=calib)
    x = calib[:, :16]
    assert _rel(_logits(student, x).logits, _logits(teacher, x).logits) <= 1e-5


@pytest.mark.parametrize("chunk", [1, 3])
def test_grams_freed_chunk_by_chunk_give_the_same_factors(qwen, calib, stats, chunk, monkeypatch):
    """compress_layers calibrating itself hands each layer's Grams over in EXPERT_CHUNK-expert tensors
    and the last variant frees each chunk once factorised (the peak-memory fix of issue 13): the
    factors, errors and spot check equal those from the same Grams collected whole and kept, and
    every chunk is freed by the end (3 does not divide E = 4: a short last chunk)."""
    import moedistill.compression.init as ci

    monkeypatch.setattr(ci, "EXPERT_CHUNK", chunk)
    made = []
    init = ci.ChunkedGrams.__init__

    def record(self, *a, **kw):
        init(self, *a, **kw)
        made.append(self)

    monkeypatch.setattr(ci.ChunkedGrams, "__init__", record)
    variants = {("mean", "plain"): 5, ("frequency", "activation"): 5}  # the Grams serve both
    er = {v: [2, 5] for v in variants}
    got = ci.compress_layers(qwen, variants, calibration=calib, error_ranks=er)
    assert len(made) == 2 * len(find_moe_blocks(qwen))  # gram_in and gram_mid per layer
    assert all(c is None for g in made for c in g.chunks)
    made.clear()
    ref = ci.compress_layers(qwen, variants, calibration=stats, error_ranks=er)
    assert not made
    for v in variants:
        for fg, fr in zip(got.factors[v], ref.factors[v]):
            for p in fg.B:
                for name in ("core", "B", "A", "singular_values", "sq_errors", "sq_norms"):
                    assert torch.equal(getattr(fg, name)[p], getattr(fr, name)[p]), (v, p, name)
    assert got.errors == ref.errors and got.svd_check == ref.svd_check


def test_chunked_grams_index_like_a_stacked_tensor():
    from moedistill.compression.init import ChunkedGrams

    g = ChunkedGrams(5, 3, 2)
    full = torch.randn(5, 3, 3)
    for e in range(5):
        g[e].copy_(full[e])
    assert torch.equal(g.stacked(), full)
    for sl in (slice(0, 2), slice(2, 3), slice(1, 4), slice(4, 5), slice(0, 5), slice(3, 1)):
        assert torch.equal(g[sl], full[sl]), sl
    assert torch.equal(g[-1], full[-1])
    g.release(slice(0, 3))  # frees the chunk [0, 2) only: [2, 4) is not wholly inside
    assert torch.equal(g[2:4], full[2:4])
    with pytest.raises(RuntimeError, match="released"):
        g[1]


def test_layer_by_layer_calibration_equals_hooks_on_one_full_forward(qwen, calib, stats):
    """Each layer run on the previous one's outputs (GPTQ style) == hooks on the whole model's forward
    (the pre-streaming algorithm, written out plainly here): same counts, same Grams."""
    blocks = [b for _, b in find_moe_blocks(qwen)]
    counts = [torch.zeros(E, dtype=torch.float64) for _ in blocks]
    g_in = [torch.zeros(E, H, H, dtype=torch.float64) for _ in blocks]
    g_mid = [torch.zeros(E, I, I, dtype=torch.float64) for _ in blocks]

    def hook(l):
        def fn(module, args, kwargs):
            hidden, index = args[0], args[1]
            W = teacher_expert_weights(module)
            for t in range(hidden.shape[0]):
                for e in index[t].tolist():
                    counts[l][e] += 1
                    x = hidden[t].double()
                    mid = F.silu(W["gate"][e].double() @ x) * (W["up"][e].double() @ x)
                    g_in[l][e] += torch.outer(x, x)
                    g_mid[l][e] += torch.outer(mid, mid)

        return fn

    handles = [b.experts.register_forward_pre_hook(hook(l), with_kwargs=True) for l, b in enumerate(blocks)]
    for i in range(0, len(calib), 4):  # other batches than the fixture's: batching changes nothing
        _logits(qwen, calib[i : i + 4])
    for h in handles:
        h.remove()
    for l in range(len(blocks)):
        assert torch.equal(stats.counts[l], counts[l])
        torch.testing.assert_close(stats.gram_in[l].double(), g_in[l], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.gram_mid[l].double(), g_mid[l], rtol=1e-5, atol=1e-5)
