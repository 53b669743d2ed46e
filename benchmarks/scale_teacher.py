"""A teacher with Qwen3-30B-A3B's real per-layer dimensions, built locally for scale benchmarks.

    python benchmarks/scale_teacher.py /tmp/q3-shaped            # 1 layer, bf16 (~2.5 GB)
    python benchmarks/scale_teacher.py /tmp/q3-shaped --layers 2 --dtype float32

Qwen3-30B-A3B per layer: hidden 2,048, 32 query / 4 key-value heads of 128, 128 experts of
intermediate 768, top-8 with norm_topk_prob, vocabulary 151,936, untied lm_head; only the
number of layers differs (48 in the real model). Weights are random (seeded) except the
lm_head, which is scaled so that the teacher's mean next-token entropy on the embedded
corpus is about ``--entropy`` nats (3 by default, like a trained LM) instead of the ~11.9
nats (log V) of a random head: a top-k cache of this teacher then holds realistic mass.

The tokenizer is the embedded teacher's (ids < 4,096): it works with the whole data
pipeline, and the model still computes every one of its 151,936 logits, so the cost of the
lm_head, the loss and the cache is the real one. Every scale benchmark and test uses this
builder, so they all measure the same model. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

QWEN3_30B_A3B = dict(
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    vocab_size=151_936,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    router_aux_loss_coef=0.001,
)


def mean_entropy(model, ids) -> float:
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def build(out: str | Path, *, layers: int = 1, dtype: str = "bfloat16", seed: int = 0, entropy: float = 3.0,
          calibration_tokens: int = 256) -> Path:
    """Write the teacher (config, safetensors, tokenizer, ``scale_teacher.json``) into ``out``."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from moedistill.data import prepare
    from moedistill.models import TINY_TEACHER, load_tokenizer

    out = Path(out)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(num_hidden_layers=layers, **QWEN3_30B_A3B)
    model = Qwen3MoeForCausalLM(config).eval()  # fp32 for the calibration below
    tok = load_tokenizer(str(TINY_TEACHER))
    seq = 128
    blocks = prepare(tok, "tiny", seq_len=seq, max_sequences=max(1, calibration_tokens // seq)).blocks
    ids = torch.as_tensor(blocks, dtype=torch.long)
    # Entropy falls monotonically as the lm_head is scaled up: bisect the log-scale.
    head = model.lm_head.weight
    base = head.detach().clone()
    lo, hi = 0.0, math.log(1e4)
    for _ in range(20):
        mid = (lo + hi) / 2
        with torch.no_grad():
            head.copy_(base * math.exp(mid))
        h = mean_entropy(model, ids)
        if abs(h - entropy) < 0.02:
            break
        lo, hi = (mid, hi) if h > entropy else (lo, mid)
    model = model.to(getattr(torch, dtype))
    got = mean_entropy(model, ids)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {
        "layers": layers, "dtype": dtype, "seed": seed, "lm_head_scale": math.exp(mid),
        "mean_entropy_nats": round(got, 4), "target_entropy_nats": entropy,
        "parameters": sum(p.numel() for p in model.parameters()), "build_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "scale_teacher.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="directory to write the teacher into")
    p.add_argument("--layers", type=int, default=1, help="decoder layers (Qwen3-30B-A3B has 48)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--entropy", type=float, default=3.0, help="target mean next-token entropy, nats")
    a = p.parse_args(argv)
    out = build(a.out, layers=a.layers, dtype=a.dtype, seed=a.seed, entropy=a.entropy)
    print(json.dumps(json.loads((out / "scale_teacher.json").read_text())))


if __name__ == "__main__":
    main()
