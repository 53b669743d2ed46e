"""Side-by-side cost of the distillation loss, printed as tables with ratios.

Section ``loss``: forward + backward of one loss over [positions, V] student logits:
  (a) plain CE           F.cross_entropy(logits, labels)
  (b) sparse (ours)      moedistill.losses.distillation_loss on top-k cache targets
  (c) dense (prototype)  the original prototype's reconstruction (the earlier distillation
                         scripts this project replaces): the top-k log-probs scattered into a
                         full-vocabulary tensor filled with -1e4, softmax(./T), then
                         F.kl_div(log_softmax(z/T), .) * T^2 blended with CE

    python benchmarks/bench_loss.py                       # V=151,936, 4,096 positions, k=64
    python benchmarks/bench_loss.py --positions 512 --vocab 32000   # quick look

How it is measured (all variants in one run of this script):
* Each variant runs in its own fresh process (multiprocessing "spawn"), so no variant
  inherits another's allocator state or peak.
* Peak memory (CPU): Linux tracks a process's peak resident set (VmHWM in
  /proc/self/status), and writing "5" to /proc/self/clear_refs resets it to the
  current RSS. After the inputs exist we reset it, note RSS, run one fwd+bwd and read
  VmHWM: the difference is the loss's own peak (its temporaries plus the gradient it
  leaves in ``logits.grad``). Large tensors are mmap'ed by glibc and returned to the OS
  when freed, so RSS follows the tensors. Where clear_refs cannot be written, the
  fallback is ru_maxrss of the fresh process, which is the same number as long as the
  measured call is the largest thing the process did (it is: the inputs come first and
  are smaller). "total" adds the inputs (logits, labels, targets) held before the call.
  On CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats().
* Time: the machine may be shared, so each variant's process alternates its own fwd+bwd
  with plain CE (``--repeats`` rounds each) and the ratio is that of the two medians,
  measured side by side; row (a) is the CE measured beside (b). The first round also
  measures the peaks.
* The prototype's dense variant needs ~7x the logits; when the free memory cannot hold it
  at the requested size it is measured at fewer positions (halving), against CE at the
  same size in the same process, since every cost here is linear in the positions.

Section ``fused``: forward + backward from the final hidden states [positions, H] through
an lm_head weight [V, H] (trainable, then frozen), each variant in its own fresh process:
  (a) today's path   F.linear(hidden, W) then distillation_loss on the logits
  (b) plain CE       F.linear(hidden, W) then F.cross_entropy
  (c) fused          moedistill.losses.fused_linear_distillation_loss(hidden, W, ...)
(c)'s process alternates (c) with (a), (b)'s alternates (b) with (a); peaks are above the
inputs (hidden, weight, targets) and include the gradients the step leaves behind
(hidden.grad, weight.grad). ``python benchmarks/bench_loss.py --section fused``
(V = 151,936, H = 2,048, 4,096 positions, k = 64: about 15 minutes on 2 cores, ~11 GB).

Section ``step``: one optimizer step of the tiny student (checkpoint-0 of the embedded
teacher, the embedded default's batch 16 x 128) along the DistillationTrainer's path:
  (a) CE only                     student forward + F.cross_entropy + backward + AdamW
  (b) distill, cache              training_step on a batch carrying top-k targets
  (c) distill, online teacher     training_step with the teacher computing full logits
  (d) distill, cache, fused       (b) with loss.fused_linear=true
Each of (b), (c), (d) is timed in its own fresh process alternating with (a), as above, and
its peak measured in another (glibc told to mmap every allocation >= 64 KiB, so a tiny
model's freed tensors leave the RSS; that slows allocation, hence the separate timing
process); the teacher is not resident in (b)'s processes. "with models" adds what the step holds
throughout: the student's weights and gradients, the AdamW state, the batch and, for
(c), the teacher. ``python benchmarks/bench_loss.py --section step``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

# --------------------------------------------------------------------------- shared helpers


def run_in_fresh_process(fn, *args):
    """Run the module-level ``fn(*args)`` in a new spawned process and return its result."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextmanager
