"""Text in, packed token blocks out.

Loading (``moedistill.sources``): a dataset of the Hugging Face ``datasets`` library by
name/config/split, a ``datasets.save_to_disk`` directory, or local ``.txt`` / ``.jsonl`` /
``.parquet`` files (one path, a directory, or a glob), streamed one document at a time. In a
``.txt`` file documents are separated by one or more blank lines. The commands keep the packed
blocks in a token store (``moedistill.store``), built once; this module is the in-memory packing
that the store reproduces exactly, and the helpers around it.

Packing: every document is tokenised with the TEACHER's tokenizer, an EOS id is
appended after it, the documents are concatenated in their original order and cut into
blocks of ``seq_len`` tokens; the last incomplete block is dropped. Documents therefore
cross block boundaries, and the order is deterministic (shuffling belongs to training).

Fingerprints bind caches to data (``moedistill.fingerprints``): ``tokenizer_hash`` hashes
the tokenizer's full serialisation, ``stream_hash`` is the sha256 of the packed ``int32``
token array.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from moedistill.errors import UserError
from moedistill.fingerprints import stream_hash, tokenizer_hash
from moedistill.sources import ASSETS, EMBEDDED_CORPUS, LOCAL_SUFFIXES, resolve_split

__all__ = ["ASSETS", "EMBEDDED_CORPUS", "LOCAL_SUFFIXES", "PackedData", "eos_id_of", "from_store", "load_texts",
           "pack", "prepare", "shifted_labels", "stream_hash", "tokenize", "tokenizer_hash"]


# --------------------------------------------------------------------------- loading


def load_texts(
    dataset: str,
    *,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_samples: int | None = None,
    bad_records: str = "error",
    **split_rules,
) -> list[str]:
    """The documents of ``dataset`` / ``split`` as a list of strings, in order (small corpora,
    scripts and tests; commands stream them into a token store instead, ``moedistill.store``).

    ``dataset`` is ``"tiny"`` (the embedded corpus), a local file / directory / glob, a
    ``datasets.save_to_disk`` directory or a Hugging Face dataset name; ``split_rules`` are
    ``resolve_split``'s (``splits``, ``eval_fraction``, ...). An empty result is an error.
    """
    source = resolve_split(dataset, split, dataset_config=dataset_config, text_field=text_field,
                           max_samples=max_samples, bad_records=bad_records, **split_rules)
    docs = list(source.documents())
    if not docs:
        raise UserError(f"dataset {dataset!r} split {split!r} holds no text; point data.dataset at non-empty data")
    return docs


# --------------------------------------------------------------------------- packing


def tokenize(texts: Sequence[str], tokenizer, batch_size: int = 512) -> list[list[int]]:
    """Token ids of each text, without special tokens (EOS is added by ``pack``)."""
    out: list[list[int]] = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i : i + batch_size]), add_special_tokens=False, verbose=False)["input_ids"]
        out.extend(enc)
    return out


def pack(token_lists: Iterable[Sequence[int]], seq_len: int, eos_id: int) -> np.ndarray:
    """Concatenate documents with ``eos_id`` after each and cut into blocks.

    Returns an ``int32`` array ``[n_blocks, seq_len]``; the incomplete tail is dropped.
    """
    if seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {seq_len}; set data.seq_len")
    stream: list[int] = []
    for toks in token_lists:
        stream.extend(toks)
        stream.append(eos_id)
    n = len(stream) // seq_len
    return np.asarray(stream[: n * seq_len], dtype=np.int32).reshape(n, seq_len)


@dataclass
class PackedData:
    """Packed blocks plus the fingerprints that bind a cache to them."""

    blocks: np.ndarray  # [n, seq_len]: int32 in memory, or a token store's memory-mapped uint16/uint32
    seq_len: int
    stream_hash: str  # fingerprints.stream_hash(blocks): what a cache records as its data fingerprint
    tokenizer_hash: str
    source: str  # human-readable description
    store: str | None = None  # the token store's directory, if the blocks are its

    @property
    def fingerprint(self) -> str:
        """One hash of the packed token stream and the tokenizer."""
        return hashlib.sha256((self.stream_hash + self.tokenizer_hash).encode()).hexdigest()

    @property
    def num_tokens(self) -> int:
        return int(self.blocks.size)


def eos_id_of(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token; packing needs one to separate documents")
    return int(eos)


def prepare(
    tokenizer,
    dataset: str,
    *,
    seq_len: int,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_samples: int | None = None,
    max_sequences: int | None = None,
    bad_records: str = "error",
    **split_rules,
) -> PackedData:
    """Load, tokenise and pack in memory; ``max_sequences`` keeps the first N blocks (and tokenises
    only the documents they need). The commands use the token store instead (``moedistill.store``),
    whose blocks are these."""
    source = resolve_split(dataset, split, dataset_config=dataset_config, text_field=text_field,
                           max_samples=max_samples, bad_records=bad_records, **split_rules)
    docs, token_lists, have = source.documents(), [], 0
    need = None if max_sequences is None else max_sequences * seq_len
    while need is None or have < need:
        chunk = list(itertools.islice(docs, 256))
        if not chunk:
            break
        ids = tokenize(chunk, tokenizer)
        token_lists += ids
        have += sum(len(t) + 1 for t in ids)
    if not token_lists:
        raise UserError(f"dataset {dataset!r} split {split!r} holds no text; point data.dataset at non-empty data")
    blocks = pack(token_lists, seq_len, eos_id_of(tokenizer))
    if max_sequences is not None:
        blocks = blocks[:max_sequences]
    if len(blocks) == 0:
        raise UserError(
            f"dataset {dataset!r} split {split!r} yields no full block of seq_len={seq_len} tokens; "
            f"lower data.seq_len or add data"
        )
    return PackedData(
        blocks=blocks,
        seq_len=seq_len,
        stream_hash=stream_hash(blocks),
        tokenizer_hash=tokenizer_hash(tokenizer),
        source=source.description,
    )


def from_store(store, tokenizer_fp: str, max_sequences: int | None = None) -> PackedData:
    """The first ``max_sequences`` blocks of a ``moedistill.store.TokenStore`` (all if None) as
    ``PackedData``: a memory-mapped view (uint16/uint32, zero-copy), no tokenising."""
    n = store.num_blocks if max_sequences is None else min(max_sequences, store.num_blocks)
    return PackedData(blocks=store.blocks[:n], seq_len=store.seq_len, stream_hash=store.stream_hash(n),
                      tokenizer_hash=tokenizer_fp, source=store.manifest["source"], store=str(store.path))


def shifted_labels(input_ids):
    """Labels aligned with positions: ``labels[t] = input_ids[t+1]``, the last is -100.

    Works on numpy arrays and torch tensors of shape ``[..., L]``. Everything downstream
    (cache items, the loss, evaluation) uses this already-shifted convention, so student
    logits at t, the label and cache position t line up without a second shift.
    """
    if hasattr(input_ids, "new_full"):  # torch
        labels = input_ids.new_full(input_ids.shape, -100)
    else:
        labels = np.full(input_ids.shape, -100, dtype=np.int64)
    labels[..., :-1] = input_ids[..., 1:]
    return labels
