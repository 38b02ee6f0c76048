"""Which device a trial trains on, from what a scheduler granted it (pqfn never imports the scheduler).

A trial that runs under a scheduler (Ray: tune_jobs.trainable) trains on exactly the GPUs it was
granted, and on the CPU when it was granted none, whatever the machine has: Ray 2.60 no longer hides
a node's GPUs from a 0-GPU task (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO defaults to false), so "is CUDA
available?" is not the question to ask there. A trial granted a GPU it cannot use refuses, in one
line, rather than train on the CPU unnoticed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from pqfn.errors import TrialError

# The oldest NVIDIA driver that runs each CUDA major version (NVIDIA's CUDA toolkit release notes, table 3).
MIN_DRIVER = {11: "450.80", 12: "525.60", 13: "580.65"}


def cuda_build() -> str:
    """torch and the CUDA it was built for, and the driver that needs; e.g. 'torch 2.14.1+cu130 (CUDA 13.0, needs
    an NVIDIA driver >= 580.65)'."""
    cuda = torch.version.cuda
    if not cuda:
        return f"torch {torch.__version__} (a CPU-only build)"
    need = MIN_DRIVER.get(int(cuda.split(".")[0]))
    return f"torch {torch.__version__} (CUDA {cuda}" + (f", needs an NVIDIA driver >= {need})" if need else ")")


def driver_version() -> str:
    """The loaded NVIDIA kernel driver's version, or 'none' (read from /proc: initialises no CUDA context)."""
    try:
        line = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    except (OSError, IndexError):
        return "none"
    words = [w for w in line.split() if w[:1].isdigit() and "." in w]
    return words[0] if words else "unknown"


def device_for_grant(requested: str, gpu_ids: Sequence[str]) -> torch.device:
    """The device of a trial granted `gpu_ids` (empty: no GPU), for trial.device = requested (auto/cpu/cuda).

    The granted GPUs are the process's visible devices (the caller sets CUDA_VISIBLE_DEVICES to them before
    CUDA starts), so the device is cuda:0. Raises TrialError (one line) when request and grant disagree or
    the granted GPU cannot be used.
    """
    ids = ",".join(str(i) for i in gpu_ids)
    if not gpu_ids:
        if requested == "cuda":
            raise TrialError("trial.device=cuda but the trial was granted no GPU (resources.gpus_per_trial is 0 "
                             "or the cluster has none); set resources.gpus_per_trial > 0, or trial.device=auto")
        return torch.device("cpu")
    if requested == "cpu":
        raise TrialError(f"trial.device=cpu but the trial was granted GPU {ids}, which would sit idle; "
                         "set resources.gpus_per_trial=0, or trial.device=auto")
    if not (torch.cuda.is_available() and torch.cuda.device_count() >= 1):
        raise TrialError(
            f"the trial was granted GPU {ids} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}) "
            f"but CUDA cannot start here: {cuda_build()}, NVIDIA driver {driver_version()}; "
            "refusing to train on the CPU instead (cluster/README.md, 'GPUs')"
        )
    return torch.device("cuda", 0)


def driver_device(requested: str) -> torch.device:
    """Where the sweep's driver evaluates the selected models: the GPU when it has one, else the CPU.

    trial.device says where trials train (on the workers); a CPU-only head still evaluates a CUDA-trained
    sweep (its fold models are loaded to the CPU), instead of failing after every trial has finished.
    """
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware (emulated bf16 on older GPUs is slower than fp32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False
