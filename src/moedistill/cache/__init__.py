"""The offline teacher cache: generation, on-disk format, verified reader.

    from moedistill.cache import generate_cache, open_cache, inspect_cache, to_dense

- ``generate_cache(teacher, tokenizer, packed, out_dir, mode=..., top_k=...)`` writes a cache
  (``generate.generate_from_config(cfg)`` does the same from a config; ``moedistill cache``).
- ``open_cache(path, expect=...)`` returns a torch Dataset of ``input_ids``, ``labels``,
  ``target_ids``, ``target_logprobs`` (and ``target_counts`` in sample mode), after
  checking completeness, checksums and fingerprints.
- ``inspect_cache(path, verify=False)`` prints a summary (``moedistill inspect``).
- ``to_dense(ids, logprobs, vocab_size)`` rebuilds full-vocabulary log-probs (memory-hungry).

The layout is described in docs/CACHE_FORMAT.md and implemented in ``format.py`` and
``encode.py``.
"""

from moedistill.cache.encode import to_dense
from moedistill.cache.format import TeacherCache, inspect_cache, open_cache

__all__ = ["open_cache", "inspect_cache", "to_dense", "generate_cache", "generate_from_config", "TeacherCache"]


def __getattr__(name):  # torch/transformers only when generating
    if name in ("generate_cache", "generate_from_config"):
        from moedistill.cache import generate

        return getattr(generate, name)
    raise AttributeError(f"module 'moedistill.cache' has no attribute {name!r}")
