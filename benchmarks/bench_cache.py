#!/usr/bin/env python
"""Teacher-cache benchmark: size, accuracy and speed of our cache against the original prototype's layout.

    python benchmarks/bench_cache.py            # ~2-4 minutes on 2 CPU cores
    python benchmarks/bench_cache.py --quick    # smaller samples, for a smoke run
    python benchmarks/bench_cache.py --modes    # only table 5 (~20 s)

Prints five tables:

1. bytes/token at k=64 -- the layout of the original prototype, the earlier distillation
   scripts this project replaces (float16 log-probs + int32 ids + gzip, chunked
   per sequence, input_ids int32 + gzip) against ours (docs/CACHE_FORMAT.md), whole files
   on disk, on (a) the embedded tiny teacher's real outputs (V=4096) and (b) a synthetic
   Zipf-like distribution over V=151,936 (ids drawn by a Zipf unigram, as frequent BPE
   tokens have small ids, plus per-position noise and a few context-boosted ids), and (c)
   the same synthetic with ids shuffled uniformly over the vocabulary -- a worst case for
   any id coding, shown for honesty.
2. mean |ΔKL| per position that each layout introduces against exact float32 top-k, for
   the distillation KL(q_T || p_T) with a student p = teacher logits + N(0, 1) noise
   (renormalize at T=1 and T=2, tail bucket at T=1), and KL(q || q_decoded).
3. generation wall time over teacher-forward-only wall time (same batches, same process,
   alternated, best of 3 each).
4. reader tokens/s with 0 and 2 DataLoader workers against the tokens/s one optimizer step
   of the tiny student (same size as the tiny teacher) consumes (the faster of 1 and all
   torch threads, so the ratio is not flattered by a slow step).
5. bytes/token of each cache mode on the embedded default (the tiny teacher, the first 64 x 128
   tokens of its corpus, k = N = 64, through ``generate_cache``) with the ratio to top-k: top-k;
   sample with log-probs in the padded layout of format version 1 (the same shards unpacked and
   written padded), packed (version 2), and packed without log-probs; and each dataset's share.

Last run (2-core CPU, nothing else running, torch 2.13 CPU, 32 s):
  bytes/token ours/prototype: tiny 121.2/213.5 = 0.568; Zipf-like V=151,936 142.9/245.2 = 0.583;
  uniform ids (worst case) 0.684. Mean |ΔKL| at most 7.6e-4 (tiny), 6.3e-4 (synthetic).
  Generation / forward over 32,768 tokens: 1.089 in the same run, 1.087 in alternated runs
  (forward 1.36 s; top-k/softmax/entropy 0.97 s and encoding + I/O 0.16 s in the writer
  thread, overlapped; 0.07 s waiting for the writer's last batch, 0.05 s merge + manifest).
  With other jobs on the 2 cores the same section gave 1.2-1.9.
  Reader 868k tok/s (0 workers), 525k (2 workers) vs 11.3k tok/s consumed by training: 77x / 46x.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

K = 64
V_BIG = 151_936


# --------------------------------------------------------------------------- data


def synthetic(n_tokens: int, vocab: int, *, seed: int = 0, chunk: int = 256):
    """Zipf-like teacher distributions over ``vocab`` ids.

    Logits = Zipf unigram over ids (id 0 most frequent, as frequent BPE tokens have small
    ids) + N(0, 2.5^2) per-position noise + 8 context-boosted ids per position. Returns
    exact float32 top-k ``ids`` [n, K] and ``lp`` [n, K], the student's full-vocabulary
    log-probs at those ids at T=1 and T=2 (``s1``, ``s2``) and the mean entropy.
    """
    g = torch.Generator().manual_seed(seed)
    base = -torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    out = {"ids": [], "lp": [], "s1": [], "s2": []}
    ent = []
    for s in range(0, n_tokens, chunk):
        b = min(chunk, n_tokens - s)
        z = base + 2.5 * torch.randn(b, vocab, generator=g)
        z.scatter_add_(1, torch.randint(0, vocab, (b, 8), generator=g), 4 + 12 * torch.rand(b, 8, generator=g))
        _collect(out, ent, z, g)
    return {k: torch.cat(v).numpy() for k, v in out.items()} | {"entropy": float(torch.cat(ent).mean())}


def shuffle_ids(d: dict, vocab: int, seed: int = 1) -> dict:
    """The same distributions with ids relabelled by a random permutation of the vocabulary:
    ids carry no frequency structure any more (a worst case for id coding)."""
    perm = np.random.default_rng(seed).permutation(vocab)
    return dict(d, ids=perm[d["ids"]])


def _collect(out, ent, z, g):
    lse = torch.logsumexp(z, -1, keepdim=True)
    vals, ids = torch.topk(z, K, -1)
    student = z + torch.randn(z.shape, generator=g)
    out["ids"].append(ids)
    out["lp"].append(vals - lse)
    out["s1"].append(student.gather(1, ids) - torch.logsumexp(student, -1, keepdim=True))
    out["s2"].append(student.gather(1, ids) / 2 - torch.logsumexp(student / 2, -1, keepdim=True))
    ent.append(lse.squeeze(1) - (torch.softmax(z, -1) * z).sum(-1))


def tiny_teacher_outputs(model, blocks, batch: int = 16):
    g = torch.Generator().manual_seed(0)
    out = {"ids": [], "lp": [], "s1": [], "s2": []}
    ent = []
    with torch.inference_mode():
        for s in range(0, len(blocks), batch):
            z = model(input_ids=torch.from_numpy(blocks[s : s + batch]).long(), use_cache=False).logits.float()
            _collect(out, ent, z.reshape(-1, z.shape[-1]), g)
    return {k: torch.cat(v).numpy() for k, v in out.items()} | {"entropy": float(torch.cat(ent).mean())}


# --------------------------------------------------------------------------- layouts


def write_prototype(path: Path, input_ids: np.ndarray, ids: np.ndarray, lp: np.ndarray) -> np.ndarray:
    """The original prototype's layout: float16 values + int32 indices + gzip. Returns the values it stores."""
    import h5py

    n, L = input_ids.shape
    with h5py.File(path, "w") as f:
        f.create_dataset("input_ids", data=input_ids.astype(np.int32), compression="gzip", chunks=(1, L))
        f.create_dataset("indices", data=ids.reshape(n, L, K).astype(np.int32), compression="gzip", chunks=(1, L, K))
        f.create_dataset("values", data=lp.reshape(n, L, K).astype(np.float16), compression="gzip", chunks=(1, L, K))
    return lp.astype(np.float16).astype(np.float32)


