"""Evaluation of a student against data and the teacher.

Metrics (all per counted next-token position, labels already shifted):

- ``perplexity`` / ``ce``: exp of the mean next-token cross-entropy of the model.
- ``agreement``: fraction of positions where the model's argmax equals the teacher's.
- ``kl_exact`` (with an online teacher): KL(teacher || model) at temperature 1, exact over
  the full vocabulary; ``kl_lower_bound`` (with a top-k cache instead): the KL between the
  two distributions coarsened to the stored ids plus one bucket for the rest, a lower
  bound of the exact KL by the data-processing inequality, tight when the stored ids hold
  nearly all the mass (the names of ``moedistill.targets.KL_NAMES``).
- ``ece``: expected calibration error of the next-token prediction: positions are binned
  by the model's top-1 probability; ECE = sum_b |B_b|/N * |accuracy_b - confidence_b|.
- ``expert_load`` (MoE models): per layer, the fraction of routed (token, slot) pairs that
  went to each expert.

``evaluate_models`` / ``evaluate_model`` are pure functions of tensors and modules; the
``moedistill eval`` glue is ``moedistill.commands.eval``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moedistill.data import shifted_labels
from moedistill.errors import UserError
from moedistill.targets import KL_NAMES, PAD_LOGPROB, TopKTargets


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


def _kl_sparse(targets: TopKTargets, s_logp: torch.Tensor) -> torch.Tensor:
    """KL over the stored ids plus one bucket for the remaining mass (teacher and model)."""
    valid = targets.valid
    safe = targets.ids.clamp_min(0)
    t_lp = targets.logprobs.float()
    t_lp = torch.where(valid, t_lp, torch.full_like(t_lp, PAD_LOGPROB))
    s_sel = torch.where(valid, s_logp.gather(-1, safe), torch.full_like(t_lp, PAD_LOGPROB))
    q = t_lp.exp()
    kl_in = torch.where(valid, q * (t_lp - s_sel), torch.zeros_like(q)).sum(-1)
    q_rest = (1 - q.sum(-1)).clamp_min(0)
    p_rest = (1 - s_sel.exp().sum(-1)).clamp_min(1e-12)
    kl_rest = torch.where(
        q_rest > 1e-12, q_rest * (q_rest.clamp_min(1e-12).log() - p_rest.log()), torch.zeros_like(q_rest)
    )
    return kl_in + kl_rest


class _Metrics:
    """Running sums of one model's metrics over batches."""

    def __init__(self, model, ece_bins: int, name: str = "model"):
        self.model, self.name = model, name
        self.bins = ece_bins
        self.rec = _ExpertLoadRecorder(model)
        self.nll = self.agree = self.kl = 0.0
        self.n = 0
        self.conf = torch.zeros(ece_bins, dtype=torch.float64)
        self.acc = torch.zeros(ece_bins, dtype=torch.float64)
        self.cnt = torch.zeros(ece_bins, dtype=torch.float64)

    def update(self, x, y, mask, t_logits=None, t_sparse: TopKTargets | None = None):
        device = next(self.model.parameters()).device
        s_logp = F.log_softmax(self.model(input_ids=x.to(device)).logits.float(), dim=-1)[mask.to(device)]  # [n, V]
        yy = y[mask].to(device)
        nll = -s_logp.gather(-1, yy[:, None]).sum().item()
        if not math.isfinite(nll):  # a perplexity of inf (or nan) would read as a result
            raise UserError(f"{self.name} gives non-finite log-probabilities (NaN/inf logits): its weights are "
                            f"damaged or overflowed; check the checkpoint, or evaluate in float32 (student.dtype)")
        self.nll += nll
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
        elif t_sparse is not None:
            t = TopKTargets(t_sparse.ids.to(device), t_sparse.logprobs.to(device))
            self.kl += _kl_sparse(t, s_logp).sum().item()
            top = t.logprobs.masked_fill(~t.valid, PAD_LOGPROB).argmax(-1, keepdim=True)
            self.agree += (t.ids.gather(-1, top).squeeze(-1) == pred).sum().item()

    def result(self, kl_name: str | None) -> dict:
        n = max(self.n, 1)
        out = {
            "ce": self.nll / n,
            "perplexity": math.exp(self.nll / n),
            "tokens": self.n,
            "ece": float((self.acc - self.conf).abs().sum() / self.cnt.sum().clamp_min(1)),
        }
        if kl_name is not None:
            out["agreement"] = self.agree / n
            out[kl_name] = self.kl / n
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
        teacher_targets: optional sequence of cache items (dicts with ``target_ids`` [L, W]
            and ``target_logprobs`` [L, W]) aligned with ``input_ids`` (top-k cache).
    Returns:
        ``{name: metrics}``; metrics hold ``perplexity``, ``ce``, ``tokens``, ``ece`` and,
        given a teacher, ``agreement`` and ``kl_exact`` (online teacher) or ``kl_lower_bound``
        (top-k targets); ``expert_load`` for MoE models.
    """
    x_all = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    for m in models.values():
        m.eval()
    acc = {name: _Metrics(m, ece_bins, name) for name, m in models.items()}
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
                kw["t_sparse"] = TopKTargets(
                    torch.stack([torch.as_tensor(it["target_ids"]) for it in items])[mask],
                    torch.stack([torch.as_tensor(it["target_logprobs"]) for it in items])[mask],
                )
            for a in acc.values():
                a.update(x, y, mask, **kw)
    finally:
        for a in acc.values():
            a.rec.close()
    kl_name = KL_NAMES["dense"] if teacher is not None else (KL_NAMES["topk"] if teacher_targets is not None else None)
    return {name: a.result(kl_name) for name, a in acc.items()}


def evaluate_model(model, input_ids, **kwargs) -> dict:
    """``evaluate_models`` for one model; same arguments, returns its metrics dict."""
    return evaluate_models({"model": model}, input_ids, **kwargs)["model"]


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