def peak_memory(device: str = "cpu"):
    """Measure the peak memory of the block above what was held when it began.

    Yields a dict; after the block ``result["peak"]`` is that peak in bytes and
    ``result["method"]`` names how it was measured (see the module docstring).
    """
    result: dict = {}
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result.update(peak=torch.cuda.max_memory_allocated() - base, method="cuda.max_memory_allocated")
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss (fresh process)"
    base = _status_bytes("VmRSS") or 0
    yield result
    if method.startswith("VmHWM"):
        hwm = _status_bytes("VmHWM")
    else:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result.update(peak=max(hwm - base, 0), method=method)


def mem_available() -> int | None:
    """Bytes the kernel says can still be allocated without swapping (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def print_table(title, header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(f"\n{title}")
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    sys.stdout.flush()


def _gb(n):
    return f"{n / 2**30:.2f}"


# --------------------------------------------------------------------------- section: loss


@dataclass
class LossBench:
    positions: int
    vocab: int
    k: int
    alpha: float
    temperature: float
    tail: str
    chunk_size: int
    dtype: str
    repeats: int
    device: str
    seed: int = 0


LOSS_VARIANTS = {
    "ce": "(a) plain CE",
    "sparse": "(b) sparse (ours)",
    "dense": "(c) dense (prototype)",
}


def _labels_and_targets(g, n: int, v: int, k: int, device: str):
    """Labels [1, N] and distinct top-k ids [1, N, k] with descending log-probs that leave
    some mass outside the k ids, as a top-k cache would hold."""
    import torch

    labels = torch.randint(0, v, (1, n), generator=g).to(device)
    base = torch.randint(0, v, (n, 1), generator=g)
    step = torch.randint(1, max(v // k, 2), (n, 1), generator=g)
    ids = ((base + torch.arange(k) * step) % v).unsqueeze(0).to(device)  # distinct per row
    lps = torch.log_softmax(torch.randn(n, k + 1, generator=g) * 3.0, -1)[:, :k]
    lps = lps.sort(-1, descending=True).values.unsqueeze(0).to(device)
    return labels, ids, lps


def _loss_inputs(cfg: LossBench):
    """Student logits [1, N, V], labels [1, N], distinct top-k ids [1, N, k] with descending
    log-probs that leave some mass outside the k ids, as a top-k cache would hold."""
    import torch

    g = torch.Generator().manual_seed(cfg.seed)
    n, v, k = cfg.positions, cfg.vocab, cfg.k
    # 256 random rows tiled: as costly to process as fully random logits, much faster to make
    block = torch.randn(min(n, 256), v, generator=g).mul_(2.0).to(getattr(torch, cfg.dtype))
    logits = block.repeat(-(-n // block.shape[0]), 1)[:n].unsqueeze(0).to(cfg.device)
    labels, ids, lps = _labels_and_targets(g, n, v, k, cfg.device)
    return logits, labels, ids, lps


def _loss_step(variant, cfg: LossBench, logits, labels, ids, lps):
    import torch
    import torch.nn.functional as F

    from moedistill.losses import distillation_loss

    v, t, a = cfg.vocab, cfg.temperature, cfg.alpha
    if variant == "ce":
        loss = F.cross_entropy(logits.view(-1, v), labels.view(-1))
    elif variant == "sparse":
        loss = distillation_loss(
            logits, labels, ids, lps, alpha=a, temperature=t, tail=cfg.tail, chunk_size=cfg.chunk_size
        ).total
    else:  # the original prototype: dense teacher rebuilt from the top-k, then F.kl_div
        z = logits.view(-1, v)
        teacher = torch.full_like(z, -1e4).scatter_(1, ids.view(-1, cfg.k), lps.view(-1, cfg.k).to(z.dtype))
        kl = F.kl_div(F.log_softmax(z / t, -1), F.softmax(teacher / t, -1), reduction="batchmean") * t * t
        loss = (1 - a) * F.cross_entropy(z, labels.view(-1)) + a * kl
    loss.backward()
    logits.grad = None


def _sync(device):
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _loss_worker(variant: str, cfg_dict: dict) -> dict:
    """In a fresh process: ``repeats`` rounds of ``variant`` and plain CE, timed alternately;
    the first round also measures each one's peak memory."""
    import torch

    cfg = LossBench(**cfg_dict)
    logits, labels, ids, lps = _loss_inputs(cfg)
    logits.requires_grad_(True)
    held = sum(t.numel() * t.element_size() for t in (logits, labels, ids, lps))
    peaks, times = {}, {}
    for name in dict.fromkeys([variant, "ce"]):  # round 1 also measures peak memory
        with peak_memory(cfg.device) as mem:
            t0 = time.perf_counter()
            _loss_step(name, cfg, logits, labels, ids, lps)
            _sync(cfg.device)
            times[name] = [time.perf_counter() - t0]
        peaks[name] = mem["peak"]
    for _ in range(cfg.repeats - 1):
        for name in peaks:
            _sync(cfg.device)
            t0 = time.perf_counter()
            _loss_step(name, cfg, logits, labels, ids, lps)
            _sync(cfg.device)
            times[name].append(time.perf_counter() - t0)
    return {
        "positions": cfg.positions,
        "peak": peaks[variant],
        "ce_peak": peaks["ce"],
        "method": mem["method"],
        "held": held,
        "times": times[variant],
        "ce_times": times["ce"],
        "threads": torch.get_num_threads(),
    }


