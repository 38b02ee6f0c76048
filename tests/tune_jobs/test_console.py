"""The sweep's console: Tune's unactionable driver warnings are dropped, every other warning passes."""

from __future__ import annotations

import logging

from tune_jobs.sweep import quiet_ray_noise


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
