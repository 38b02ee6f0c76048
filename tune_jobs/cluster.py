"""A local multi-node Ray cluster on one workstation: `pqfn cluster up/down/env`.

A head and N worker nodes, each a `ray start --block` process in its own session, with explicit
ports, a private temp dir, the dashboard bound to 127.0.0.1, and Ray 2.60 token authentication
(a token file of its own, passed to every process through RAY_AUTH_TOKEN_PATH). `down` stops
exactly the process groups `up` started, never a machine-wide `ray stop`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pqfn.errors import PqfnError
from pqfn.io import atomic_write_text, read_json

STATE = "cluster.json"
# What `up` writes and `env`, `down` and `pqfn submit` read; anything else in the file is ignored.
STATE_KEYS: dict[str, type] = {"pids": list, "gcs_address": str, "dashboard": str, "token_path": str, "python": str}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def auth_env(token_path: Path) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def read_state(folder: Path) -> dict[str, Any] | None:
    """The cluster.json that `up` wrote, or None when there is none; a damaged one is one PqfnError line."""
    f = folder / STATE
    if not f.exists():
        return None
    fix = ("delete it and run `pqfn cluster up` again (stop any Ray processes it started yourself: "
           "`ray stop` would stop every Ray cluster of this user)")
    try:
        state = read_json(f, "pqfn cluster state file")
    except PqfnError as e:
        raise PqfnError(f"{e}; {fix}") from None
    bad = [k for k, t in STATE_KEYS.items() if not isinstance(state, dict) or not isinstance(state.get(k), t)]
    if not bad and not all(isinstance(p, int) for p in state["pids"]):
        bad = ["pids"]
    if bad:
        raise PqfnError(f"{f}: lacks or has a wrong {', '.join(bad)}; expected the state written by `pqfn cluster up`; {fix}")
    return dict(state)


def _node_env(token: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    # The cluster's own interpreter first on PATH: a job entrypoint's bare `python` then finds it.
    return os.environ | auth_env(token) | {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def _alive_nodes(gcs: str, env: dict[str, str]) -> int:
    code = (f"import ray; ray.init(address={gcs!r}, logging_level='ERROR'); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else 0


def visible_gpus() -> list[str]:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES names them (its own list when set, else 0..n-1 from NVML)."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return [d.strip() for d in cvd.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def node_devices(nodes: int, gpus_per_node: int) -> list[dict[str, str]]:
    """Each node's CUDA_VISIBLE_DEVICES: disjoint slices of this machine's GPUs (Ray then grants each node's
    trials only its own). A machine without GPUs (a CPU machine declaring GPUs to test scheduling) gets the
    names 0..nodes*gpus_per_node-1; one with too few GPUs is refused."""
    if gpus_per_node <= 0:
        return [{} for _ in range(nodes)]
    need = nodes * gpus_per_node
    have = visible_gpus()
    if not have:
        have = [str(i) for i in range(need)]
    if len(have) < need:
        raise PqfnError(f"--gpus-per-node {gpus_per_node}: {nodes} nodes need {need} GPUs, this machine shows "
                        f"{len(have)} ({','.join(have)}); lower --gpus-per-node or --workers")
    return [{"CUDA_VISIBLE_DEVICES": ",".join(have[n * gpus_per_node:(n + 1) * gpus_per_node])} for n in range(nodes)]


def up(folder: Path, *, workers: int = 1, cpus_per_node: int = 1, gpus_per_node: int = 0, port: int = 6390,
       dashboard_port: int = 8265, timeout: float = 120.0) -> dict[str, Any]:
    """Start a head and `workers` worker nodes on 127.0.0.1; returns the state written to cluster.json."""
    folder = folder.resolve()
    old = read_state(folder)
    if old and any(_alive(p) for p in old["pids"]):
        raise PqfnError(f"{folder}: a local cluster is already up (pids {old['pids']}); run `pqfn cluster down` first")
    folder.mkdir(parents=True, exist_ok=True)
    token = folder / "auth_token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    # Ray's socket paths must stay short (AF_UNIX limit), so the temp dir lives under /tmp.
    temp = Path(tempfile.gettempdir()) / f"pqfn-ray-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}"
    env = _node_env(token)
    devices = node_devices(1 + workers, gpus_per_node)
    ray_exe = str(Path(sys.executable).parent / "ray")
    common = ["--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus_per_node}",
              f"--num-gpus={gpus_per_node}"]
    gcs = f"127.0.0.1:{port}"
    pids: list[int] = []
    try:
        log = (folder / "head.log").open("w")
        head = subprocess.Popen(
            [ray_exe, "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard_port}", "--include-dashboard=true", f"--temp-dir={temp}", *common],
            env=env | devices[0], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        pids.append(head.pid)
        deadline = time.time() + timeout
        while _alive_nodes(gcs, env) < 1:
            if head.poll() is not None or time.time() > deadline:
                raise PqfnError(f"the head node did not start; see {folder / 'head.log'}")
            time.sleep(1)
        for i in range(workers):
            wlog = (folder / f"worker{i + 1}.log").open("w")
            w = subprocess.Popen([ray_exe, "start", f"--address={gcs}", *common], env=env | devices[i + 1], stdout=wlog,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            pids.append(w.pid)
        while _alive_nodes(gcs, env) < 1 + workers:
            if time.time() > deadline:
                raise PqfnError(f"worker nodes did not join within {timeout:.0f} s; see {folder}/worker*.log")
            time.sleep(1)
    except BaseException:
        _stop(pids)
        raise
    state = {"pids": pids, "gcs_address": gcs, "dashboard": f"http://127.0.0.1:{dashboard_port}",
             "token_path": str(token), "temp_dir": str(temp), "python": sys.executable, "nodes": 1 + workers}
    atomic_write_text(folder / STATE, json.dumps(state, indent=2))  # never half-written, even if killed here
    return state


def _stop(pids: list[int], grace: float = 20.0) -> list[int]:
    """SIGTERM each started process group (a `ray start --block` stops its node's processes), then SIGKILL."""
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.3)
        for p in pids:  # reap our own children so they do not linger as zombies
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p, os.WNOHANG)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    return pids


def down(folder: Path) -> list[int]:
    folder = folder.resolve()
    state = read_state(folder)
    if state is None:
        raise PqfnError(f"{folder}: no local cluster state ({STATE}); nothing to stop")
    stopped = _stop(state["pids"])
    (folder / STATE).unlink()
    return stopped


def check_address(address: str | None, timeout_s: float = 3.0) -> None:
    """`pqfn sweep --address`, checked before the sweep folder is made and before ray.init: a dashboard URL
    (which Ray rejects with a ValueError) or an address where nothing listens (where Ray retries "Failed to
    connect to GCS" for minutes) is one line naming the address and what to do."""
    if not address or address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise PqfnError(f"--address {address}: is a dashboard (Ray Jobs) address; `pqfn sweep --address` joins a "
                        "cluster's GCS, HOST:PORT (e.g. 127.0.0.1:6390, the gcs_address `pqfn cluster up` prints), "
                        f"or submit the sweep to the dashboard with `pqfn submit CONFIG --address {address}`")
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PqfnError(f"--address {address}: expected HOST:PORT of a Ray cluster's GCS (e.g. 127.0.0.1:6390), "
                        "or leave it out to start a private local Ray")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        raise PqfnError(f"--address {address}: nothing answers there ({why} within {timeout_s:g} s); start the "
                        "cluster first (`pqfn cluster up`, or `ray start --head`) or check the address, or leave "
                        "--address out to run on a private local Ray") from None
