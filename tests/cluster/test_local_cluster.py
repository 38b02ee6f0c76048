"""A real local two-node Ray cluster: submit a sweep as a Ray Job; lose a node mid-sweep."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pqfn.config import DataConfig, load_config
from pqfn.data import Dataset
from tests.tune_jobs.conftest import sweep_yaml
from tune_jobs import cluster

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True


def test_submit_to_local_two_node_cluster(tmp_path: Path, tiny_data_cfg: DataConfig, tiny_ds: Dataset) -> None:
    folder = tmp_path / "cl"
    state = cluster.up(folder, workers=1, cpus_per_node=1, port=_free_port(), dashboard_port=_free_port())
    try:
        assert state["nodes"] == 2 and state["dashboard"].startswith("http://127.0.0.1:")
        assert oct((folder / "auth_token").stat().st_mode)[-3:] == "600"
        # The token goes to the submitting process only (Ray caches a token per process, so this test's
        # own process must not pick it up): `pqfn submit` runs as a user would run it.
        env = os.environ | cluster.auth_env(Path(state["token_path"]))
        cfg = sweep_yaml(tmp_path, tiny_data_cfg, "job", (
            "search:\n  type: grid\n  max_concurrent: 2\n  space: {trial.resolution: {choice: [32, 40]}}\n"
            "evaluate: {enabled: false}\nwandb: {mode: disabled}\n"))
        pqfn = str(Path(sys.executable).parent / "pqfn")
        r = subprocess.run([pqfn, "submit", str(cfg), "--address", state["dashboard"], "--follow"],
                           env=env, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0 and "SUCCEEDED" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
        run = tmp_path / "runs/job"
        rows = list(csv.DictReader((run / "trials.csv").open()))
        assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
        assert len({r["node_id"] for r in rows}) == 2  # one trial on each node (1 CPU each)
        assert (run / "selection.json").exists()
    finally:
        pids = cluster.down(folder)
    time.sleep(1)
    assert pids == state["pids"] and all(_dead(p) for p in pids)


def _results(run: Path) -> list[dict[str, Any]]:
    import json

    out = []
    for f in (run / "tune").glob("*/result.json"):
        lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        out.extend(lines)
    return out


def test_node_loss_mid_sweep_resumes_from_checkpoint(tmp_path: Path, tiny_data_cfg: DataConfig, tiny_ds: Dataset) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from tune_jobs.sweep import run_sweep

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = c.add_node(num_cpus=1)
    ray.init(address=c.address, logging_level="WARNING")
    try:
        cfg = load_config(sweep_yaml(tmp_path, tiny_data_cfg, "loss", (
            "search:\n  type: grid\n  max_concurrent: 2\n  max_failures: 3\n"
            "  space: {trial.resolution: {choice: [32, 40]}}\nevaluate: {enabled: false}\nwandb: {mode: disabled}\n")),
            ["trial.epochs=6"])
        out: dict[str, Any] = {}
        t = threading.Thread(target=lambda: out.setdefault("summary", run_sweep(cfg, log=lambda *a: None)))
        t.start()
        run = tmp_path / "runs/loss"
        deadline = time.time() + 240
        while not any(r.get("node_id") == worker.node_id and r.get("epoch", 0) >= 2 for r in _results(run)):
            assert t.is_alive() and time.time() < deadline, "no trial checkpointed on the worker node in time"
            time.sleep(0.2)
        c.remove_node(worker)  # the node dies mid-trial
        c.add_node(num_cpus=1)  # somewhere else to go on
        t.join(timeout=400)
        assert not t.is_alive()
        rows = list(csv.DictReader((run / "trials.csv").open()))
        assert len(rows) == 2 and all(r["status"] == "completed" and r["epoch"] == "6" for r in rows), rows
        moved = [r for r in rows if float(r["restored_from"]) >= 1]
        assert moved, "the affected trial did not resume from its checkpoint"
        assert all(r["node_id"] != worker.node_id for r in moved)
    finally:
        ray.shutdown()
        c.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
