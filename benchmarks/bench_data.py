#!/usr/bin/env python
"""Token-store benchmark: memory and speed of ``moedistill prepare``, and what a second command pays.

    python benchmarks/bench_data.py                 # 50 MB and 500 MB corpora (~10 min on 2 busy cores)
    python benchmarks/bench_data.py --sizes 5,50    # smaller, for a smoke run
    python benchmarks/bench_data.py --sections speed --repeat 3   # tokens/s only, best of 3 alternated rounds

The corpora are the embedded train split (King James Bible, 3.9 MB) repeated to the size, as a
local .txt file. Every measured variant runs in a process of its own (peak RSS = that process's
``ru_maxrss``, from ``wait4``: the process and the workers it reaped, the largest of them), and
the driver prints them side by side:

1. peak RSS of ``moedistill prepare`` (the real command, ``data.prepare_workers=0``) per corpus
   size, and the ratio largest / smallest (memory flat in corpus size means ~1.0).
2. tokens/s of the store build (the manifest's ``seconds``: read, tokenise, write, hash) against
   a plain batched call of the same fast tokenizer (``tokenizer(batch, add_special_tokens=False)``,
   the same documents in the same batches, only the calls timed) in one process; with the
   tokenizer's own threads (``TOKENIZERS_PARALLELISM`` unset) and without; ``prepare`` with 0 and
   with ``--workers`` worker processes. The variants run in alternated rounds (``--repeat``), best
   of each, so that other load on the machine hits them alike.
3. data time of a second command: opening the existing store and taking its blocks and data
   fingerprint (``common.prepare_split``'s work on a complete store) against the first build.

Measured figures are in docs/DATA.md ("Measured") with the machine load of that run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_rss(cmd: list[str], env: dict) -> tuple[str, int, float]:
    """stdout, peak RSS in bytes (``ru_maxrss`` from ``wait4``: the child and the children it reaped)
    and wall seconds of ``cmd``."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{err.read()[-3000:]}")
        return out.read(), ru.ru_maxrss * 1024, wall


def make_corpus(path: Path, mb: int) -> Path:
    from moedistill.sources import EMBEDDED_CORPUS

    if path.exists() and path.stat().st_size >= mb * 1e6:
        return path
    text = (EMBEDDED_CORPUS / "train.txt").read_bytes().rstrip(b"\n") + b"\n\n"
    with open(path, "wb") as f:
        written = 0
        while written < mb * 1e6:
            f.write(text)
            written += len(text)
    return path


# --------------------------------------------------------------------------- variants (own process each)


def variant_baseline(corpus: str) -> dict:
    """The plain batched tokenizer call over the documents, batched as ``prepare`` batches them."""
    from moedistill.models import load_tokenizer
    from moedistill.sources import resolve_split
    from moedistill.store import BATCH_CHARS, _batches

    tok = load_tokenizer("tiny", False)
    tokens, spent = 0, 0.0
    for batch in _batches(resolve_split(corpus, "train").documents(), BATCH_CHARS):
        t0 = time.perf_counter()
        ids = tok(batch, add_special_tokens=False)["input_ids"]
        spent += time.perf_counter() - t0
        tokens += sum(len(x) + 1 for x in ids)  # + EOS, as the store counts
    return {"tokens": tokens, "seconds": spent}


def variant_open(corpus: str, out: str) -> dict:
    """What a second command spends on data: open the complete store, take blocks + fingerprint."""
    from moedistill.data import from_store
    from moedistill.fingerprints import tokenizer_hash
    from moedistill.models import load_tokenizer
    from moedistill.sources import resolve_split
    from moedistill.store import ensure_store

    tok = load_tokenizer("tiny", False)
    t0 = time.perf_counter()
    store = ensure_store(Path(out) / "data" / "train", resolve_split(corpus, "train"), tok, seq_len=128)
    packed = from_store(store, tokenizer_hash(tok))
    int(packed.blocks[-1, -1])  # touch the last block
    return {"seconds": time.perf_counter() - t0, "blocks": len(packed.blocks)}


# --------------------------------------------------------------------------- driver


def _prepare(corpus: Path, out: Path, workers: int, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "moedistill.cli", "prepare", "--split", "train", f"data.dataset={corpus}",
           f"output_dir={out}", f"data.prepare_workers={workers}"]
    _, rss, wall = _run_rss(cmd, env)
    m = json.loads((out / "data" / "train" / "manifest.json").read_text())
    return {"rss": rss, "wall": wall, "seconds": m["seconds"], "tokens": m["num_tokens"]}


