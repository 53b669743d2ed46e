"""Compressed MoE students: a shared core plus low-rank wrappers per expert.

- ``compress_model(teacher, rank=|compression_ratio=, core=, svd=, calibration=)``: the
  zero-shot student, in memory (``init.py``).
- ``compress_from_config(cfg)``: ``moedistill compress``; writes
  ``<output_dir>/compressed/checkpoint-0`` and the report (``checkpoint.py``, ``report.py``).
- ``export_checkpoint(ckpt, out, dtype=None)``: ``moedistill export``; a plain
  Qwen3-MoE / Mixtral checkpoint with ``W_i = C + B_i A_i`` (``export.py``).

Importing this package registers the compressed model types (``moedistill_qwen3_moe``,
``moedistill_mixtral``) with ``AutoConfig`` and ``AutoModelForCausalLM``, so a
checkpoint-0 loads with ``AutoModelForCausalLM.from_pretrained``. Checkpoints also carry
``modeling_moedistill.py`` and an ``auto_map``, so ``trust_remote_code=True`` loads them
where moedistill is not installed.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from moedistill.compression.checkpoint import compress_from_config
from moedistill.compression.export import export_checkpoint, to_dense
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

for _config_cls, _model_cls, _, _ in ARCHITECTURES.values():
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)
    # save_pretrained copies modeling_moedistill.py beside the weights and writes auto_map.
    _config_cls.register_for_auto_class("AutoConfig")
    _model_cls.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "CalibrationStats",
    "CompressedExperts",
    "MoedistillMixtralConfig",
    "MoedistillMixtralForCausalLM",
    "MoedistillQwen3MoeConfig",
    "MoedistillQwen3MoeForCausalLM",
    "collect_calibration_stats",
    "compress_from_config",
    "compress_model",
    "export_checkpoint",
    "rank_for_ratio",
    "to_dense",
]
