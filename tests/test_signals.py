"""SIGTERM (what SLURM and Kubernetes send before preemption) and SIGINT (Ctrl-C), sent for real
to real ``moedistill`` processes (docs/RELIABILITY.md).

Training finishes the optimizer step in progress, writes a complete checkpoint, prints one
line with the command that resumes it and exits 143 (SIGTERM) / 130 (SIGINT); that command
gives the weights of an uninterrupted run bit for bit. Cache generation writes the batches
already computed and exits likewise; the rerun gives the uninterrupted cache byte for byte.
A second signal exits at once.

The processes are slowed down (a sleep in each training step, in each part written) by a
small driver so that the signal lands in the middle of the work; what handles it is the
real command. The world (teacher, student, reference run) is that of test_reliability.py.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_reliability as rel
import torch
from safetensors.torch import load_file
from test_cache_process import _assert_same, _content
from test_reliability import RUN, STEPS, assert_same_weights, env, overrides, train_log, with_caches

from moedistill.cli import main
from moedistill.integrity import is_complete, verify_checkpoint

world, one_thread = rel.world, rel.one_thread  # the fixtures of test_reliability (teacher, student, reference run)

# `moedistill <argv>`, with every training step and every part file written slowed down by
# SLOW seconds; with PUTS, each batch handed to the cache writer is noted in that file; with
# SAVE_SLEEP, the save of the checkpoint a signal asked for first writes its path to SAVING,
# then waits SAVE_SLEEP seconds; with COMPRESSING, compress creates that file and waits 30 s
# before it saves checkpoint-0
DRIVER = r"""
import os, sys, time
from pathlib import Path
slow = float(os.environ.get("SLOW", "0"))
import moedistill.trainer as trainer
step = trainer.DistillationTrainer.training_step
def training_step(self, *a, **k):
    time.sleep(slow)
    return step(self, *a, **k)
trainer.DistillationTrainer.training_step = training_step
import moedistill.cache.generate as generate
part = generate.write_part
def write_part(*a, **k):
    time.sleep(slow)
    return part(*a, **k)
generate.write_part = write_part
put = generate._Writer.put
def counted_put(self, job):
    put(self, job)
    with open(os.environ.get("PUTS", os.devnull), "a") as f:
        f.write(f"{job['start']}\n")
generate._Writer.put = counted_put
if os.environ.get("COMPRESSING"):
    import moedistill.commands.compress as compress
    save = compress._save
    def slow_save(*a, **k):
        Path(os.environ["COMPRESSING"]).touch()
        time.sleep(30)
        return save(*a, **k)
    compress._save = slow_save
if os.environ.get("SAVE_SLEEP"):
    from moedistill import integrity, signals
    mark = integrity.mark_checkpoint
    def mark_checkpoint(ckpt, info=None):
        if signals.requested():
            Path(os.environ["SAVING"]).write_text(str(ckpt))
            time.sleep(float(os.environ["SAVE_SLEEP"]))
        return mark(ckpt, info)
    integrity.mark_checkpoint = mark_checkpoint
