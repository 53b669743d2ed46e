"""bf16 through the student path: compressed experts, loss, training, evaluation, export.

CPU autocast (``torch.autocast("cpu", torch.bfloat16)``, what ``training.bf16=true`` turns
on in the Trainer) stands in for the GPU's. Every reference is the same model in fp32;
the tolerances are bf16's (8 significant bits, ~4e-3 per rounding), not fp32's.
"""

import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from moedistill.compression import compress_model
from moedistill.compression.export import to_plain_model
from moedistill.losses import distillation_loss

BF16_REL = 5e-2  # relative error of a whole logits tensor / gradient after a few bf16 layers


def _teacher(vocab: int = 96, seed: int = 0, init: float = 0.2) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, tie_word_embeddings=True, initializer_range=init,
    )
    return Qwen3MoeForCausalLM(cfg).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _step(student, x, targets, autocast: bool):
    """Loss and gradients of one distillation step of ``student`` on ``x`` (top-k targets)."""
    student.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = student(input_ids=x).logits
        labels = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], 1)
        loss = distillation_loss(logits, labels, *targets, alpha=0.5, temperature=2.0, tail="tail")
    loss.total.backward()
    return loss, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def test_bf16_autocast_step_matches_fp32_loss_and_gradients():
    teacher = _teacher()
    student = compress_model(teacher, rank=4).train()
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp = torch.log_softmax(teacher(input_ids=x).logits.float(), -1)
    top_lp, top_ids = lp.topk(16, -1)
    ref, ref_grads = _step(student, x, (top_ids, top_lp), autocast=False)
    got, grads = _step(student, x, (top_ids, top_lp), autocast=True)
    for part in ("total", "ce", "kl"):
        assert getattr(got, part).item() == pytest.approx(getattr(ref, part).item(), rel=BF16_REL), part
    assert grads.keys() == ref_grads.keys()
    wrappers = [n for n in grads if "wrapper" in n or "shared_core" in n]
    assert len(wrappers) == 2 * 9  # 2 layers x (3 cores + 6 factors): the compressed experts get gradients
    for n in grads:
        assert _rel(grads[n], ref_grads[n]) < BF16_REL, n
        assert grads[n].dtype == torch.float32  # autocast keeps the fp32 master weights


def test_bf16_weights_forward_backward_and_export():
    teacher = _teacher()
    fp32 = compress_model(teacher, rank=4)
    bf16 = compress_model(teacher, rank=4).to(torch.bfloat16)
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = fp32(input_ids=x).logits
        got = bf16(input_ids=x).logits
        plain = to_plain_model(bf16)(input_ids=x).logits
    assert got.dtype == torch.bfloat16 and _rel(got, ref) < BF16_REL
    # the exported dense model computes W_i = C + B_i A_i in bf16: the same function up to bf16 rounding
    assert plain.dtype == torch.bfloat16 and _rel(plain, ref) < BF16_REL
    bf16.train()
    bf16(input_ids=x).logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for n, p in bf16.named_parameters()
               if "wrapper" in n)


@pytest.mark.parametrize("override", ["training.bf16=false", "training.bf16=true", "student.dtype=bfloat16"])
def test_train_in_bf16_lowers_validation_kl(override, tmp_path):
    """`moedistill train training.bf16=true` (autocast) and `student.dtype=bfloat16` (bf16
    weights) from checkpoint-0 on disk: training runs both stages and the KL goes down."""
    from moedistill.commands.train import train_from_config
    from moedistill.config import load_config
    from moedistill.models import TINY_TEACHER, load_tokenizer

    tok = load_tokenizer("tiny")
    teacher_dir = tmp_path / "teacher"
    _teacher(vocab=len(tok), init=0.5).save_pretrained(teacher_dir)  # peaked: checkpoint-0 is measurably off
    for f in TINY_TEACHER.glob("tokenizer*"):
        shutil.copy(f, teacher_dir / f.name)
    cfg = load_config("tiny", [
        f"output_dir={tmp_path / 'out'}", f"teacher.name={teacher_dir}", "data.seq_len=16", "data.max_sequences=16",
        "data.eval_max_sequences=8", "cache.top_k=8", "cache.batch_size=8", "compress.report_ranks=[]",
        "compress.calibration_sequences=8", "compress.rank=1", "stages.0.max_steps=4", "stages.1.max_steps=4",
        "training.per_device_train_batch_size=4", "training.logging_steps=1", "training.save_steps=100",
        "training.report_to=[]", "training.warmup_steps=0", "training.learning_rate=3e-3", override,
    ])
    out = train_from_config(cfg)
    first, last = out["initial_eval"], out["final_eval"]
    assert last["eval_kl_lower_bound"] < first["eval_kl_lower_bound"]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in out["log_history"] if "loss" in e)
    with safe_open(f"{out['final_dir']}/model.safetensors", "pt") as f:  # bf16 weights stay bf16 on disk
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == ({"BF16"} if override.startswith("student.dtype") else {"F32"})
