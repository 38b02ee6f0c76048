"""The code stays ruff-clean and mypy-clean (configuration in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("tool", [["ruff", "check", "pqfn", "tune_jobs", "tests"], ["mypy"]], ids=["ruff", "mypy"])
def test_static_checks(tool: list[str]) -> None:
    exe = shutil.which(tool[0], path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip(f"{tool[0]} is not installed (pip install -e '.[test]')")
    r = subprocess.run([exe, *tool[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_pqfn_never_imports_ray_or_tune_jobs() -> None:
    """Import every pqfn module in a fresh interpreter: neither ray nor tune_jobs may end up in sys.modules."""
    mods = sorted(f"pqfn.{p.stem}" for p in (ROOT / "pqfn").glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'tune_jobs'))\n"
            "print(','.join(bad))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "", f"pqfn imports {r.stdout.strip()}"


@pytest.mark.slow
def test_no_import_cycles_in_pqfn() -> None:
    """Each pqfn module imports cleanly on its own, first, in a fresh interpreter (a cycle would fail one)."""
    mods = sorted(f"pqfn.{p.stem}" for p in (ROOT / "pqfn").glob("*.py") if p.stem != "__init__")
    code = ("import importlib, subprocess, sys\n"
            f"bad = [m for m in {mods!r} if subprocess.run([sys.executable, '-c', 'import ' + m]).returncode]\n"
            "print(','.join(bad))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.stdout.strip() == "", f"cannot be imported first: {r.stdout.strip()}"
