"""The cloud launcher YAML (Ray's own validation), KubeRay manifests and Dockerfile (schema checks)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"


def test_launcher_yaml_passes_rays_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER / "gpu-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu and gpu[0]["max_workers"] >= gpu[0]["min_workers"]
    assert cfg["docker"]["image"] == "REGISTRY/pqfn:0.1.0"  # the project's image: dependencies installed once
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c)
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_worker"]["max_workers"] = "many"
    with pytest.raises(Exception, match="is not of type 'integer'"):
        validate_config(prepare_config(bad))


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _check_raycluster_spec(spec: dict[str, Any]) -> None:
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    workers = spec["workerGroupSpecs"]
    assert workers and all(w["minReplicas"] <= w["replicas"] <= w["maxReplicas"] for w in workers)
    for w in workers:
        for c in w["template"]["spec"]["containers"]:
            assert c["resources"]["limits"]["nvidia.com/gpu"] == w["rayStartParams"]["num-gpus"]
    images = {c["image"] for c in _containers(spec)}
    assert len(images) == 1
    for c in _containers(spec):
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]  # the token comes from a secret, not the file
        assert any(m["mountPath"] == "/mnt/shared" for m in c["volumeMounts"])


def test_kuberay_raycluster_manifest() -> None:
    doc = yaml.safe_load((CLUSTER / "kuberay/raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    _check_raycluster_spec(doc["spec"])


def test_kuberay_rayjob_manifest() -> None:
    doc = yaml.safe_load((CLUSTER / "kuberay/rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert "-m tune_jobs.sweep configs/" in spec["entrypoint"] and "resources.shared_storage=true" in spec["entrypoint"]
    config = spec["entrypoint"].split()[3]
    assert (ROOT / config).exists()
    yaml.safe_load(spec["runtimeEnvYAML"])
    _check_raycluster_spec(spec["rayClusterSpec"])


def test_dockerfile_matches_pinned_ray() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-" in text
    assert "-c constraints.txt" in text and "auth_token" not in text.replace("RAY_AUTH_TOKEN_PATH", "")
