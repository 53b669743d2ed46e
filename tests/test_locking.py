"""One writer per directory (moedistill.locking): real second processes, real kill -9.

The first command of each test runs in its own process and is held at a known point by a
gate (a file it waits for; nothing else about it is changed), so that the second command
meets it mid-work on every machine, however slow. The second is a plain ``python -m
moedistill.cli``. The first must finish exactly as an uninterrupted run does (the world of
tests/test_reliability.py: its reference run and caches).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_reliability
from test_reliability import (
    RUN,
    STEPS,
    assert_same_weights,
    env,
    error_line,
    overrides,
    snapshot,
    train_log,
    with_caches,
)

from moedistill.cli import main
from moedistill.errors import UserError
from moedistill.locking import LOCK_FILE, DirectoryLock, read_holder

# the world of tests/test_reliability.py (teacher, student, reference run), built once for this module
world, one_thread = test_reliability.world, test_reliability.one_thread

# Runs the CLI in this process, held once at a gate: training at step 3 of stage 0 (checkpoint-2
# is complete), cache generation after its first part file. It writes <gate>/paused with its pid
# and waits for <gate>/go.
GATED = r"""
import os, sys, time
from pathlib import Path
gate = Path(os.environ["GATE"])

def wait():
    (gate / "paused").write_text(str(os.getpid()))
    t = time.time()
    while not (gate / "go").exists():
        if time.time() - t > 120:
            sys.exit("the test never opened the gate")
        time.sleep(0.05)

import moedistill.stages as stages
on_step_end = stages.StageCallback.on_step_end
def gated_step_end(self, args, state, control, **kw):
    if self.stage.index == 0 and state.global_step == 3:
        wait()
    return on_step_end(self, args, state, control, **kw)
stages.StageCallback.on_step_end = gated_step_end

import moedistill.cache.generate as generate
write_part = generate.write_part
parts = []
def gated_write_part(*a, **kw):
    write_part(*a, **kw)
    parts.append(1)
    if len(parts) == 1:
        wait()
generate.write_part = gated_write_part

