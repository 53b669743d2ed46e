"""``moedistill inspect``: a cache's summary, and a full check of its contents."""

from __future__ import annotations

import bisect
import time
from pathlib import Path

import numpy as np

from moedistill.cache.layout import PARTS_DIR, load_manifest, packed, parse_part_name, read_json
from moedistill.cache.reader import TeacherCache, open_cache
from moedistill.errors import UserError

# --------------------------------------------------------------------------- contents


def verify_contents(ds: TeacherCache, block: int = 64) -> int:
    """Decode every row; check ids, ordering, finiteness and counts. Returns rows checked."""
    n = len(ds)
    for start in range(0, n, block):
        j = bisect.bisect_right(ds._starts, start) - 1
        stop = min(start + block, n, ds._starts[j + 1] if j + 1 < len(ds._starts) else n)
        problems = _problems(ds, ds.read_rows(start, stop))
        if problems:
            where = f"cache shard {ds._files[j]} rows {start - ds._starts[j]}..{stop - ds._starts[j]}"
            raise UserError(f"{where}: {', '.join(problems)}; the cache is corrupted, regenerate it")
    return n


def _problems(ds: TeacherCache, r: dict, tol: float = 1e-6) -> list[str]:
    """What is wrong with the decoded rows ``r`` (see :meth:`TeacherCache.read_rows`); empty if nothing."""
    ids, lp = r["target_ids"], r["target_logprobs"]
    valid = ids >= 0
    problems = []
    if (r["input_ids"] < 0).any() or (r["input_ids"] >= ds.vocab_size).any():
        problems.append("input ids outside the vocabulary")
    if (ids >= ds.vocab_size).any():
        problems.append("target ids outside the vocabulary")
    if np.isnan(lp).any() or np.isinf(lp[valid]).any():
        problems.append("NaN/inf log-probs")
    if (lp[valid] > tol).any():
        problems.append("log-probs above 0")
    lpv = np.where(valid, lp, -1e30)  # padding sorts last without -inf - -inf = NaN
    if (np.diff(lpv, axis=-1) > tol).any():
        problems.append("targets not sorted by log-prob")
    if ds.mode == "topk" and not valid.all():
        problems.append("padding in top-k mode")
    if ds.mode == "sample":
        c = r["target_counts"]
        if (c.sum(-1) != ds.num_samples).any():
            problems.append(f"counts that do not sum to num_samples={ds.num_samples}")
        if not (valid[..., :1]).all():
            problems.append("positions without any target")
    return problems


# --------------------------------------------------------------------------- summary


def cache_bytes(path: Path, manifest: dict) -> int:
    return sum(int(s["bytes"]) for s in manifest.get("shards", []))


def cache_summary(path: Path, m: dict) -> dict:
    """The facts :func:`inspect_cache` prints and returns, from the manifest ``m`` of the cache at ``path``
    (and, for a partial cache, the parts and shard records generated so far)."""
    n, seq_len = int(m["num_sequences"]), int(m["seq_len"])
    tokens = n * seq_len
    complete = bool(m.get("complete"))
    size = cache_bytes(path, m)
    stats = m.get("stats") or {}
    summary = {
        "path": str(path),
        "complete": complete,
        "format_version": m["format_version"],
        "mode": m["mode"],
        "k": m.get("k"),
        "top_k": m.get("top_k"),
        "num_samples": m.get("num_samples"),
        "vocab_size": m["vocab_size"],
        "seq_len": seq_len,
        "sequences": n,
        "tokens": tokens,
        "shards": len(m.get("shards", [])),
        "bytes": size,
        "bytes_per_token": size / tokens if complete and tokens else None,
        "mean_mass": stats.get("mean_mass"),
        "mean_entropy": stats.get("mean_entropy"),
        "mean_distinct": stats.get("mean_distinct"),
        "teacher": m["fingerprints"]["teacher"],
        "source": m.get("source"),
    }
    if not complete:
        summary["sequences_done"] = _sequences_done(path)
    return summary


