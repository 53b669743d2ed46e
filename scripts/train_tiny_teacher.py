#!/usr/bin/env python
"""Build the embedded default teacher: a byte-level BPE tokenizer and a tiny Qwen3-MoE.

Trains both on the embedded corpus's train split (King James Bible, public domain) and
saves them with ``save_pretrained`` into ``src/moedistill/assets/tiny-teacher`` so that
``AutoTokenizer.from_pretrained(dir)`` and ``AutoModelForCausalLM.from_pretrained(dir)``
load them. Seeded and single-threaded-deterministic: the same command on the same
torch version gives the same weights. Takes a few minutes on 2 CPU cores.

    python scripts/train_tiny_teacher.py                 # rebuild tokenizer + teacher
    python scripts/train_tiny_teacher.py --steps 200     # quicker, worse teacher
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from moedistill.data import ASSETS, eos_id_of, load_texts, pack, tokenize

OUT = ASSETS / "tiny-teacher"


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.model_max_length = 1024
    fast.save_pretrained(out)
    return fast


def build_config(vocab_size: int, eos_id: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,  # dense MLP width (unused: every layer is MoE)
        moe_intermediate_size=64,  # expert width != hidden width, as in real MoEs
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        router_aux_loss_coef=0.01,
        output_router_logits=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


@torch.no_grad()
def perplexity(model, blocks: np.ndarray, batch_size: int = 16) -> float:
    model.eval()
    nll, n = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = torch.from_numpy(blocks[i : i + batch_size]).long()
        logits = model(input_ids=x).logits[:, :-1].float()
        y = x[:, 1:]
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"
        ).item()
        n += y.numel()
    return math.exp(nll / n)


def unigram_perplexity(train: np.ndarray, val: np.ndarray, vocab: int) -> float:
    counts = np.bincount(train.reshape(-1), minlength=vocab).astype(np.float64) + 1.0  # add-one smoothing
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[val[:, 1:].reshape(-1)].mean()))


def evaluate_saved(path: Path, seq_len: int = 128) -> tuple[float, float]:
    """Validation perplexity of the saved teacher and of the train-split unigram model."""
    from moedistill.models import get_model

    model, tok = get_model(str(path))
    eos = eos_id_of(tok)
    train = pack(tokenize(load_texts("tiny", split="train"), tok), seq_len, eos)
    val = pack(tokenize(load_texts("tiny", split="validation"), tok), seq_len, eos)
    return perplexity(model, val), unigram_perplexity(train, val, len(tok))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab_size", type=int, default=4096)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output_dir", type=Path, default=OUT)
    ap.add_argument("--eval_only", action="store_true", help="only print the saved teacher's perplexities")
    args = ap.parse_args()
    if args.eval_only:
        ppl, uni = evaluate_saved(args.output_dir, args.seq_len)
        print(f"validation perplexity: teacher {ppl:.2f}, unigram {uni:.2f}")
        return

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from transformers import Qwen3MoeForCausalLM

    train_texts = load_texts("tiny", split="train")
    val_texts = load_texts("tiny", split="validation")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(train_texts, args.vocab_size, args.output_dir)
    eos = eos_id_of(tok)
    train = pack(tokenize(train_texts, tok), args.seq_len, eos)
    val = pack(tokenize(val_texts, tok), args.seq_len, eos)
    print(f"tokenizer: vocab {len(tok)}; train {train.size:,} tokens, validation {val.size:,} tokens")

    cfg = build_config(len(tok), eos)
    model = Qwen3MoeForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"teacher: {n_params:,} parameters")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, len(train), (args.batch_size,), generator=g)
        x = torch.from_numpy(train[idx.numpy()]).long()
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {out.loss.item():.3f}  {time.time() - t0:.0f}s", flush=True)

    ppl = perplexity(model, val)
    uni = unigram_perplexity(train, val, len(tok))
    print(f"validation perplexity: teacher {ppl:.2f}, unigram {uni:.2f}")
    model.config.use_cache = True
    model.save_pretrained(args.output_dir, safe_serialization=True)
    (args.output_dir / "training_summary.json").write_text(
        json.dumps({"steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size, "lr": args.lr,
                    "seed": args.seed, "parameters": n_params, "val_perplexity": round(ppl, 3),
                    "unigram_val_perplexity": round(uni, 3), "train_tokens": int(train.size),
                    "torch": torch.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
