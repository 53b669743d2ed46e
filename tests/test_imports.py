"""The package's import graph has no cycle, and every module imports on its own in a fresh interpreter."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "src" / "moedistill"

# scripts/ is not a package: load the checker from its path.
_spec = importlib.util.spec_from_file_location("check_imports", REPO / "scripts" / "check_imports.py")
check_imports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_imports)


def test_import_graph_has_no_cycle():
    graph, sites = check_imports.scan(ROOT)
    cycles = check_imports.find_cycles(graph)
    report = "\n".join(check_imports.describe(graph, sites, cycles))
    assert not cycles, f"import cycles (scripts/check_imports.py):\n{report}"


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_checker_finds_a_planted_cycle(tmp_path, capsys):
    """A fake package with one cycle per kind of edge, so the test above cannot pass because edges go unseen."""
    _write(tmp_path, {
        "a/__init__.py": "",
        # absolute, the back edge inside a function
        "a/x.py": "def f():\n    import a.y\n",
        "a/y.py": "import a.x\n",
        # relative: `from ..rel.q import` (level 2) and `from . import p` (p is a submodule)
        "a/rel/__init__.py": "",
        "a/rel/p.py": "from ..rel.q import thing\n",
        "a/rel/q.py": "from . import p\nthing = 1\n",
        # implicit parent: hook imports a.pkg.inner (empty), which first runs a/pkg/__init__.py, which imports hook
        "a/pkg/__init__.py": "import a.hook\nfrom a.pkg import inner\n",
        "a/hook.py": "from a.pkg.inner import thing\n",
        # ...but inner importing its sibling is no edge back to a.pkg (a.pkg is already running): no cycle
        "a/pkg/inner.py": "import a.pkg.sibling\nthing = 1\n",
        "a/pkg/sibling.py": "",
        # a lazy module-level __getattr__ whose submodule reads a name from the package
        "a/lazy/__init__.py": "NAME = 1\n\ndef __getattr__(name):\n    from a.lazy import heavy\n    return heavy\n",
        "a/lazy/heavy.py": "from a.lazy import NAME\n",
        # TYPE_CHECKING never runs: no edge, no cycle; its else branch does run
        "a/typed.py": """\
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from a.typed_peer import T
            else:
                import a.other
            """,
        "a/typed_peer.py": "import a.typed\nT = int\n",
        "a/other.py": "",
    })
    graph = check_imports.build_graph(tmp_path / "a")
    assert "a.typed_peer" not in graph["a.typed"] and "a.other" in graph["a.typed"]
    assert "a.pkg" not in graph["a.pkg.inner"] and "a.pkg" in graph["a.hook"]
    assert sorted(check_imports.find_cycles(graph)) == [
        ["a.hook", "a.pkg", "a.hook"],
        ["a.lazy", "a.lazy.heavy", "a.lazy"],
        ["a.rel.p", "a.rel.q", "a.rel.p"],
        ["a.x", "a.y", "a.x"],
    ]
    assert check_imports.find_cycles({"s": {"s"}, "t": set()}) == [["s", "s"]]  # a self-loop is a cycle too

    assert check_imports.main(["--root", str(tmp_path / "a")]) == 1
    assert "a.x -> a.y -> a.x" in capsys.readouterr().out
    (tmp_path / "a/y.py").write_text("")
    assert check_imports.main(["--root", str(tmp_path / "a"), "--dot"]) == 1  # the other three remain
    assert '"a.x" -> "a.y";' in capsys.readouterr().out


# Every module, subpackages' __init__ included. A __main__ would run the CLI on import: none exists today,
# and it is skipped should one appear.
MODULES = sorted(name for name in check_imports.module_names(ROOT) if not name.endswith(".__main__"))


# Run by a fresh interpreter that imports only the third-party libraries (the slow part, several
# seconds each time) and then forks one child per module: each child starts with no moedistill module
# imported, so earlier imports still cannot hide a module that only works once another has run.
_FORK_IMPORTS = """
import importlib, json, os, sys, traceback
import numpy, torch, transformers
from transformers import PreTrainedModel, Trainer  # noqa: F401  (resolves transformers' lazy modules)
assert not [m for m in sys.modules if m.split(".")[0] == "moedistill"]
results = {}
for module in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(module)
            msg = ""
        except BaseException:
            msg = traceback.format_exc() or "failed"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    _, status = os.waitpid(pid, 0)
    results[module] = msg or ("" if status == 0 else f"the child exited with status {status}")
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def import_results(tmp_path_factory) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # cwd: a temp dir, so the repo's files shadow nothing
    proc = subprocess.run([sys.executable, "-c", _FORK_IMPORTS, *MODULES], cwd=tmp_path_factory.mktemp("imports"),
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports_alone(module, import_results):
    assert import_results[module] == "", f"`import {module}` alone failed:\n{import_results[module]}"


def test_a_module_that_fails_alone_is_reported(tmp_path):
    """The forking importer sees a failure that only shows when a module is imported alone."""
    pkg = tmp_path / "moedistill_probe"
    _write(pkg, {"__init__.py": "", "ok.py": "import json\n", "bad.py": "json.dumps(1)\n"})
    proc = subprocess.run([sys.executable, "-c", _FORK_IMPORTS, "moedistill_probe.ok", "moedistill_probe.bad"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True,
                          timeout=300)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["moedistill_probe.ok"] == "" and "NameError" in got["moedistill_probe.bad"]
