"""Real full disks (docs/RELIABILITY.md): the output directory on a small tmpfs, filled by the
real writers (safetensors, torch.save, the tokenizer's, h5py through the cache writer, json).

Each test runs the command in a real process until the disk is full, then checks: exit 2, one
``error:`` line naming the path and the space, no traceback, no segmentation fault, nothing
left that passes as complete; then the tmpfs is enlarged (``mount -o remount,size=64m``) and
the same command finishes, equal to a run on an ample disk (weights, shard bytes).

Needs root (``mount -t tmpfs``), as CI has; skipped with the reason otherwise. Uses the world
of test_reliability.py (tiny teacher and student, reference run). About 75 s in all.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import test_reliability
import torch
from safetensors.torch import load_file
from test_reliability import RUN, STEPS, assert_same_weights, env, error_line, overrides, train_log, with_caches

from moedistill.cli import main
from moedistill.errors import UserError

world, one_thread = test_reliability.world, test_reliability.one_thread  # its fixtures, used here too

PAGE = 4096  # tmpfs counts whole pages per file


class Tmpfs:
    """A tmpfs mounted on ``path`` (of ``size`` bytes), enlarged with :meth:`resize`."""

    def __init__(self, path: Path):
        self.path, self.mounted = path, False

    def mount(self, size: int) -> None:
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)],
                               capture_output=True, text=True)
        except OSError as e:  # no mount command
            pytest.skip(f"cannot mount a tmpfs: {e}")
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip() or r.returncode}")
        self.mounted = True

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)


@pytest.fixture
def tmpfs(tmp_path):
    fs = Tmpfs(tmp_path / "disk")
    fs.path.mkdir()
    yield fs
    if fs.mounted:
        if subprocess.run(["umount", str(fs.path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(fs.path)], capture_output=True)


def pages(*paths: Path) -> int:
    """The bytes that ``paths`` (files, or every file under directories) take on a tmpfs."""
    n = 0
    for p in paths:
        for f in [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]:
            n += math.ceil(f.stat().st_size / PAGE) * PAGE
    return n


# the token stores (data.store) live off the small disks: these tests fill the disk at a chosen
# write (a cache shard, checkpoint-0, a checkpoint), which the store's tokens.bin would reach first
STORE = Path(tempfile.mkdtemp(prefix="moedistill-store-"))


def cli(*argv, driver: str | None = None) -> subprocess.CompletedProcess:
    if argv and argv[0] in ("compress", "cache", "train", "run", "eval", "prepare"):
        argv = (*argv, f"data.store={STORE}")
    cmd = [sys.executable, *(["-c", driver] if driver else ["-m", "moedistill.cli"]), *argv]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)


def disk_full(r: subprocess.CompletedProcess, where: Path) -> str:
    """Exit 2, one error line (the last) that names a path under ``where`` and the space; nothing else."""
    assert r.returncode == 2, (r.returncode, r.stderr[-4000:])  # -11 was the segmentation fault
    line = error_line(r.stderr)
    assert "Segmentation fault" not in r.stderr and "HDF5" not in r.stderr, r.stderr[-4000:]
    assert line.startswith(f"error: no space left on the device writing {where}"), line
    assert " MB free there, about " in line and " MB needed; free space and rerun the same command" in line, line
    return line


def no_temporaries(root: Path) -> None:
    left = [p for p in root.rglob("*") if ".tmp" in p.name]
    assert not left, left


# --------------------------------------------------------------------------- compress


def test_compress_on_a_full_disk_is_one_line_and_rerun_finishes(world, tmp_path, tmpfs):
    from moedistill.commands.compress import _existing

    ref = tmp_path / "ref"
    assert main(["compress", *overrides(world, ref)]) == 0  # an ample disk: the reference checkpoint-0
    ref_ckpt = ref / "compressed" / "checkpoint-0"
    assert pages(ref_ckpt / "model.safetensors") > 256 << 10
    tmpfs.mount(256 << 10)  # room for the config files, not for the weights
    out = tmpfs.path / "out"
    argv = ["compress", *overrides(world, out)]
    r = cli(*argv)
    line = disk_full(r, out / "compressed" / "checkpoint-0")
    assert "SafetensorError" not in r.stderr, line
    ckpt = out / "compressed" / "checkpoint-0"
    h = json.loads((ref_ckpt / "config.json").read_text())["compression"]["settings_hash"]
    assert not _existing(ckpt, h) and not ckpt.exists()  # nothing a rerun would reuse
    no_temporaries(out)  # the partial checkpoint-0.tmp was removed: its space is free again
    tmpfs.resize("64m")
    r = cli(*argv)
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = load_file(ckpt / "model.safetensors"), load_file(ref_ckpt / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert (out / "compressed" / "report.json").is_file()


# --------------------------------------------------------------------------- cache


COUNT_PARTS = """
import sys
import moedistill.cache.generate as generate
real = generate.write_part
def write_part(path, arrays, attrs):  # observes only: which parts this run computed
    real(path, arrays, attrs)
    sys.stderr.write(f"wrote {path.name}\\n")  # one write: tqdm's bar cannot land between the words
    sys.stderr.flush()