# Memory of a variant's process in units of the fp32 logits: the inputs (1x) plus the
# larger of its own peak and CE's (measured: CE ~3.0x, ours ~1.1x, the prototype's dense ~6.0x).
# Used only to pick a size that fits.
_NEED = {"ce": 4.0, "sparse": 4.0, "dense": 7.0}


def _fits(variant, positions, cfg: LossBench):
    avail = mem_available()
    if cfg.device != "cpu" or avail is None:
        return True
    return _NEED[variant] * positions * cfg.vocab * 4 < 0.8 * avail


def loss_section(args):
    cfg = LossBench(
        positions=args.positions,
        vocab=args.vocab,
        k=args.k,
        alpha=args.alpha,
        temperature=args.temperature,
        tail=args.tail,
        chunk_size=args.chunk_size,
        dtype=args.dtype,
        repeats=args.repeats,
        device=args.device,
    )
    elem = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.dtype]
    print(
        f"loss fwd+bwd: {cfg.positions} positions x V={cfg.vocab}, k={cfg.k}, {cfg.dtype} logits "
        f"({_gb(cfg.positions * cfg.vocab * elem)} GB), alpha={cfg.alpha}, T={cfg.temperature}, tail={cfg.tail}, "
        f"chunk_size={cfg.chunk_size}, device={cfg.device}, {args.repeats} timed rounds"
    )
    results = {}
    # (a) is measured inside the other variants' processes; alone only if nothing else runs
    todo = [v for v in LOSS_VARIANTS if v != "ce" and v not in args.skip] or ["ce"]
    for variant in todo:
        n = cfg.positions
        while n > 64 and not _fits(variant, n, cfg):
            n //= 2  # ratios are per position; a smaller run still compares like with like
        if not _fits(variant, n, cfg):
            print(f"skip {LOSS_VARIANTS[variant]}: not enough free memory even at {n} positions")
            continue
        if n != cfg.positions:
            print(f"  {LOSS_VARIANTS[variant]}: too big for the free memory, measured at {n} positions")
        t0 = time.perf_counter()
        run_cfg = replace(cfg, positions=n, repeats=args.dense_repeats if variant == "dense" else cfg.repeats)
        results[variant] = run_in_fresh_process(_loss_worker, variant, asdict(run_cfg))
        print(f"  {LOSS_VARIANTS[variant]} done in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    if "ce" not in results and results:
        first = next(iter(results.values()))
        results = {"ce": {**first, "peak": first["ce_peak"], "times": first["ce_times"]}, **results}
    for variant, r in results.items():
        t_med, t_ce = median(r["times"]), median(r["ce_times"])
        total, ce_total = r["peak"] + r["held"], r["ce_peak"] + r["held"]
        rows.append(
            [
                LOSS_VARIANTS[variant],
                r["positions"],
                f"{t_med:.2f}",
                f"{t_ce:.2f}",
                f"{t_med / t_ce:.2f}x",
                _gb(r["peak"]),
                _gb(r["ce_peak"]),
                f"{r['peak'] / r['ce_peak']:.2f}x",
                f"{total / ce_total:.2f}x",
            ]
        )
    print_table(
        "forward+backward of the loss, ratios to (a) plain CE measured in the same process",
        ["variant", "positions", "time s", "CE s", "time/CE", "peak GB", "CE peak GB", "peak/CE", "incl. inputs/CE"],
        rows,
    )
    if results:
        r = next(iter(results.values()))
        rounds = f"{cfg.repeats}" + (f" ({args.dense_repeats} for (c))" if "dense" in results else "")
        print(
            f"time: median of {rounds}, alternating with plain CE; peak: above the inputs "
            f"({r['method']}), 'incl. inputs' also counts the logits and targets; {r['threads']} threads."
        )
    return results


# --------------------------------------------------------------------------- section: step


STEP_VARIANTS = {
    "ce": "(a) CE only",
    "cache": "(b) distill, cache",
    "fused": "(d) distill, cache, fused_linear",
    "online": "(c) distill, online teacher",
}


@dataclass
class StepBench:
    batch_size: int
    seq_len: int
    k: int
    rank: int
    alpha: float
    temperature: float
    repeats: int
    device: str


def _step_worker(variant: str, cfg_dict: dict, measure: str) -> dict:
    """In a fresh process: one optimizer step of the tiny student, ``variant`` alternating
    with a CE-only step, after one warm-up round that creates the optimizer state.
    ``measure="memory"``: one round, each step's peak memory; ``"time"``: ``repeats`` rounds.

    (a) CE only: student forward, F.cross_entropy, backward, AdamW step.
    (b) cache: DistillationTrainer.training_step on a batch carrying top-k targets (the
        teacher is not in the process while measuring), then the AdamW step.
    (c) online: DistillationTrainer.training_step with the teacher beside the student,
        computing its full logits under no_grad, then the AdamW step.
    (d) fused: (b) with ``loss.fused_linear``: the lm_head inside the loss.
    """
    import gc

    import torch
    import torch.nn.functional as F
    from transformers import TrainingArguments

    from moedistill.compression import compress_model
    from moedistill.config import LossConfig
    from moedistill.data import prepare, shifted_labels
    from moedistill.models import get_model
    from moedistill.trainer import DistillationTrainer

    cfg = StepBench(**cfg_dict)
    torch.manual_seed(0)
    teacher, tok = get_model("tiny", dtype="float32")
    student = compress_model(teacher, rank=cfg.rank).to(cfg.device).train()
    blocks = prepare(tok, "tiny", seq_len=cfg.seq_len, max_sequences=cfg.batch_size).blocks
    ids = torch.as_tensor(blocks, dtype=torch.long)
    batch = {"input_ids": ids, "labels": shifted_labels(ids)}
    if variant in ("cache", "fused"):  # what the cache holds: top-k log-probs of the teacher at T=1
        with torch.no_grad():
            top = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1).topk(cfg.k, -1)
        batch |= {"target_ids": top.indices, "target_logprobs": top.values}
        del teacher, top
        teacher = None
        gc.collect()
    else:
        teacher.to(cfg.device)
    batch = {k: v.to(cfg.device) for k, v in batch.items()}
    args = TrainingArguments(
        output_dir="/tmp/moedistill-bench-step", use_cpu=cfg.device == "cpu", report_to=[], learning_rate=1e-5,
        max_grad_norm=0.0,
    )
    loss = LossConfig(alpha=cfg.alpha, temperature=cfg.temperature, fused_linear=variant == "fused")
    trainer = DistillationTrainer(student, args, teacher=teacher if variant == "online" else None, loss=loss)
    optimizer = trainer.create_optimizer()
    n_items = batch["labels"].ne(-100).sum()

    def step(name):
        if name == "ce":
            logits = student(input_ids=batch["input_ids"], use_cache=False).logits
            F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100).backward()
            del logits
        else:
            trainer.training_step(student, batch, n_items)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    names = list(dict.fromkeys([variant, "ce"]))
    for name in names:  # warm-up: optimizer state, allocator, one-time setup
        step(name)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    held = {
        "student": 2 * nbytes(student.parameters()),  # weights + gradients
        "optimizer": nbytes(t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t)),
        "teacher": nbytes(teacher.parameters()) if teacher is not None else 0,
        "batch": nbytes(batch.values()),
    }
    if measure == "memory":
        peaks = {}
        for name in names:
            gc.collect()
            with peak_memory(cfg.device) as mem:
                step(name)
                _sync(cfg.device)
            peaks[name] = mem["peak"]
        return {"peak": peaks[variant], "ce_peak": peaks["ce"], "held": held, "method": mem["method"]}
    times = {name: [] for name in names}
    for _ in range(cfg.repeats):
        for name in names:
            _sync(cfg.device)
            t0 = time.perf_counter()
            step(name)
            _sync(cfg.device)
            times[name].append(time.perf_counter() - t0)
    return {"times": times[variant], "ce_times": times["ce"], "threads": torch.get_num_threads()}


