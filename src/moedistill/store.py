"""The token store: a split tokenised and packed once, memory-mapped by every command and rank.

A store is a directory (``<data.store>/<split>``, default ``<output_dir>/data/<split>``)::

    tokens.bin      the token stream: every document's ids, then EOS, in document order;
                    flat little-endian uint16 (vocabulary <= 65,536) or uint32
    index.npy       int64 [n_blocks]: the offset in tokens.bin where each block starts
                    (block i is tokens[index[i] : index[i] + seq_len])
    manifest.json   format, version, fingerprint; source, tokenizer fingerprint, seq_len,
                    EOS policy, dtype; counts (documents, tokens, blocks, dropped tail, skipped
                    records); stream_hash; ``complete: true`` -- written last

Blocks are exactly ``moedistill.data.pack``'s: documents joined with EOS after each, cut into
``seq_len`` blocks, the incomplete tail dropped (it stays in tokens.bin but is in no block).
``stream_hash`` is ``moedistill.fingerprints.stream_hash`` of all blocks (as int32), which is
what a teacher cache records as its data fingerprint; a cache of the first N blocks records
:func:`blocks_hash` of those N.

The store's ``fingerprint`` hashes what the tokens depend on: the source (settings, and each
local file's path, size and mtime), the tokenizer (``tokenizer_hash``), seq_len, the EOS id and
the format version. A store is rebuilt only when absent or when that fingerprint differs.

Building (:func:`build_store`) streams: documents are read one at a time, tokenised in batches
(the fast tokenizer's batch API, in ``workers`` processes when > 1) and appended to
``<split>.partial/tokens.bin``; every few seconds the file is fsync'ed and ``progress.json``
records how many documents and tokens are safely on disk. A killed build resumes from there
(same fingerprint) and the finished directory is renamed into place, so a reader sees a whole
store or none. Under torchrun / accelerate launch process 0 builds while the others wait for
the manifest (:func:`ensure_store`).
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import json
import logging
import multiprocessing
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moedistill.dist import launched_rank, launched_world
from moedistill.errors import UserError
from moedistill.files import atomic_write_json, disk_full_as_error, replace_dir
from moedistill.fingerprints import tokenizer_hash
from moedistill.locking import DirectoryLock
from moedistill.sources import Source

logger = logging.getLogger(__name__)

FORMAT = "moedistill-token-store"
VERSION = 1
MANIFEST = "manifest.json"
TOKENS = "tokens.bin"
INDEX = "index.npy"
PROGRESS = "progress.json"
EOS_POLICY = "after_each_document"
HASH_CHUNK = 1 << 22  # tokens per chunk when hashing (16 MiB as int32)
BATCH_CHARS = 1 << 20  # characters of text per tokenisation batch
SAVE_EVERY_S = 5.0  # seconds between fsync + progress records while building
WAIT_POLL_S = 0.5


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def blocks_hash(tokens: np.ndarray, n_blocks: int, seq_len: int) -> str:
    """``fingerprints.stream_hash`` of the first ``n_blocks`` blocks of the flat ``tokens``,
    computed in chunks (never the whole int32 copy in memory)."""
    h = hashlib.sha256()
    h.update(str((n_blocks, seq_len)).encode())
    total = n_blocks * seq_len
    for s in range(0, total, HASH_CHUNK):
        h.update(np.ascontiguousarray(tokens[s : min(s + HASH_CHUNK, total)], dtype="<i4").tobytes())
    return h.hexdigest()


def _file_blocks_hash(path: Path, dtype: np.dtype, n_blocks: int, seq_len: int) -> str:
    """:func:`blocks_hash` read from the file in chunks (a memory map would leave the whole file's
    pages in this process's RSS)."""
    h = hashlib.sha256()
    h.update(str((n_blocks, seq_len)).encode())
    left = n_blocks * seq_len
    with open(path, "rb") as f:
        while left:
            chunk = np.fromfile(f, dtype=dtype, count=min(HASH_CHUNK, left))
            h.update(chunk.astype("<i4").tobytes())
            left -= len(chunk)
    return h.hexdigest()


def store_fingerprint(source: Source, tokenizer, seq_len: int) -> str:
    """sha256 of what the store's tokens depend on (the module docstring); no data is read."""
    payload = {"format": FORMAT, "version": VERSION, "source": source.identity(),
               "tokenizer": tokenizer_hash(tokenizer), "seq_len": int(seq_len), "eos_id": _eos_id(tokenizer),
               "eos_policy": EOS_POLICY,
               "dtype": token_dtype(len(tokenizer)).str}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; packing needs one to separate documents")
    return int(tokenizer.eos_token_id)


# --------------------------------------------------------------------------- reading


@dataclass
class TokenStore:
    """An open, complete store: ``blocks`` is a read-only memory-mapped ``[n, seq_len]`` view
    (zero-copy: slicing reads only the pages it touches)."""

    path: Path
    manifest: dict
    tokens: np.ndarray  # memmap, flat

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def num_blocks(self) -> int:
        return int(self.manifest["num_blocks"])

    @property
    def blocks(self) -> np.ndarray:
        L = self.seq_len
        return self.tokens[: self.num_blocks * L].reshape(self.num_blocks, L)

    def stream_hash(self, n_blocks: int | None = None) -> str:
        """The data fingerprint of the first ``n_blocks`` blocks (all: the manifest's)."""
        if n_blocks is None or n_blocks >= self.num_blocks:
            return self.manifest["stream_hash"]
        return blocks_hash(self.tokens, n_blocks, self.seq_len)


def read_manifest(path) -> dict | None:
    """The manifest of a complete store at ``path``, else None."""
    try:
        m = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT and m.get("complete") else None


def open_store(path, fingerprint: str | None = None) -> TokenStore | None:
    """The complete store at ``path`` (with that ``fingerprint``, if given), memory-mapped; else None.
    A store of another format version is not opened (it is rebuilt)."""
    path = Path(path)
    m = read_manifest(path)
    if m is None or m.get("version") != VERSION or (fingerprint is not None and m.get("fingerprint") != fingerprint):
        return None
    tokens = np.memmap(path / TOKENS, dtype=np.dtype(m["dtype"]), mode="r", shape=(int(m["num_tokens"]),))
    return TokenStore(path, m, tokens)


# --------------------------------------------------------------------------- building


_worker_tok = None


def _worker_init(tokenizer_json: str) -> None:
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    from tokenizers import Tokenizer

    _worker_tok = Tokenizer.from_str(tokenizer_json)
    _worker_tok.no_truncation()
    _worker_tok.no_padding()


def _encode(tok, docs: list[str], eos_id: int, dtype) -> np.ndarray:
    """The stream of ``docs``: each one's ids (no special tokens), then EOS."""
    encs = tok.encode_batch_fast(docs, add_special_tokens=False) if hasattr(tok, "encode_batch_fast") else \
        tok.encode_batch(docs, add_special_tokens=False)
    lengths = [len(e.ids) + 1 for e in encs]
    out = np.empty(sum(lengths), dtype=dtype)
    pos = 0
    for e, n in zip(encs, lengths):
        out[pos : pos + n - 1] = e.ids
        out[pos + n - 1] = eos_id
        pos += n
    return out


def _worker_encode(docs: list[str], eos_id: int, dtype_str: str) -> np.ndarray:
    return _encode(_worker_tok, docs, eos_id, np.dtype(dtype_str))


def _backend(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a fast HF tokenizer (what its batch call runs)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise UserError(f"the tokenizer {type(tokenizer).__name__} is not a fast (Rust) tokenizer; "
                        f"install `tokenizers` and load it with use_fast=True")
    tok = type(backend).from_str(backend.to_str())  # a copy: the caller's truncation/padding stay as they are
    tok.no_truncation()
    tok.no_padding()
    return tok


def _batches(docs, batch_chars: int):
    batch, chars = [], 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _read_ahead(batches, depth: int = 2):
    """``batches``, read by a thread up to ``depth`` batches ahead: the fast tokenizer releases the
    GIL while it encodes, so reading the next documents costs no time of its own. An error
    of the reader (bad data) is raised here, in the caller's thread."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for b in batches:
                if not put(b):
                    return
            put(end)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            put(e)

    t = threading.Thread(target=run, name="moedistill-read-ahead", daemon=True)
    t.start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join()


def default_workers(source: Source) -> int:
    """Worker processes when ``data.prepare_workers`` is null: none for local data under 32 MB
    (starting processes would cost more than they save), else one per core, at most 8."""
    if source.kind == "files" and sum(f.stat().st_size for f in source.files) < 32 << 20:
        return 0
    return max(0, min(8, os.cpu_count() or 1))


def build_store(path, source: Source, tokenizer, *, seq_len: int, eos_id: int, fingerprint: str,
                workers: int = 0, progress: bool = True) -> TokenStore:
    """Tokenise and pack ``source`` into the store at ``path`` (resuming ``<path>.partial`` if its
    fingerprint matches); returns it open. Memory stays flat: a few batches of text in flight."""
    from tqdm.auto import tqdm

    path = Path(path)
    vocab = len(tokenizer)
    dtype = token_dtype(vocab)
    part = path.with_name(path.name + ".partial")
    done_docs, done_tokens = _resume_point(part, fingerprint, dtype.itemsize)
    part.mkdir(parents=True, exist_ok=True)
    tok_file = part / TOKENS
    started = time.time()
    bar = tqdm(desc=f"prepare {source.split}", unit=" docs", disable=not progress or launched_rank() != 0,
               initial=done_docs)
    what = "resuming" if done_docs else "tokenising"
    logger.info("%s %s into %s (%s workers)%s", what, source.description, path, workers or "no",
                f" from document {done_docs:,}" if done_docs else "")
    pool = None
    with disk_full_as_error(tok_file), open(tok_file, "r+b" if tok_file.exists() else "wb") as f:
        f.truncate(done_tokens * dtype.itemsize)
        f.seek(done_tokens * dtype.itemsize)
        docs = source.documents()
        for _ in range(done_docs):  # read again, not tokenised again
            if next(docs, None) is None:
                break
        n_docs, n_tokens, last_save, new_tokens = done_docs, done_tokens, time.time(), 0

        def emit(arr: np.ndarray, count: int):
            nonlocal n_docs, n_tokens, last_save, new_tokens
            f.write(memoryview(arr))
            n_docs += count
            n_tokens += len(arr)
            new_tokens += len(arr)
            bar.update(count)
            rate = new_tokens / max(time.time() - started, 1e-9)
            bar.set_postfix_str(f"{n_tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)
            if time.time() - last_save >= SAVE_EVERY_S:
                _save_progress(f, part, fingerprint, n_docs, n_tokens)
                last_save = time.time()

        try:
            if workers > 1:
                # fork: spawn would re-run a user script without a __main__ guard; the children run only
                # the tokenizer they build from its JSON (one thread each), nothing of torch
                ctx = multiprocessing.get_context("fork")
                pool = ctx.Pool(workers, initializer=_worker_init, initargs=(_backend(tokenizer).to_str(),))
                pending = collections.deque()
                for batch in _batches(docs, BATCH_CHARS):
                    pending.append((pool.apply_async(_worker_encode, (batch, eos_id, dtype.str)), len(batch)))
                    if len(pending) >= 2 * workers:  # bounded: the reader never runs ahead of the workers
                        r, count = pending.popleft()
                        emit(r.get(), count)
                while pending:
                    r, count = pending.popleft()
                    emit(r.get(), count)
            else:
                tok = _backend(tokenizer)
                for batch in _read_ahead(_batches(docs, BATCH_CHARS)):
                    emit(_encode(tok, batch, eos_id, dtype), len(batch))
        except UserError:  # bad data: nothing to resume once the data is fixed (the fingerprint changes)
            f.close()
            shutil.rmtree(part, ignore_errors=True)
            raise
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        _save_progress(f, part, fingerprint, n_docs, n_tokens)
    bar.close()
    if n_docs == 0:
        shutil.rmtree(part, ignore_errors=True)
        raise UserError(f"dataset {source.name!r} split {source.split!r} holds no text"
                        + (f" (skipped: {_skipped(source)})" if source.skipped else "")
                        + "; point data.dataset at non-empty data")
    n_blocks = n_tokens // seq_len
    if n_blocks == 0:
        shutil.rmtree(part, ignore_errors=True)
        raise UserError(f"dataset {source.name!r} split {source.split!r} yields no full block of seq_len={seq_len} "
                        f"tokens ({n_tokens:,} tokens); lower data.seq_len or add data")
    with disk_full_as_error(part / INDEX):
        np.save(part / INDEX, np.arange(n_blocks, dtype=np.int64) * seq_len)
    manifest = {
        "format": FORMAT, "version": VERSION, "fingerprint": fingerprint,
        "source": source.description, "source_identity": source.identity(),
        "tokenizer": tokenizer_hash(tokenizer), "vocab_size": vocab, "dtype": dtype.str,
        "seq_len": int(seq_len), "eos_id": int(eos_id), "eos_policy": EOS_POLICY,
        "num_documents": n_docs, "num_tokens": n_tokens, "num_blocks": n_blocks,
        "dropped_tail_tokens": n_tokens - n_blocks * seq_len,
        "skipped_records": dict(source.skipped),  # a resumed build re-read the documents before its resume point
        "stream_hash": _file_blocks_hash(tok_file, dtype, n_blocks, seq_len),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 3),
        "complete": True,
    }
    (part / PROGRESS).unlink(missing_ok=True)
    atomic_write_json(part / MANIFEST, manifest)
    replace_dir(part, path)
    if source.skipped:
        logger.warning("%s: skipped %s (data.bad_records=skip)", source.description, _skipped(source))
    logger.info("prepared %s: %s documents, %s tokens, %s blocks of %s in %.1f s -> %s", source.description,
                f"{n_docs:,}", f"{n_tokens:,}", f"{n_blocks:,}", seq_len, manifest["seconds"], path)
    return open_store(path, fingerprint)


def _skipped(source: Source) -> str:
    return ", ".join(f"{n:,} {kind}" for kind, n in sorted(source.skipped.items()))


def _save_progress(f, part: Path, fingerprint: str, n_docs: int, n_tokens: int) -> None:
    """The tokens written so far are on disk before the record that counts them."""
    f.flush()
    os.fsync(f.fileno())
    atomic_write_json(part / PROGRESS, {"fingerprint": fingerprint, "documents": n_docs, "tokens": n_tokens})


def _resume_point(part: Path, fingerprint: str, itemsize: int) -> tuple[int, int]:
    """``(documents, tokens)`` safely written by an interrupted build of the same fingerprint, else
    ``(0, 0)`` (and a partial build of anything else is cleared)."""
    try:
        p = json.loads((part / PROGRESS).read_text())
        size = (part / TOKENS).stat().st_size
    except (OSError, ValueError):
        p, size = None, 0
    if p and p.get("fingerprint") == fingerprint and int(p["tokens"]) * itemsize <= size:
        return int(p["documents"]), int(p["tokens"])
    if part.exists():
        shutil.rmtree(part)
    return 0, 0


def ensure_store(path, source: Source, tokenizer, *, seq_len: int, workers: int | None = None,
                 progress: bool = True) -> TokenStore:
    """The store of ``source`` at ``path``: opened if complete with the right fingerprint, else built.

    Under torchrun / accelerate launch only process 0 builds; the others wait until the store
    it writes is complete (a launcher stops them if process 0 fails). One build per store root at
    a time: a second command building into the same ``data.store`` stops with the holder's name."""
    path = Path(path)
    eos = _eos_id(tokenizer)
    fp = store_fingerprint(source, tokenizer, seq_len)
    store = open_store(path, fp)
    if store is not None:
        return store
    if launched_world() > 1 and launched_rank() != 0:
        logger.info("waiting for process 0 to prepare %s", path)
        while (store := open_store(path, fp)) is None:
            time.sleep(WAIT_POLL_S)
        return store
    with DirectoryLock(path.parent, "token store directory"):
        store = open_store(path, fp)  # built meanwhile by the holder we waited for
        if store is not None:
            return store
        return build_store(path, source, tokenizer, seq_len=seq_len, eos_id=int(eos), fingerprint=fp,
                           workers=default_workers(source) if workers is None else workers, progress=progress)
