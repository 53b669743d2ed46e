"""Compressed experts, forward + backward at Qwen3-30B-A3B's per-layer expert dimensions.

    python benchmarks/bench_experts.py [--tokens 512] [--rank 64] [--experts 128]

Side by side in one process on the same weights and routing (hidden 2048, expert
intermediate 768, top-8):

  indexed   the factors indexed per expert (``A[e]``): each slice's backward writes a zero
            gradient the size of the whole [E, ...] stack, so the backward grows with E^2
  unbound   the same loop with the factors unbound once per forward (the previous forward):
            still a one-hot mask, a ``torch.where``, a gather and two scatter-adds per expert
  grouped   ``CompressedExperts`` as shipped: routed pairs sorted by expert once, one gather,
            one scatter-add, two small matmuls per non-empty expert and projection

Prints seconds (best of ``--repeat``) and the ratios; checks that all give the same output
and gradients. CPU only; the 2 cores are shared, so read the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from moedistill.compression.modeling_moedistill import CompressedExperts


def indexed_forward(m: CompressedExperts, hidden, top_k_index, top_k_weights):
    """The same computation with per-expert indexing of the stacked factors (the old forward)."""
    I = m.intermediate_dim
    core_gate_up = F.linear(hidden, torch.cat([m.shared_core_gate, m.shared_core_up]))
    mixed = hidden.new_zeros(hidden.shape[0], I)
    out = torch.zeros_like(hidden)
    mask = F.one_hot(top_k_index, num_classes=m.num_experts + 1).permute(2, 1, 0)
    for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
        if e == m.num_experts:
            continue
        pos, tok = torch.where(mask[e])
        x = hidden[tok]

        def lr(v, proj):
            B, A = m.wrapper(proj)
            return F.linear(F.linear(v, A[e]), B[e])

        h = m.act_fn(core_gate_up[tok, :I] + lr(x, "gate")) * (core_gate_up[tok, I:] + lr(x, "up"))
        h = h * top_k_weights[tok, pos, None]
        mixed.index_add_(0, tok, h)
        out.index_add_(0, tok, lr(h, "down"))
    return out + F.linear(mixed, m.shared_core_down)


def unbound_forward(m: CompressedExperts, hidden, top_k_index, top_k_weights):
    """The per-expert loop with the factors unbound once (the forward before the grouped one)."""
    I = m.intermediate_dim
    core_gate_up = F.linear(hidden, torch.cat([m.shared_core_gate, m.shared_core_up]))
    mixed = hidden.new_zeros(hidden.shape[0], I)
    out = torch.zeros_like(hidden)
    mask = F.one_hot(top_k_index, num_classes=m.num_experts + 1).permute(2, 1, 0)
    factors = {p: [t.unbind(0) for t in m.wrapper(p)] for p in ("gate", "up", "down")}

    def lr(v, proj, e):
        B, A = factors[proj]
        return F.linear(F.linear(v, A[e]), B[e])

    for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
        if e == m.num_experts:
            continue
        pos, tok = torch.where(mask[e])
        x = hidden[tok]
        h = m.act_fn(core_gate_up[tok, :I] + lr(x, "gate", e)) * (core_gate_up[tok, I:] + lr(x, "up", e))
        h = h * top_k_weights[tok, pos, None]
        mixed.index_add_(0, tok, h)
        out.index_add_(0, tok, lr(h, "down", e))
    return out + F.linear(mixed, m.shared_core_down)


def run(fn, m, args, repeat: int):
    best, result = float("inf"), None
    for _ in range(repeat):
        m.zero_grad(set_to_none=True)
        t = time.perf_counter()
        y = fn(*args)
        y.square().mean().backward()
        best = min(best, time.perf_counter() - t)
        result = (y.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
    return best, result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--skip-indexed", action="store_true", help="leave out the E^2 variant (slow at many tokens)")
    a = p.parse_args()
    torch.manual_seed(0)
    H, I, k = 2048, 768, 8
    m = CompressedExperts(a.experts, H, I, a.rank)
    with torch.no_grad():
        for name, t in m.named_parameters():
            if "wrapper" in name and name.endswith("_B"):
                t.normal_(std=0.02)  # nonzero B, so every factor gets a gradient
    hidden = torch.randn(a.tokens, H) * 0.1
    logits = torch.randn(a.tokens, a.experts)
    w, idx = torch.softmax(logits, -1).topk(k, -1)
    args = (hidden, idx, w / w.sum(-1, keepdim=True))
    variants = {"indexed": lambda *x: indexed_forward(m, *x), "unbound": lambda *x: unbound_forward(m, *x),
                "grouped": m}
    if a.skip_indexed:
        del variants["indexed"]
    results = {name: run(fn, m, args, a.repeat) for name, fn in variants.items()}
    first, (_, (y_ref, g_ref)) = next(iter(results)), next(iter(results.values()))
    for name, (_, (y, g)) in results.items():
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6, msg=f"{name} vs {first}")
        for n in g_ref:
            torch.testing.assert_close(g[n], g_ref[n], rtol=1e-4, atol=1e-7, msg=f"{name} vs {first}: {n}")
    print(f"{a.tokens} tokens, {a.experts} experts, top-{k}, hidden {H}, intermediate {I}, rank {a.rank}; fwd+bwd, "
          f"best of {a.repeat}; {torch.get_num_threads()} threads")
    print(f"{'variant':<10} {'seconds':>8} {'ratio':>6}")
    t_first = results[first][0]
    for name, (t, _) in results.items():
        print(f"{name:<10} {t:8.2f} {t / t_first:6.2f}")


if __name__ == "__main__":
    main()
