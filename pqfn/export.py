"""Export a bundle's model to ONNX for an inspection line: `pqfn export BUNDLE --onnx FILE`.

The graph takes the resized scan as float32 pixel values and does the rest itself:

    input  "image"          float32 (batch, 1, r, r), grayscale pixel values 0..255 after the resize
    output "logits"         float32 (batch, 4), raw (equal-prior) logits, classes A, B, C, D
    output "probabilities"  float32 (batch, 4), softmax of the logits, prior-adjusted when the bundle
                            applies its priors by default (logits + strength * log(priors))

The batch axis is dynamic. Decoding and resizing stay outside the graph (image formats and resamplers
differ per line); they are written to <FILE stem>.preprocessing.json next to the model and to the
model's metadata (key "pqfn").

Exporter: torch.onnx's TorchScript exporter (dynamo=False). Measured on a 2-core machine, it exports a
ResNet-18 in ~2 s where the dynamo exporter takes 5-17 s and needs onnxscript; both give the same
outputs. torch deprecates it; when a torch release drops it, pass dynamo=True and
dynamic_shapes=({0: torch.export.Dim("batch")},) instead, with onnxscript installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pqfn.bundle import MEAN, STD, Bundle, load_bundle
from pqfn.errors import PqfnError
from pqfn.io import check_not_on_inputs, check_output_paths, check_replaceable

DEFAULT_OPSET = 18


class _Deployable(nn.Module):
    """Normalisation + model + prior adjustment + softmax, as one graph."""

    def __init__(self, model: nn.Module, log_prior: np.ndarray | None):
        super().__init__()
        self.model = model
        # (1, classes) added to the logits; zeros when no adjustment applies
        shift = np.zeros(4) if log_prior is None else log_prior
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float32)[None, :])

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model((image / 255.0 - MEAN) / STD)
        return logits, torch.softmax(logits + self.shift, dim=-1)


def preprocessing_note(b: Bundle, onnx_file: Path, opset: int) -> dict[str, Any]:
    r = b.preprocessing.resolution
    return {
        "model": onnx_file.name,
        "opset": opset,
        "bundle": str(b.folder),
        "bundle_sha256": b.info["files"],
        "data_fingerprint": b.fingerprint,
        "classes": list(b.classes),
        "input": {"name": "image", "dtype": "float32", "shape": ["batch", 1, r, r],
                  "values": "grayscale pixel values 0..255 after the resize (normalisation is inside the graph)"},
        "outputs": {
            "logits": "raw logits (batch, classes), trained at equal class priors",
            "probabilities": ("softmax(logits + prior_strength * log(priors))" if b.adjusts else "softmax(logits)"),
        },
        "priors": None if b.priors is None else b.priors.tolist(),
        "prior_strength": b.prior_strength if b.adjusts else 0.0,
        "preprocessing": b.preprocessing.describe()["steps"][:3],
        "normalisation_in_graph": f"(image / 255 - {MEAN}) / {STD}",
    }


def opset_range() -> tuple[int, int]:
    """The opsets torch's TorchScript exporter writes."""
    from torch.onnx import _constants

    return int(_constants.ONNX_MIN_OPSET), int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)


def check_opset(opset: int) -> None:
    lo, hi = opset_range()
    if not lo <= opset <= hi:
        raise PqfnError(f"--opset {opset}: this torch exports ONNX opsets {lo} to {hi}; the default is {DEFAULT_OPSET}")


@contextlib.contextmanager
def _captured_fds() -> Iterator[Path]:
    """Send what C++ code prints to fds 1 and 2 (the exporter's TorchScript IR dumps, thousands of lines on a
    failure) into a file; the caller turns a failure into one line."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.NamedTemporaryFile(prefix="pqfn-export-", suffix=".log", delete=False) as log:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield Path(log.name)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
        finally:
            for fd in saved:
                os.close(fd)
            Path(log.name).unlink(missing_ok=True)


def note_path(onnx_file: Path) -> Path:
    return onnx_file.with_name(onnx_file.stem + ".preprocessing.json")


def _is_our_onnx(path: Path) -> bool:
    """An ONNX file that pqfn export wrote: its metadata has the key "pqfn" (weights are not read)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - anything unreadable as ONNX is not ours
        return False
    return any(p.key == "pqfn" for p in proto.metadata_props)


def _is_our_note(path: Path) -> bool:
    try:
        note = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(note, dict) and {"model", "bundle_sha256", "normalisation_in_graph"} <= note.keys()


def export_onnx(bundle: Bundle | Path | str, out: Path | str, *, opset: int = DEFAULT_OPSET,
                overwrite: bool = False) -> Path:
    """Verify the bundle, export its model to `out` (ONNX) with a dynamic batch, write the preprocessing
    note beside it; returns the ONNX path. The bundle's checks refuse altered or missing files.

    Both files are checked before any work: neither may land in or on the bundle, and an existing one is
    replaced only with overwrite and only when pqfn export wrote it (the ONNX metadata key "pqfn"; the note's
    keys). Both are written aside and renamed into place only once both are complete.
    """
    import onnx

    out = Path(out)
    note_file = note_path(out)
    check_opset(opset)
    folder = bundle.folder if isinstance(bundle, Bundle) else Path(bundle)
    check_output_paths(files={"--onnx": out, "preprocessing note": note_file}, create_parents=True)
    check_not_on_inputs({"--onnx": out, "preprocessing note": note_file}, [("bundle", folder)])
    check_replaceable("--onnx", out, overwrite, mine=out.is_file() and _is_our_onnx(out),
                      what="an ONNX file that pqfn export wrote (metadata key 'pqfn')")
    check_replaceable("preprocessing note", note_file, overwrite, mine=_is_our_note(note_file),
                      what="the preprocessing JSON that pqfn export wrote beside its ONNX file")
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    log_prior = np.log(b.priors) * b.prior_strength if (b.adjusts and b.priors is not None) else None
    net = _Deployable(b.model.float().eval(), log_prior).eval()
    r = b.preprocessing.resolution
    example = torch.full((2, 1, r, r), 128.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp_note = note_file.with_name(f".{note_file.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings(), _captured_fds():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation note
            try:
                torch.onnx.export(
                    net, (example,), str(tmp), input_names=["image"], output_names=["logits", "probabilities"],
                    dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "probabilities": {0: "batch"}},
                    opset_version=opset, dynamo=False,
                )
            except Exception as e:  # noqa: BLE001 - any exporter failure is reported as one line
                raise PqfnError(f"ONNX export of {b.folder} failed at opset {opset} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
        note = preprocessing_note(b, out, opset)
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = "pqfn", json.dumps(note)
        onnx.save(proto, str(tmp))
        tmp_note.write_text(json.dumps(note, indent=2))
        tmp.replace(out)
        tmp_note.replace(note_file)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_note.unlink(missing_ok=True)
    return out
