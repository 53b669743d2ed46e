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

How, at V = 151,936: every metric comes from ``moedistill.losses.position_stats``, the loss's
chunked engine (the KL is the loss's own code), a few [chunk, V] fp32 buffers at a time; a
model whose lm_head the fused loss can take hands over its final hidden states instead of its
logits, so its [B, L, V] logits never exist either. Models are evaluated one at a time (a
model given as a loader is loaded for its turn and dropped after), and an online teacher runs
once, before them, keeping its final hidden states on disk for all of them
(``_TeacherOutputs`` says why that and not its logits). Measured by
``benchmarks/bench_scale.py --sections eval`` (docs/DISTILLATION.md, "Evaluation at scale").

``evaluate_models`` / ``evaluate_model`` are pure functions of tensors and modules; the
``moedistill eval`` glue is ``moedistill.commands.eval``.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from moedistill.data import shifted_labels
from moedistill.errors import UserError
from moedistill.files import disk_full_as_error
from moedistill.losses import PositionStats, position_stats
from moedistill.targets import KL_NAMES, DenseTargets, HiddenTargets, TopKTargets


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


class _Metrics:
    """Running sums of one model's metrics over batches, from ``losses.position_stats``."""

    def __init__(self, name: str, ece_bins: int):
        self.name, self.bins = name, ece_bins
        self.nll = self.agree = self.kl = 0.0
        self.n = 0
        self.conf = torch.zeros(ece_bins, dtype=torch.float64)
        self.acc = torch.zeros(ece_bins, dtype=torch.float64)
        self.cnt = torch.zeros(ece_bins, dtype=torch.float64)

    def add(self, st: PositionStats, labels: torch.Tensor):
        """``st`` of one batch; ``labels`` [n]: the labels of its counted positions, in order."""
        nll = st.nll.sum(dtype=torch.float64).item()
        if not math.isfinite(nll):  # a perplexity of inf (or nan) would read as a result
            raise UserError(f"{self.name} gives non-finite log-probabilities (NaN/inf logits): its weights are "
                            f"damaged or overflowed; check the checkpoint, or evaluate in float32 (student.dtype)")
        self.nll += nll
        self.n += len(st.nll)
        conf = st.confidence.double().cpu()
        b = (conf * self.bins).long().clamp(max=self.bins - 1)
        self.conf += torch.bincount(b, conf, self.bins)
        self.acc += torch.bincount(b, (st.prediction == labels.to(st.prediction.device)).double().cpu(), self.bins)
        self.cnt += torch.bincount(b, minlength=self.bins).double()
        if st.kl is not None:
            self.kl += st.kl.sum(dtype=torch.float64).item()
            self.agree += (st.teacher_prediction == st.prediction).sum().item()

    def result(self, kl_name: str | None, load: dict, parameters: int) -> dict:
        n = max(self.n, 1)
        out = {
            "ce": self.nll / n,
            "perplexity": math.exp(self.nll / n),
            "tokens": self.n,
            "ece": float((self.acc - self.conf).abs().sum() / self.cnt.sum().clamp_min(1)),
            "parameters": parameters,
        }
        if kl_name is not None:
            out["agreement"] = self.agree / n
            out[kl_name] = self.kl / n
        if load:
            out["expert_load"] = load
        return out


def _output_layer(model):
    """The model's lm_head when the fused path can take it (an nn.Linear, nothing applied after), else None."""
    from moedistill.trainer import fused_linear_head  # here: the trainer module imports transformers.Trainer

    try:
        return fused_linear_head(model)
    except UserError:
        return None


def _outputs(model, head, x: torch.Tensor):
    """One forward of ``model`` on ``x`` [B, L] -> ``(hidden [B, L, H], weight, bias)`` when ``head``
    is its fusable lm_head (the lm_head's call is replaced, so the logits are never made), else
    ``(logits [B, L, V], None, None)``. The weight is taken inside the lm_head's call, where a
    device map's hooks have put it on the hidden states' device."""
    if head is None:
        return model(input_ids=x, use_cache=False).logits, None, None
    from moedistill.trainer import _forward_replaced

    box = {}

    def capture(hidden):
        bias = None if head.bias is None else head.bias.detach()
        box["out"] = (hidden.detach(), head.weight.detach(), bias)
        return hidden.new_zeros(())

    with _forward_replaced(head, capture):
        model(input_ids=x, use_cache=False)
    if "out" not in box:
        raise RuntimeError("evaluation: the model's forward never called its output layer")
    return box["out"]


def _load(model_or_loader):
    """A model, or a function that loads one (called when its turn comes)."""
    return model_or_loader if isinstance(model_or_loader, torch.nn.Module) else model_or_loader()


class _TeacherOutputs:
    """An online teacher's outputs on every evaluation batch, computed once for all models.

    Exact KL needs the teacher's full distribution at every position: N x V logits (159 GB in
    bf16 for 256 x 2,048 positions at V = 151,936), too much to keep. Kept instead: the
    teacher's final hidden states, one file per batch in a temporary directory ([B, L, H] in
    its dtype: H / V of the logits' size, 2.1 GB for those positions at H = 2,048), and its
    lm_head weight (the rest of the teacher can then be freed); the logits are remade a chunk
    at a time by ``position_stats`` from ``HiddenTargets``, the same matmul the lm_head does.
    A teacher whose output layer the fused path cannot take (not an nn.Linear, or a logit
    softcap) keeps its full logits per batch instead (N x V x 2 bytes on disk in bf16)."""

    def __init__(self, directory: str, n_batches: int):
        self.dir, self.n_batches = Path(directory), n_batches
        self.weight = self.bias = None
        self.n = 0

    def add(self, out, weight, bias):
        if weight is not None:
            self.weight, self.bias = weight, bias
        path = self.dir / f"batch-{self.n:06d}.pt"
        with disk_full_as_error(path, needed=out.numel() * out.element_size() * self.n_batches):
            torch.save(out.detach().cpu().clone(), path)
        self.n += 1

    def own_weights(self):
        """Copy the lm_head's weight out of the teacher: a reference would keep the memory of the
        whole teacher it was loaded with (e.g. the memory-mapped checkpoint file it views)."""
        if self.weight is not None:
            self.weight = self.weight.clone()
            self.bias = None if self.bias is None else self.bias.clone()

    def targets(self, i: int, device) -> DenseTargets | HiddenTargets:
        out = torch.load(self.dir / f"batch-{i:06d}.pt", mmap=True).to(device)
        if self.weight is None:
            return DenseTargets(out)
        if self.weight.device != device:  # once per model's device
            self.weight = self.weight.to(device)
            self.bias = None if self.bias is None else self.bias.to(device)
        return HiddenTargets(out, self.weight, self.bias)


def _batches(x_all: torch.Tensor, batch_size: int):
    for i, start in enumerate(range(0, len(x_all), batch_size)):
        x = x_all[start : start + batch_size]
        y = shifted_labels(x)
        yield i, start, x, y


def _cache_targets(teacher_targets, start: int, n: int, device) -> TopKTargets:
    """Items ``start .. start + n - 1`` of a cache, stacked: ids and log-probs [n, L, W]."""
    items = [teacher_targets[j] for j in range(start, start + n)]
    return TopKTargets(
        torch.stack([torch.as_tensor(it["target_ids"]) for it in items]).to(device),
        torch.stack([torch.as_tensor(it["target_logprobs"]) for it in items]).to(device),
    )


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
    chunk_size: int = 1024,
    work_dir: str | Path | None = None,
) -> dict[str, dict]:
    """Evaluate several models on the same packed blocks, one model at a time, the teacher once.

    An online teacher runs first, over every batch, and its outputs are kept on disk
    (``_TeacherOutputs``: its final hidden states, H / V of its logits); then each model is
    loaded (when given as a loader), evaluated against them and dropped, so only one model is
    in memory at a time. Every metric comes from ``moedistill.losses.position_stats``, the
    loss's chunked engine and its KL: no [N, V] fp32 tensor is made, and a model whose lm_head
    the fused loss can take never makes its logits either.

    Args:
        models: ``{name: model or a function returning one}``, causal LMs (``.logits`` [B, L, V]).
            A model that ``is`` the ``teacher`` is evaluated in the teacher's own pass.
        input_ids: int [N, L] packed blocks.
        teacher: optional teacher model, or a function returning one (loaded for its pass and
            then dropped): exact KL and agreement; or
        teacher_targets: optional sequence of cache items (dicts with ``target_ids`` [L, W]
            and ``target_logprobs`` [L, W]) aligned with ``input_ids`` (top-k cache).
        chunk_size: the most positions upcast to fp32 at a time (as the loss's ``chunk_size``).
        work_dir: where the online teacher's outputs are kept while the models are evaluated
            (a temporary directory inside it, removed afterwards); default: the system's temp dir.
    Returns:
        ``{name: metrics}``; metrics hold ``perplexity``, ``ce``, ``tokens``, ``ece``,
        ``parameters`` and, given a teacher, ``agreement`` and ``kl_exact`` (online teacher) or
        ``kl_lower_bound`` (top-k targets); ``expert_load`` for MoE models.
    """
    x_all = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    kl_name = KL_NAMES["dense"] if teacher is not None else (KL_NAMES["topk"] if teacher_targets is not None else None)
    n_batches = -(-len(x_all) // batch_size)
    results = {}
    if teacher is not None and work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="moedistill-eval-", dir=work_dir) as tmp:
        store = None
        if teacher is not None:
            store = _TeacherOutputs(tmp, n_batches)
            own = [name for name, m in models.items() if m is teacher]
            results.update(_teacher_pass(_load(teacher), own, x_all, batch_size, store, ece_bins, chunk_size,
                                         kl_name, desc))
            if not isinstance(teacher, torch.nn.Module):  # loaded here, dropped now: keep its lm_head alone
                store.own_weights()
        for name, m in models.items():
            if name in results:
                continue
            model = _load(m).eval()
            device = next(model.parameters()).device
            head = _output_layer(model)
            rec = _ExpertLoadRecorder(model)
            acc = _Metrics(name, ece_bins)
            try:
                for i, start, x, y in tqdm(_batches(x_all, batch_size), total=n_batches, desc=f"{desc} {name}",
                                           unit="batch", leave=False):
                    if store is not None:
                        targets = store.targets(i, device)
                    elif teacher_targets is not None:
                        targets = _cache_targets(teacher_targets, start, len(x), device)
                    else:
                        targets = None
                    out, w, b = _outputs(model, head, x.to(device))
                    st = position_stats(out, y.to(device), targets, lm_head_weight=w, lm_head_bias=b,
                                        chunk_size=chunk_size)
                    del out, targets
                    acc.add(st, y[y != -100])
            finally:
                rec.close()
            results[name] = acc.result(kl_name, rec.fractions(), count_parameters(model))
            del model, head, rec
    return {name: results[name] for name in models}


