"""Device rules that need no GPU: where the driver evaluates, bf16 only where it is native, the build line."""

from __future__ import annotations

import pytest
import torch

from pqfn.config import TrialConfig
from pqfn.device import cuda_build, driver_device, native_bf16
from pqfn.trial import use_bf16


def test_a_cuda_sweep_evaluates_on_a_cpu_only_head(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert driver_device("cuda") == torch.device("cpu")  # before: pick_device raised after every trial ended
    assert driver_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert driver_device("auto") == torch.device("cuda")
    assert driver_device("cpu") == torch.device("cpu")


def test_bf16_auto_only_where_the_gpu_computes_it_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[bool] = []

    def supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return including_emulation  # a T4-class GPU: bf16 only emulated

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert native_bf16(torch.device("cuda")) is False and asked == [False]
    assert use_bf16(TrialConfig(), torch.device("cuda")) is False
    assert use_bf16(TrialConfig(bf16=True), torch.device("cuda")) is True  # an explicit request stands


def test_build_line_names_the_driver_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert "CUDA 13.0, needs an NVIDIA driver >= 580" in cuda_build()
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in cuda_build()
