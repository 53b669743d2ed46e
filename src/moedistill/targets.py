"""What the teacher says about each position, as one typed object from the reader to the loss.

Three kinds, one per way a teacher distribution reaches training:

- ``TopKTargets``: a top-k cache: per position the ``W`` (width) most probable ids and their
  log-probabilities (log-softmax at T=1 over the full vocabulary, sorted descending).
- ``SampledTargets``: a sample-mode cache: the distinct ids of N draws from the teacher,
  their log-probabilities and how often each was drawn.
- ``DenseTargets``: the teacher's full logits (an online teacher); ``HiddenTargets``, the
  same distribution as the teacher's final hidden states and its lm_head (evaluation).

Sparse targets have a fixed width W (entries per position) per batch; positions with fewer entries (sampled
targets, or items of different widths stacked into one batch) are padded at the end
with the markers below. They are defined here and nowhere else.

Cache items and batches stay plain dicts of tensors (``target_ids``, ``target_logprobs``
and, sampled, ``target_counts``: the cache contract, and what a DataLoader collates);
:func:`from_batch` turns one into the typed object the loss and evaluation take.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:  # annotations only: this module must not pull in torch for the numpy cache code
    import torch

PAD_ID = -1  # target_ids at padding (readers treat any negative id as padding)
PAD_LOGPROB = float("-inf")  # target_logprobs at padding
PAD_COUNT = 0  # target_counts at padding (and on disk: count 0 marks padding)

IDS, LOGPROBS, COUNTS = "target_ids", "target_logprobs", "target_counts"
PAD_VALUES = {IDS: PAD_ID, LOGPROBS: PAD_LOGPROB, COUNTS: PAD_COUNT}


@dataclass(frozen=True)
class SparseTargets:
    """``ids`` int64 [..., W] (PAD_ID at padding), ``logprobs`` float32 [..., W] (PAD_LOGPROB)."""

    ids: torch.Tensor
    logprobs: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        """bool [..., W]: the entries that are not padding."""
        return self.ids >= 0


@dataclass(frozen=True)
class TopKTargets(SparseTargets):
    """The W most probable ids per position, sorted by log-prob, descending."""

    kind = "topk"


@dataclass(frozen=True)
class SampledTargets(SparseTargets):
    """The distinct ids of N draws, plus ``counts`` [..., W]: draws of each id (PAD_COUNT at padding)."""

    counts: torch.Tensor

    kind = "sample"


@dataclass(frozen=True)
class DenseTargets:
    """``logits`` [..., V]: the teacher's full logits for the same positions as the student's."""

    logits: torch.Tensor

    kind = "dense"


@dataclass(frozen=True)
class HiddenTargets:
    """The teacher's final hidden states ``hidden`` [..., H] and its output layer, ``weight`` [V, H]
    and ``bias`` [V] or None: its logits are ``hidden @ weight.T + bias``, which the loss's engine
    makes a chunk of positions at a time, so they never exist whole. H / V of the logits' size
    (1.3% at Qwen3-30B-A3B's 2,048 / 151,936): how evaluation keeps an online teacher's outputs
    for every student (``moedistill.evaluate``)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    kind = "dense"


Targets = Union[TopKTargets, SampledTargets, DenseTargets]

# The KL(teacher || model) at T=1 that each kind of target gives, by the name it carries in
# logs, reports and eval.json (docs/DISTILLATION.md, "Which KL is which"):
KL_NAMES = {
    "dense": "kl_exact",  # over the full vocabulary
    "topk": "kl_lower_bound",  # stored ids plus one bucket for the rest: <= the exact KL
    "sample": "kl_sampled",  # importance-weighted estimate from the draws
}


def eval_kl_key(metrics: Mapping, prefix: str = "eval") -> str | None:
    """The key of the evaluation KL in ``metrics`` (whichever kind it is), or None."""
    return next((f"{prefix}_{n}" for n in KL_NAMES.values() if f"{prefix}_{n}" in metrics), None)


def from_batch(batch: Mapping) -> TopKTargets | SampledTargets | None:
    """The sparse targets a cache item or batch holds, or None when it holds none."""
    if IDS not in batch:
        return None
    if COUNTS in batch:
        return SampledTargets(batch[IDS], batch[LOGPROBS], batch[COUNTS])
    return TopKTargets(batch[IDS], batch[LOGPROBS])