def write_ours(
    path: Path, input_ids: np.ndarray, ids: np.ndarray, lp: np.ndarray, codec="zstd", level=None
) -> np.ndarray:
    """Our layout through the cache's own encoder and part writer. Returns the decoded values."""
    from moedistill.cache import encode
    from moedistill.cache.writer import write_part

    n, L = input_ids.shape
    steps = encode.logprob_steps(K)
    arrays = {"input_ids": input_ids.astype(encode.ID_DTYPE)}
    arrays.update(encode.encode_targets(ids.reshape(n, L, K), lp.reshape(n, L, K), steps))
    arrays = encode.to_disk(arrays, packed=False)
    attrs = {
        "format_version": encode.FORMAT_VERSION, "mode": "topk", "width": K, "top_k": K, "vocab_size": 0,
        "seq_len": L, "logprob_steps": steps, "codec": codec,
        "codec_level": level if level is not None else encode.DEFAULT_LEVEL, "seq_start": 0, "seq_end": n,
    }
    write_part(path, arrays, attrs)
    return encode.decode_logprobs(arrays["target_deltas"], steps).reshape(-1, K)


def storage(path: Path) -> dict:
    import h5py

    try:
        import hdf5plugin  # noqa: F401
    except ImportError:
        pass
    with h5py.File(path, "r") as f:
        return {name: f[name].id.get_storage_size() for name in f}


