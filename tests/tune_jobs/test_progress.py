"""The sweep's progress lines (plain text: the same in a terminal, CI logs and `pqfn submit --follow`)."""

from __future__ import annotations

import io
import pickle
import time
from types import SimpleNamespace
from typing import Any

from tune_jobs.progress import ProgressLines


def _trial(tid: str, status: str, result: dict[str, Any] | None) -> Any:
    return SimpleNamespace(trial_id=tid, status=status, last_result=result,
                           config={"overrides": {"trial.resolution": 64}})


def test_progress_line_every_interval_with_running_trials_and_time_left() -> None:
    lines: list[str] = []
    p = ProgressLines(total=4, slots=2, interval=0.0, out=lambda s, flush=False: lines.append(s))
    a = _trial("a", "RUNNING", {"epoch": 5, "epochs": 10, "val/bal_acc": 0.5, "gap/acc": 0.1})
    b = _trial("b", "RUNNING", None)
    p.on_trial_start(0, [], a)
    p.on_trial_start(0, [], b)
    p.started["a"] -= 60  # a has run 60 s, half of its epochs
    p.on_step_begin(1, [a, b])
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("[progress ") and "0/4 done, 2 running" in line
    assert "a (resolution=64): epoch 5/10 done; at epoch 5 val/bal_acc 0.500" in line and "b (resolution=64): preparing" in line
    assert "about 4:00 left" in line  # a: 5 epochs x 12 s, then 2 more x 120 s; b: 120 s (a's rate)
    assert line.index("left") < line.index("a (resolution=64)")  # before the details a terminal may cut
    done = _trial("a", "TERMINATED", {"epoch": 10, "epochs": 10, "val/bal_acc": 0.6, "val/min_recall": 0.3, "gap/acc": 0.1})
    p.on_trial_complete(2, [], done)
    assert lines[-1].startswith("[1/4] trial a (resolution=64): completed; val/bal_acc 0.600")


def test_no_line_before_the_interval() -> None:
    lines: list[str] = []
    p = ProgressLines(total=1, slots=1, interval=3600.0, out=lambda s, flush=False: lines.append(s))
    p.on_step_begin(1, [])
    assert lines == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_status_line_is_redrawn_in_place() -> None:
    term = _Terminal()
    p = ProgressLines(total=2, slots=2, interval=10.0, terminal=term)
    a = _trial("a", "RUNNING", {"epoch": 1, "epochs": 2, "val/bal_acc": 0.5, "gap/acc": 0.1})
    p.on_trial_start(0, [], a)
    p.last -= 1.0  # a second later: on a terminal the line is redrawn every second, whatever `interval` says
    p.on_step_begin(1, [a])
    p.last -= 1.0
    p.on_step_begin(2, [a])
    first = term.getvalue()
    assert "[progress " in first and "a (resolution=64): epoch 1/2" in first
    assert "\r" in first and "\n" not in first.strip("\n")  # one line, rewritten in place: no new lines
    p.on_trial_complete(3, [], _trial("a", "TERMINATED", {"epoch": 2, "epochs": 2, "val/bal_acc": 0.6,
                                                          "val/min_recall": 0.3, "gap/acc": 0.1}))
    assert "[1/2] trial a (resolution=64): completed" in term.getvalue()  # printed above the status line
    state = p.__getstate__()  # Tune pickles its callbacks: no stream or bar goes with them
    assert state["_terminal"] is None and state["_bar"] is None
    p.on_experiment_end([])
    assert p._bar is None


def test_back_from_a_pickle_the_clock_restarts_and_finished_trials_are_counted() -> None:
    """A resumed sweep gets its callbacks back from tuner.pkl, in another process."""
    p = ProgressLines(total=3, slots=1, interval=0.0, out=lambda s, flush=False: None)
    p.t0 -= 3600
    q = pickle.loads(pickle.dumps(p))
    assert q._terminal is None and q._out is None  # stdout is not a terminal under pytest
    assert time.monotonic() - q.t0 < 60
    lines: list[str] = []
    q._out = lambda s, flush=False: lines.append(s)
    done = _trial("a", "TERMINATED", {"epoch": 2, "epochs": 2})
    q.on_step_begin(1, [done, _trial("b", "RUNNING", None), _trial("c", "PENDING", None)])
    assert lines[0].startswith("[progress 0:00] 1/3 done, 1 running")
