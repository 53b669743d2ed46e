"""Compression, export and experts at Qwen3-30B-A3B's per-layer dimensions (issue 13's acceptance figures).

    python benchmarks/scale_teacher.py /tmp/q3-1layer              # once (bf16, ~2.5 GB)
    python benchmarks/scale_teacher.py /tmp/q3-2layer --layers 2   # once
    python benchmarks/bench_scale.py --teacher1 /tmp/q3-1layer --teacher2 /tmp/q3-2layer --work /tmp/bench_scale

Every measured variant runs in a process of its own (``--variant``), so each peak RSS
(``ru_maxrss``) is that variant's alone; the driver prints them side by side with the ratios:

  compress-new  ``compress_layers``: layer-by-layer calibration, batched fp32 factors (eigh of
                the smaller Gram), the reconstruction errors, the fp64 spot check
  compress-old  the pre-issue-13 algorithm, copied below: calibration hooked on one full
                forward, a float64 ``torch.linalg.svd`` and Cholesky per expert and projection
                (``--old-experts N`` times the first N experts and scales by E / N: the loop is
                per expert, so its cost is linear in E); its errors are computed with the new
                chunked code (the old report's float64 copies took 10.2 GiB for one layer)
  export        ``export_checkpoint`` of checkpoint-0 (rank for compression_ratio=0.25), peak RSS
  export-check  the float32 export's logits against the compressed model's
  experts       student experts (rank for ratio 0.25) vs the teacher's experts, fwd+bwd, 2,048 tokens
  eval-*        (``--sections eval``) evaluation at V = 151,936 on 4 x 512 tokens against a training
                step's loss (``train-loss``: ``DistillationTrainer.compute_loss`` + backward, top-k
                targets, fused lm_head or not) on the same tokens: ``eval-new`` (``evaluate_models``,
                online teacher or top-k targets) and ``eval-old`` (the pre-issue-13 evaluation,
                copied below), with the metrics of both side by side. The evaluated student is the
                1-layer teacher with noise on its lm_head (so its KL is not 0); top-k targets (k = 64)
                are made once by ``eval-targets``

Settings: core=frequency, svd=activation, 32 calibration blocks of 128 tokens of the embedded
corpus. CPU times are process user+system seconds; the machine's 2 cores are shared, so read
the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CALIB_SEQUENCES, CALIB_LEN, RATIO = 32, 128, 0.25


def _rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _teacher(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def _resident_teacher(path):
    """``_teacher`` with every weight read once: ``from_pretrained`` leaves the safetensors memory-mapped,
    so the first pass over the experts would page ~1.2 GiB of the teacher's own weights into the
    RSS (and its CPU time) of whatever runs first; the compression figures are measured above this."""
    import torch

    teacher = _teacher(path)
    with torch.no_grad():
        for p in teacher.parameters():
            p.view(-1)[:: max(1, 4096 // p.element_size())].sum()  # one element per page
    return teacher


def _calibration():
    from moedistill.data import prepare
    from moedistill.models import TINY_TEACHER, load_tokenizer

    tok = load_tokenizer(str(TINY_TEACHER))
    return prepare(tok, "tiny", seq_len=CALIB_LEN, max_sequences=CALIB_SEQUENCES).blocks


def _rank(teacher):
    from moedistill.compression.init import resolve_rank

    return resolve_rank(teacher, None, RATIO)


def _stats_bytes(teacher) -> int:
    from moedistill.compression.init import expert_dims

    E, H, I = expert_dims(teacher)
    return E * (H * H + I * I) * 4


# --------------------------------------------------------------------------- the old algorithm (before issue 13)


def old_calibration(model, input_ids, batch_size=8):
    """Hooks on one full forward, Grams of all layers at once (the old one-group case), per-expert masks."""
    import numpy as np
    import torch

    from moedistill.compression.init import teacher_expert_weights
    from moedistill.compression.modeling_moedistill import find_moe_blocks

    blocks = [b for _, b in find_moe_blocks(model)]
    ex = blocks[0].experts
    E, H, I = ex.num_experts, ex.hidden_dim, ex.intermediate_dim
    counts = [torch.zeros(E, dtype=torch.float64) for _ in blocks]
    g_in = [torch.zeros(E, H, H) for _ in blocks]
    g_mid = [torch.zeros(E, I, I) for _ in blocks]

    def hook(l):
        def fn(module, args, kwargs):
            hidden, index = args[0], args[1]
            counts[l] += torch.bincount(index[index < E].reshape(-1), minlength=E).double()
            W = teacher_expert_weights(module)
            for e in torch.unique(index).tolist():
                rows = (index == e).any(dim=-1)
                x = hidden[rows]
                mid = (module.act_fn(x @ W["gate"][e].T) * (x @ W["up"][e].T)).float()
                x = x.float()
                g_in[l][e] += x.T @ x
                g_mid[l][e] += mid.T @ mid

        return fn

    hs = [b.experts.register_forward_pre_hook(hook(l), with_kwargs=True) for l, b in enumerate(blocks)]
    x_all = torch.as_tensor(np.asarray(input_ids))
    with torch.no_grad():
        for i in range(0, len(x_all), batch_size):
            model(input_ids=x_all[i : i + batch_size], use_cache=False)
    for h in hs:
        h.remove()
    return counts, g_in, g_mid


def old_layer_factors(experts, max_rank, counts, gram_in, gram_mid, damping=1e-2, n_experts=None):
    """The old ``layer_factors`` (frequency core, activation SVD): float64, one expert at a time."""
    import torch

    from moedistill.compression.init import LayerFactors, teacher_expert_weights

    def whitening(gram):
        g = gram.double()
        n = g.shape[-1]
        scale = g.diagonal().mean()
        if not torch.isfinite(scale) or scale <= 0:
            return torch.eye(n, dtype=torch.float64)
        g = g + damping * scale * torch.eye(n, dtype=torch.float64)
        S, info = torch.linalg.cholesky_ex(g)
        if info.item() != 0:
            S = torch.linalg.cholesky(g + scale * torch.eye(n, dtype=torch.float64))
        return S

    W_all = teacher_expert_weights(experts)
    out = LayerFactors({}, {}, {}, {})
    w = counts / counts.sum()
    for p in ("gate", "up", "down"):
        W = W_all[p].double()
        C = torch.einsum("e,eoi->oi", w.to(W), W)
        D = W - C
        Bs, As = [], []
        for e in range(n_experts or W.shape[0]):
            S = whitening((gram_mid if p == "down" else gram_in)[e])  # gate and up: computed twice, as before
            U, sv, Vh = torch.linalg.svd(D[e] @ S, full_matrices=False)
            Vh = torch.linalg.solve_triangular(S, Vh, upper=False, left=False)
            U, sv, Vh = U[:, :max_rank], sv[:max_rank], Vh[:max_rank]
            root = sv.sqrt()
            Bs.append(U * root)
            As.append(root[:, None] * Vh)
        out.core[p] = C.float()
        out.B[p] = torch.stack(Bs).float()
        out.A[p] = torch.stack(As).float()
        del W, D
    return out


# --------------------------------------------------------------------------- variants (one process each)


def v_compress_new(a) -> dict:
    from moedistill.compression.init import compress_layers

    teacher = _resident_teacher(a.teacher)
    ids = _calibration()
    r = _rank(teacher)
    rss0, cpu0, t0 = _rss(), _cpu(), time.perf_counter()
    v = ("frequency", "activation")
    res = compress_layers(teacher, {v: r}, calibration=ids, error_ranks={v: [r]}, keep=set())
    return {"cpu_s": _cpu() - cpu0, "wall_s": time.perf_counter() - t0, "layer_s": res.seconds,
            "peak_above_teacher": _peak() - rss0, "stats_bytes": _stats_bytes(teacher), "rank": r,
            "errors": res.errors[(*v, r)], "svd_check": res.svd_check}


def v_compress_old(a) -> dict:
    import torch

    from moedistill.compression.init import layer_errors
    from moedistill.compression.modeling_moedistill import find_moe_blocks

    teacher = _resident_teacher(a.teacher)
    ids = _calibration()
    r = _rank(teacher)
    rss0, cpu0, t0 = _rss(), _cpu(), time.perf_counter()
    counts, g_in, g_mid = old_calibration(teacher, ids)
    cpu_calib = _cpu() - cpu0
    cpu_f, errors = 0.0, []
    E = teacher.config.num_experts
    n = a.old_experts or E
    for l, (name, block) in enumerate(find_moe_blocks(teacher)):
        c = _cpu()
        f = old_layer_factors(block.experts, r, counts[l], g_in[l], g_mid[l], n_experts=n)
        cpu_f += (_cpu() - c) * E / n
        if n == E:
            from moedistill.compression.init import teacher_expert_weights

            B = {p: f.B[p] for p in f.B}
            A = {p: f.A[p] for p in f.A}
            errors.append({"layer": name, **layer_errors(teacher_expert_weights(block.experts), f.core, B, A,
                                                         g_in[l], g_mid[l])})
        del f
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"cpu_s": cpu_calib + cpu_f, "cpu_calibration_s": cpu_calib, "experts_timed": n,
            "wall_s": time.perf_counter() - t0, "peak_above_teacher": _peak() - rss0, "errors": errors}


def v_make_ckpt(a) -> dict:
    import moedistill.compression as mc
    from moedistill.models import load_tokenizer

    teacher = _teacher(a.teacher)
    student = mc.compress_model(teacher, compression_ratio=RATIO, core="frequency", svd="activation",
                                calibration=_calibration())
    student.save_pretrained(a.ckpt)
    load_tokenizer(a.teacher).save_pretrained(a.ckpt)
    return {"ckpt": a.ckpt}


def v_export(a) -> dict:
    import shutil

    from moedistill.compression.export import _FileTensors, export_checkpoint

    out = Path(a.work) / f"export-{Path(a.ckpt).name}"
    shutil.rmtree(out, ignore_errors=True)
    # the student's size from its file's header: export_checkpoint reads it a tensor at a time, so
    # loading it here would set the peak this measures
    student_bytes = sum(w[4] for w in _FileTensors(Path(a.ckpt)).where.values())
    rss0, t0 = _rss(), time.perf_counter()
    export_checkpoint(a.ckpt, out)
    info = {"peak_rss": _peak(), "peak_above_start": _peak() - rss0, "student_bytes": student_bytes,
            "wall_s": time.perf_counter() - t0,
            "shards": len(list(out.glob("model-*.safetensors")))}
    shutil.rmtree(out, ignore_errors=True)
    return info


def v_export_check(a) -> dict:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from moedistill.compression.export import export_checkpoint
    from moedistill.models import get_model

    out = Path(a.work) / "export-fp32"
    shutil.rmtree(out, ignore_errors=True)
    ids = torch.as_tensor(_calibration()[:2, :64])
    student, _ = get_model(a.ckpt, with_tokenizer=False)
    student = student.float()
    with torch.no_grad():
        ref = student(input_ids=ids).logits
    del student
    export_checkpoint(a.ckpt, out, dtype="float32")
    dense = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = dense(input_ids=ids).logits
    shutil.rmtree(out, ignore_errors=True)
    return {"max_abs_diff": float((got - ref).abs().max()), "max_abs_logit": float(ref.abs().max()),
            "type": type(dense).__name__}


def v_experts(a) -> dict:
    import torch
    from transformers import AutoConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    import moedistill.compression.modeling_moedistill as mm
    from moedistill.compression.init import rank_for_ratio
    from moedistill.compression.modeling_moedistill import CompressedExperts

    cfg = AutoConfig.from_pretrained(a.teacher)
    # A standalone experts module gets no implementation from from_pretrained (None: transformers' per-expert
    # loop); a loaded teacher gets grouped_mm, torch's grouped matmul, which runs on the CPU in torch >= 2.10.
    cfg._experts_implementation = a.experts_implementation
    E, H, I, k, T = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok, 2048
    torch.manual_seed(0)
    teacher = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        teacher.gate_up_proj.normal_(std=0.02)
        teacher.down_proj.normal_(std=0.02)
    r = rank_for_ratio(RATIO, E, H, I)
    student = CompressedExperts(E, H, I, r)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if n.endswith("_B"):
                p.normal_(std=0.02)
    x = (torch.randn(T, H) * 0.1).requires_grad_()
    w, idx = torch.softmax(torch.randn(T, E), -1).topk(k, -1)
    w = w / w.sum(-1, keepdim=True)

    def time_it(m):
        best = float("inf")
        for _ in range(a.repeat):
            m.zero_grad(set_to_none=True)
            x.grad = None
            t = time.perf_counter()
            m(x, idx, w).square().mean().backward()
            best = min(best, time.perf_counter() - t)
        return best

    t_teacher, t_student = time_it(teacher), time_it(student)
    grouped, mm.USE_GROUPED_MM = mm.USE_GROUPED_MM, False
    t_loop = time_it(student)  # the per-expert loop, _GroupedLowRank's fallback engine, same process
    mm.USE_GROUPED_MM = grouped
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    return {"teacher_s": t_teacher, "student_s": t_student, "ratio": t_student / t_teacher, "rank": r,
            "student_loop_s": t_loop, "loop_ratio": t_loop / t_teacher, "grouped_mm": grouped,
            "param_ratio": n_s / n_t, "implementation": getattr(cfg, "_experts_implementation", None),
            "threads": torch.get_num_threads(), "tokens": T}


# --------------------------------------------------------------------------- evaluation (issue 13, item 5)

EVAL_BLOCKS, EVAL_LEN, EVAL_TOPK = 4, 512, 64


def _eval_blocks():
    from moedistill.data import prepare
    from moedistill.models import TINY_TEACHER, load_tokenizer

    return prepare(load_tokenizer(str(TINY_TEACHER)), "tiny", seq_len=EVAL_LEN, max_sequences=EVAL_BLOCKS).blocks


def _student(path):
    """The evaluated model: the scale teacher with noise (a tenth of its spread) on its lm_head."""
    import torch

    m = _teacher(path)
    w = m.lm_head.weight
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        std = w[:4096].float().std().item()
        for i in range(0, w.shape[0], 8192):  # in pieces: no fp32 copy of the whole head
            w[i : i + 8192] += (torch.randn(w[i : i + 8192].shape, generator=g) * (0.1 * std)).to(w.dtype)
    return m


def _targets(a):
    import torch

    d = torch.load(Path(a.work) / "eval-topk.pt")
    return [{"target_ids": d["ids"][i], "target_logprobs": d["logprobs"][i]} for i in range(EVAL_BLOCKS)]


def _old_kl_sparse(ids, lp, s_logp):
    import math

    import torch

    valid = ids >= 0
    t_lp = torch.where(valid, lp.to(s_logp.dtype), torch.full_like(s_logp[:, :1], -math.inf))
    s_sel = torch.where(valid, s_logp.gather(-1, ids.clamp_min(0)), torch.full_like(t_lp, -math.inf))
    q = t_lp.exp()
    kl_in = torch.where(valid, q * (t_lp - s_sel), torch.zeros_like(q)).sum(-1)
    q_rest = (1 - q.sum(-1)).clamp_min(0)
    p_rest = (1 - s_sel.exp().sum(-1)).clamp_min(1e-12)
    kl_rest = torch.where(q_rest > 1e-12, q_rest * (q_rest.clamp_min(1e-12).log() - p_rest.log()),
                          torch.zeros_like(q_rest))
    return kl_in + kl_rest


def old_evaluate(models: dict, input_ids, *, teacher=None, targets=None, batch_size=4, ece_bins=15) -> dict:
    """The evaluation before issue 13 (``_Metrics.update``, ``_kl_full``, ``_kl_sparse``), less the expert load:
    full fp32 log-softmaxes of every batch, all models and the teacher in memory at once."""
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F

    from moedistill.data import shifted_labels

    def kl_full(t_logits, s_logp):
        t_logp = F.log_softmax(t_logits.float(), dim=-1)
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)

    x_all = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    acc = {name: dict(nll=0.0, agree=0.0, kl=0.0, n=0, conf=torch.zeros(ece_bins, dtype=torch.float64),
                      acc=torch.zeros(ece_bins, dtype=torch.float64), cnt=torch.zeros(ece_bins, dtype=torch.float64))
           for name in models}
    with torch.no_grad():
        for i in range(0, len(x_all), batch_size):
            x = x_all[i : i + batch_size]
            y = shifted_labels(x)
            mask = y != -100
            t_logits = teacher(input_ids=x).logits[mask] if teacher is not None else None
            if targets is not None:
                ids = torch.stack([targets[j]["target_ids"] for j in range(i, i + len(x))])[mask]
                lp = torch.stack([targets[j]["target_logprobs"] for j in range(i, i + len(x))])[mask]
            for name, model in models.items():
                a = acc[name]
                s_logp = F.log_softmax(model(input_ids=x).logits.float(), dim=-1)[mask]
                yy = y[mask]
                a["nll"] += -s_logp.gather(-1, yy[:, None]).sum().item()
                a["n"] += int(mask.sum())
                conf, pred = s_logp.max(-1)
                conf = conf.exp().double()
                b = (conf * ece_bins).long().clamp(max=ece_bins - 1)
                a["conf"] += torch.bincount(b, conf, ece_bins)
                a["acc"] += torch.bincount(b, (pred == yy).double(), ece_bins)
                a["cnt"] += torch.bincount(b, minlength=ece_bins).double()
                if t_logits is not None:
                    a["kl"] += kl_full(t_logits, s_logp).sum().item()
                    a["agree"] += (t_logits.argmax(-1) == pred).sum().item()
                elif targets is not None:
                    a["kl"] += _old_kl_sparse(ids, lp, s_logp).sum().item()
                    top = lp.masked_fill(ids < 0, -math.inf).argmax(-1, keepdim=True)
                    a["agree"] += (ids.gather(-1, top).squeeze(-1) == pred).sum().item()
                del s_logp
    kl_name = "kl_exact" if teacher is not None else "kl_lower_bound"
    return {name: {"ce": a["nll"] / a["n"], "perplexity": math.exp(a["nll"] / a["n"]), "agreement": a["agree"] / a["n"],
                   kl_name: a["kl"] / a["n"], "ece": float((a["acc"] - a["conf"]).abs().sum() / a["cnt"].sum())}
            for name, a in acc.items()}


def v_eval_targets(a) -> dict:
    """Top-k targets of the teacher on the eval blocks, one block at a time, into <work>/eval-topk.pt."""
    import torch

    teacher = _teacher(a.teacher)
    ids, lps = [], []
    with torch.no_grad():
        for block in torch.as_tensor(_eval_blocks()):
            lp, i = torch.log_softmax(teacher(input_ids=block[None]).logits[0].float(), -1).topk(EVAL_TOPK, -1)
            ids.append(i)
            lps.append(lp)
    torch.save({"ids": torch.stack(ids), "logprobs": torch.stack(lps)}, Path(a.work) / "eval-topk.pt")
    return {}


def v_eval_new(a) -> dict:
    from moedistill.evaluate import evaluate_models

    blocks, kw = _eval_blocks(), {}
    if a.targets == "topk":
        kw["teacher_targets"] = _targets(a)
    else:
        kw["teacher"] = lambda: _teacher(a.teacher)
    rss0, t0 = _rss(), time.perf_counter()
    m = evaluate_models({"student": lambda: _student(a.teacher)}, blocks, batch_size=a.batch, work_dir=a.work,
                        **kw)["student"]
    return {"peak_rss": _peak(), "start_rss": rss0, "models_held": 1, "wall_s": time.perf_counter() - t0,
            "metrics": {k: v for k, v in m.items() if k != "expert_load"}}


def v_eval_old(a) -> dict:
    blocks, kw = _eval_blocks(), {}
    rss0, t0 = _rss(), time.perf_counter()
    if a.targets == "topk":
        kw["targets"] = _targets(a)
    else:
        kw["teacher"] = _teacher(a.teacher)
    m = old_evaluate({"student": _student(a.teacher)}, blocks, batch_size=a.batch, **kw)["student"]
    return {"peak_rss": _peak(), "start_rss": rss0, "models_held": 1 + (a.targets != "topk"),
            "wall_s": time.perf_counter() - t0, "metrics": m}


def v_eval_f64(a) -> dict:
    """ce and kl_lower_bound of the student on the top-k targets in float64, one block at a time (the
    same batched bf16 forward as eval-new and eval-old), for the error of each."""
    import torch
    import torch.nn.functional as F

    from moedistill.data import shifted_labels

    student, targets, ids = _student(a.teacher), _targets(a), torch.as_tensor(_eval_blocks())
    with torch.no_grad():
        logits = student(input_ids=ids).logits
    del student
    nll = kl = 0.0
    y = shifted_labels(ids)
    for i in range(len(ids)):
        m = y[i] != -100
        s_logp = F.log_softmax(logits[i][m].double(), -1)
        nll -= s_logp.gather(-1, y[i][m][:, None]).sum().item()
        t = targets[i]
        kl += _old_kl_sparse(t["target_ids"][m], t["target_logprobs"][m].double(), s_logp).sum().item()
    n = int((y != -100).sum())
    return {"ce": nll / n, "kl_lower_bound": kl / n}


def v_train_loss(a) -> dict:
    import torch
    from transformers import TrainingArguments

    from moedistill.config import LossConfig
    from moedistill.data import shifted_labels
    from moedistill.trainer import DistillationTrainer

    ids = torch.as_tensor(_eval_blocks())
    d = torch.load(Path(a.work) / "eval-topk.pt")
    inputs = {"input_ids": ids, "labels": shifted_labels(ids), "target_ids": d["ids"], "target_logprobs": d["logprobs"]}
    rss0, t0 = _rss(), time.perf_counter()
    student = _student(a.teacher).train()
    args = TrainingArguments(output_dir=str(Path(a.work) / "train-loss"), use_cpu=True, report_to=[],
                             per_device_train_batch_size=EVAL_BLOCKS)
    # the reference recipe's loss (conf/distillation/default.yaml)
    trainer = DistillationTrainer(student, args, loss=LossConfig(alpha=0.5, temperature=2.0, fused_linear=a.fused))
    trainer.compute_loss(student, inputs).backward()
    return {"peak_rss": _peak(), "start_rss": rss0, "models_held": 1, "wall_s": time.perf_counter() - t0}


VARIANTS = {"compress-new": v_compress_new, "compress-old": v_compress_old, "make-ckpt": v_make_ckpt,
            "export": v_export, "export-check": v_export_check, "experts": v_experts,
            "eval-targets": v_eval_targets, "eval-new": v_eval_new, "eval-old": v_eval_old,
            "eval-f64": v_eval_f64, "train-loss": v_train_loss}


# --------------------------------------------------------------------------- driver


def _run(variant: str, **kw) -> dict:
    args = [sys.executable, __file__, "--variant", variant]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    t = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  [{variant} {kw.get('teacher') or kw.get('ckpt')}: {time.perf_counter() - t:.0f} s]", flush=True)
    return res


def _gib(b) -> str:
    return f"{b / 2**30:.2f} GiB"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=sorted(VARIANTS))
    p.add_argument("--teacher")
    p.add_argument("--ckpt")
    p.add_argument("--teacher1", default="/tmp/q3-1layer")
    p.add_argument("--teacher2", default="/tmp/q3-2layer")
    p.add_argument("--work", default="/tmp/bench_scale")
    p.add_argument("--sections", default="compress,export,experts")
    p.add_argument("--old-experts", type=int, default=0, help="time the old factors on N experts (0: all)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--experts-implementation", default="grouped_mm",
                   help="the teacher experts' config._experts_implementation (grouped_mm, batched_mm, eager)")
    p.add_argument("--targets", choices=["online", "topk"], default="online", help="eval-*: the teacher's targets")
    p.add_argument("--batch", type=int, default=EVAL_BLOCKS, help="eval-new, eval-old: blocks per batch")
    p.add_argument("--fused", type=int, default=1, help="train-loss: loss.fused_linear")
    a = p.parse_args()
    if a.variant:
        print(json.dumps(VARIANTS[a.variant](a)))
        return
    Path(a.work).mkdir(parents=True, exist_ok=True)
    sections = set(a.sections.split(","))
    print(f"load average at start: {os.getloadavg()[0]:.2f} (2 cores)")
    results = {}
    if "compress" in sections:
        new1 = _run("compress-new", teacher=a.teacher1)
        old1 = _run("compress-old", teacher=a.teacher1, old_experts=a.old_experts)
        new2 = _run("compress-new", teacher=a.teacher2)
        results["compress"] = {"new1": new1, "old1": old1, "new2": new2}
        print(f"\ncompression, 1 layer (rank {new1['rank']}, frequency+activation, "
              f"{CALIB_SEQUENCES}x{CALIB_LEN} calibration tokens)")
        print(f"{'':<34}{'old':>12}{'new':>12}{'ratio':>8}")
        old_note = "" if old1["experts_timed"] == 128 else f" (factors timed on {old1['experts_timed']} experts, x E/N)"
        print(f"{'CPU seconds' + old_note:<34}{old1['cpu_s']:12.1f}{new1['cpu_s']:12.1f}"
              f"{new1['cpu_s'] / old1['cpu_s']:8.3f}")
        print(f"{'wall seconds':<34}{old1['wall_s']:12.1f}{new1['wall_s']:12.1f}")
        st = new1["stats_bytes"]
        for tag, r in (("1 layer", new1), ("2 layers", new2)):
            print(f"peak RSS above teacher, {tag}: {_gib(r['peak_above_teacher'])} = "
                  f"{r['peak_above_teacher'] / st:.2f}x one layer's statistics ({_gib(st)})")
        print(f"old, 1 layer: peak RSS above teacher {_gib(old1['peak_above_teacher'])}")
        if old1["errors"]:
            print("error on routed inputs, new (fp32 batched) vs old (fp64 per expert), relative difference:")
            for rn, ro in zip(new1["errors"], old1["errors"]):
                for proj in ("gate", "up", "down"):
                    k = f"{proj}_on_inputs"
                    print(f"  {rn['layer']} {proj}: {ro[k]:.6f} -> {rn[k]:.6f} ({rn[k] / ro[k] - 1:+.2e}); "
                          f"weights {ro[proj]:.6f} -> {rn[proj]:.6f}")
        worst = max(new1["svd_check"], key=lambda r: abs(r["relative_difference"]))
        print(f"report's fp64 spot check: worst relative difference {worst['relative_difference']:+.2e}")
    if "export" in sections:
        ck = {}
        for tag, t in (("1", a.teacher1), ("2", a.teacher2)):
            ck[tag] = str(Path(a.work) / f"ckpt-{tag}layer")
            if not (Path(ck[tag]) / "config.json").is_file():
                _run("make-ckpt", teacher=t, ckpt=ck[tag])
        e1, e2 = _run("export", ckpt=ck["1"], work=a.work), _run("export", ckpt=ck["2"], work=a.work)
        chk = _run("export-check", ckpt=ck["1"], work=a.work)
        results["export"] = {"1": e1, "2": e2, "check": chk}
        print(f"\nexport (bf16, shards <= 2 GiB)\n{'':<30}{'1 layer':>12}{'2 layers':>12}{'ratio':>8}")
        print(f"{'peak RSS':<30}{e1['peak_rss'] / 2**30:12.2f}{e2['peak_rss'] / 2**30:12.2f}"
              f"{e2['peak_rss'] / e1['peak_rss']:8.3f}")
        print(f"{'peak RSS above start':<30}{e1['peak_above_start'] / 2**30:12.2f}"
              f"{e2['peak_above_start'] / 2**30:12.2f}{e2['peak_above_start'] / e1['peak_above_start']:8.3f}")
        print(f"{'student weights, GiB':<30}{e1['student_bytes'] / 2**30:12.2f}{e2['student_bytes'] / 2**30:12.2f}")
        print(f"{'seconds':<30}{e1['wall_s']:12.1f}{e2['wall_s']:12.1f}")
        print(f"fp32 export vs compressed model, 1 layer: logits max abs diff {chk['max_abs_diff']:.2e} "
              f"(max |logit| {chk['max_abs_logit']:.1f}), loaded as {chk['type']}")
    if "experts" in sections:
        ex = _run("experts", teacher=a.teacher1, repeat=a.repeat, experts_implementation=a.experts_implementation)
        results["experts"] = ex
        print(f"\nexperts fwd+bwd, {ex['tokens']} tokens, top-8, {ex['threads']} threads: teacher "
              f"({ex['implementation']}) "
              f"{ex['teacher_s']:.2f} s, student (rank {ex['rank']}, {ex['param_ratio']:.3f} of the parameters) "
              f"{ex['student_s']:.2f} s (grouped_mm engine: {ex['grouped_mm']}), ratio {ex['ratio']:.3f}; "
              f"per-expert loop engine {ex['student_loop_s']:.2f} s, ratio {ex['loop_ratio']:.3f}")
    if "eval" in sections:
        results["eval"] = _eval_section(a)
    (Path(a.work) / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def _eval_section(a) -> dict:
    weights = sum(f.stat().st_size for f in Path(a.teacher1).glob("*.safetensors"))  # = the student's
    if not (Path(a.work) / "eval-topk.pt").is_file():
        _run("eval-targets", teacher=a.teacher1, work=a.work)
    # the old online evaluation holds teacher, student and several [n, V] fp32 tensors: one block per batch
    # keeps it under this machine's share of memory (its metrics do not depend on the batching)
    runs = {
        "train-loss, fused lm_head": _run("train-loss", teacher=a.teacher1, work=a.work, fused=1),
        "train-loss, lm_head + chunked loss": _run("train-loss", teacher=a.teacher1, work=a.work, fused=0),
        "eval new, top-k targets": _run("eval-new", teacher=a.teacher1, work=a.work, targets="topk"),
        "eval new, online teacher": _run("eval-new", teacher=a.teacher1, work=a.work, targets="online"),
        "eval new, online (1 block/batch)": _run("eval-new", teacher=a.teacher1, work=a.work, targets="online",
                                                 batch=1),
        "eval old, top-k targets": _run("eval-old", teacher=a.teacher1, work=a.work, targets="topk"),
        "eval old, online (1 block/batch)": _run("eval-old", teacher=a.teacher1, work=a.work, targets="online",
                                                 batch=1),
    }
    ref = runs["train-loss, fused lm_head"]
    ref_work = ref["peak_rss"] - ref["start_rss"] - weights
    print(f"\nevaluation vs a training step's loss, V = 151,936, {EVAL_BLOCKS} x {EVAL_LEN} tokens, 1-layer scale "
          f"teacher (weights {_gib(weights)} per model); peak RSS, and above the weights held")
    print(f"{'':<36}{'peak GiB':>10}{'/ train':>9}{'work GiB':>10}{'/ train':>9}{'seconds':>9}")
    for name, r in runs.items():
        work = r["peak_rss"] - r["start_rss"] - r["models_held"] * weights
        print(f"{name:<36}{r['peak_rss'] / 2**30:10.2f}{r['peak_rss'] / ref['peak_rss']:9.3f}{work / 2**30:10.2f}"
              f"{work / ref_work:9.3f}{r['wall_s']:9.1f}")
    # a bf16 forward's rounding depends on the batch's shape: compare runs of the same batching
    print("metrics, old -> new (difference), same blocks per batch:")
    for kind in ("top-k targets", "online (1 block/batch)"):
        new, old = runs[f"eval new, {kind}"]["metrics"], runs[f"eval old, {kind}"]["metrics"]
        diffs = ", ".join(f"{k} {old[k]:.6f} -> {new[k]:.6f} ({new[k] - old[k]:+.1e}, rel {new[k] / old[k] - 1:+.1e})"
                          for k in old)
        print(f"  {kind}: {diffs}")
    ref = _run("eval-f64", teacher=a.teacher1, work=a.work)
    new, old = runs["eval new, top-k targets"]["metrics"], runs["eval old, top-k targets"]["metrics"]
    print("top-k targets, error against float64 (from the same bf16 logits): "
          + ", ".join(f"{k} old {old[k] - ref[k]:+.1e}, new {new[k] - ref[k]:+.1e}" for k in ref))
    runs["float64 reference, top-k targets"] = ref
    return runs


if __name__ == "__main__":
    main()
