"""Loading teachers and students: ``get_model(name_or_path)`` -> (model, tokenizer).

One code path for everything: a hub id, a local directory (any HF causal LM, or a
compressed checkpoint of ours) or the alias ``tiny`` for the embedded teacher all go
through ``AutoModelForCausalLM.from_pretrained``. Our compressed model types
register themselves with the Auto classes when ``moedistill.compression.modeling_moedistill``
is imported (this module does), so checkpoint-0 loads here and with plain
``AutoModelForCausalLM`` after ``import moedistill.compression``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import moedistill.compression.modeling_moedistill  # noqa: F401  (registers the compressed model types)
from moedistill.data import ASSETS
from moedistill.errors import UserError

TINY_TEACHER = ASSETS / "tiny-teacher"
ALIASES = {"tiny": TINY_TEACHER}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve(name_or_path: str) -> str:
    """Map an alias to its directory; leave hub ids and paths alone."""
    return str(ALIASES.get(str(name_or_path), name_or_path))


def config_or_none(name_or_path: str, trust_remote_code: bool = False):
    """The model's config file alone (no weights), or None when it cannot be read.

    For checks made before a large model loads; an unreadable model is left to
    :func:`get_model`, which reports it with its own message."""
    try:
        return AutoConfig.from_pretrained(resolve(name_or_path), trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - see the docstring
        return None


def parse_dtype(dtype):
    """``"bfloat16"`` / ``torch.bfloat16`` / ``"auto"`` / None -> what ``from_pretrained`` takes."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16, auto")
    return _DTYPES[dtype]


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    path = resolve(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"cannot load a tokenizer from {name_or_path!r}: {str(e).splitlines()[0]}") from None


def get_model(
    name_or_path: str,
    *,
    dtype=None,
    device_map=None,
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
    tokenizer_from: str | None = None,
    **kwargs,
):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: hub id (``Qwen/Qwen3-30B-A3B``), local directory, or ``"tiny"``.
        dtype: ``"float32" | "bfloat16" | "float16" | "auto"`` or a ``torch.dtype``; None keeps
            the checkpoint's dtype.
        device_map: passed to ``from_pretrained`` (``"auto"`` spreads a large teacher over GPUs).
        with_tokenizer: also load the tokenizer (from ``tokenizer_from`` or the same place).
    Returns:
        ``(model, tokenizer)``; tokenizer is None when ``with_tokenizer`` is False.
    """
    path = resolve(name_or_path)
    if not Path(path).exists() and (path.startswith((".", "/", "~")) or Path(path).suffix):
        raise UserError(f"model {name_or_path!r} does not exist; check the path")
    load_kwargs = dict(trust_remote_code=trust_remote_code, **kwargs)
    td = parse_dtype(dtype)
    if td is not None:
        load_kwargs["dtype"] = td
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
    except (OSError, ValueError, SafetensorError) as e:
        # OSError: no such model / no weights; ValueError: a directory that is no model ("Unrecognized
        # model"); SafetensorError: weights cut short or damaged (e.g. a truncated checkpoint-0)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model {name_or_path!r}: {first}; check the path, or rebuild the "
                        f"checkpoint if it was damaged") from None
    model.eval()
    tok = load_tokenizer(tokenizer_from or name_or_path, trust_remote_code) if with_tokenizer else None
    return model, tok


@contextmanager
def whole_under_zero3(always: bool = False):
    """Load whole, not partitioned, under a DeepSpeed ZeRO-3 launch whose ``zero3_init_flag``
    is false (the shipped conf/accelerate/deepspeed_zero3.yaml): the flag says so, but the
    ``TrainingArguments`` built before the student registers the ZeRO-3 config with
    transformers anyway, and ``from_pretrained`` would then partition on load. DeepSpeed
    partitions the model itself when training starts. With the flag true, it loads
    partitioned and the parameter-group checks count ``ds_numel``.
    ``always``: whole whatever the flag (a temporary copy whose weights are copied in)."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    registered = ref() if ref is not None else None
    zero3_init = os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false").lower() == "true"
    if registered is None or not registered.is_zero3() or (zero3_init and not always):
        yield
        return
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds.set_hf_deepspeed_config(registered)
