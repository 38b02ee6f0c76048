"""What every bad-input test asserts of a refused `pqfn` command line."""

from __future__ import annotations

import pytest

from tune_jobs.cli import main


def fails(argv: list[object], capsys: pytest.CaptureFixture[str], *names: str) -> str:
    """Run pqfn; assert exit 2, exactly one error line and no traceback, naming every one of `names`; return it."""
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    errors = [ln for ln in cap.err.splitlines() if ln.startswith("pqfn: error:")]
    assert code == 2, cap.err
    assert len(errors) == 1 and "Traceback" not in cap.err, cap.err
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]
