"""Where a split's documents come from, read one at a time.

``resolve_split(...)`` turns the ``data`` settings and a split name into a :class:`Source`;
``Source.documents()`` streams its documents (strings, in order) without ever holding the
corpus: ``.txt`` / ``.jsonl`` files line by line, ``.parquet`` in row batches, a
``datasets.save_to_disk`` directory through ``load_from_disk`` (memory-mapped Arrow) in batches,
a Hugging Face dataset name with ``load_dataset(..., streaming=True)``.

Split rules (explicit, so that evaluation never reads training data by accident):

- ``tiny`` (the embedded corpus) and a directory: the files named after the split
  (``train.txt``, ``validation.jsonl``, ``train-00001.parquet``).
- a ``save_to_disk`` directory: the split of its ``DatasetDict``; a single saved ``Dataset`` is the
  train split only.
- one file or a glob: the train split (``data.split``) only. Another split is named in
  ``data.splits`` (``++data.splits='{train: a.txt, validation: b.txt}'``) or carved out of the train split with
  ``data.eval_fraction``: a document is held out when the hash of its text falls below the
  fraction, so the choice is deterministic and a repeated document is on one side only.
- a Hugging Face dataset: the split as the dataset names it.

Bad records (``data.bad_records``): a null or non-string text field, bytes that are not UTF-8,
a JSON line that is not an object, an empty document. ``error`` (the default) stops at the first
with one line naming the file and line (or row); ``skip`` drops them and counts them by kind.
In a ``.txt`` file documents are separated by blank lines, so it has no empty documents.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from moedistill.errors import UserError

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_CORPUS = ASSETS / "corpus"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
BAD_RECORDS = ("error", "skip")
_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what datasets.save_to_disk writes
_BATCH = 1024  # rows per batch read from parquet / Arrow
_CHUNK_BYTES = 1 << 20  # bytes per piece read from a .txt / .jsonl file


@dataclass
class Source:
    """One split of one corpus, with what decides which of its documents are kept.

    ``kind``: ``files`` (local .txt/.jsonl/.parquet), ``saved`` (a ``save_to_disk`` directory)
    or ``hub`` (a Hugging Face dataset name). ``holdout``: ``(fraction, side)`` with side
    ``"eval"`` (keep the held-out documents) or ``"train"`` (keep the rest)."""

    kind: str
    name: str  # the dataset as the user gave it
    split: str
    text_field: str = "text"
    files: list[Path] = field(default_factory=list)
    config: str | None = None  # hub: dataset config; saved: None
    holdout: tuple[float, str] | None = None
    max_samples: int | None = None
    bad_records: str = "error"
    shown: str | None = None  # the dataset as the user named it, when ``name`` is what it resolved to
    skipped: Counter = field(default_factory=Counter)  # counted by documents() in skip mode

    @property
    def description(self) -> str:
        held = f" ({self.holdout[1]} side of eval_fraction={self.holdout[0]})" if self.holdout else ""
        return f"{self.shown or self.name}:{self.config or ''}:{self.split}{held}"

    def identity(self) -> dict:
        """What the documents depend on, for the token store's fingerprint: the settings and,
        for local data, every file's path, size and modification time (an edited file is read again)."""
        ident = {"kind": self.kind, "name": self.name, "config": self.config, "split": self.split,
                 "text_field": self.text_field, "holdout": list(self.holdout) if self.holdout else None,
                 "max_samples": self.max_samples, "bad_records": self.bad_records}
        files = self.files
        if self.kind == "saved":
            files = sorted(f for f in Path(self.name).rglob("*") if f.is_file())
        if files:
            ident["files"] = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        return ident

    def documents(self) -> Iterator[str]:
        """The kept documents, in order (holdout, bad-record policy and ``max_samples`` applied)."""
        self.skipped.clear()
        n = 0
        for doc in self._raw():
            if self.holdout is not None and (held_out(doc, self.holdout[0]) != (self.holdout[1] == "eval")):
                continue
            yield doc
            n += 1
            if self.max_samples is not None and n >= self.max_samples:
                return

    # ----------------------------------------------------------------- readers

    def _bad(self, kind: str, message: str) -> None:
        if self.bad_records == "skip":
            self.skipped[kind] += 1
            return
        raise UserError(f"{message}; fix the data, or set data.bad_records=skip to skip such records (counted)")

    def _text(self, value, where: str) -> str | None:
        """A record's text, or None for a bad record that is skipped."""
        if value is None:
            return self._bad("null text", f"{where}: the {self.text_field!r} field is null")
        if not isinstance(value, str):
            return self._bad("non-string text", f"{where}: the {self.text_field!r} field holds "
                                                f"{type(value).__name__} {str(value)[:40]!r}, not a string")
        if not value.strip():
            return self._bad("empty document", f"{where}: the {self.text_field!r} field is an empty document")
        return value

    def _raw(self) -> Iterator[str]:
        if self.kind == "files":
            for f in self.files:
                if f.suffix == ".txt":
                    yield from self._read_txt(f)
                elif f.suffix in (".jsonl", ".json"):
                    yield from self._read_jsonl(f)
                elif f.suffix == ".parquet":
                    yield from self._read_parquet(f)
                else:
                    raise UserError(f"unsupported file type {f.suffix!r} for {f}; use .txt, .jsonl or .parquet")
        elif self.kind == "saved":
            yield from self._read_saved()
        else:
            yield from self._read_hub()

    def _chunks(self, path: Path) -> Iterator[tuple[int, bytes]]:
        """``(lines before it, bytes)`` of the file in pieces of about 1 MiB, each ending after a
        ``\\n`` byte (never inside a UTF-8 sequence, a line or a ``\\r\\n``)."""
        with open(path, "rb") as f:
            before, rest = 0, b""
            while block := f.read(_CHUNK_BYTES):
                block = rest + block
                cut = block.rfind(b"\n") + 1
                rest, block = block[cut:], block[:cut]
                if block:
                    yield before, block
                    before += block.count(b"\n")
            if rest:
                yield before, rest

    def _lines_of(self, path: Path, before: int, block: bytes, split_all: bool) -> list[tuple[int, str]]:
        """The lines of a chunk that does not decode, one by one: the bad ones reported with their line
        number (or skipped and counted), the others split as the fast path splits them."""
        out, n = [], before + 1
        for raw in block.splitlines(keepends=True):  # with the terminators: blank lines stay lines
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                self._bad("non-UTF-8 line", f"{path}:{n} is not UTF-8 text (byte {e.start} of the line: "
                                            f"{e.reason}); convert the file (e.g. iconv -f latin1 -t utf-8)")
                line = None
            if line is not None:
                out += [(n, part) for part in ((line.splitlines() or [""]) if split_all else [line])]
            n += raw.endswith(b"\n")
        return out

    def _read_txt(self, path: Path) -> Iterator[str]:
        # lines as str.splitlines splits the whole text (chunks end after a line break, so
        # splitting each chunk gives the same lines)
        cur: list[str] = []
        for before, block in self._chunks(path):
            try:
                lines = block.decode("utf-8").splitlines()
            except UnicodeDecodeError:
                lines = [line for _, line in self._lines_of(path, before, block, split_all=True)]
            for line in lines:
                if line.strip():
                    cur.append(line)
                elif cur:
                    yield "\n".join(cur)
                    cur = []
        if cur:
            yield "\n".join(cur)

    def _read_jsonl(self, path: Path) -> Iterator[str]:
        # one record per "\n"-separated line (a U+2028 inside a JSON string does not split it)
        for before, block in self._chunks(path):
            try:
                numbered = enumerate(block.decode("utf-8").split("\n"), before + 1)
            except UnicodeDecodeError:
                numbered = self._lines_of(path, before, block, split_all=False)
            for n, line in numbered:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    self._bad("invalid JSON", f"{path}:{n} is not valid JSON ({e.msg})")
                    continue
                if not isinstance(row, dict):
                    self._bad("non-object JSON", f"{path}:{n} is a JSON {type(row).__name__}, not an object with a "
                                                 f"{self.text_field!r} field (write one object per line)")
                    continue
                if self.text_field not in row:
                    raise UserError(f"{path}:{n} has no field {self.text_field!r} (fields: {', '.join(row)}); "
                                    f"set data.text_field")
                text = self._text(row[self.text_field], f"{path}:{n}")
                if text is not None:
                    yield text

    def _read_parquet(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq  # lazy: only for .parquet sources

        pf = pq.ParquetFile(path)
        if self.text_field not in pf.schema_arrow.names:
            raise UserError(f"{path} has no column {self.text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                            f"set data.text_field")
        batches = (b.column(0).to_pylist() for b in pf.iter_batches(batch_size=_BATCH, columns=[self.text_field]))
        yield from self._column_texts(batches, str(path))

    def _read_saved(self) -> Iterator[str]:
        import datasets  # lazy: slow to import

        ds = datasets.load_from_disk(self.name)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[self.split]
        if self.text_field not in ds.column_names:
            raise UserError(f"{self.name} has no column {self.text_field!r} (columns: {', '.join(ds.column_names)}); "
                            f"set data.text_field")
        batches = (b[self.text_field] for b in ds.select_columns([self.text_field]).iter(batch_size=_BATCH))
        yield from self._column_texts(batches, f"{self.name} ({self.split})")

    def _column_texts(self, batches, where: str) -> Iterator[str]:
        """The texts of a column read in batches of values, rows numbered from 0 in messages."""
        row = 0
        for values in batches:
            for value in values:
                text = self._text(value, f"{where} row {row}")
                row += 1
                if text is not None:
                    yield text

    def _read_hub(self) -> Iterator[str]:
        import datasets  # lazy: slow to import

        try:
            ds = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except ValueError as e:  # unknown split
            raise UserError(f"dataset {self.name!r}: {str(e).splitlines()[0]}; check data.split") from None
        except Exception as e:  # noqa: BLE001 - datasets raises many types for "not found / offline"
            raise UserError(
                f"cannot load dataset {self.name!r} (config {self.config!r}): {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}; check the name, or use a local .txt/.jsonl/.parquet path"
            ) from None
        for row, record in enumerate(ds):
            if self.text_field not in record:
                raise UserError(f"dataset {self.name!r} has no column {self.text_field!r} "
                                f"(columns: {', '.join(record)}); set data.text_field")
            text = self._text(record[self.text_field], f"dataset {self.name!r} ({self.split}) row {row}")
            if text is not None:
                yield text


def held_out(doc: str, fraction: float) -> bool:
    """Whether ``data.eval_fraction`` puts ``doc`` in the held-out eval split: the first 8 bytes of
    its blake2b hash, as a number in [0, 1), fall below ``fraction``."""
    h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


# --------------------------------------------------------------------------- resolving


def _is_saved(p: Path) -> bool:
    return p.is_dir() and any((p / m).is_file() for m in _SAVED_MARKERS)


def _files_of(spec: str, key: str) -> tuple[list[Path], bool]:
    """The files a path / directory / glob names, and whether it is a directory."""
    p = Path(spec).expanduser()
    if p.is_file():
        return [p], False
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.is_file() and f.suffix in LOCAL_SUFFIXES), True
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(spec), recursive=True) if Path(f).is_file())
        if not files:
            raise UserError(f"no file matches {spec!r}; check the {key} path")
        return files, False
    raise UserError(f"{spec!r} does not exist; check the {key} path")


