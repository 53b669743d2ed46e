"""Compressed MoE students: a shared core plus low-rank wrappers per expert.

- ``modeling_moedistill``: the model classes (``CompressedExperts`` and the Qwen3-MoE /
  Mixtral subclasses); importing it registers them with ``AutoConfig`` and
  ``AutoModelForCausalLM``, so a checkpoint-0 loads with ``AutoModelForCausalLM.from_pretrained``.
  Checkpoints also carry that file and an ``auto_map``, so ``trust_remote_code=True``
  loads them where moedistill is not installed.
- ``init``: ``compress_model(teacher, rank=|compression_ratio=, core=, svd=, calibration=)``,
  the zero-shot student in memory, and the calibration statistics it uses.
- ``export``: ``export_checkpoint(ckpt, out, dtype=None)`` (``moedistill export``), a plain
  Qwen3-MoE / Mixtral checkpoint with ``W_i = C + B_i A_i``; ``to_plain_model`` in memory.
- ``report``: the compression report (``moedistill compress`` writes it; the glue is
  ``moedistill.commands.compress``).

This package's ``__init__`` imports only the leaf modules (model classes, the math), so
``moedistill.models`` can import it to register the model types without a cycle.
"""

from moedistill.compression.init import (
    CalibrationStats,
    collect_calibration_stats,
    compress_model,
    rank_for_ratio,
)
from moedistill.compression.modeling_moedistill import (
    ARCHITECTURES,
    CompressedExperts,
    MoedistillMixtralConfig,
    MoedistillMixtralForCausalLM,
    MoedistillQwen3MoeConfig,
    MoedistillQwen3MoeForCausalLM,
)

__all__ = [
    "ARCHITECTURES",
    "CalibrationStats",
    "CompressedExperts",
    "MoedistillMixtralConfig",
    "MoedistillMixtralForCausalLM",
    "MoedistillQwen3MoeConfig",
    "MoedistillQwen3MoeForCausalLM",
    "collect_calibration_stats",
    "compress_model",
    "rank_for_ratio",
]
