"""A trial killed mid-run keeps each epoch once in W&B: what W&B holds is read back from its offline files.

wandb-core writes an offline run's file only every 15 s and at finish, so a SIGKILLed process loses the
epochs it logged last. The restarted trial must log those again (from its checkpoint's history) and no
others. Real offline W&B, a real SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import wandb

from pqfn.config import load_config
from pqfn.wandb_files import epoch_steps, logged_steps, offline_runs, records, written
from pqfn.wandb_log import SERVICE_ENV, trial_run

ROOT = Path(__file__).resolve().parents[2]
RUN_ID = "t0restart"

# Log epochs 1..2 of a trial, say so, then hang until killed (or finish the run when told to).
WRITER = """
import sys, time
from pathlib import Path
from pqfn.config import load_config
from pqfn.wandb_log import trial_run
cfg = load_config(sys.argv[1], ["wandb.mode=offline"])
run = trial_run(cfg, {}, trial_name="t", trial_id=sys.argv[2], folder=Path(sys.argv[3]))
for e in (1, 2):
    run.log({"epoch": float(e), "gap/acc": 0.1 * e}, step=e)
if sys.argv[4] == "finish":
    run.finish()
print("logged", flush=True)
time.sleep(600)
"""


def _history(n: int) -> list[dict[str, float]]:
    return [{"epoch": float(e), "gap/acc": 0.1 * e} for e in range(1, n + 1)]


def _wandb_core_of(pid: int) -> list[int]:
    """The wandb-core service processes started by process `pid` (their command line has --pid <pid>)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"wandb-core") for a in args[:1]) and b"--pid" in args and str(pid).encode() in args:
            found.append(int(proc.name))
    return found


@pytest.fixture(autouse=True)
def _own_parent_service() -> Iterator[None]:
    """This test starts a W&B service of its own in the pytest process and ends it, leaving no address behind
    (a restored address of a service that is gone would send later tests' W&B runs nowhere)."""
    wandb.teardown()
    os.environ.pop(SERVICE_ENV, None)
    yield
    wandb.teardown()
    os.environ.pop(SERVICE_ENV, None)


def _first_start(tmp_path: Path, mode: str) -> None:
    cfg = ROOT / "configs/quickstart.yaml"
    # As under Ray or a notebook: this process already has a W&B service, and children inherit its address.
    parent = trial_run(load_config(cfg, ["wandb.mode=offline"]), {}, trial_name="p", trial_id="parent", folder=tmp_path / "p")
    assert parent is not None
    parent.finish()
    assert os.environ.get(SERVICE_ENV)
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(cfg), RUN_ID, str(tmp_path), mode], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "logged"
        time.sleep(0.5)
    finally:
        # The process, mid-run, and its wandb-core: that runs in a session of its own (so killpg misses it) and
        # would otherwise exit by itself a little later, possibly writing its buffer after the restart read.
        core = _wandb_core_of(p.pid)
        assert core, "the writer has no wandb-core of its own"
        os.killpg(p.pid, signal.SIGKILL)
        for pid in core:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        p.wait()
    time.sleep(1.0)  # W&B names a start's folder by the second: a real restart takes longer than that


@pytest.mark.slow  # starts and kills trial processes with W&B: seconds each
@pytest.mark.parametrize("mode", ["kill", "finish"])
def test_restart_logs_each_epoch_once(tmp_path: Path, mode: str) -> None:
    """Killed: the file holds nothing, the restart logs 1-3 from the checkpoint; finished: it holds 1-2."""
    _first_start(tmp_path, mode)
    held = logged_steps(tmp_path / "wandb", RUN_ID)
    # Killed before any flush: the file holds nothing. Finished: it holds both epochs.
    assert held == ({1, 2} if mode == "finish" else set())

    cfg = load_config(ROOT / "configs/quickstart.yaml", ["wandb.mode=offline"])
    run = trial_run(cfg, {}, trial_name="t", trial_id=RUN_ID, folder=tmp_path)
    assert run is not None
    run.replay(_history(2))  # the restored checkpoint's epochs
    run.log(_history(3)[-1], step=3)
    run.log(_history(3)[-1], step=3)  # a repeated epoch is not logged twice
    run.finish()
    assert epoch_steps(offline_runs(tmp_path)) == {RUN_ID: [1, 2, 3]}
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{RUN_ID}"))) == 2  # one run id, two starts


def test_reader_ignores_a_cut_tail(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs/quickstart.yaml", ["wandb.mode=offline"])
    run = trial_run(cfg, {}, trial_name="t", trial_id=RUN_ID, folder=tmp_path)
    assert run is not None
    run.replay(_history(3))
    run.finish()
    (f,) = (tmp_path / "wandb").glob(f"offline-run-*-{RUN_ID}/run-{RUN_ID}.wandb")
    whole = logged_steps(tmp_path / "wandb", RUN_ID)
    f.write_bytes(f.read_bytes()[:-40])  # a writer killed mid-record
    cut = logged_steps(tmp_path / "wandb", RUN_ID)
    assert whole == {1, 2, 3} and {1, 2} <= cut <= whole
    f.write_bytes(b"not a W&B file")
    assert logged_steps(tmp_path / "wandb", RUN_ID) == set()  # unreadable: every epoch is logged again


def test_finish_returns_once_the_offline_file_is_written(tmp_path: Path) -> None:
    """wandb's finish() only informs its core, which writes the file a moment later: read at once, the file was
    empty (seen in CI: a restart test found no run). TrialRun.finish returns once the exit record is on disk."""
    cfg = load_config(ROOT / "configs/quickstart.yaml", ["wandb.mode=offline"])
    run = trial_run(cfg, {}, trial_name="t", trial_id=RUN_ID, folder=tmp_path)
    assert run is not None
    run.replay(_history(200))
    path = Path(run.run.settings.sync_file)
    run.finish()
    kinds = [m.WhichOneof("record_type") for m in records(path)]  # read at once, no waiting
    assert written(path) and kinds[-1] == "exit" and "history" in kinds
