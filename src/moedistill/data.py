"""Text in, packed token blocks out.

Loading: a dataset of the Hugging Face ``datasets`` library by name/config/split, or
local ``.txt`` / ``.jsonl`` / ``.parquet`` files (one path, a directory, or a glob).
In a ``.txt`` file documents are separated by one or more blank lines.

Packing: every document is tokenised with the TEACHER's tokenizer, an EOS id is
appended after it, the documents are concatenated in their original order and cut into
blocks of ``seq_len`` tokens; the last incomplete block is dropped. Documents therefore
cross block boundaries, and the order is deterministic (shuffling belongs to training).

Fingerprints bind caches to data (``moedistill.fingerprints``): ``tokenizer_hash`` hashes
the tokenizer's full serialisation, ``stream_hash`` is the sha256 of the packed ``int32``
token array.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from moedistill.errors import UserError
from moedistill.fingerprints import stream_hash, tokenizer_hash

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_CORPUS = ASSETS / "corpus"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


# --------------------------------------------------------------------------- loading


def _resolve_local(dataset: str, split: str) -> list[Path] | None:
    """Local files for ``dataset`` (and ``split`` inside a directory), or None if not local."""
    if dataset in ("tiny", "embedded"):
        dataset = str(EMBEDDED_CORPUS)
    p = Path(dataset).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in LOCAL_SUFFIXES and f.stem == split)
        if not files:
            files = sorted(f for f in p.glob(f"{split}*") if f.suffix in LOCAL_SUFFIXES)
        if not files:
            have = sorted({f.stem for f in p.iterdir() if f.suffix in LOCAL_SUFFIXES})
            raise UserError(
                f"no '{split}' split in {p} (found splits: {', '.join(have) or 'none'}); "
                f"set data.split / data.eval_split to one of them"
            )
        return files
    if any(ch in dataset for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(dataset)))
        if not files:
            raise UserError(f"no file matches {dataset!r}; check the data.dataset path")
        return files
    if dataset.endswith(LOCAL_SUFFIXES) or dataset.startswith((".", "/", "~")):
        raise UserError(f"dataset file {dataset!r} does not exist; check the data.dataset path")
    return None


def _read_utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line} is not UTF-8 text (byte {e.start}: {e.reason}); convert the file to UTF-8 "
                        f"(e.g. iconv -f latin1 -t utf-8) or drop that file") from None


def _text(value, where: str) -> str | None:
    """A record's text field: a string, or None (null: no document, skipped); anything else is an error."""
    if value is None or isinstance(value, str):
        return value
    raise UserError(f"{where}: the text field holds {type(value).__name__} {str(value)[:40]!r}, not a string; "
                    f"fix the data or point data.text_field at the text")


def _read_txt(path: Path) -> list[str]:
    text = _read_utf8(path)
    docs, cur = [], []
    for line in text.splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            docs.append("\n".join(cur))
            cur = []
    if cur:
        docs.append("\n".join(cur))
    return docs


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    for n, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n} is not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n} is a JSON {type(row).__name__}, not an object with a {text_field!r} field; "
                            f"write one object per line")
        if text_field not in row:
            raise UserError(
                f"{path}:{n} has no field {text_field!r} (fields: {', '.join(row)}); set data.text_field"
            )
        docs.append(_text(row[text_field], f"{path}:{n}"))
    return _drop_nulls(docs, path)


def _drop_nulls(docs: list, where) -> list[str]:
    """The documents without the null text fields, which are counted in a warning."""
    nulls = sum(d is None for d in docs)
    if nulls:
        warnings.warn(f"{where}: {nulls} record(s) with a null text field skipped", stacklevel=3)
    return [d for d in docs if d is not None]


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq  # lazy: only for .parquet sources

    table = pq.read_table(path)
    if text_field not in table.column_names:
        raise UserError(
            f"{path} has no column {text_field!r} (columns: {', '.join(table.column_names)}); set data.text_field"
        )
    rows = table.column(text_field).to_pylist()
    return _drop_nulls([_text(x, f"{path} row {i}") for i, x in enumerate(rows)], path)


def load_texts(
    dataset: str,
    *,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_samples: int | None = None,
) -> list[str]:
    """Return the documents of ``dataset`` / ``split`` as a list of strings, in order.

    ``dataset`` is ``"tiny"`` (the embedded corpus), a local file / directory / glob, or a
    Hugging Face dataset name (loaded with ``datasets.load_dataset``). ``max_samples``
    keeps the first N documents. Empty documents are skipped. An empty result is an error.
    """
    files = _resolve_local(dataset, split)
    if files is not None:
        docs: list[str] = []
        for f in files:
            if f.suffix == ".txt":
                docs += _read_txt(f)
            elif f.suffix in (".jsonl", ".json"):
                docs += _read_jsonl(f, text_field)
            elif f.suffix == ".parquet":
                docs += _read_parquet(f, text_field)
            else:
                raise UserError(f"unsupported file type {f.suffix!r} for {f}; use .txt, .jsonl or .parquet")
    else:
        docs = _load_hub(dataset, dataset_config, split, text_field, max_samples)
    docs = [d for d in docs if d.strip()]
    if max_samples is not None:
        docs = docs[:max_samples]
    if not docs:
        raise UserError(f"dataset {dataset!r} split {split!r} holds no text; point data.dataset at non-empty data")
    return docs


def _load_hub(dataset: str, config: str | None, split: str, text_field: str, max_samples: int | None) -> list[str]:
    import datasets  # lazy: only for hub datasets (slow to import)

    sel = split if max_samples is None else f"{split}[:{max_samples}]"
    try:
        ds = datasets.load_dataset(dataset, config, split=sel)
    except ValueError as e:  # unknown split
        raise UserError(f"dataset {dataset!r}: {str(e).splitlines()[0]}; check data.split") from None
    except Exception as e:  # noqa: BLE001 - datasets raises many types for "not found / offline"
        raise UserError(
            f"cannot load dataset {dataset!r} (config {config!r}): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}; check the name, or use a local .txt/.jsonl/.parquet path"
        ) from None
    if text_field not in ds.column_names:
        raise UserError(
            f"dataset {dataset!r} has no column {text_field!r} (columns: {', '.join(ds.column_names)}); "
            "set data.text_field"
        )
    return _drop_nulls([_text(x, f"dataset {dataset!r} row {i}") for i, x in enumerate(ds[text_field])], dataset)


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

    blocks: np.ndarray  # int32 [n, seq_len]
    seq_len: int
    stream_hash: str
    tokenizer_hash: str
    source: str  # human-readable description

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
) -> PackedData:
    """Load, tokenise and pack; ``max_sequences`` keeps the first N blocks."""
    texts = load_texts(
        dataset, dataset_config=dataset_config, split=split, text_field=text_field, max_samples=max_samples
    )
    if max_sequences is None:
        token_lists = tokenize(texts, tokenizer)
    else:  # tokenise only as many documents as the first max_sequences blocks need
        need, have, token_lists = max_sequences * seq_len, 0, []
        for i in range(0, len(texts), 256):
            chunk = tokenize(texts[i : i + 256], tokenizer)
            token_lists += chunk
            have += sum(len(t) + 1 for t in chunk)
            if have >= need:
                break
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
        source=f"{dataset}:{dataset_config or ''}:{split}",
    )


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
