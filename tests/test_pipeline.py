"""`moedistill run` end to end on a configuration small enough for CI.

Checks the report's structure, that every number in it is finite, and that the numbers
agree with `moedistill eval` run separately on the same model.
"""

import json
import math
import subprocess
import sys

import pytest

SMALL = [
    "data.max_sequences=48",
    "data.eval_max_sequences=16",
    "eval.max_sequences=16",
    "cache.batch_size=16",
    "compress.calibration_sequences=8",
    "compress.report_ranks=[]",
    (
        "stages=[{name: wrappers, max_steps: 3, param_groups: {default_lr_multiplier: 0.0, "
        "rules: [{pattern: '.*wrapper.*', lr_multiplier: 1.0}]}}, {name: full, max_steps: 3}]"
    ),
    "training.logging_steps=1",
    "training.save_steps=3",
    "training.per_device_train_batch_size=8",
]


def _cli(*args, cwd=None):
    r = subprocess.run([sys.executable, "-m", "moedistill.cli", *args], capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    _cli("run", f"output_dir={out}", *SMALL)
    return out


def test_report_structure_and_finite_numbers(run_dir):
    report = (run_dir / "report.md").read_text()
    for name in ("teacher", "checkpoint-0", "CE-only", "distilled (top-k)", "distilled (sampled)"):
        assert f"| {name} |" in report
    for png in ("perplexity.png", "losses.png"):
        assert (run_dir / png).stat().st_size > 1000
    rows = json.loads((run_dir / "report.json").read_text())["models"]
    assert [r["name"] for r in rows][:2] == ["teacher", "checkpoint-0"]
    for r in rows:
        for key in ("perplexity", "agreement", "kl_exact", "ece", "parameters"):
            assert math.isfinite(r[key]), (r["name"], key)
    teacher = rows[0]
    assert abs(teacher["kl_exact"]) < 1e-6 and teacher["agreement"] == 1.0
    students = [r for r in rows if r["name"] != "teacher"]
    assert all(r["parameters"] < teacher["parameters"] for r in students)
    for r in students[1:]:  # gap_closed derives from the perplexities in the same table
        expect = (rows[1]["perplexity"] - r["perplexity"]) / (rows[1]["perplexity"] - teacher["perplexity"])
        assert math.isclose(r["gap_closed"], expect, rel_tol=1e-9)
    # the training curves behind losses.png carry both loss parts and the stage
    log = [json.loads(x) for x in (run_dir / "train/topk/log.jsonl").read_text().splitlines() if x.strip()]
    assert any("ce_loss" in e and "kl_loss" in e for e in log)
    assert {e.get("stage_name") for e in log if "ce_loss" in e} == {"wrappers", "full"}


def test_report_agrees_with_moedistill_eval(run_dir, tmp_path):
    rows = {r["name"]: r for r in json.loads((run_dir / "report.json").read_text())["models"]}
    row = rows["distilled (top-k)"]
    out = tmp_path / "eval.json"
    _cli("eval", f"output_dir={run_dir}", *SMALL, "--model", row["path"], "--output", str(out))
    m = json.loads(out.read_text())
    for key in ("perplexity", "kl_exact", "agreement", "ece"):
        assert math.isclose(m[key], row[key], rel_tol=1e-4, abs_tol=1e-6), key


def test_second_run_reuses_checkpoint_and_caches(run_dir):
    def stamp():
        return {p: p.stat().st_mtime_ns for p in run_dir.glob("cache/*/manifest.json")} | {
            p: p.stat().st_mtime_ns for p in run_dir.glob("compressed/checkpoint-0/*.safetensors")}

    before = stamp()
    assert len(before) >= 3
    # without --overwrite the finished students are not replaced: refused before any work
    r = subprocess.run([sys.executable, "-m", "moedistill.cli", "run", f"output_dir={run_dir}", *SMALL],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "holds an earlier run" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    _cli("run", "--overwrite", f"output_dir={run_dir}", *SMALL)
    assert stamp() == before


def test_python_api_example_runs_and_its_numbers_add_up(run_dir):
    """examples/distillation_example.py on the same small config (it reuses checkpoint-0 and
    the caches of the run above): it trains, and the loss it prints decomposes as documented."""
    import re
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "distillation_example.py"
    r = subprocess.run([sys.executable, str(example), str(run_dir), *SMALL], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"total ([\d.]+) = \(1-a\) \* ce ([\d.]+) \+ a T\^2 \* kl ([\d.]+)", r.stdout)
    assert m, r.stdout
    total, ce, kl = map(float, m.groups())
    from moedistill.config import load_config

    loss = load_config("tiny", SMALL).loss
    a, t = loss.alpha, loss.temperature
    assert math.isclose(total, (1 - a) * ce + a * t * t * kl, abs_tol=2e-3)
    kl0, kl1 = map(
        float, re.search(r"validation KL to the teacher \(lower bound\): ([\d.]+) -> ([\d.]+)", r.stdout).groups()
    )
    assert kl1 < kl0
    assert (run_dir / "train" / "example" / "final" / "model.safetensors").is_file()