generate.write_part = write_part
from moedistill.cli import main
sys.exit(main(sys.argv[1:]))
"""
# 8 parts of ~150 KB: large enough that the disk fills while HDF5 writes a part's data (which made
# h5py 3.16 / HDF5 2.0 crash with a segmentation fault while cleaning up, before cache/writer.py's _Sink)
CACHE = ("data.seq_len=64", "cache.top_k=64", "cache.batch_size=16", "data.max_sequences=128")


@pytest.fixture(scope="module")
def cache_ref(world, tmp_path_factory):
    """The cache of CACHE on an ample disk, uninterrupted: its manifest and the size of each part."""
    import moedistill.cache.generate as generate

    sizes, real = [], generate.write_part

    def write_part(path, arrays, attrs):  # observes only
        real(path, arrays, attrs)
        sizes.append(path.stat().st_size)

    ref = tmp_path_factory.mktemp("cache-ref")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(generate, "write_part", write_part)
        assert main(["cache", *overrides(world, ref, *CACHE)]) == 0
    assert len(sizes) == 8
    return json.loads((ref / "cache" / "topk" / "manifest.json").read_text()), sizes


@pytest.mark.parametrize("where", ["part", "shard"])
def test_cache_on_a_disk_that_fills_resumes_to_the_same_bytes(world, cache_ref, tmpfs, where):
    """Full while writing the 4th part's data, or (all parts written) half-way through merging them
    into the shard: one line; the parts written whole stay and the rerun computes only the rest."""
    from moedistill.cache import open_cache

    ref_manifest, sizes = cache_ref
    part_pages = math.ceil(max(sizes) / PAGE)
    shard_pages = math.ceil(ref_manifest["shards"][0]["bytes"] / PAGE)
    # the manifest and the lock, then 3.4 of the 8 parts, or all 8 and half of the shard
    fill = int(3.4 * part_pages) if where == "part" else 8 * part_pages + shard_pages // 2
    tmpfs.mount((4 + fill) * PAGE)
    out = tmpfs.path / "out"
    cache = out / "cache" / "topk"
    argv = ["cache", *overrides(world, out, *CACHE)]
    r = cli(*argv)
    if where == "part":
        line = disk_full(r, cache / "parts" / "part-0000000048-0000000064.h5")
    else:
        line = disk_full(r, cache / "shard-00000.h5")
    parts = sorted(p.name for p in (cache / "parts").glob("part-*.h5"))
    assert len(parts) == (3 if where == "part" else 8), (parts, line)
    assert not json.loads((cache / "manifest.json").read_text())["complete"]
    with pytest.raises(UserError, match="is incomplete"):
        open_cache(cache)
    assert not list(cache.glob("shard-*"))  # no shard and no shard record: nothing a rerun would keep
    no_temporaries(cache)
    tmpfs.resize("64m")
    r = cli(*argv, driver=COUNT_PARTS)
    assert r.returncode == 0, r.stderr[-4000:]
    rewritten = re.findall(r"wrote (part-\S+\.h5)", r.stderr)  # (may follow a progress bar on its line)
    assert len(rewritten) == 8 - len(parts) and not set(rewritten) & set(parts)  # resumed, not restarted
    got = json.loads((cache / "manifest.json").read_text())
    assert got["complete"] and [s["checksum"] for s in got["shards"]] == [s["checksum"] for s in ref_manifest["shards"]]
    assert len(open_cache(cache)) == 128
    assert not (cache / "parts").exists()


# --------------------------------------------------------------------------- train


def test_train_on_a_disk_that_fills_at_a_checkpoint_resumes_to_the_same_weights(world, tmpfs):
    from moedistill.integrity import is_complete, verify_checkpoint

    ref_run = world.ref / RUN
    first = ref_run / "01-wrappers" / "checkpoint-2"
    # the caches, the run's small files and the first checkpoint; the second stops half-way
    size = pages(world.ref / "cache", first) + 64 * PAGE + pages(first / "model.safetensors") // 2
    tmpfs.mount(size)
    out = with_caches(world, tmpfs.path / "out")
    argv = ["train", *overrides(world, out)]
    r = cli(*argv)
    run = out / RUN
    line = disk_full(r, run / "01-wrappers" / "checkpoint-4")
    assert "SafetensorError" not in r.stderr and "RuntimeError" not in r.stderr, line
    verify_checkpoint(run / "01-wrappers" / "checkpoint-2")
    half = run / "01-wrappers" / "checkpoint-4"
    assert half.is_dir() and not is_complete(half)  # never resumed from
    for ckpt in run.glob("*/checkpoint-*"):
        if is_complete(ckpt):
            verify_checkpoint(ckpt)  # whatever says it is complete, is
    assert not (run / "final").exists() and not (run / "final.tmp").exists()
    tmpfs.resize("64m")
    r = cli("train", "--resume", str(half), *argv[1:])  # named explicitly, the cut-short checkpoint is refused
    assert r.returncode == 2 and f"checkpoint {half} is incomplete" in error_line(r.stderr), r.stderr[-4000:]
    r = cli("train", "--resume", *argv[1:])  # the latest complete one
    assert r.returncode == 0, r.stderr[-4000:]
    assert_same_weights(out, world.ref)
    assert [(e["step"], e["stage"]) for e in train_log(out) if "loss" in e] == STEPS


def test_a_full_disk_in_the_optimizer_save_is_recognised(world, tmpfs):
    """torch.save's zip writer fails with 'unexpected pos' and no errno: recognised by the
    disk being full where it wrote, not shown as a traceback."""
    ref_run = world.ref / RUN
    first = ref_run / "01-wrappers" / "checkpoint-2"
    full = ref_run / "02-full" / "checkpoint-2"
    small = [f for f in full.iterdir() if f.name not in ("optimizer.pt", "checkpoint.json")]
    # up to the stage-2 checkpoint's weights; its optimizer state (written after them) does not fit
    size = (pages(world.ref / "cache", first, ref_run / "01-wrappers" / "checkpoint-4", *small) + 64 * PAGE
            + pages(full / "optimizer.pt") // 2)
    tmpfs.mount(size)
    out = with_caches(world, tmpfs.path / "out")
    r = cli("train", *overrides(world, out))
    run = out / RUN
    disk_full(r, run / "02-full" / "checkpoint-2")
    assert (run / "02-full" / "checkpoint-2" / "model.safetensors").is_file()
    assert not (run / "02-full" / "checkpoint-2" / "checkpoint.json").exists()
    assert "unexpected pos" not in r.stderr


# --------------------------------------------------------------------------- export


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(world, tmp_path, tmpfs):
    final = world.ref / RUN / "final"
    assert main(["export", str(final), str(tmp_path / "ref")]) == 0
    tmpfs.mount(256 << 10)
    out = tmpfs.path / "plain"
    r = cli("export", str(final), str(out))
    disk_full(r, out)
    assert not out.exists() and not list(tmpfs.path.iterdir())  # no <out>.tmp either: its space is free
    tmpfs.resize("64m")
    r = cli("export", str(final), str(out))
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


# --------------------------------------------------------------------------- recognition


def test_what_each_library_raises_on_a_full_disk_is_recognised(world, tmpfs):
    """The exceptions themselves, raised by the real writers on a full tmpfs: each is recognised
    (files.is_disk_full) and becomes one line naming the path; other errors are not."""
    import errno

    import numpy as np
    from safetensors.torch import save_file

    from moedistill.cache.writer import write_part
    from moedistill.files import DiskFullError, atomic_write_json, is_disk_full
    from moedistill.models import load_tokenizer

    tmpfs.mount(64 << 10)
    d = tmpfs.path
    big = {"w": torch.zeros(256, 256)}  # 256 KB
    tok = load_tokenizer(str(world.teacher))  # tokenizer.json alone is larger than the disk
    attrs = {"format": "t", "mode": "topk", "width": 64, "seq_len": 64, "num_samples": None, "codec": "zstd",
             "codec_level": 3, "vocab_size": 4096}
    rng = np.random.default_rng(0)
    arrays = {"input_ids": rng.integers(0, 4096, (64, 64), dtype=np.uint32),
              "target_ids": rng.integers(0, 4096, (64, 64, 64), dtype=np.uint32),
              "target_deltas": rng.integers(0, 60000, (64, 64, 64), dtype=np.uint16)}
    writers = {
        "safetensors": lambda: save_file(big, d / "w.safetensors"),
        "torch.save": lambda: torch.save(big, d / "w.pt"),
        "json": lambda: atomic_write_json(d / "x.json", list(range(50_000))),
        "tokenizer": lambda: tok.save_pretrained(d / "tok"),
        "h5py (cache writer)": lambda: write_part(d / "part.h5", arrays, attrs),
    }
    for name, write in writers.items():
        with pytest.raises(Exception) as e:  # noqa: PT011 - each library raises its own type
            write()
        assert is_disk_full(e.value, d), (name, repr(e.value))
        msg = str(DiskFullError.from_exception(e.value, d, 2_500_000))
        assert msg.startswith(f"no space left on the device writing {d}") and "about 2.5 MB needed" in msg, msg
        for p in d.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied", str(d)), d)
    assert not is_disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
                            world.root)  # the same torch error with room on the disk: not a full disk


def test_a_read_only_output_dir_is_one_line(world, tmp_path):
    """A real read-only mount (EROFS) as output_dir: one line naming the path, exit 2, no traceback."""
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs (needs root): {r.stderr.strip()}")
    try:
        for command in ("compress", "cache", "train"):
            r = cli(command, *overrides(world, ro / "out"))
            assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
            line = error_line(r.stderr)
            assert f"{ro}/out" in line and "Read-only file system" in line, line
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)
