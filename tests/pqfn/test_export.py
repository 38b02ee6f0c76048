"""pqfn export: ONNX outputs match PyTorch's on real (synthetic) scans; an altered bundle is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pqfn.bundle import WEIGHTS_FILE, load_bundle
from pqfn.cli import main
from pqfn.data import Dataset
from tests.pqfn.bundles import PRIORS, make_bundle

# fp32 on both sides; the graphs differ only in operator order (measured max |diff| ~1e-6 on logits)
ATOL_LOGITS, ATOL_PROBS = 1e-4, 1e-5


@pytest.mark.parametrize("model_name", ["resnet18", "resnet18_dense"])
def test_onnx_matches_pytorch_on_scans(tmp_path: Path, tiny_ds: Dataset, model_name: str) -> None:
    import onnxruntime as ort

    folder = make_bundle(tmp_path / "b", decode_size=tiny_ds.images.shape[-1], model_name=model_name)
    onnx_file = tmp_path / "model.onnx"
    assert main(["export", str(folder), "--onnx", str(onnx_file)]) == 0
    note = json.loads((tmp_path / "model.preprocessing.json").read_text())
    assert note["input"]["shape"] == ["batch", 1, 32, 32] and note["priors"] == PRIORS
    b = load_bundle(folder)
    assert type(b.model).__name__ == ("DenseResNet18" if model_name == "resnet18_dense" else "ResNet")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for n in (1, 7):  # dynamic batch
        x = b.preprocessing.resize(tiny_ds.images[:n])  # (n, 1, 32, 32) uint8, real scans
        logits, probs = session.run(None, {"image": x.float().numpy()})
        with torch.no_grad():
            ref = b.model(b.preprocessing.normalise(x)).numpy()
        assert logits.shape == (n, 4)
        np.testing.assert_allclose(logits, ref, atol=ATOL_LOGITS, rtol=0)
        np.testing.assert_allclose(probs, b.probabilities(ref.astype(np.float64)), atol=ATOL_PROBS, rtol=0)


def test_export_refuses_an_altered_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_bundle(tmp_path / "b")
    with (folder / WEIGHTS_FILE).open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x01\x02\x03\x04")
    assert main(["export", str(folder), "--onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors was altered" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()