from moedistill.cli import main
sys.exit(main(sys.argv[1:]))
"""

HOLD = r"""
import sys
from moedistill.locking import DirectoryLock
lock = DirectoryLock(sys.argv[1], "run directory").acquire()
print("locked", flush=True)
sys.stdin.readline()
lock.release()
"""


def _start_gated(tmp_path: Path, argv: list[str]) -> tuple[subprocess.Popen, Path]:
    gate = tmp_path / "gate"
    gate.mkdir()
    p = subprocess.Popen([sys.executable, "-c", GATED, *argv], env=env(GATE=str(gate)), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    t = time.time()
    while not (gate / "paused").exists():
        if p.poll() is not None:
            raise AssertionError(f"the first process ended before the gate (rc {p.returncode}):\n"
                                 + p.stderr.read()[-5000:])
        assert time.time() - t < 180, "the first process never reached the gate"
        time.sleep(0.1)
    return p, gate


def _finish(p: subprocess.Popen, gate: Path) -> tuple[int, str]:
    (gate / "go").write_text("")
    _, err = p.communicate(timeout=300)
    return p.returncode, err


def _cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moedistill.cli", *argv], env=env(), capture_output=True, text=True,
                          timeout=300)


def _assert_names_holder(line: str, directory: Path, pid: int, command: str) -> None:
    assert f"{directory} is in use by another moedistill process (host {socket.gethostname()}, pid {pid}, " in line
    assert f"-c {command} output_dir=" in line, line  # the holder runs the CLI through python -c
    assert line.endswith("wait for it to finish, or stop it; a lock left by a process that died is released "
                         "automatically"), line


# --------------------------------------------------------------------------- train


def test_second_train_on_one_output_dir_is_refused_and_the_first_is_unharmed(world, tmp_path):
    out = with_caches(world, tmp_path / "out")
    argv = overrides(world, out)
    first, gate = _start_gated(tmp_path, ["train", *argv])
    run = out / RUN
    assert read_holder(run)["pid"] == first.pid
    before = snapshot(out)
    # without the lock, --overwrite would clear the first run's checkpoints under it
    for second in (["train", "--overwrite", *argv], ["train", "--resume", *argv]):
        r = _cli(*second)
        assert r.returncode == 2, r.stderr[-3000:]
        _assert_names_holder(error_line(r.stderr), run, first.pid, "train")
        assert snapshot(out) == before, "the refused run changed files"
    rc, err = _finish(first, gate)
    assert rc == 0, err[-5000:]
    assert_same_weights(out, world.ref)  # bit for bit the uninterrupted reference run
    assert [(e["step"], e["stage"]) for e in train_log(out) if "loss" in e] == STEPS
    assert not (run / LOCK_FILE).exists()


def test_a_lock_left_by_a_killed_training_run_does_not_block_the_resume(world, tmp_path, capsys):
    out = with_caches(world, tmp_path / "out")
    first, gate = _start_gated(tmp_path, ["train", *overrides(world, out)])
    run = out / RUN
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    # the file stays with the dead holder's details; the lock itself went with the process
    assert read_holder(run)["pid"] == first.pid
    assert main(["train", "--resume", *overrides(world, out)]) == 0, capsys.readouterr().err[-3000:]
    assert_same_weights(out, world.ref)
    assert [(e["step"], e["stage"]) for e in train_log(out) if "loss" in e] == STEPS
    assert not (run / LOCK_FILE).exists()


# --------------------------------------------------------------------------- cache


def _shard_checksums(cache: Path) -> list[str]:
    return [s["checksum"] for s in json.loads((cache / "manifest.json").read_text())["shards"]]


def test_second_cache_generation_on_one_directory_is_refused_and_the_first_completes(world, tmp_path, capsys):
    out = tmp_path / "out"
    argv = overrides(world, out)
    cache = out / "cache" / "topk"
    first, gate = _start_gated(tmp_path, ["cache", *argv])
    before = snapshot(out)
    assert read_holder(cache)["pid"] == first.pid
    for second in (["cache", *argv], ["cache", "--overwrite", *argv]):
        r = _cli(*second)
        assert r.returncode == 2, r.stderr[-3000:]
        _assert_names_holder(error_line(r.stderr), cache, first.pid, "cache")
        assert snapshot(out) == before, "the refused run changed files"
    rc, err = _finish(first, gate)
    assert rc == 0, err[-5000:]
    assert not (cache / LOCK_FILE).exists()
    capsys.readouterr()
    assert main(["inspect", str(cache), "--verify"]) == 0, capsys.readouterr().err
    assert _shard_checksums(cache) == _shard_checksums(world.ref / "cache" / "topk")  # byte-identical shards


def test_a_lock_left_by_a_killed_cache_generation_does_not_block_the_rerun(world, tmp_path, capsys):
    """Killed before anything but its lock file existed: the directory holds only that file,
    which counts as an empty cache directory, not a foreign one."""
    cache = tmp_path / "out" / "cache" / "topk"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(cache)], env=env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait(timeout=60)
    assert [p.name for p in cache.iterdir()] == [LOCK_FILE]
    assert main(["cache", *overrides(world, tmp_path / "out")]) == 0, capsys.readouterr().err[-3000:]
    assert sorted(p.name for p in cache.iterdir()) == ["manifest.json", "shard-00000.h5", "verified.json"]
    assert _shard_checksums(cache) == _shard_checksums(world.ref / "cache" / "topk")


# --------------------------------------------------------------------------- DirectoryLock itself


def _holder(directory: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], env=env(), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_directory_lock_between_two_processes(tmp_path):
    d = tmp_path / "a" / "run"
    p = _holder(d)
    with pytest.raises(UserError) as e:
        DirectoryLock(d, "run directory").acquire()
    msg = str(e.value)
    assert f"run directory {d} is in use by another moedistill process (host {socket.gethostname()}, pid {p.pid}, " \
           in msg and "\n" not in msg
    assert f"-c {d}`" in msg  # the holder's command line
    info = read_holder(d)
    assert info["pid"] == p.pid and info["host"] == socket.gethostname() and "started" in info
    p.stdin.write("\n")
    p.stdin.close()
    assert p.wait(timeout=60) == 0
    assert not (tmp_path / "a").exists()  # the holder made a/run for its lock and removed them, still empty
    with DirectoryLock(d) as lock:
        assert lock.locked and read_holder(d)["pid"] == os.getpid()
        with DirectoryLock(d) as inner:  # re-entrant within one process
            assert inner.locked
        assert lock.locked and (d / LOCK_FILE).exists()
        (d / "result.txt").write_text("kept")
    assert not lock.locked and sorted(p.name for p in d.iterdir()) == ["result.txt"]
    # a killed holder: its file stays, its lock does not
    p = _holder(d)
    p.kill()
    p.wait(timeout=60)
    assert read_holder(d)["pid"] == p.pid
    with DirectoryLock(d):
        assert read_holder(d)["pid"] == os.getpid()


def test_directory_lock_refuses_a_path_that_is_a_file_or_not_writable(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(UserError, match=f"run directory {f} is not a directory; remove it or choose another"):
        DirectoryLock(f, "run directory").acquire()
    if os.geteuid() == 0:
        return  # root writes anywhere: the read-only case cannot be made here
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UserError, match="Permission denied"):
            DirectoryLock(ro / "run", "run directory").acquire()
    finally:
        ro.chmod(0o755)


def test_filesystem_without_flock_runs_unlocked_with_one_warning(tmp_path, monkeypatch, caplog):
    """The code path only (no filesystem without flock is at hand): flock failing with ENOLCK."""
    import errno
    import fcntl

    import moedistill.locking as locking

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.setattr(locking, "_warned", False)
    with caplog.at_level("WARNING", logger="moedistill.locking"):
        with DirectoryLock(tmp_path / "a") as lock, DirectoryLock(tmp_path / "b"):
            assert not lock.locked
    warnings = [r for r in caplog.records if "does not support flock" in r.message]
    assert len(warnings) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- several processes

AGREE = r"""
import datetime, sys, torch.distributed as td
td.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
from moedistill.errors import UserError
from moedistill.locking import lock_on_rank0, read_holder
try:
    with lock_on_rank0(sys.argv[1], "teacher cache") as lock:
        print(f"rank {td.get_rank()}: holds={lock is not None} holder={read_holder(sys.argv[1])['pid']}", flush=True)
        td.barrier()
