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


def test_pqfn_never_imports_ray() -> None:
    offenders = [p for p in (ROOT / "pqfn").rglob("*.py")
                 if any(line.strip().startswith(("import ray", "from ray")) for line in p.read_text().splitlines())]
    assert not offenders
