"""Evaluation of a student against data and the teacher.

Metrics (all per counted next-token position, labels already shifted):

- ``perplexity`` / ``ce``: exp of the mean next-token cross-entropy of the model.
- ``agreement``: fraction of positions where the model's argmax equals the teacher's.
- ``kl``: KL(teacher || model) at temperature 1. With an online teacher it is exact over
  the full vocabulary; with a top-k cache it is the KL between the two distributions
  coarsened to the stored ids plus one bucket for the rest (a lower bound of the full KL
  by the data-processing inequality, tight when the stored ids hold nearly all the mass).
- ``ece``: expected calibration error of the next-token prediction: positions are binned
  by the model's top-1 probability; ECE = sum_b |B_b|/N * |accuracy_b - confidence_b|.
- ``expert_load`` (MoE models): per layer, the fraction of routed (token, slot) pairs that
  went to each expert.

``evaluate_model`` is a pure function of tensors and modules; ``eval_from_config`` is the
``moedistill eval`` glue.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moedistill.data import shifted_labels


class _ExpertLoadRecorder:
    """Counts the router's top-k choices of every MoE layer through forward hooks."""

    def __init__(self, model):
        self.counts: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, mod in model.named_modules():
            n_exp = getattr(mod, "num_experts", None)
            if n_exp is not None and hasattr(mod, "top_k") and hasattr(mod, "weight") and name.endswith("gate"):
                self.counts[name] = torch.zeros(n_exp, dtype=torch.float64)
                self.handles.append(mod.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(_mod, _inp, out):
            idx = out[-1] if isinstance(out, tuple) else None
            if idx is not None and idx.dtype in (torch.int64, torch.int32):
                self.counts[name] += torch.bincount(idx.reshape(-1).cpu(), minlength=len(self.counts[name])).double()

        return hook

    def close(self):
        for h in self.handles:
            h.remove()

    def fractions(self) -> dict[str, list[float]]:
        return {k: (v / v.sum().clamp_min(1)).tolist() for k, v in self.counts.items() if v.sum() > 0}


def _kl_full(t_logits: torch.Tensor, s_logp: torch.Tensor) -> torch.Tensor:
    t_logp = F.log_softmax(t_logits.float(), dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


def _kl_sparse(ids: torch.Tensor, t_lp: torch.Tensor, s_logp: torch.Tensor) -> torch.Tensor:
    """KL over the stored ids plus one bucket for the remaining mass (teacher and model)."""
    valid = ids >= 0
    safe = ids.clamp_min(0)
    t_lp = torch.where(valid, t_lp.float(), torch.full_like(t_lp.float(), -math.inf))
    s_sel = torch.where(valid, s_logp.gather(-1, safe), torch.full_like(t_lp, -math.inf))
    q = t_lp.exp()
    kl_in = torch.where(valid, q * (t_lp - s_sel), torch.zeros_like(q)).sum(-1)
    q_rest = (1 - q.sum(-1)).clamp_min(0)
    p_rest = (1 - s_sel.exp().sum(-1)).clamp_min(1e-12)
    kl_rest = torch.where(q_rest > 1e-12, q_rest * (q_rest.clamp_min(1e-12).log() - p_rest.log()), torch.zeros_like(q_rest))
    return kl_in + kl_rest


class _Metrics:
    """Running sums of one model's metrics over batches."""

    def __init__(self, model, ece_bins: int):
        self.model = model
        self.bins = ece_bins
        self.rec = _ExpertLoadRecorder(model)
        self.nll = self.agree = self.kl = 0.0
        self.n = 0
        self.conf = torch.zeros(ece_bins, dtype=torch.float64)
        self.acc = torch.zeros(ece_bins, dtype=torch.float64)
        self.cnt = torch.zeros(ece_bins, dtype=torch.float64)

    def update(self, x, y, mask, t_logits=None, t_ids=None, t_lps=None):
        device = next(self.model.parameters()).device
        s_logp = F.log_softmax(self.model(input_ids=x.to(device)).logits.float(), dim=-1)[mask.to(device)]  # [n, V]
        yy = y[mask].to(device)
        self.nll += -s_logp.gather(-1, yy[:, None]).sum().item()
        self.n += int(mask.sum())
        conf, pred = s_logp.max(-1)
        conf = conf.exp().double().cpu()
        b = (conf * self.bins).long().clamp(max=self.bins - 1)
        self.conf += torch.bincount(b, conf, self.bins)
        self.acc += torch.bincount(b, (pred == yy).double().cpu(), self.bins)
        self.cnt += torch.bincount(b, minlength=self.bins).double()
        if t_logits is not None:
            t_logits = t_logits.to(device)
            self.kl += _kl_full(t_logits, s_logp).sum().item()
            self.agree += (t_logits.argmax(-1) == pred).sum().item()
        elif t_ids is not None:
            ids, lps = t_ids.to(device), t_lps.to(device)
            self.kl += _kl_sparse(ids, lps, s_logp).sum().item()
            top = lps.masked_fill(ids < 0, -math.inf).argmax(-1, keepdim=True)
            self.agree += (ids.gather(-1, top).squeeze(-1) == pred).sum().item()

    def result(self, has_teacher: bool) -> dict:
        n = max(self.n, 1)
        out = {
            "ce": self.nll / n,
            "perplexity": math.exp(self.nll / n),
            "tokens": self.n,
            "ece": float((self.acc - self.conf).abs().sum() / self.cnt.sum().clamp_min(1)),
        }
        if has_teacher:
            out["agreement"] = self.agree / n
            out["kl"] = self.kl / n
        load = self.rec.fractions()
        if load:
            out["expert_load"] = load
        return out


@torch.no_grad()
def evaluate_models(
    models: dict,
    input_ids: np.ndarray | torch.Tensor,
    *,
    teacher=None,
    teacher_targets=None,
    batch_size: int = 8,
    ece_bins: int = 15,
    desc: str = "eval",
) -> dict[str, dict]:
    """Evaluate several models on the same packed blocks, running the teacher once per batch.

    Args:
        models: ``{name: causal LM returning .logits [B, L, V]}``.
        input_ids: int [N, L] packed blocks.
        teacher: optional teacher model (exact KL and agreement), or
        teacher_targets: optional sequence of cache items (dicts with ``target_ids`` [L, K]
            and ``target_logprobs`` [L, K]) aligned with ``input_ids`` (top-k cache).
    Returns:
        ``{name: metrics}``; metrics hold ``perplexity``, ``ce``, ``tokens``, ``ece`` and,
        given a teacher, ``agreement`` and ``kl``; ``expert_load`` for MoE models.
    """
    x_all = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    for m in models.values():
        m.eval()
    acc = {name: _Metrics(m, ece_bins) for name, m in models.items()}
    try:
        for i in tqdm(range(0, len(x_all), batch_size), desc=desc, unit="batch", leave=False):
            x = x_all[i : i + batch_size]
            y = shifted_labels(x)
            mask = y != -100
            kw = {}
            if teacher is not None:
                t_dev = next(teacher.parameters()).device
                kw["t_logits"] = teacher(input_ids=x.to(t_dev)).logits[mask.to(t_dev)]
            elif teacher_targets is not None:
                items = [teacher_targets[j] for j in range(i, min(i + batch_size, len(x_all)))]
                kw["t_ids"] = torch.stack([torch.as_tensor(it["target_ids"]) for it in items])[mask]
                kw["t_lps"] = torch.stack([torch.as_tensor(it["target_logprobs"]) for it in items])[mask]
            for a in acc.values():
                a.update(x, y, mask, **kw)
    finally:
        for a in acc.values():
            a.rec.close()
    has_teacher = teacher is not None or teacher_targets is not None
    return {name: a.result(has_teacher) for name, a in acc.items()}


def evaluate_model(model, input_ids, **kwargs) -> dict:
    """``evaluate_models`` for one model; same arguments, returns its metrics dict."""
    return evaluate_models({"model": model}, input_ids, **kwargs)["model"]


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def eval_blocks(cfg, tokenizer) -> np.ndarray:
    """The packed blocks of ``cfg.data.eval_split`` that evaluation uses (``eval.max_sequences`` first)."""
    from moedistill.data import prepare

    d = cfg.data
    return prepare(tokenizer, d.dataset, seq_len=d.seq_len, dataset_config=d.dataset_config, split=d.eval_split,
                   text_field=d.text_field, max_sequences=cfg.eval.max_sequences or d.eval_max_sequences).blocks


def eval_from_config(cfg, model: str | None = None, cache: str | None = None, output: str | None = None) -> dict:
    """``moedistill eval``: evaluate ``model`` (default: the trained top-k student) on the eval split.

    The teacher is used online when it fits (it is loaded from ``cfg.teacher``); with
    ``cache`` (a cache of the eval split) the teacher is not loaded at all.
    """
    from moedistill.models import get_model

    name = model or str(Path(cfg.output_dir) / "train" / "topk" / "final")
    student, _ = get_model(name, dtype=cfg.student.dtype, trust_remote_code=cfg.student.trust_remote_code, with_tokenizer=False)
    teacher, tok = None, None
    targets = None
    if cache:
        from moedistill.cache import open_cache

        targets = open_cache(cache)
        blocks = np.stack([targets[i]["input_ids"].numpy() for i in range(len(targets))])
    else:
        teacher, tok = get_model(cfg.teacher.name, dtype=cfg.teacher.dtype, device_map=cfg.teacher.device_map,
                                 trust_remote_code=cfg.teacher.trust_remote_code)
        blocks = eval_blocks(cfg, tok)
    if cfg.eval.max_sequences:
        blocks = blocks[: cfg.eval.max_sequences]
    metrics = evaluate_model(student, blocks, teacher=teacher, teacher_targets=targets,
                             batch_size=cfg.eval.batch_size, ece_bins=cfg.eval.ece_bins)
    metrics["model"] = name
    metrics["parameters"] = count_parameters(student)
    text = json.dumps(metrics, indent=2)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")
    summary = {k: v for k, v in metrics.items() if k != "expert_load"}
    print(json.dumps(summary, indent=2))
    return metrics
