"""The checks to run whenever a machine with a GPU is at hand; one prepared script, a few minutes.

    python benchmarks/gpu_check.py                 # on a CUDA machine: all three sections
    python benchmarks/gpu_check.py --smoke         # anywhere (CPU): the same code at toy sizes

Prints three tables (never run in CI; CPU tests cover correctness, this measures the GPU):

1. ``default``: bf16 training steps (autocast, AdamW) of the embedded default's compressed
   student: CE-only, distillation (top-k 64, tail) and distillation with the fused lm_head;
   ms per step and peak CUDA memory, ratios against CE-only.
2. ``layer``: the same three steps on the student of a Qwen3-30B-A3B-shaped 1-layer teacher
   (``benchmarks/scale_teacher.py``: hidden 2,048, 128 experts, V = 151,936) at
   ``compression_ratio=0.25``, 2 x 2,048 tokens, bf16 weights.
3. ``loss``: peak CUDA memory of the loss alone at V = 151,936, H = 2,048, 4 x 2,048
   positions, forward + backward from bf16 hidden states: lm_head + plain cross-entropy,
   lm_head + ``distillation_loss``, ``fused_linear_distillation_loss``.

Every figure is measured by this run; nothing is hard-coded. Written on a machine without a
GPU: ``--smoke`` (run by tests/test_docs.py) proves the code path on CPU at toy sizes; the
first GPU run is its first real one (the ``layer`` section never ran yet). Teacher targets are the
teacher's own top-k log-probs on the same tokens (computed once, outside the timing).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moedistill.compression import compress_model  # noqa: E402
from moedistill.losses import distillation_loss, fused_linear_distillation_loss  # noqa: E402
from moedistill.models import get_model  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def _peak(device, base):
    return (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else float("nan")


def _targets(teacher, x, k):
    with torch.no_grad():
        lp = torch.log_softmax(teacher(input_ids=x, use_cache=False).logits.float(), -1)
        top_lp, top_ids = lp.topk(k, -1)
    return top_ids, top_lp


def _train_steps(student, x, targets, variant, steps, device):
    """ms per step and peak memory of ``steps`` optimizer steps of ``variant``: ce | distill | fused."""
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    labels = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], 1)
    head = student.get_output_embeddings()
    ids, lps = targets

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if variant == "fused":
                h = student.model(input_ids=x, use_cache=False).last_hidden_state
                loss = fused_linear_distillation_loss(h, head.weight, labels, ids, lps, alpha=0.5, temperature=2.0,
                                                      tail="tail", lm_head_bias=head.bias).total
            else:
                logits = student(input_ids=x, use_cache=False).logits
                alpha = 0.0 if variant == "ce" else 0.5
                loss = distillation_loss(logits, labels, ids, lps, alpha=alpha, temperature=2.0, tail="tail").total
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    student.train()
    step()  # warm-up (allocator, kernels, optimizer state)
    _sync(device)
    base = _peak_reset(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    ms = (time.perf_counter() - t0) / steps * 1e3
    return ms, _peak(device, base)


def _table(title, rows, ref="ce"):
    print(f"\n{title}")
    print(f"{'variant':<10} {'ms/step':>10} {'x ' + ref:>8} {'peak GiB':>10} {'x ' + ref:>8}")
    ms0, mem0 = rows[ref]
    for name, (ms, mem) in rows.items():
        ratio = mem / mem0 if mem0 == mem0 else float("nan")  # nan: no CUDA memory counter on CPU
        print(f"{name:<10} {ms:>10.1f} {ms / ms0:>8.2f} {mem / 2**30:>10.2f} {ratio:>8.2f}")


def default_section(device, args):
    teacher, _ = get_model("tiny", with_tokenizer=False)
    teacher = teacher.to(device).eval()
    x = torch.randint(0, teacher.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    targets = _targets(teacher, x, 64)
    rows = {}
    for variant in ("ce", "distill", "fused"):
        student = compress_model(teacher, rank=4).to(device)
        rows[variant] = _train_steps(student, x, targets, variant, args.steps, device)
        del student
    _table(f"1. embedded default, bf16 autocast, batch {args.batch} x {args.seq} tokens, {args.steps} steps", rows)


def layer_section(device, args):
    from scale_teacher import build

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = build(Path(tmp) / "q3", layers=1, dtype="bfloat16")
        teacher, _ = get_model(str(path), dtype="bfloat16", with_tokenizer=False)
        teacher = teacher.to(device).eval()
        print(f"\n(Qwen3-30B-A3B-shaped 1-layer teacher built and loaded in {time.perf_counter() - t0:.0f} s)")
        x = torch.randint(0, 4096, (2, args.layer_seq), generator=torch.Generator().manual_seed(0)).to(device)
        targets = _targets(teacher, x, 64)
        rows = {}
        for variant in ("ce", "distill", "fused"):
            t0 = time.perf_counter()
            student = compress_model(teacher, compression_ratio=0.25).to(device)
            if variant == "ce":
                print(f"(compressed at ratio 0.25 in {time.perf_counter() - t0:.0f} s)")
            rows[variant] = _train_steps(student, x, targets, variant, max(args.steps // 4, 2), device)
            del student
            if device.type == "cuda":
                torch.cuda.empty_cache()
    _table(f"2. Qwen3-30B-A3B-shaped layer, bf16 weights + autocast, 2 x {args.layer_seq} tokens", rows)


def loss_section(device, args):
    V, H, N, k = args.vocab, 2048, args.positions, 64
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    ids = torch.randint(0, V, (N, k), generator=g).to(device)
    lps = torch.log_softmax(torch.randn(N, k, generator=g), -1).to(device)
    rows = {}
    for variant in ("ce", "distill", "fused"):
        hidden = (torch.randn(1, N, H, generator=g) * 0.02).to(device, torch.bfloat16).requires_grad_()
        weight = (torch.randn(V, H, generator=g) * 0.02).to(device, torch.bfloat16).requires_grad_()
        _sync(device)
        base = _peak_reset(device)
        t0 = time.perf_counter()
        if variant == "fused":
            loss = fused_linear_distillation_loss(hidden, weight, labels[None], ids[None], lps[None], alpha=0.5,
                                                  temperature=2.0, tail="tail").total
        else:
            logits = hidden @ weight.T
            if variant == "ce":
                loss = F.cross_entropy(logits.float().view(-1, V), labels)
            else:
                loss = distillation_loss(logits, labels[None], ids[None], lps[None], alpha=0.5, temperature=2.0,
                                         tail="tail").total
        loss.backward()
        _sync(device)
        rows[variant] = ((time.perf_counter() - t0) * 1e3, _peak(device, base))
        del hidden, weight, loss
    _table(f"3. the loss alone, V = {V:,}, H = {H}, {N:,} positions, bf16 hidden + weight, fwd + bwd", rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="toy sizes, CPU allowed: checks that the script runs")
    p.add_argument("--sections", default="default,layer,loss")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("error: no CUDA device; run this on a GPU machine, or pass --smoke for a CPU dry run")
    args.batch, args.seq, args.steps = (2, 32, 2) if args.smoke else (16, 128, 20)
    args.layer_seq = 2048
    args.vocab, args.positions = (151_936, 4 * 2048) if not args.smoke else (4096, 256)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)"
    print(f"device: {name}; torch {torch.__version__}")
    sections = args.sections.split(",")
    if "default" in sections:
        default_section(device, args)
    if "layer" in sections and not args.smoke:
        layer_section(device, args)
    if "loss" in sections:
        loss_section(device, args)


if __name__ == "__main__":
    main()