def step_section(args):
    cfg = StepBench(
        batch_size=args.step_batch_size,
        seq_len=args.step_seq_len,
        k=args.k,
        rank=args.step_rank,
        alpha=args.alpha,
        temperature=args.temperature,
        repeats=max(args.repeats, args.step_repeats),
        device=args.device,
    )
    print(
        f"\ntraining step of the tiny student (checkpoint-0 of the embedded teacher, rank {cfg.rank}): "
        f"batch {cfg.batch_size} x {cfg.seq_len}, k={cfg.k}, alpha={cfg.alpha}, T={cfg.temperature}, AdamW, "
        f"device={cfg.device}, {cfg.repeats} timed rounds"
    )
    results = {}
    for variant in ("cache", "online", "fused"):
        t0 = time.perf_counter()
        # memory: glibc told to mmap every allocation >= 64 KiB, so the small tensors of a tiny
        # model leave the RSS when freed and each step's peak shows in VmHWM. That makes every
        # allocation a page-faulting mmap, so time is measured in another process without it.
        old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        try:
            mem = run_in_fresh_process(_step_worker, variant, asdict(cfg), "memory")
        finally:
            if old is None:
                os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
            else:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = old
        results[variant] = {**mem, **run_in_fresh_process(_step_worker, variant, asdict(cfg), "time")}
        print(f"  {STEP_VARIANTS[variant]} done in {time.perf_counter() - t0:.0f} s", flush=True)
    first = results["cache"]
    results = {"ce": {**first, "peak": first["ce_peak"], "times": first["ce_times"]}, **results}
    rows = []
    for variant, r in results.items():
        t_med, t_ce = median(r["times"]), median(r["ce_times"])
        held = sum(r["held"].values())
        ce_total = r["ce_peak"] + sum(v for k, v in results["ce"]["held"].items() if k != "teacher")
        total = r["peak"] + held - (r["held"]["teacher"] if variant == "ce" else 0)
        rows.append(
            [
                STEP_VARIANTS[variant],
                f"{t_med * 1e3:.0f}",
                f"{t_ce * 1e3:.0f}",
                f"{t_med / t_ce:.2f}x",
                f"{r['peak'] / 2**20:.1f}",
                f"{r['peak'] / r['ce_peak']:.2f}x",
                f"{total / 2**20:.1f}",
                f"{total / ce_total:.2f}x",
            ]
        )
    print_table(
        "one optimizer step, ratios to (a) CE only measured in the same process",
        ["step", "time ms", "CE ms", "time/CE", "peak MiB", "peak/CE", "with models MiB", "with models/CE"],
        rows,
    )
    r = results["online"]
    print(
        f"time: median of {cfg.repeats}, alternating with the CE step; peak: above what the step starts with "
        f"({r['method']}); 'with models' adds the student's weights and gradients, AdamW state, the batch and, "
        f"for (c), the teacher's weights ({r['held']['teacher'] / 2**20:.1f} MiB); {r['threads']} threads."
    )
    return results


