"""The code stays ruff-clean and mypy-clean (configuration in pyproject.toml)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("tool", [["ruff", "check", "pqfn", "tune_jobs", "tests"],
                                  pytest.param(["mypy"], marks=pytest.mark.slow)], ids=["ruff", "mypy"])
def test_static_checks(tool: list[str]) -> None:
    exe = shutil.which(tool[0], path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip(f"{tool[0]} is not installed (pip install -e '.[test]')")
    r = subprocess.run([exe, *tool[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def _imports(path: Path) -> set[str]:
    """The modules a file imports, anywhere in it (module top, functions, TYPE_CHECKING blocks); `from a import b`
    counts as both a and a.b (b may be a module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_pqfn_source_never_imports_ray_or_tune_jobs() -> None:
    """The fast check, from the source: no pqfn file names ray or tune_jobs in any import, even inside a function."""
    bad = {p.name: sorted({m.split(".")[0] for m in _imports(p)} & {"ray", "tune_jobs"}) for p in (ROOT / "pqfn").glob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


@pytest.mark.slow  # a fresh interpreter importing torch, timm, wandb, sklearn, onnx...: 8 s
def test_pqfn_never_imports_ray_or_tune_jobs() -> None:
    """Import every pqfn module in a fresh interpreter: neither ray nor tune_jobs may end up in sys.modules
    (also through a library pqfn imports, which the source check above cannot see)."""
    mods = sorted(f"pqfn.{p.stem}" for p in (ROOT / "pqfn").glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'tune_jobs'))\n"
            "print(','.join(bad))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "", f"pqfn imports {r.stdout.strip()}"


def test_no_import_cycles_in_pqfn() -> None:
    """The graph of pqfn's imports has no cycle (read from the source, so a cycle hidden inside a function,
    which imports fine at run time until the day it does not, fails here too)."""
    mods = {f"pqfn.{p.stem}": p for p in (ROOT / "pqfn").glob("*.py") if p.stem != "__init__"}
    graph = {m: sorted(_imports(p) & mods.keys() - {m}) for m, p in mods.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*path[path.index(n):], n])
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert sum(len(v) for v in graph.values()) > 20  # the graph was really read
