"""The sweep's console: Tune's unactionable driver warnings are dropped, every other warning passes."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pqfn.config import DataConfig
from tests.tune_jobs.conftest import sweep_yaml
from tune_jobs.sweep import quiet_ray_noise

ROOT = Path(__file__).resolve().parents[2]


def _passes(logger: str, msg: str) -> bool:
    lg = logging.getLogger(logger)
    return bool(lg.filter(lg.makeRecord(logger, logging.WARNING, __file__, 1, msg, (), None)))


def test_ray_noise_is_dropped_and_real_warnings_kept() -> None:
    quiet_ray_noise()
    quiet_ray_noise()  # idempotent: one filter per logger
    util, state = "ray.tune.utils.util", "ray.tune.execution.experiment_state"
    assert len(logging.getLogger(util).filters) == 1
    assert not _passes(util, "The `process_trial_result` operation took 0.612 s, which may be a performance bottleneck.")
    assert not _passes(util, "Processing trial results took 0.7 s, which may be a performance bottleneck. Please "
                             "consider reporting results less frequently to Ray Tune.")
    assert not _passes(state, "Experiment state snapshotting has been triggered multiple times in the last 5.0 seconds")
    assert _passes(state, "Saving the experiment state (which holds a global view of trial statuses and is used to "
                          "restore the experiment) took ~40.00 seconds, which may be a performance bottleneck.")
    assert _passes(util, "Something else went wrong")


# Every line a sweep prints, by shape (numbers, ids and wording inside a line are free). A line matching
# none is noise a user cannot act on (Ray's token notice, Optuna's "A new study created in RDB", ...).
LINE_SHAPES = [
    r"pqfn: (generating|decoding) .*",
    r"sweep \S+: \w+ search, \d+ trial\(s\), \d+ pool / \d+ held-out images -> .+",
    r"\[progress \d+:\d\d\] \d+/\d+ done, \d+ running(, \d+ starting)?(, about \d+:\d\d left)?(: .+)?",
    r"\[\d+/\d+\] trial \S+ \(.*\): (completed|stopped early|FAILED .*)(; .*)?",
    r"",
    r"(trials|selected|held-out test|time|results|no configuration selected)\b.*",
    r"  \S.*",  # the summary's indented detail lines
]


@pytest.mark.slow
def test_a_sweep_prints_only_lines_a_user_can_act_on(tmp_path: Path, tiny_data_cfg: DataConfig) -> None:
    """The sweep command as a user runs it (its own private Ray, Optuna, W&B offline, evaluation on)."""
    cfg = sweep_yaml(tmp_path, tiny_data_cfg, "con", (
        "search:\n  type: optuna\n  num_samples: 2\n  max_concurrent: 2\n  progress_every_s: 1\n"
        "  space: {trial.resolution: {choice: [32, 40]}}\nwandb: {mode: offline, project: pqfn-test}\n"))
    out = subprocess.run([sys.executable, "-m", "tune_jobs.sweep", str(cfg), "trial.epochs=4"], capture_output=True,
                         text=True, timeout=900, cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(ROOT)})
    lines = (out.stdout + out.stderr).splitlines()
    assert out.returncode == 0, "\n".join(lines[-30:])
    noise = [ln for ln in lines if not any(re.fullmatch(s, ln) for s in LINE_SHAPES)]
    assert noise == []
    verdict = json.loads((tmp_path / "runs/con/final/evaluation.json").read_text())["verdict"]
    assert sum(verdict in ln for ln in lines) == 1  # the held-out verdict, once
    for ln in lines:  # a running trial past its first 15 s says where it is inside its epoch
        if ln.startswith("[progress ") and ": " in ln:
            for part in re.split(r"; (?=\S+ \()", ln.split(": ", 1)[1]):  # one part per running trial
                age = re.search(r", (\d+) s$", part)
                if age and int(age.group(1)) > 15:
                    assert re.search(r"epoch \d+/\d+ step \d+/\d+", part), ln


def test_pqfn_synth_starts_without_ray_or_torch(tmp_path: Path) -> None:
    # The installed `pqfn` command (tune_jobs.cli) imports Ray, torch and timm only for the commands that use
    # them: `pqfn synth` on a 2-core machine spent about 6 of its 26 s importing them before session 11.
    code = ("import sys; from tune_jobs.cli import main; "
            f"rc = main(['synth', {str(tmp_path / 'd')!r}, '--ag', '1', '--nipdau', '0', '--cu', '0', '--image-size', '64']); "
            "print(rc, sorted(m for m in ('ray', 'torch', 'timm', 'wandb', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 []"
    assert (tmp_path / "d" / "manifest.csv").is_file()


def test_a_stopped_workers_sigterm_exit_leaves_no_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray's SIGTERM handler raises SystemExit; landing inside a weakref callback it became "Exception ignored in:
    # ... SystemExit: 1" with a traceback on the sweep's console. Other unraisable exceptions still get through.
    import weakref

    from tune_jobs.trainable import quiet_sigterm_exit

    seen: list[type[BaseException]] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(type(u.exc_value)))
    quiet_sigterm_exit()
    installed = sys.unraisablehook
    quiet_sigterm_exit()  # once per worker process, however many trials it runs
    assert sys.unraisablehook is installed

    class Obj:
        pass

    def raising(exc: BaseException) -> object:
        def callback(_ref: object) -> None:
            raise exc
        obj = Obj()
        ref = weakref.ref(obj, callback)
        del obj  # the callback runs here and its exception is unraisable
        return ref

    raising(SystemExit(1))
    raising(ValueError("a real problem"))
    assert seen == [ValueError]