# --------------------------------------------------------------------------- accuracy


def delta_kl(d: dict, lp_dec: np.ndarray) -> dict:
    """Mean over positions of |KL(q_dec || p) - KL(q || p)| for three loss variants, and KL(q || q_dec)."""
    lp = torch.tensor(d["lp"], dtype=torch.float64)
    dec = torch.tensor(lp_dec, dtype=torch.float64)
    s1, s2 = (torch.tensor(d[k], dtype=torch.float64) for k in ("s1", "s2"))

    def renorm(teacher_lp, student_lp, T):
        q = torch.log_softmax(teacher_lp / T, -1)
        return (q.exp() * (q - student_lp)).sum(-1)  # student_lp: full-vocabulary log p_T at the ids

    def tail(teacher_lp, student_lp):
        q_tail = (1 - teacher_lp.exp().sum(-1)).clamp(min=1e-12)
        p_tail = (1 - student_lp.exp().sum(-1)).clamp(min=1e-12)
        return (teacher_lp.exp() * (teacher_lp - student_lp)).sum(-1) + q_tail * (q_tail.log() - p_tail.log())

    q, qd = torch.log_softmax(lp, -1), torch.log_softmax(dec, -1)
    return {
        "renorm T=1": (renorm(dec, s1, 1) - renorm(lp, s1, 1)).abs().mean().item(),
        "renorm T=2": (renorm(dec, s2, 2) - renorm(lp, s2, 2)).abs().mean().item(),
        "tail T=1": (tail(dec, s1) - tail(lp, s1)).abs().mean().item(),
        "KL(q||q_dec)": (q.exp() * (q - qd)).sum(-1).mean().item(),
        "max |err|": float(np.abs(lp_dec - d["lp"]).max()),
    }


# --------------------------------------------------------------------------- speed


def generation_ratio(model, tok, packed, batch: int, workdir: Path, repeats: int = 3) -> dict:
    """Wall seconds of the teacher forward alone and of the whole generation (forward, top-k,
    encode, write, merge, checksum, manifest).

    Runs with one torch thread: on a 2-core machine shared with other jobs, two OpenMP
    threads per op spin-wait on each other and made the same forward take 3.5 to 22 s;
    one thread is stable (and leaves the second core to the writer thread, which on a CPU
    also does the top-k). Two measurements, because other processes still add noise: (a) the
    generation's own record of its forward time (``timing`` in the manifest:
    the same batches in the same run) against its total wall time, best of ``repeats``;
    (b) forward-only passes alternated with generation runs, best of ``repeats`` each.
    """
    import json

    from moedistill.cache import generate_cache

    def forward_only():
        t = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, len(packed.blocks), batch):
                model(input_ids=torch.from_numpy(packed.blocks[s : s + batch]).long(), use_cache=False).logits
        return time.perf_counter() - t

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        forward_only()  # warm-up
        fwd, runs = [], []
        for _ in range(repeats):
            fwd.append(forward_only())
            t = time.perf_counter()
            generate_cache(model, tok, packed, workdir / "gen", mode="topk", top_k=K, batch_size=batch,
                           teacher_name="tiny", overwrite=True, progress=False)
            wall = time.perf_counter() - t
            timing = json.loads((workdir / "gen" / "manifest.json").read_text())["shards"][0]["timing"]
            runs.append(dict(timing, wall_s=wall))
    finally:
        torch.set_num_threads(threads)
    best = min(runs, key=lambda r: r["wall_s"] / r["forward_s"])
    return {"forward_alone_s": min(fwd), "generation_s": min(r["wall_s"] for r in runs), "best_run": best}


