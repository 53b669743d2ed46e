"""The fingerprints that bind a teacher cache to what it was made from.

A cache records three of them and every reader compares them with what it is about to
train on: the teacher (its name plus :func:`config_fingerprint`), the tokenizer
(:func:`tokenizer_hash`) and the packed token stream (:func:`stream_hash`). They are
computed from configs and arrays alone (no weights, no torch), so a cache can be checked
before any model loads.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

# config entries that do not change what the model computes
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "use_cache")


def config_fingerprint(config) -> str:
    """sha256 of a model config (architecture and sizes), without the entries that do not
    change what the model computes (name, dtype, library version)."""
    d = config.to_dict()
    for k in _VOLATILE_CONFIG_KEYS:
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(model) -> str:
    """Teacher identity for caches: :func:`config_fingerprint` of ``model.config``."""
    return config_fingerprint(model.config)


def stream_hash(blocks: np.ndarray) -> str:
    """sha256 of the packed token stream (as contiguous little-endian int32)."""
    a = np.ascontiguousarray(blocks, dtype="<i4")
    h = hashlib.sha256()
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's full JSON serialisation (vocabulary, merges, normaliser, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:  # slow tokenizer: hash the vocabulary
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(
        {"eos": tokenizer.eos_token, "bos": tokenizer.bos_token, "pad": tokenizer.pad_token}, sort_keys=True
    )
    return hashlib.sha256((payload + specials).encode()).hexdigest()

