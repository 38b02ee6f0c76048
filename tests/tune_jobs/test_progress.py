"""The sweep's progress lines (plain text: the same in a terminal, CI logs and `pqfn submit --follow`)."""

from __future__ import annotations

import io
import json
import pickle
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tune_jobs.progress import Pace, ProgressLines, time_left


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


def _simulate(rates: list[float], slots: int, setup: float, epochs: int, steps: int, tmp: Path) -> list[tuple[float, float]]:
    """A sweep on a fake clock: trial k needs `setup` s, then epochs at rates[k] s each, and starts when a slot
    frees. Each tick, every running trial's progress.json is written as the trial would, and the console's
    estimate is compared with the time that actually remained. Returns (estimate, truth) per tick."""
    free = [0.0] * slots
    start, end = [], []
    for r in rates:
        s = min(free)
        free[free.index(s)] = s + setup + epochs * r
        start.append(s)
        end.append(s + setup + epochs * r)
    p = ProgressLines(total=len(rates), slots=slots, interval=0.0, out=lambda s, flush=False: None, trials_dir=tmp)
    out = []
    t = 0.0
    while t < max(end):
        trials = []
        for k, r in enumerate(rates):
            tid = f"t{k}"
            if t < start[k]:
                continue
            if t >= end[k]:
                if p.started.get(tid) is not None:
                    p.on_trial_complete(0, [], _trial(tid, "TERMINATED", {"epoch": epochs, "epochs": epochs}))
                continue
            p.started.setdefault(tid, start[k])
            (tmp / tid).mkdir(parents=True, exist_ok=True)
            ran = t - start[k] - setup
            if ran >= 0:
                e = int(ran // r)
                step = int((ran - e * r) / r * steps)
                prog = {"epoch": e + 1, "epochs": epochs, "step": step, "steps": steps, "epoch_s": r if e else None,
                        "run_s": ran, "run_epochs": e + step / steps,
                        "last_step_s": (e + step / steps) * r, "cycle_s": e * r, "cycle_epochs": e}
                (tmp / tid / "progress.json").write_text(json.dumps(prog))
            trials.append(_trial(tid, "RUNNING", None))
        p.status(trials, t)
        if p.estimate is not None:
            out.append((p.estimate, max(end) - t))
        t += 1.0
    return out


def test_time_left_falls_steadily_and_stays_within_1_5x_of_the_truth(tmp_path: Path) -> None:
    """The README's main job's shape (4 trials on 2 slots, 12 epochs, a few seconds of set-up), on a fake clock.
    Steady rates: from its first figure on the estimate never grows and never exceeds the truth by more than
    1.5x. Unequal rates (two sizes of trial): still within 1.5x."""
    steady = _simulate([12.0] * 4, slots=2, setup=8.0, epochs=12, steps=39, tmp=tmp_path / "steady")
    assert steady and steady[0][1] > 250  # a first figure within the first epoch of the first trials
    for (e0, _), (e1, _) in zip(steady, steady[1:], strict=False):
        assert e1 <= e0 + 1e-6
    assert all(est <= 1.5 * truth + 1.0 for est, truth in steady)
    mixed = _simulate([12.0, 8.0, 12.0, 8.0], slots=2, setup=8.0, epochs=12, steps=39, tmp=tmp_path / "mixed")
    assert all(est <= 1.5 * truth + 1.0 for est, truth in mixed)


def test_time_left_by_hand() -> None:
    running = [Pace(age_s=30, epochs=10, done=2.0, rate=10.0, setup_s=10.0), Pace(age_s=2, epochs=10)]
    # first: 8 epochs x 10 s = 80 s; second: 8 s more set-up, then 10 x 10 s = 108 s; a pending one follows the first
    assert time_left(running, pending=1, slots=2, seen=running) == 80 + 10 + 100
    assert time_left([Pace(age_s=5, epochs=10)], pending=3, slots=2, seen=[]) is None  # no rate yet: no figure
