"""What the console shows while a sweep runs: one line per finished trial, and the progress of the running
trials (parameters, epoch and latest metrics, an estimate of the time left).

On a terminal the progress is one status line redrawn in place (tqdm), at least every second, with the
finished-trial lines printed above it. Elsewhere (CI, `pqfn submit --follow` logs, a file) it is a plain
line every `interval` seconds. Tune's own table is off (verbose=0).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ray import tune
from tqdm import tqdm

from pqfn.records import is_complete
from tune_jobs.trainable import params_of


def _params(trial: Any) -> str:
    return ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in params_of(trial.config).items())


class ProgressLines(tune.Callback):
    def __init__(self, total: int, slots: int, interval: float = 10.0, out: Any = None,
                 terminal: TextIO | None = None) -> None:
        # out: a print-like function for tests; None = print. terminal: the stream to redraw the status line on;
        # None = stdout when it is a terminal. Neither is kept when Tune pickles its callbacks (__getstate__).
        self.total, self.slots, self.interval, self._out = total, max(1, slots), interval, out
        if terminal is None and out is None and sys.stdout.isatty():
            terminal = sys.stdout
        self._terminal = terminal
        self._bar: Any = None
        self._recount = False  # set when back from a pickle: count the finished trials at the next step
        self.done = 0
        self.t0 = time.monotonic()
        self.last = self.t0
        self.started: dict[str, float] = {}
        self.durations: list[float] = []

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_out": None, "_terminal": None, "_bar": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Back from tuner.pkl in a resumed sweep: another process, maybe another console; its clock starts
        # now, and the finished trials (which fire no callback again) are counted at the first step.
        self.__dict__.update(state)
        self._terminal = sys.stdout if sys.stdout.isatty() else None
        self.t0 = self.last = time.monotonic()
        self.started = {}
        self._recount = True

    def out(self, line: str, flush: bool = True) -> None:
        if self._terminal is not None:
            tqdm.write(line, file=self._terminal)  # above the status line, which is redrawn after it
        else:
            (self._out or print)(line, flush=flush)

    def _redraw(self, line: str) -> None:
        if self._bar is None:
            self._bar = tqdm(total=self.total, file=self._terminal, bar_format="{desc}", leave=False,
                             dynamic_ncols=True)
        self._bar.set_description_str(line)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -------------------------------------------------------------- finished trials
    def _line(self, trial: Any, what: str) -> None:
        self.done += 1
        if trial.trial_id in self.started:
            self.durations.append(time.monotonic() - self.started.pop(trial.trial_id))
        m = trial.last_result or {}
        extra = (f"val/bal_acc {m['val/bal_acc']:.3f}, worst class recall {m['val/min_recall']:.3f}, "
                 f"gap/acc {m['gap/acc']:+.3f}, epoch {int(m['epoch'])}" if "val/bal_acc" in m else "")
        self.out(f"[{self.done}/{self.total}] trial {trial.trial_id} ({_params(trial)}): {what}"
                 f"{'; ' + extra if extra else ''}", flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started.setdefault(trial.trial_id, time.monotonic())

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "completed" if is_complete(trial.last_result or {}) else "stopped early")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        why = _error_line(trial)
        self._line(trial, f"FAILED: {why}" if why else "FAILED (see trials.csv, column error)")

    # -------------------------------------------------------------- periodic progress
    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if self._recount:
            self._recount = False
            self.done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        if now - self.last >= (min(self.interval, 1.0) if self._terminal is not None else self.interval):
            self.last = now
            if self._terminal is not None:
                self._redraw(self.status(trials, now))
            else:
                self.out(self.status(trials, now), flush=True)

    def status(self, trials: list, now: float) -> str:
        running = [t for t in trials if t.status == "RUNNING"]
        parts = []
        for t in running:
            m = t.last_result or {}
            age = now - self.started.get(t.trial_id, now)
            if "epoch" in m and "epochs" in m:
                what = f"epoch {int(m['epoch'])}/{int(m['epochs'])}"
                if "val/bal_acc" in m:
                    what += f", val/bal_acc {m['val/bal_acc']:.3f}, gap/acc {m['gap/acc']:+.3f}"
            else:
                what = "starting / first epochs"
            parts.append(f"{t.trial_id} ({_params(t)}): {what}, {age:.0f} s")
        # Counts and time left first: a terminal cuts the status line at its width.
        return (f"[progress {self._clock(now - self.t0)}] {self.done}/{self.total} done, {len(running)} running"
                + self._eta(running, now) + (": " + "; ".join(parts) if parts else ""))

    def _eta(self, running: list, now: float) -> str:
        """Time left, from the mean finished trial (or, before any finished, the running ones' epoch rate)."""
        left = self.total - self.done
        if not left:
            return ""
        if self.durations:
            per = sum(self.durations) / len(self.durations)
        else:
            rates = []
            for t in running:
                m = t.last_result or {}
                if m.get("epoch") and m.get("epochs"):
                    rates.append((now - self.started.get(t.trial_id, now)) / m["epoch"] * m["epochs"])
            if not rates:
                return ""
            per = sum(rates) / len(rates)
        spent = sum(now - self.started.get(t.trial_id, now) for t in running)
        est = max(0.0, (left * per - spent) / self.slots)
        return f", about {self._clock(est)} left"

    @staticmethod
    def _clock(s: float) -> str:
        return f"{int(s) // 60}:{int(s) % 60:02d}"


def _error_line(trial: Any) -> str:
    """A failed trial's own one-line error (a pqfn error's message), or "" for anything else (a traceback)."""
    try:  # the driver's own copy, written before this callback (Trial.handle_error); storage's comes later
        lines = Path(trial.error_file).read_text().strip().splitlines()
    except (OSError, TypeError):  # no error file: point at trials.csv instead
        return ""
    last = lines[-1] if lines else ""
    return last.split(": ", 1)[1][:300] if last.startswith("pqfn.errors.") and ": " in last else ""
