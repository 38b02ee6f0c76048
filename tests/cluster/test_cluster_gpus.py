"""`pqfn cluster up --gpus-per-node N`: each node gets its own slice of the machine's GPUs (declared GPUs on
this CPU machine: Ray names them after the node's CUDA_VISIBLE_DEVICES)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pqfn.errors import PqfnError
from tune_jobs import cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_node_devices_are_disjoint_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5,7")
    assert cluster.node_devices(2, 2) == [{"CUDA_VISIBLE_DEVICES": "2,3"}, {"CUDA_VISIBLE_DEVICES": "5,7"}]
    assert cluster.node_devices(3, 0) == [{}, {}, {}]
    with pytest.raises(PqfnError, match="3 nodes need 6 GPUs, this machine shows 4"):
        cluster.node_devices(3, 2)


# Each node runs one 1-GPU task pinned to it; the task reports Ray's grant and what CUDA would see.
PROBE = """
import json, os, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
ray.init(address={gcs!r}, logging_level="ERROR")
@ray.remote(num_gpus=1)
def probe():
    return [str(i) for i in ray.get_gpu_ids()], os.environ.get("CUDA_VISIBLE_DEVICES")
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
print(json.dumps(ray.get([probe.options(scheduling_strategy=On(n, soft=False)).remote() for n in nodes])))
"""


@pytest.mark.slow
def test_cluster_up_gives_each_node_its_own_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    folder = tmp_path / "cl"
    state = cluster.up(folder, workers=1, cpus_per_node=1, gpus_per_node=1, port=_free_port(),
                       dashboard_port=_free_port())
    try:
        env = os.environ | cluster.auth_env(Path(state["token_path"]))
        r = subprocess.run([sys.executable, "-c", PROBE.format(gcs=state["gcs_address"])], env=env,
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        grants = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        cluster.down(folder)
    # Before: both nodes declared "GPU 0" and a task on each was handed the same physical GPU.
    assert sorted(tuple(ids) for ids, _ in grants) == [("0",), ("1",)]
    assert all(cvd == ",".join(ids) for ids, cvd in grants)