def _sequences_done(path: Path) -> int:
    """Sequences of a partial cache already generated: in part files and in merged shards."""
    parts = list((path / PARTS_DIR).glob("part-*.h5")) if (path / PARTS_DIR).is_dir() else []
    done = sum(b - a for a, b in filter(None, (parse_part_name(p.name) for p in parts)))
    for s in sorted(path.glob("shard-*.json")):
        done += int(read_json(s)["rows"])
    return done


def summary_lines(s: dict, m: dict) -> list[tuple[str, str]]:
    """``(label, text)`` lines of the summary ``s`` (plus the fingerprints and encoding of the manifest ``m``)."""
    lines = [("cache", s["path"])]
    if s["complete"]:
        lines.append(("status", f"complete (format {s['format_version']})"))
    else:
        lines.append(("status", f"INCOMPLETE: {s['sequences_done']}/{s['sequences']} sequences generated; "
                                f"rerun the same `moedistill cache` command to resume"))
    if s["mode"] == "topk":
        lines.append(("mode", f"topk (k={s['top_k']})"))
    else:
        md = s["mean_distinct"]
        extra = ""
        if md is not None and s["complete"]:
            extra = f", {md:.1f} distinct ids per position on average, at most {s['k']}"
        lines.append(("mode", f"sample (N={s['num_samples']} draws{extra})"))
    fp, teacher = m["fingerprints"], s["teacher"]
    lines += [
        ("teacher", f"{teacher.get('name')} (config {teacher.get('config_hash', '')[:12]})"),
        ("data", f"{s['source']} (stream {fp['data'][:12]}, tokenizer {fp['tokenizer'][:12]})"),
        ("vocabulary", f"{s['vocab_size']:,}"),
        ("sequences", f"{s['sequences']:,} x {s['seq_len']} = {s['tokens']:,} tokens"),
    ]
    if s["complete"]:
        lines += [
            ("shards", f"{s['shards']} ({s['bytes'] / 2**20:.2f} MiB)"),
            ("bytes/token", f"{s['bytes'] / s['tokens']:.1f}"),
            ("mass", f"{s['mean_mass']:.4f} mean teacher probability covered by the stored ids"),
            ("entropy", f"{s['mean_entropy']:.4f} nats mean teacher entropy (full vocabulary)"),
        ]
    enc = m["encoding"]
    steps = enc["logprob_steps"]
    if s["mode"] == "sample" and m.get("sample_logprobs") is False:
        values = "no log-probs (counts only; log(count / N) is read)"
    else:
        values = f"log-probs uint16 deltas (steps {_frac(min(steps))}..{_frac(max(steps))} nat) bit-shuffle"
    layout = ("packed: only the valid entries, rank-major, with per-position lengths" if packed(m)
              else "rank-major, padded" if s["mode"] == "sample" else "rank-major")
    lines.append((
        "encoding",
        f"{layout}; ids uint32 byte-shuffle, {values}; {enc['codec']}({enc['level']}) + fletcher32",
    ))
    return lines


def _frac(x: float) -> str:
    return f"1/{round(1 / x)}" if x < 1 else f"{x:g}"


def print_lines(lines: list[tuple[str, str]]) -> int:
    """Print ``label  text`` lines with the labels in one column; returns the column's width."""
    width = max(len(label) for label, _ in lines)
    for label, text in lines:
        print(f"{label:<{width}}  {text}")
    return width


# --------------------------------------------------------------------------- inspect


def inspect_cache(path, verify: bool = False) -> dict:
    """Print a summary of the cache at ``path``; with ``verify`` check checksums and every row.

    Returns the summary as a dict (also for partial caches, which are reported as such).
    """
    path = Path(path)
    m = load_manifest(path)
    summary = cache_summary(path, m)
    width = print_lines(summary_lines(summary, m))
    if verify:
        if not summary["complete"]:
            raise UserError(f"cache {path} is incomplete; finish it (rerun `moedistill cache`) before verifying")
        t = time.time()
        ds = open_cache(path, verify="full")  # sizes, every shard's checksum, HDF5 headers
        rows = verify_contents(ds)
        ds.close()
        print(f"{'verify':<{width}}  OK: checksums match, {rows:,} rows decode, no NaN/inf ({time.time() - t:.1f} s)")
        summary["verified"] = True
    return summary