def _variant(name: str, *args, env: dict) -> tuple[dict, int]:
    out, rss, _ = _run_rss([sys.executable, __file__, "--variant", name, *args], env)
    return json.loads(out.strip().splitlines()[-1]), rss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--sizes", default="50,500", help="corpus sizes in MB, comma-separated (default 50,500)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--dir", default=None, help="where corpora and stores go (default: a temporary directory)")
    p.add_argument("--sections", default="rss,speed,second", help="comma-separated: rss, speed, second (default all)")
    p.add_argument("--repeat", type=int, default=2, help="rounds of the speed section (best of; default 2)")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        fn = {"baseline": variant_baseline, "open": variant_open}[a.variant]
        print(json.dumps(fn(*a.args)))
        return
    sizes = [int(s) for s in a.sizes.split(",")]
    sections = set(a.sections.split(","))
    work = Path(a.dir or tempfile.mkdtemp(prefix="bench_data-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# bench_data: {os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.2f}, "
          f"corpora {sizes} MB in {work}\n")
    env = _env()
    small, big = sizes[0], sizes[-1]
    rows = {}
    for mb in sizes if "rss" in sections else [small]:
        corpus = make_corpus(work / f"corpus-{mb}mb.txt", mb)
        rows[mb] = _prepare(corpus, work / f"out-{mb}", 0, env)
        print(f"prepared {mb} MB: {rows[mb]['tokens']:,} tokens in {rows[mb]['seconds']:.1f} s, "
              f"peak RSS {rows[mb]['rss'] / 2**20:.0f} MiB, load average {os.getloadavg()[0]:.2f}", flush=True)
    if "rss" in sections:
        print("\n## 1. peak RSS of `moedistill prepare` (data.prepare_workers=0)\n")
        print("| corpus | tokens | peak RSS | / smallest |\n|---|---:|---:|---:|")
        for mb in sizes:
            r = rows[mb]
            print(f"| {mb} MB | {r['tokens']:,} | {r['rss'] / 2**20:,.0f} MiB | {r['rss'] / rows[small]['rss']:.3f} |")

    corpus = work / f"corpus-{small}mb.txt"
    if "speed" in sections:
        # alternated, best of --repeat each: the machine's other load hits every variant alike
        names = ["plain tokenizer call (its own threads)", "plain tokenizer call (one thread)",
                 "prepare, 0 workers", f"prepare, {a.workers} workers"]
        rate = dict.fromkeys(names, 0.0)
        for rep in range(a.repeat):
            for name in names:
                if name.startswith("plain"):
                    e = env if "threads" in name else _env(TOKENIZERS_PARALLELISM="false")
                    r, _ = _variant("baseline", str(corpus), env=e)
                else:
                    r = rows[small] if rep == 0 and name.endswith(" 0 workers") else \
                        _prepare(corpus, work / "out-speed", 0 if " 0 " in name else a.workers, env)
                rate[name] = max(rate[name], r["tokens"] / r["seconds"])
            print(f"speed round {rep + 1}/{a.repeat} done, load average {os.getloadavg()[0]:.2f}", flush=True)
        ref = rate[names[0]]
        print(f"\n## 2. tokens/s on the {small} MB corpus (best of {a.repeat}, alternated)\n")
        print("| variant | tokens/s | / plain call (threads) | / plain call (one thread) |\n|---|---:|---:|---:|")
        for k, v in rate.items():
            print(f"| {k} | {v:,.0f} | {v / ref:.3f} | {v / rate[names[1]]:.3f} |")

    if "second" in sections:
        second, _ = _variant("open", str(corpus), str(work / f"out-{small}"), env=env)
        first = rows[small]["seconds"]
        print(f"\n## 3. data time of a second command on the {small} MB corpus\n")
        print("| | seconds | / first |\n|---|---:|---:|")
        print(f"| first (build the store) | {first:.3f} | 1.000 |")
        print(f"| second (open it, blocks + fingerprint) | {second['seconds']:.4f} | {second['seconds'] / first:.5f} |")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}"
          + (f"; peak RSS {big} MB / {small} MB = {rows[big]['rss'] / rows[small]['rss']:.3f}" if big in rows else ""))
    if not a.dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