def reader_speed(path: Path, workers: int, batch: int, epochs: int) -> float:
    from torch.utils.data import DataLoader

    from moedistill.cache import open_cache

    ds = open_cache(path)
    dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    for _ in dl:  # warm-up epoch (starts the workers)
        pass
    t = time.perf_counter()
    n = 0
    for _ in range(epochs):
        for b in dl:
            n += b["input_ids"].numel()
    return n / (time.perf_counter() - t)


def training_consumption(model, path: Path, batch: int, steps: int = 4) -> float:
    """Tokens/s of full optimizer steps (forward, KD loss, backward, AdamW) of a tiny student."""
    import copy

    from torch.utils.data import DataLoader

    from moedistill.cache import open_cache
    from moedistill.losses import distillation_loss

    student = copy.deepcopy(model).train()
    for p in student.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    dl = DataLoader(open_cache(path), batch_size=batch, shuffle=True, drop_last=True)
    batches = []
    while len(batches) < steps + 1:
        batches += list(dl)
    batches = batches[: steps + 1]
    times = []
    for b in batches:
        t = time.perf_counter()
        logits = student(input_ids=b["input_ids"]).logits
        out = distillation_loss(logits, b["labels"], b["target_ids"], b["target_logprobs"], alpha=0.5, temperature=2.0)
        out.total.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return batch * batches[0]["input_ids"].shape[1] / float(np.median(times[1:]))


# --------------------------------------------------------------------------- cache modes


def mode_sizes(model, tok, packed, workdir: Path, batch: int = 16) -> list[tuple]:
    """Table 5's rows: ``(cache, B/token, ratio to top-k, per-dataset B/token)``."""
    import h5py

    from moedistill.cache import encode, generate_cache
    from moedistill.cache.layout import open_h5

    n_tok = packed.num_tokens
    sizes = {}
    for name, kw in (("top-k (k=64)", dict(mode="topk", top_k=K)),
                     ("sample N=64, log-probs", dict(mode="sample", num_samples=K)),
                     ("sample N=64, counts only", dict(mode="sample", num_samples=K, sample_logprobs=False))):
        out = generate_cache(model, tok, packed, workdir / name.replace(" ", "_"), batch_size=batch,
                             teacher_name="tiny", overwrite=True, progress=False, **kw)
        sizes[name] = (out, {f.name: storage(f) for f in out.glob("shard-*.h5")})
    # version 1's padded sample layout: the packed shards unpacked to [rows, W, L], written as version 1 did
    out = sizes["sample N=64, log-probs"][0]
    v1 = workdir / "v1.h5"
    with open_h5(out / "shard-00000.h5") as f, h5py.File(v1, "w") as g:
        W, lengths = int(f.attrs["width"]), f["target_lengths"][...]
        for name in ("input_ids", *encode.TARGET_ARRAYS):
            a = f[name][...] if name == "input_ids" else encode.unpack(f[name][...], lengths, W)
            g.create_dataset(name, data=a, chunks=(1, *a.shape[1:]), **encode.compression_kwargs(name))
    sizes["sample N=64, log-probs, padded (version 1)"] = (None, {"v1": storage(v1)})
    order = ["top-k (k=64)", "sample N=64, log-probs, padded (version 1)", "sample N=64, log-probs",
             "sample N=64, counts only"]
    files = {name: sum(((out / f).stat().st_size if out else v1.stat().st_size) for f in parts)
             for name, (out, parts) in sizes.items()}
    rows = []
    for name in order:
        per = {}
        for d in sizes[name][1].values():
            for k, v in d.items():
                per[k] = per.get(k, 0) + v
        b = files[name] / n_tok
        shares = ", ".join(f"{k.replace('target_', '')} {v / n_tok:.1f}" for k, v in per.items() if k != "input_ids")
        rows.append((name, f"{b:.1f}", f"{b / (files[order[0]] / n_tok):.3f}", shares))
    return rows