from moedistill.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start(argv, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, *argv], env=env(**extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(what, proc: subprocess.Popen, timeout: float = 120):
    """Poll ``what()`` until it is truthy; fails if the process ends first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = what()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"the process ended (rc {proc.returncode}) first:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("timed out")


def logged_steps(out: Path, run: Path | None = None) -> list[int]:
    path = (run or out / RUN) / "log.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")[:-1]  # whole lines only: the last one may be being written
    return [e["step"] for e in map(json.loads, lines) if "loss" in e]


def the_line(stderr: str, start: str, traceback: bool = False) -> str:
    """The one line starting with ``start``, on a line of its own, and no traceback (but torchrun's own)."""
    lines = [ln for ln in stderr.split("\n") if ln.startswith(start)]
    assert len(lines) == 1 and ("Traceback" not in stderr or traceback), stderr[-3000:]
    assert not any(start in ln and not ln.startswith(start) for ln in stderr.split("\n")), stderr[-3000:]
    return lines[0]


def interrupt_training(world, out: Path, sig: int, after_step: int = 2, **extra):
    """Start `moedistill train` (0.3 s a step), send ``sig`` once ``after_step`` steps are logged."""
    proc = start(["train", *overrides(world, out)], SLOW="0.3", **extra)
    wait_for(lambda: len(logged_steps(out)) >= after_step, proc)
    proc.send_signal(sig)
    return proc


def test_sigterm_during_training_checkpoints_and_the_printed_command_resumes_exactly(world, tmp_path):
    out = with_caches(world, tmp_path / "out")
    proc = interrupt_training(world, out, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    line = the_line(err, "interrupted by SIGTERM at global step ")
    step = int(line.split("at global step ")[1].split()[0])
    assert 2 < step <= 7, line  # the step in progress was finished, the run stopped there
    ckpt = Path(line.split("; checkpoint ")[1].split(" written;")[0])
    assert ckpt.parent.parent == out / RUN and is_complete(ckpt)
    verify_checkpoint(ckpt)  # sizes and checksums
    assert json.loads((ckpt / "stage.json").read_text())["global_step"] == step
    assert not (out / RUN / "final").exists()
    assert logged_steps(out)[-1] == step  # it stopped after that step
    cmd = shlex.split(line.split("; resume with: ")[1])
    assert cmd[:4] == ["moedistill", "train", "--resume", str(ckpt)] and cmd[4:] == overrides(world, out)
    assert main(cmd[1:]) == 0
    assert_same_weights(out, world.ref)
    assert [(e["step"], e["stage"]) for e in train_log(out) if "loss" in e] == STEPS


def test_sigint_during_training_checkpoints_and_exits_130(world, tmp_path):
    out = with_caches(world, tmp_path / "out")
    proc = interrupt_training(world, out, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    line = the_line(err, "interrupted by SIGINT at global step ")
    ckpt = Path(line.split("; checkpoint ")[1].split(" written;")[0])
    verify_checkpoint(ckpt)
    assert f"resume with: moedistill train --resume {ckpt} " in line


def test_second_signal_during_the_save_exits_at_once(world, tmp_path):
    """The first SIGTERM asks for a checkpoint; a second one while it is being saved ends the
    process at once (not after the save), and the unfinished checkpoint is never used."""
    from moedistill.stages import list_checkpoints

    out = with_caches(world, tmp_path / "out")
    saving = tmp_path / "saving"
    proc = interrupt_training(world, out, signal.SIGTERM, after_step=3, SAVE_SLEEP="30", SAVING=str(saving))
    half = Path(wait_for(lambda: saving.is_file() and saving.read_text(), proc))
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM and time.monotonic() - t0 < 10, err[-3000:]  # the shell's 143
    assert "Traceback" not in err, err[-3000:]
    assert (half / "model.safetensors").is_file() and not is_complete(half)
    assert all(p != half and is_complete(p) for _, p in list_checkpoints(out / RUN))


def test_sigterm_outside_a_loop_stops_at_once_with_one_line(world, tmp_path):
    """SIGTERM while `moedistill compress` computes (no loop to finish): it stops at once, one
    line on a line of its own, exit 143, no checkpoint-0 and no lock left; the same command
    then builds it."""
    out = tmp_path / "out"
    small = ["student.name=null", "compress.rank=1", "compress.calibration_sequences=4", "compress.report_ranks=[]"]
    marker = tmp_path / "compressing"
    proc = start(["compress", *overrides(world, out, *small)], COMPRESSING=str(marker))
    wait_for(marker.is_file, proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and time.monotonic() - t0 < 10, err[-3000:]
    assert the_line(err, "interrupted by SIGTERM") == \
        "interrupted by SIGTERM; nothing half-written is kept: rerun the same command"
    assert not (out / "compressed" / "checkpoint-0").exists()
    assert main(["compress", *overrides(world, out, *small)]) == 0
    assert (out / "compressed" / "checkpoint-0" / "model.safetensors").is_file()


def test_sigterm_during_cache_generation_keeps_every_computed_batch_and_resumes_exactly(world, tmp_path):
    """16 batches of 1 sequence, each part written slowly: when SIGTERM comes, batches wait in
    the writer's queue. They are all written; the rerun computes only the rest and gives the
    uninterrupted cache."""
    small = ["cache.batch_size=1"]
    ref = tmp_path / "ref"
    assert main(["cache", *overrides(world, ref, *small)]) == 0
    out = tmp_path / "out"
    parts = out / "cache" / "topk" / "parts"
    puts = tmp_path / "puts"
    proc = start(["cache", *overrides(world, out, *small)], SLOW="0.4", PUTS=str(puts))
    wait_for(lambda: parts.is_dir() and len(list(parts.glob("part-*.h5"))) >= 1, proc)
    at_signal = len(list(parts.glob("part-*.h5")))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    line = the_line(err, "interrupted by SIGTERM after ")
    kept = int(line.split("after ")[1].split(" of 16 batches")[0])
    written = len(list(parts.glob("part-*.h5")))
    computed = len(puts.read_text().split())  # every batch the teacher computed was written
    assert written == kept == computed and at_signal < kept < 16, (at_signal, kept, written, computed, line)
    assert not list(parts.glob("*.tmp*"))
    cmd = shlex.split(line.split("; rerun to go on from there: ")[1])
    assert cmd == ["moedistill", "cache", *overrides(world, out, *small)]
    assert main(cmd[1:]) == 0
    _assert_same(_content(out / "cache" / "topk"), _content(ref / "cache" / "topk"))


def test_torchrun_sigterm_stops_both_processes_at_the_same_step(world, tmp_path):
    """SIGTERM to torchrun, which forwards it to both processes (at slightly different times):
    both finish the same step and save one complete checkpoint, with both RNG states, well
    within torchrun's 30 s before it would SIGKILL them; the line is printed once."""
    import shutil

    from test_reliability import TWO_PROCESSES

    out = with_caches(world, tmp_path / "out")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", str(driver), "train", *overrides(world, out, *TWO_PROCESSES)]
    proc = subprocess.Popen(cmd, env=env(SLOW="0.3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(logged_steps(out)) >= 2, proc, timeout=300)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "forcefully exiting via SIGKILL" not in err, err[-3000:]
    assert err.count("Traceback") == 1 and "SignalException: Process" in err  # torchrun's own, no other
    line = the_line(err, "interrupted by SIGTERM at global step ", traceback=True)
    ckpt = Path(line.split("; checkpoint ")[1].split(" written;")[0])
    verify_checkpoint(ckpt)
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= json.loads((ckpt / "checkpoint.json").read_text())["files"].keys()
    assert "; resume (launched as this one was, by torchrun or accelerate launch) with: moedistill train --resume " \
        f"{ckpt} " in line


def test_sigterm_during_run_then_run_resume_ends_like_an_uninterrupted_run(world, tmp_path):
    """`moedistill run --overwrite` over a finished run, stopped in its second training (sampled
    targets): the line says `moedistill run --resume ...`, which keeps the top-k training it had
    redone, resumes the sampled one from its checkpoint and redoes the CE baseline (which still
    held the earlier run's results): all three students bit for bit those of the first run."""
    from moedistill.commands.run import RUN_FILE

    out = tmp_path / "out"
    small = ["student.name=null", "compress.rank=1", "compress.calibration_sequences=4", "compress.report_ranks=[]"]
    names = ("topk", "sample", "ce")
    assert main(["run", *overrides(world, out, *small)]) == 0  # the uninterrupted run
    first = {n: load_file(out / "train" / n / "final" / "model.safetensors") for n in names}
    t0 = time.time()
    proc = start(["run", "--overwrite", *overrides(world, out, *small)], SLOW="0.3")
    sample = out / "train" / "sample"
    log = sample / "log.jsonl"  # the first run's, until this one clears it
    wait_for(lambda: log.is_file() and log.stat().st_mtime > t0 and len(logged_steps(out, sample)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    line = the_line(err, "interrupted by SIGTERM at global step ")
    assert f"checkpoint {sample}/01-wrappers/checkpoint-" in line
    cmd = shlex.split(line.split("; go on with: ")[1])
    assert cmd == ["moedistill", "run", "--resume", *overrides(world, out, *small), "overwrite=true"]
    assert (out / "train" / "ce" / "final").is_dir()  # the earlier run's, not reached
    assert main(cmd[1:]) == 0
    started = (out / RUN_FILE).stat().st_mtime
    for n in names:
        got = load_file(out / "train" / n / "final" / "model.safetensors")
        assert got.keys() == first[n].keys() and all(torch.equal(got[k], first[n][k]) for k in got), n
        assert logged_steps(out, out / "train" / n) == [s for s, _ in STEPS], n
        ckpts = (out / "train" / n).glob("*/checkpoint-*")
        assert all((p / "checkpoint.json").stat().st_mtime >= started for p in ckpts), n  # none of the first run
    assert (out / "report.md").is_file()
