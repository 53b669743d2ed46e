"""The docs say what the code does: every command in them parses, every config key exists.

Each `moedistill ...` line in a ```bash block of the docs is parsed by the real CLI parser
and its overrides are validated by the real config loader; the cheap ones (help, config)
are run. Script lines must name scripts that exist and accept the flags shown.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from moedistill.cli import _parser
from moedistill.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def command_lines(path: Path) -> list[str]:
    text = path.read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


ALL = [(p.name, line) for p in DOCS for line in command_lines(p)]
MOEDISTILL = [(n, ln) for n, ln in ALL if ln.startswith("moedistill")]
SCRIPTS = [(n, ln) for n, ln in ALL if ln.startswith("python scripts/") or ln.startswith("python examples/")
           or ln.startswith("python benchmarks/")]


def test_docs_have_commands():
    assert len(MOEDISTILL) >= 10 and len(SCRIPTS) >= 3


@pytest.mark.parametrize("doc,line", MOEDISTILL, ids=[f"{n}:{ln[:60]}" for n, ln in MOEDISTILL])
def test_moedistill_command_parses_and_validates(doc, line):
    argv = shlex.split(line, comments=True)[1:]
    if "--help" in argv or "-h" in argv:
        r = subprocess.run([sys.executable, "-m", "moedistill.cli", *argv], capture_output=True, text=True)
        assert r.returncode == 0 and "usage" in r.stdout, r.stderr
        return
    args = _parser().parse_args(argv)  # SystemExit on an unknown command or flag
    if hasattr(args, "overrides") and args.command is not None:
        overrides = args.overrides
        if args.multirun:
            from moedistill.cli import expand_sweep

            for ov in expand_sweep(overrides):
                load_config(args.config_name, ov)
        else:
            load_config(args.config_name, overrides)
    if args.command == "config":
        r = subprocess.run([sys.executable, "-m", "moedistill.cli", *argv], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("doc,line", SCRIPTS, ids=[f"{n}:{ln[:60]}" for n, ln in SCRIPTS])
def test_script_exists_and_accepts_its_flags(doc, line):
    argv = shlex.split(line, comments=True)
    if "torchrun" in argv[0]:
        return
    script = ROOT / argv[1]
    assert script.is_file(), f"{doc} names {argv[1]}, which does not exist"
    flags = [a.split("=")[0] for a in argv[2:] if a.startswith("--")]
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for f in flags:
        assert f in r.stdout, f"{argv[1]} --help does not list {f}"


def test_gpu_check_runs_its_smoke_mode():
    """benchmarks/gpu_check.py is only ever run by hand on a GPU; its --smoke mode runs the same
    code at toy sizes on CPU, so the script does not rot between GPU sessions."""
    import os

    import torch

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--smoke"], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    assert "1. embedded default" in r.stdout and "3. the loss alone" in r.stdout
    if not torch.cuda.is_available():  # without --smoke it refuses to measure a CPU as a GPU
        assert "error: no CUDA device" in subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_check.py")],
                                                         capture_output=True, text=True, timeout=120).stderr
