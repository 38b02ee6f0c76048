"""What the console shows while a sweep runs: one line per finished trial, and the progress of the running
trials (parameters, epoch and step inside it, own time per epoch, latest metrics, an estimate of the time left).

A trial's position inside its epoch comes from its progress file (tune_jobs/trainable.py, rewritten every
second), not from Tune, which hears from a trial only at its measured epochs.

Time left (time_left): every trial's own rate (seconds per epoch, averaged over what it has trained) and its
set-up time (from its start to its first batch) are observed; a running trial needs its remaining epochs at
its own rate, a trial not yet started needs the mean set-up plus its epochs at the mean rate, and the trials
are dealt to the free slots in turn. While the sweep runs at a steady rate the figure falls by a second a
second; it is shown from the moment a trial has trained a tenth of an epoch.

On a terminal the progress is one status line redrawn in place (tqdm), at least every second, with the
finished-trial lines printed above it. Elsewhere (CI, `pqfn submit --follow` logs, a file) it is a plain
line every `interval` seconds. Tune's own table is off (verbose=0).
"""

from __future__ import annotations

import heapq
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ray import tune
from tqdm import tqdm

from pqfn.records import TrialProgress, is_complete
from tune_jobs.trainable import params_of, read_progress


def _params(trial: Any) -> str:
    return ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in params_of(trial.config).items())


@dataclass
class Pace:
    """One trial as the time-left estimate sees it."""

    age_s: float  # since the driver saw it start
    epochs: int
    done: float = 0.0  # epochs done, fractional
    rate: float | None = None  # its own seconds per epoch, once observed
    setup_s: float | None = None  # from its start to its first batch, once observed


def time_left(running: list[Pace], pending: int, slots: int, seen: list[Pace]) -> float | None:
    """Seconds until the last trial ends: running trials at their own rates, pending ones at the mean observed
    rate and set-up, dealt to the earliest free slot. None while no trial has a rate yet.

    seen: every trial with an observed rate so far (running and finished), the means' sample."""
    rates = [p.rate for p in seen if p.rate is not None]
    if not rates:
        return None
    rate = sum(rates) / len(rates)
    setups = [p.setup_s for p in seen if p.setup_s is not None]
    setup = sum(setups) / len(setups) if setups else 0.0
    epochs = max(p.epochs for p in [*seen, *running])  # a trial not heard from yet has the usual budget
    free = []
    for p in running:
        if p.rate is not None:
            free.append(((p.epochs or epochs) - p.done) * p.rate)
        else:  # not trained a tenth of an epoch yet: the rest of a mean set-up, then its epochs at the mean rate
            free.append(max(setup - p.age_s, 0.0) + ((p.epochs or epochs) - p.done) * rate)
    free += [0.0] * max(0, slots - len(free))
    heapq.heapify(free)
    for _ in range(pending):
        heapq.heappush(free, heapq.heappop(free) + setup + epochs * rate)
    return max(free)


class ProgressLines(tune.Callback):
    def __init__(self, total: int, slots: int, interval: float = 10.0, out: Any = None,
                 terminal: TextIO | None = None, trials_dir: Path | None = None) -> None:
        # out: a print-like function for tests; None = print. terminal: the stream to redraw the status line on;
        # None = stdout when it is a terminal. Neither is kept when Tune pickles its callbacks (__getstate__).
        self.total, self.slots, self.interval, self._out = total, max(1, slots), interval, out
        if terminal is None and out is None and sys.stdout.isatty():
            terminal = sys.stdout
        self._terminal = terminal
        self.trials_dir = trials_dir  # where each trial's progress.json is (None: none is read)
        self.paces: dict[str, Pace] = {}  # every trial whose progress was seen, finished ones too
        self.estimate: float | None = None  # the latest time-left figure, seconds
        self._bar: Any = None
        self._recount = False  # set when back from a pickle: count the finished trials at the next step
        self.done = 0
        self.t0 = time.monotonic()
        self.last = self.t0
        self.started: dict[str, float] = {}

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_out": None, "_terminal": None, "_bar": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Back from tuner.pkl in a resumed sweep: another process, maybe another console; its clock starts
        # now, and the finished trials (which fire no callback again) are counted at the first step.
        self.__dict__.update(state)
        self._terminal = sys.stdout if sys.stdout.isatty() else None
        self.t0 = self.last = time.monotonic()
        self.started = {}
        self.paces = {k: v for k, v in self.paces.items() if v.rate is not None}
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
        self.started.pop(trial.trial_id, None)
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

    def _pace(self, trial: Any, now: float) -> tuple[Pace, TrialProgress | None]:
        """The trial's progress file (None before its first batch) and its pace, kept for the estimate."""
        m = trial.last_result or {}
        age = now - self.started.get(trial.trial_id, now)
        prog = read_progress(self.trials_dir / trial.trial_id) if self.trials_dir is not None else None
        epochs = int(prog.epochs if prog else m.get("epochs", 0))
        pace = Pace(age, epochs, float(m.get("epoch", 0.0)))
        old = self.paces.get(trial.trial_id)
        if prog is not None and prog.run_s > 0:
            pace.done = prog.epoch - 1 + (prog.step / prog.steps if prog.steps else 0.0)
            pace.rate = prog.seconds_per_epoch()
            pace.setup_s = max(0.0, age - prog.run_s)
        elif m.get("epoch"):  # no progress file (unreadable here): Tune's last report, set-up counted in
            pace.rate = age / float(m["epoch"])
        if pace.rate is None and old is not None and old.rate is not None:
            pace.rate, pace.setup_s = old.rate, old.setup_s  # between a progress file and the next
        if pace.rate is not None or trial.trial_id not in self.paces:
            self.paces[trial.trial_id] = pace
        return pace, prog

    def status(self, trials: list, now: float) -> str:
        running = [t for t in trials if t.status == "RUNNING"]
        parts, paces = [], []
        for t in running:
            m = t.last_result or {}
            pace, prog = self._pace(t, now)
            paces.append(pace)
            if prog is not None and prog.run_s > 0:
                what = f"epoch {prog.epoch}/{prog.epochs} step {prog.step}/{prog.steps}"
                rate = prog.seconds_per_epoch()
                if rate is not None:
                    what += f", {rate:.1f} s/epoch"
            elif "epoch" in m and "epochs" in m:
                what = f"epoch {int(m['epoch'])}/{int(m['epochs'])} done"
            else:
                what = "preparing (images, fold models, W&B)"
            if "val/bal_acc" in m:
                what += (f"; at epoch {int(m['epoch'])} val/bal_acc {m['val/bal_acc']:.3f}, "
                         f"gap/acc {m['gap/acc']:+.3f}")
            parts.append(f"{t.trial_id} ({_params(t)}): {what}, {pace.age_s:.0f} s")
        pending = max(0, self.total - self.done - len(running))
        starting = sum(t.status == "PENDING" for t in trials)  # created, waiting for a Ray worker
        est = self.estimate = time_left(paces, pending, self.slots, list(self.paces.values()))
        left = f", about {self._clock(est)} left" if est is not None and self.done < self.total else ""
        # Counts and time left first: a terminal cuts the status line at its width.
        return (f"[progress {self._clock(now - self.t0)}] {self.done}/{self.total} done, {len(running)} running"
                + (f", {starting} starting" if starting else "") + left + (": " + "; ".join(parts) if parts else ""))

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