def _teacher_pass(teacher, own, x_all, batch_size, store, ece_bins, chunk_size, kl_name, desc) -> dict:
    """Run the teacher over every batch into ``store``; the metrics of the teacher itself
    under each name in ``own`` (its KL to itself is 0 up to rounding)."""
    teacher.eval()
    device = next(teacher.parameters()).device
    head = _output_layer(teacher)
    rec = _ExpertLoadRecorder(teacher) if own else None
    acc = _Metrics(own[0] if own else "teacher", ece_bins)
    try:
        n_batches = -(-len(x_all) // batch_size)
        for _, _, x, y in tqdm(_batches(x_all, batch_size), total=n_batches, desc=f"{desc} teacher", unit="batch",
                               leave=False):
            out, w, b = _outputs(teacher, head, x.to(device))
            store.add(out, w, b)
            if own:
                yd = y.to(out.device)
                targets = DenseTargets(out) if w is None else HiddenTargets(out, w, b)
                acc.add(position_stats(out, yd, targets, lm_head_weight=w, lm_head_bias=b, chunk_size=chunk_size),
                        y[y != -100])
            del out
    finally:
        if rec is not None:
            rec.close()
    if not own:
        return {}
    m = acc.result(kl_name, rec.fractions(), count_parameters(teacher))
    return {name: dict(m) for name in own}


def evaluate_model(model, input_ids, **kwargs) -> dict:
    """``evaluate_models`` for one model; same arguments, returns its metrics dict."""
    return evaluate_models({"model": model}, input_ids, **kwargs)["model"]


def count_parameters(model) -> int:
    """Parameters of ``model``; compressed experts with per-expert ranks without their zero padding."""
    from moedistill.compression.modeling_moedistill import count_parameters as count

    return count(model)
