"""The offline teacher cache: generation, on-disk format, verified reader.

    from moedistill.cache import generate_cache, open_cache, inspect_cache, to_dense

- ``generate_cache(teacher, tokenizer, packed, out_dir, mode=..., top_k=...)`` writes a cache
  (``moedistill.commands.cache.generate_from_config(cfg)`` does the same from a config;
  ``moedistill cache``).
- ``open_cache(path, expect=...)`` returns a torch Dataset of ``input_ids``, ``labels``,
  ``target_ids``, ``target_logprobs`` (and ``target_counts`` in sample mode), after
  checking completeness, checksums and fingerprints.
- ``inspect_cache(path, verify=False)`` prints a summary (``moedistill inspect``).
- ``to_dense(ids, logprobs, vocab_size)`` rebuilds full-vocabulary log-probs (memory-hungry).

The layout is described in docs/CACHE_FORMAT.md. Modules: ``layout`` (names, datasets,
manifest), ``encode`` (the integer encoding), ``writer`` (crash-safe part and shard
files), ``reader`` (``open_cache``), ``inspect``, ``sparsify`` (teacher logits -> sparse
targets) and ``generate`` (the streaming generation across processes).
"""

from moedistill.cache.encode import to_dense
from moedistill.cache.inspect import inspect_cache
from moedistill.cache.reader import TeacherCache, open_cache

__all__ = ["open_cache", "inspect_cache", "to_dense", "generate_cache", "TeacherCache"]


def __getattr__(name):
    # Lazy for start-up time: reading or inspecting a cache (``moedistill inspect``, training
    # on a cache) never needs the generation machinery (sparsify, the writer thread, the
    # process group set-up, tqdm), so it is imported on the first use of generate_cache.
    if name == "generate_cache":
        from moedistill.cache.generate import generate_cache

        return generate_cache
    raise AttributeError(f"module 'moedistill.cache' has no attribute {name!r}")
