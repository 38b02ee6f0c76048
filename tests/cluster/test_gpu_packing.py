"""The GPU configs fill the cluster their headers describe, and the cluster files give every node shared
storage, the project's image and a CUDA matching the pinned torch build (no cluster needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pqfn.config import load_config
from tune_jobs.trainable import packing_note, trials_per_node

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"


def _launcher_gpu_nodes() -> tuple[float, float, int]:
    cfg = yaml.safe_load((CLUSTER / "gpu-cluster.yaml").read_text())
    gpu = cfg["available_node_types"]["gpu_worker"]
    return float(gpu["resources"]["CPU"]), float(gpu["resources"]["GPU"]), int(gpu["max_workers"])


def _kuberay_gpu_nodes(spec: dict[str, Any]) -> tuple[float, float, int]:
    (w,) = spec["workerGroupSpecs"]
    limits = w["template"]["spec"]["containers"][0]["resources"]["limits"]
    return float(limits["cpu"]), float(w["rayStartParams"]["num-gpus"]), int(w["maxReplicas"])


@pytest.mark.parametrize("config", ["paper.yaml", "paper-optuna.yaml"])
def test_paper_configs_fill_the_gpu_cluster(config: str) -> None:
    cfg = load_config(ROOT / "configs" / config)
    r = cfg.resources
    assert r.gpus_per_trial
    kuberay = [yaml.safe_load((CLUSTER / f"kuberay/{f}").read_text()) for f in ("raycluster.yaml", "rayjob.yaml")]
    clusters = [_launcher_gpu_nodes(), _kuberay_gpu_nodes(kuberay[0]["spec"]),
                _kuberay_gpu_nodes(kuberay[1]["spec"]["rayClusterSpec"])]
    for cpus, gpus, nodes in clusters:
        per_node = trials_per_node(r.cpus_per_trial, r.gpus_per_trial, cpus, gpus)
        assert per_node == round(gpus / r.gpus_per_trial)  # the CPUs asked for leave no GPU share unused
        assert per_node * r.cpus_per_trial == cpus  # and no CPU idle
        assert cfg.search.max_concurrent == per_node * nodes  # every GPU of the full cluster busy
        assert packing_note(r.cpus_per_trial, r.gpus_per_trial, [{"CPU": cpus, "GPU": gpus}]) is None


def test_a_cpu_share_that_strands_gpu_share_is_named() -> None:
    """The issue's case: 4 CPUs a trial on 8-CPU, 1-GPU nodes fits 2 trials where 0.25 GPU promises 4."""
    note = packing_note(4, 0.25, [{"CPU": 0.0}, {"CPU": 8.0, "GPU": 1.0}])
    assert note is not None and "fits 2 trial(s)" in note and "would fit 4" in note and "cpus_per_trial=2" in note
    assert trials_per_node(1, 0, 8, 1) == 8 and trials_per_node(2, 0.25, 8, 1) == 4


def _cuda_major_of_constraints() -> str:
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split() if "==" in line)
    return pins["nvidia-cuda-runtime"].split(".")[0]


def test_image_carries_the_pinned_cuda_build() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M)
    assert base is not None
    tag = re.search(r"-cu(\d+)", base.group(1))
    major = _cuda_major_of_constraints()
    # No second CUDA in the image, or one of the pinned torch's major version (torch brings its own runtime).
    assert tag is None or tag.group(1).startswith(major), base.group(1)
    assert f"startswith('{major}.')" in text  # the build fails if the installed torch is another CUDA build
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in text


def test_launcher_nodes_share_storage_and_sync_only_code() -> None:
    cfg = yaml.safe_load((CLUSTER / "gpu-cluster.yaml").read_text())
    init = " ".join(cfg["initialization_commands"])
    assert "mount -t nfs4" in init and ":/ /mnt/shared" in init  # the host mounts shared storage ...
    assert "-v /mnt/shared:/mnt/shared" in cfg["docker"]["run_options"]  # ... and the container sees it
    assert not any("mkdir -p /mnt/shared" in c for c in cfg["setup_commands"])  # not a local folder per node
    assert {"runs", "data", ".venv"} <= set(cfg["rsync_exclude"])
    commands = cfg["setup_commands"] + cfg["head_setup_commands"] + cfg["available_node_types"]["gpu_worker"][
        "worker_setup_commands"]
    assert all("--no-deps" in c for c in commands if "pip install" in c)  # no GBs of wheels per node
    assert any("driver_version" in c and "580" in c for c in commands)


def test_kuberay_autoscales_and_the_job_submitter_has_the_token() -> None:
    cl = yaml.safe_load((CLUSTER / "kuberay/raycluster.yaml").read_text())["spec"]
    job = yaml.safe_load((CLUSTER / "kuberay/rayjob.yaml").read_text())["spec"]
    for spec in (cl, job["rayClusterSpec"]):
        assert spec["enableInTreeAutoscaling"] is True  # else minReplicas/maxReplicas do nothing
        env = {e["name"]: e for e in spec["autoscalerOptions"]["env"]}
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    (sub,) = job["submitterPodTemplate"]["spec"]["containers"]
    env = {e["name"]: e for e in sub["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