except UserError as e:
    print(f"rank {td.get_rank()}: error: {e}", flush=True)
td.destroy_process_group()
"""


def _rank_lines(stdout: str) -> list[str]:
    """The ranks' ``rank N: ...`` messages, sorted; two processes share the pipe, so one
    message can land on the end of the other's line."""
    return sorted(m.strip() for m in re.split(r"(?=rank \d: )", stdout) if m.startswith("rank "))


def test_torchrun_rank0_takes_the_lock_and_every_rank_learns_its_verdict(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    d = tmp_path / "cache"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", str(script), str(d)]
    with DirectoryLock(d, "teacher cache"):  # held by this process: both ranks refuse, none hangs
        r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-5000:]
    lines = _rank_lines(r.stdout)
    assert [x[:15] for x in lines] == ["rank 0: error: ", "rank 1: error: "], r.stdout
    assert lines[0][15:] == lines[1][15:] and f"pid {os.getpid()}," in lines[0]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-5000:]
    lines = _rank_lines(r.stdout)
    assert [x.split(" holder=")[0] for x in lines] == ["rank 0: holds=True", "rank 1: holds=False"], r.stdout
    assert lines[0].split(" holder=")[1] == lines[1].split(" holder=")[1]  # one holder: rank 0
    assert not d.exists()
