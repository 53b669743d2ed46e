"""Teacher cache across processes: resume after kill -9, torchrun with 2 ranks, the script and CLI.

References are uninterrupted single-process runs of the same command; caches are
compared by content (every stored array of every shard, and every decoded item).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moedistill.cache import open_cache
from moedistill.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "generate_teacher_logits.py"
TEACHER = "tiny"
ARGS = ["--teacher_model", TEACHER, "--max_samples", "20", "--max_sequences", "8", "--seq_len", "32",
        "--batch_size", "2", "--top_k", "16", "--num_samples", "24"]


def _script_main(argv) -> int:
    """The script in this process, on one thread like the subprocesses (torchrun sets
    OMP_NUM_THREADS=1): float sums then run in the same order everywhere."""
    import runpy

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return runpy.run_path(str(SCRIPT))["main"](argv)
    finally:
        torch.set_num_threads(threads)


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _content(path: Path) -> dict:
    """Every stored array (shards concatenated) and every decoded item of a cache."""
    import h5py
    import hdf5plugin  # noqa: F401

    m = json.loads((path / "manifest.json").read_text())
    raw: dict[str, list] = {}
    for s in m["shards"]:
        with h5py.File(path / s["file"], "r") as f:
            for name in f:
                raw.setdefault(name, []).append(f[name][:])
    out = {f"raw/{k}": np.concatenate(v) for k, v in raw.items()}
    ds = open_cache(path)
    for i in range(len(ds)):
        for k, v in ds[i].items():
            out[f"item{i}/{k}"] = v.numpy()
    out["k"] = ds.k
    return out


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    refs = {}
    for mode in ("topk", "sample"):
        out = tmp_path_factory.mktemp(f"ref-{mode}") / "cache"
        assert _script_main([*ARGS, "--mode", mode, "--output_dir", str(out)]) == 0
        refs[mode] = out
    return refs


def test_resume_after_kill_9_equals_uninterrupted(references, tmp_path, capsys):
    out = tmp_path / "cache"
    cmd = [sys.executable, str(SCRIPT), *ARGS, "--mode", "sample", "--output_dir", str(out)]
    r = subprocess.run(cmd, env=_env(MOEDISTILL_TEST_KILL_AFTER_PARTS="2"), capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    parts = sorted(p.name for p in (out / "parts").glob("part-*.h5"))
    assert len(parts) >= 2 and not json.loads((out / "manifest.json").read_text())["complete"]
    with pytest.raises(UserError, match="incomplete"):
        open_cache(out)
    from moedistill.cache import inspect_cache

    assert inspect_cache(out)["complete"] is False
    assert "INCOMPLETE" in capsys.readouterr().out
    (out / "parts" / "part-0000000006-0000000008.h5.tmp").write_bytes(b"half-written garbage")
    assert _script_main([*ARGS, "--mode", "sample", "--output_dir", str(out)]) == 0
    _assert_same(_content(out), _content(references["sample"]))
    assert not (out / "parts").exists()


def test_resume_after_interrupt_equals_uninterrupted(references, tmp_path, monkeypatch):
    """Top-k mode, interrupted in-process (Ctrl-C in the teacher's third forward)."""
    import moedistill.commands.common

    real_get_model, calls = moedistill.commands.common.get_model, []

    def interrupt_third_forward(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    def get_model(*a, **kw):
        model, tok = real_get_model(*a, **kw)
        model.register_forward_pre_hook(interrupt_third_forward)
        return model, tok

    out = tmp_path / "cache"
    monkeypatch.setattr(moedistill.commands.common, "get_model", get_model)
    with pytest.raises(KeyboardInterrupt):
        _script_main([*ARGS, "--mode", "topk", "--output_dir", str(out)])
    assert len(list((out / "parts").glob("part-*.h5"))) == 2
    monkeypatch.setattr(moedistill.commands.common, "get_model", real_get_model)
    assert _script_main([*ARGS, "--mode", "topk", "--output_dir", str(out)]) == 0
    _assert_same(_content(out), _content(references["topk"]))


def test_torchrun_two_processes_equal_one(references, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "cache"
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", str(SCRIPT), *ARGS, "--mode", "sample",
           "--output_dir", str(out)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and [(s["rank"], s["seq_start"], s["seq_end"]) for s in m["shards"]] == [(0, 0, 4), (1, 4, 8)]
    _assert_same(_content(out), _content(references["sample"]))


def test_device_map_auto_gives_the_same_cache(references, tmp_path):
    """--device_map auto reaches from_pretrained and the cache is the same. On a machine
    without GPUs accelerate keeps the whole teacher on the CPU: this checks the flag and
    the load path, not a split over devices (that needs several GPUs)."""
    out = tmp_path / "cache"
    assert _script_main([*ARGS, "--mode", "topk", "--device_map", "auto", "--output_dir", str(out)]) == 0
    _assert_same(_content(out), _content(references["topk"]))


def test_script_refuses_other_config_and_cli_inspects(references, capsys):
    from moedistill.cli import main

    ref = references["topk"]
    assert _script_main([*ARGS, "--mode", "topk", "--output_dir", str(ref), "--top_k", "8"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["inspect", str(ref), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "topk (k=16)" in text and "verify" in text and "OK" in text
    assert main(["inspect", str(ref / "nothere")]) == 2
    assert "does not exist" in capsys.readouterr().err