# --------------------------------------------------------------------------- section: fused


FUSED_VARIANTS = {
    "today": "(a) lm_head + distillation_loss",
    "ce": "(b) lm_head + plain CE",
    "fused": "(c) fused_linear_distillation_loss",
}


@dataclass
class FusedBench:
    positions: int
    vocab: int
    hidden: int
    k: int
    alpha: float
    temperature: float
    tail: str
    chunk_size: int
    dtype: str
    repeats: int
    device: str
    frozen: bool
    seed: int = 0


def _fused_inputs(cfg: FusedBench):
    """Hidden states [1, N, H], lm_head weight [V, H] (trainable unless frozen), labels and
    top-k targets as in the loss section; logits ~ N(0, 4) as there."""
    import torch

    g = torch.Generator().manual_seed(cfg.seed + 1)
    dtype = getattr(torch, cfg.dtype)
    hidden = torch.randn(1, cfg.positions, cfg.hidden, generator=g).to(dtype).to(cfg.device).requires_grad_(True)
    weight = (torch.randn(cfg.vocab, cfg.hidden, generator=g) * (2.0 / cfg.hidden**0.5)).to(dtype).to(cfg.device)
    weight.requires_grad_(not cfg.frozen)
    n, v, k = cfg.positions, cfg.vocab, cfg.k  # targets made as in the loss section
    labels, ids, lps = _labels_and_targets(g, n, v, k, cfg.device)
    return hidden, weight, labels, ids, lps