# --------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller samples (a smoke run, noisier numbers)")
    ap.add_argument("--teacher", default="tiny", help="teacher for the real-output rows and the speed tables")
    ap.add_argument("--modes", action="store_true", help="only table 5: bytes/token of each cache mode")
    args = ap.parse_args(argv)
    from moedistill.data import prepare
    from moedistill.models import get_model

    t_start = time.time()
    n_syn = 1024 if args.quick else 4096
    n_seq = 16 if args.quick else 64
    L = 128
    work = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    try:
        model, tok = get_model(args.teacher, dtype="float32")
        packed = prepare(tok, "tiny", seq_len=L, max_samples=400, max_sequences=n_seq)
        if args.modes:
            _print_modes(model, tok, packed if n_seq == 64 else prepare(tok, "tiny", seq_len=L, max_samples=400,
                                                                       max_sequences=64), work)
            return
        datasets = {"tiny teacher (V=4,096)": (tiny_teacher_outputs(model, packed.blocks), packed.blocks)}
        t0 = time.time()
        d = synthetic(n_syn, V_BIG)
        datasets[f"Zipf-like synthetic (V={V_BIG:,})"] = (d, d["ids"][:, 0].reshape(-1, L))  # "text": top-1 tokens
        u = shuffle_ids(d, V_BIG)
        datasets["  same, ids uniform (worst case)"] = (u, u["ids"][:, 0].reshape(-1, L))
        print(f"[data: {time.time() - t0:.0f} s]", file=sys.stderr)

        t0 = time.time()
        size_rows, kl_rows = [], []
        for name, (d, input_ids) in datasets.items():
            n_tok = input_ids.size
            proto_vals = write_prototype(work / "prototype.h5", input_ids, d["ids"], d["lp"])
            ours_vals = write_ours(work / "ours.h5", input_ids, d["ids"], d["lp"])
            write_ours(work / "ours_gzip.h5", input_ids, d["ids"], d["lp"], codec="gzip", level=6)
            b_proto = (work / "prototype.h5").stat().st_size / n_tok
            b_ours = (work / "ours.h5").stat().st_size / n_tok
            b_gzip = (work / "ours_gzip.h5").stat().st_size / n_tok
            ss, so = storage(work / "prototype.h5"), storage(work / "ours.h5")
            mass = float(np.exp(d["lp"]).sum(-1).mean())
            size_rows.append((
                name, f"{d['entropy']:.2f}", f"{mass:.3f}", f"{b_proto:.1f}", f"{b_ours:.1f}",
                f"{b_ours / b_proto:.3f}",
                f"{b_gzip / b_proto:.3f}", f"{ss['indices'] / n_tok:.0f} / {so['target_ids'] / n_tok:.0f}",
                f"{ss['values'] / n_tok:.0f} / {so['target_deltas'] / n_tok:.0f}",
            ))
            ko, ks = delta_kl(d, ours_vals), delta_kl(d, proto_vals)
            for layout, kd in (("ours", ko), ("prototype fp16", ks)):
                kl_rows.append((name, layout, *(f"{v:.2e}" if k != "max |err|" else f"{v:.4f}" for k, v in kd.items())))

        print(f"\n## 1. bytes/token at k={K} (whole HDF5 files; prototype = float16 log-probs + int32 ids + gzip)\n")
        _table(["data", "entropy", "top-64 mass", "prototype B/tok", "ours B/tok", "ours/prototype",
                "ours(gzip)/prototype",
                "ids B/tok prototype/ours", "values B/tok prototype/ours"], size_rows)
        print(f"[sizes and KL: {time.time() - t0:.0f} s]", file=sys.stderr)
        print("\n## 2. mean |ΔKL| per position vs exact float32 top-k (student = teacher + N(0,1) logit noise)\n")
        _table(["data", "layout", "renorm T=1", "renorm T=2", "tail T=1", "KL(q||q_dec)", "max |err| nats"], kl_rows)

        t0 = time.time()
        repeats = 2 if args.quick else 3
        # 256 sequences = 16 batches: the writer's work on the last batch (it cannot overlap a
        # next forward) is a fixed ~0.07 s per run, which would be a quarter of a 4-batch run
        gen_packed = prepare(tok, "tiny", seq_len=L, max_samples=400, max_sequences=64 if args.quick else 256)
        g = generation_ratio(model, tok, gen_packed, batch=16, workdir=work, repeats=repeats)
        n_tok = gen_packed.num_tokens
        b = g["best_run"]
        print(f"\n## 3. generation vs teacher forward (tiny teacher, {len(gen_packed.blocks)} x {L} tokens, batch 16, "
              f"1 torch thread, best of {repeats})\n")
        _table(["measurement", "teacher forward", "generation", "ratio"], [
            ("same run (forward timed inside the generation)", f"{b['forward_s']:.2f} s", f"{b['wall_s']:.2f} s",
             f"{b['wall_s'] / b['forward_s']:.3f}"),
            ("separate runs, alternated", f"{g['forward_alone_s']:.2f} s ({n_tok / g['forward_alone_s']:,.0f} tok/s)",
             f"{g['generation_s']:.2f} s ({n_tok / g['generation_s']:,.0f} tok/s)",
             f"{g['generation_s'] / g['forward_alone_s']:.3f}"),
        ])
        rest = b["wall_s"] - b["forward_s"] - b["writer_drain_s"] - b["merge_s"]
        print(f"\nwhere the same run's time went: forward {b['forward_s']:.2f} s; waiting for the writer at the end "
              f"{b['writer_drain_s']:.2f} s; merge + checksum {b['merge_s']:.2f} s; setup, queue, verify and manifest "
              f"{rest:.2f} s. Alongside the teacher the writer thread worked "
              f"{b['writer_busy_s']:.2f} s, of which top-k/softmax/entropy on the logits {b['targets_s']:.2f} s.")
        print(f"[generation: {time.time() - t0:.0f} s]", file=sys.stderr)

        t0 = time.time()
        cache = work / "gen"
        epochs = 3 if args.quick else 8
        r0 = reader_speed(cache, 0, 16, epochs)
        r2 = reader_speed(cache, 2, 16, epochs)
        threads = torch.get_num_threads()  # the faster of 1 and all threads (see generation_ratio)
        torch.set_num_threads(1)
        train = training_consumption(model, cache, 16)
        torch.set_num_threads(threads)
        train = max(train, training_consumption(model, cache, 16))
        print("\n## 4. reader throughput vs training consumption (batch 16 x 128, shuffled)\n")
        _table(["reader, 0 workers", "reader, 2 workers", "one training step consumes", "ratio 0 / 2 workers"],
               [(f"{r0:,.0f} tok/s", f"{r2:,.0f} tok/s", f"{train:,.0f} tok/s",
                 f"{r0 / train:.0f}x / {r2 / train:.0f}x")])
        print(f"[reader and training: {time.time() - t0:.0f} s]", file=sys.stderr)
        _print_modes(model, tok, packed if n_seq == 64 else prepare(tok, "tiny", seq_len=L, max_samples=400,
                                                                   max_sequences=64), work)
        print(f"\n(total {time.time() - t_start:.0f} s; torch {torch.__version__}, {os.cpu_count()} CPUs)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _print_modes(model, tok, packed, work: Path):
    print(f"\n## 5. bytes/token of each cache mode (tiny teacher, {len(packed.blocks)} x {packed.seq_len} tokens, "
          f"whole shards; B/token per dataset)\n")
    _table(["cache", "B/token", "/ top-k", "datasets (B/token)"], mode_sizes(model, tok, packed, work))


def _table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


if __name__ == "__main__":
    sys.exit(main())