def _is_local(dataset: str) -> bool:
    p = Path(dataset).expanduser()
    return (p.exists() or any(ch in dataset for ch in "*?[") or dataset.endswith(LOCAL_SUFFIXES)
            or dataset.startswith((".", "/", "~")))


def resolve_split(
    dataset: str,
    split: str,
    *,
    dataset_config: str | None = None,
    text_field: str = "text",
    splits: dict | None = None,
    train_split: str = "train",
    eval_split: str | None = None,
    eval_fraction: float | None = None,
    max_samples: int | None = None,
    bad_records: str = "error",
) -> Source:
    """The :class:`Source` of ``split`` under the split rules in the module docstring.

    ``train_split`` / ``eval_split``: ``data.split`` / ``data.eval_split`` (with ``eval_fraction``
    the eval split is the held-out part of the train split's documents, the train split the rest).
    """
    if bad_records not in BAD_RECORDS:
        raise UserError(f"data.bad_records={bad_records!r} must be one of {', '.join(BAD_RECORDS)}")
    common = dict(text_field=text_field, max_samples=max_samples, bad_records=bad_records)
    holdout = None
    if eval_fraction is not None:
        if split == eval_split:
            holdout, split = (float(eval_fraction), "eval"), train_split
        elif split == train_split:
            holdout = (float(eval_fraction), "train")
    splits = dict(splits or {})
    if splits:
        if split not in splits:
            raise UserError(f"data.splits names no {split!r} split (it names: {', '.join(splits)}); "
                            f"add one, e.g. +data.splits.{split}=path/to/{split}.jsonl")
        files, _ = _files_of(str(splits[split]), f"data.splits.{split}")
        return Source("files", str(splits[split]), split, files=_check_files(files, splits[split]),
                      holdout=holdout, **common)
    shown = dataset
    if dataset in ("tiny", "embedded"):
        dataset = str(EMBEDDED_CORPUS)
    if not _is_local(dataset):
        return Source("hub", dataset, split, config=dataset_config, holdout=holdout, **common)
    p = Path(dataset).expanduser()
    if _is_saved(p):
        _check_saved_split(p, split, train_split)
        return Source("saved", str(p), split, holdout=holdout, **common)
    files, is_dir = _files_of(dataset, "data.dataset")
    if is_dir:
        named = [f for f in files if f.stem == split] or [f for f in files if f.name.startswith(split)]
        if not named:
            have = sorted({f.stem for f in files})
            raise UserError(f"no '{split}' split in {p} (found splits: {', '.join(have) or 'none'}); "
                            f"set data.split / data.eval_split to one of them")
        return Source("files", str(p), split, files=named, holdout=holdout, shown=shown, **common)
    if split != train_split:
        what = "a glob" if not p.exists() else "one file"
        raise UserError(
            f"data.dataset={dataset} is {what}, which is the {train_split!r} split only, so it has no {split!r} split; "
            f"name one with ++data.splits='{{{train_split}: {dataset}, {split}: path/to/{split}.txt}}', or hold out "
            f"a fraction of its documents with data.eval_fraction=0.01"
        )
    return Source("files", dataset, split, files=_check_files(files, dataset), holdout=holdout, **common)


def _check_files(files: list[Path], spec) -> list[Path]:
    if not files:
        raise UserError(f"{spec} holds no .txt/.jsonl/.parquet file; check the path")
    return files


def _check_saved_split(p: Path, split: str, train_split: str) -> None:
    """A ``save_to_disk`` directory has the split: the DatasetDict names it, or it is one Dataset and
    the split is the train split."""
    dd = p / "dataset_dict.json"
    if dd.is_file():
        names = json.loads(dd.read_text()).get("splits", [])
        if split not in names:
            raise UserError(f"the saved dataset {p} has no {split!r} split (its splits: {', '.join(names)}); "
                            f"set data.split / data.eval_split to one of them")
    elif split != train_split:
        raise UserError(
            f"the saved dataset {p} is one Dataset, the {train_split!r} split only, so it has no {split!r} split; "
            f"save a DatasetDict with that split, name one with data.splits, or hold out a fraction with "
            f"data.eval_fraction=0.01"
        )