def _fused_step(variant, cfg: FusedBench, hidden, weight, labels, ids, lps):
    import torch.nn.functional as F

    from moedistill.losses import distillation_loss, fused_linear_distillation_loss

    kw = dict(alpha=cfg.alpha, temperature=cfg.temperature, tail=cfg.tail, chunk_size=cfg.chunk_size)
    if variant == "fused":
        loss = fused_linear_distillation_loss(hidden, weight, labels, ids, lps, **kw).total
    else:
        logits = F.linear(hidden, weight)
        if variant == "ce":
            loss = F.cross_entropy(logits.view(-1, cfg.vocab), labels.view(-1))
        else:
            loss = distillation_loss(logits, labels, ids, lps, **kw).total
        del logits  # autograd keeps what it needs; the caller holds nothing
    loss.backward()
    hidden.grad = None
    weight.grad = None


def _fused_worker(variant: str, cfg_dict: dict) -> dict:
    """In a fresh process: ``variant`` alternating with (a) today's path, ``repeats`` rounds;
    the first round also measures each one's peak memory above the inputs."""
    import torch

    cfg = FusedBench(**cfg_dict)
    hidden, weight, labels, ids, lps = _fused_inputs(cfg)
    held = sum(t.numel() * t.element_size() for t in (hidden, weight, labels, ids, lps))
    names = list(dict.fromkeys([variant, "today"]))
    peaks, times = {}, {name: [] for name in names}
    for r in range(cfg.repeats):
        for name in names:
            _sync(cfg.device)
            if r == 0:
                with peak_memory(cfg.device) as mem:
                    t0 = time.perf_counter()
                    _fused_step(name, cfg, hidden, weight, labels, ids, lps)
                    _sync(cfg.device)
                    times[name].append(time.perf_counter() - t0)
                peaks[name] = mem["peak"]
            else:
                t0 = time.perf_counter()
                _fused_step(name, cfg, hidden, weight, labels, ids, lps)
                _sync(cfg.device)
                times[name].append(time.perf_counter() - t0)
    return {"peak": peaks[variant], "today_peak": peaks["today"], "method": mem["method"], "held": held,
            "times": times[variant], "today_times": times["today"], "threads": torch.get_num_threads()}


def fused_section(args):
    elem = {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
    all_results = {}
    for frozen in [h == "frozen" for h in args.fused_heads]:
        cfg = FusedBench(positions=args.positions, vocab=args.vocab, hidden=args.hidden, k=args.k, alpha=args.alpha,
                         temperature=args.temperature, tail=args.tail, chunk_size=args.chunk_size, dtype=args.dtype,
                         repeats=args.fused_repeats, device=args.device, frozen=frozen)
        head = "frozen lm_head (no weight gradient)" if frozen else "trainable lm_head"
        print(
            f"\nfused linear loss, {head}: fwd+bwd from the hidden states, {cfg.positions} positions, H={cfg.hidden}, "
            f"V={cfg.vocab}, k={cfg.k}, {cfg.dtype} (logits {_gb(cfg.positions * cfg.vocab * elem)} GB, "
            f"weight {_gb(cfg.vocab * cfg.hidden * elem)} GB), alpha={cfg.alpha}, T={cfg.temperature}, "
            f"tail={cfg.tail}, device={cfg.device}, {cfg.repeats} timed rounds",
            flush=True,
        )
        results = {}
        for variant in ("fused", "ce"):
            t0 = time.perf_counter()
            results[variant] = run_in_fresh_process(_fused_worker, variant, asdict(cfg))
            print(f"  {FUSED_VARIANTS[variant]} beside (a) done in {time.perf_counter() - t0:.0f} s", flush=True)
        f, c = results["fused"], results["ce"]
        ref_peak, ref_time = f["today_peak"], median(f["today_times"])
        rows = []
        for name, peak, times in [("today", ref_peak, f["today_times"]), ("ce", c["peak"], c["times"]),
                                  ("fused", f["peak"], f["times"])]:
            # CE's time is against (a) of its own process; the others against (a) of the fused process
            ref_t = median(c["today_times"]) if name == "ce" else ref_time
            rows.append([FUSED_VARIANTS[name], f"{median(times):.2f}", f"{median(times) / ref_t:.2f}x",
                         _gb(peak), f"{peak / ref_peak:.2f}x", f"{peak / c['peak']:.2f}x"])
        print_table(
            f"{head}: ratios to (a) today's path and (b) plain CE",
            ["variant", "time s", "time/(a)", "peak GB", "peak/(a)", "peak/(b)"],
            rows,
        )
        print(f"time: median of {cfg.repeats}, alternating with (a) in the same process; peak above the inputs "
              f"(hidden, weight, labels, targets: {_gb(f['held'])} GB), {f['method']}, including the gradients "
              f"left in hidden.grad and weight.grad; {f['threads']} threads.")
        all_results["frozen" if frozen else "trainable"] = results
    return all_results


# --------------------------------------------------------------------------- main

# name -> function(args); a section adds its own flags in _add_flags below.
SECTIONS = {"loss": loss_section, "step": step_section, "fused": fused_section}


def _add_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("loss section")
    g.add_argument("--positions", type=int, default=4096)
    g.add_argument("--vocab", type=int, default=151_936)
    g.add_argument("--k", type=int, default=64)
    g.add_argument("--alpha", type=float, default=0.5)
    g.add_argument("--temperature", type=float, default=2.0)
    g.add_argument("--tail", default="renormalize", choices=["renormalize", "tail"])
    g.add_argument("--chunk-size", type=int, default=1024)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--dense-repeats", type=int, default=1, help="timed rounds of (c); one takes ~1 min on 2 cores")
    g.add_argument("--skip", nargs="*", default=[], choices=list(LOSS_VARIANTS), help="variants to leave out")
    g = p.add_argument_group("fused section (also uses --positions, --vocab, --k, --alpha, ...)")
    g.add_argument("--hidden", type=int, default=2048, help="hidden size H of the lm_head (Qwen3-30B-A3B: 2,048)")
    g.add_argument("--fused-repeats", type=int, default=2, help="timed rounds per variant (one is ~1 min on 2 cores)")
    g.add_argument("--fused-heads", nargs="+", default=["trainable", "frozen"], choices=["trainable", "frozen"],
                   help="which tables: a trainable lm_head, a frozen one")
    g = p.add_argument_group("step section")
    g.add_argument("--step-batch-size", type=int, default=16, help="the embedded default's batch")
    g.add_argument("--step-seq-len", type=int, default=128)
    g.add_argument("--step-rank", type=int, default=4, help="wrapper rank of the tiny student")
    g.add_argument("--step-repeats", type=int, default=7, help="timed rounds of a training step (at least --repeats)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", default="all", choices=["all", *SECTIONS])
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per variant (median)")
    p.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    _add_flags(p)
    args = p.parse_args(argv)
    for name, section in SECTIONS.items():
        if args.section in ("all", name):
            section(args)


def _cuda_available():
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
