"""The model bundle: one folder that says everything needed to use a trained model on new scans.

    <bundle>/model.safetensors   weights (a single timm model, or a FoldEnsemble's members.<k>.* keys)
    <bundle>/bundle.json         format version, classes, architecture, preprocessing, the resolved trial
                                 config, class priors and whether to apply them, the training data's
                                 fingerprint, held-out metrics, package versions, and the sha256 of every
                                 file (and of bundle.json's own content)

Loading rebuilds the exact model and preprocessing. A bundle whose files are missing or altered (sha256
mismatch), or whose format version this pqfn does not read, is refused with one PqfnError line: a model
that silently runs with other weights or another resolution is worse than no model.

Prior adjustment (pqfn.ensemble): the model trains on a class-balanced pool (equal priors); at the natural
class frequencies `priors`, adjusted logits = logits + strength * log(priors) and the adjusted class
probabilities are their softmax. The bundle stores the priors, the strength, and whether to apply them by
default (`prior_adjust`); raw probabilities are always available.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pqfn.config import CLASSES, TrialConfig
from pqfn.data import REDUCTIONS, Dataset, resize_uint8
from pqfn.errors import ConfigError, PqfnError, TrialError
from pqfn.io import read_json, read_safetensors
from pqfn.trial import MEAN, STD

FORMAT = "pqfn-bundle"
FORMAT_VERSION = 1  # bump when a reader of the old layout would misread the new one
WEIGHTS_FILE = "model.safetensors"
BUNDLE_FILE = "bundle.json"


@dataclass(frozen=True)
class Preprocessing:
    """From an image file to the model's input, exactly as in training (pqfn.data, pqfn.trial)."""

    decode_size: int  # every image is first decoded to (decode_size, decode_size) uint8 grayscale
    resolution: int  # then resized to the model's input size
    reduce: str = "bilinear"  # how (trial.reduce; bundles written before it existed: bilinear)

    def resize(self, images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """Decoded (N, decode_size, decode_size) uint8 -> (N, 1, r, r) uint8, the resize of TrialImages."""
        return resize_uint8(torch.from_numpy(np.ascontiguousarray(images)).to(device), self.resolution, self.reduce)

    @staticmethod
    def normalise(x_uint8: torch.Tensor) -> torch.Tensor:
        """(N, 1, r, r) uint8 -> float32 model input."""
        return (x_uint8.float() / 255.0 - MEAN) / STD

    def describe(self) -> dict[str, Any]:
        """For bundle.json and the ONNX note: what an inspection line must reproduce."""
        return {
            "decode_size": self.decode_size,
            "resolution": self.resolution,
            "reduce": self.reduce,
            "mean": MEAN,
            "std": STD,
            "steps": [
                "read the image; 16-bit (I;16) scaled by 255/65535, float images min-max scaled to 0..255, "
                "RGB/palette converted to 8-bit luminance (PIL 'L')",
                f"resize to {self.decode_size}x{self.decode_size} with PIL bilinear (reducing_gap=3) "
                "when the size differs (pqfn.data.decode_image)",
                (f"resize to {self.resolution}x{self.resolution}: when smaller than {self.decode_size}, each pixel "
                 "the maximum of its window (torch.nn.functional.adaptive_max_pool2d); otherwise antialiased "
                 "bilinear interpolation (torch.nn.functional.interpolate, align_corners=False)"
                 if self.reduce == "max" else
                 f"resize to {self.resolution}x{self.resolution} with antialiased bilinear interpolation "
                 "(torch.nn.functional.interpolate, align_corners=False)") + ", round to uint8",
                f"x = (pixel / 255 - {MEAN}) / {STD}, float32, shape (N, 1, {self.resolution}, {self.resolution})",
            ],
        }


@dataclass(frozen=True)
class Bundle:
    folder: Path
    model: nn.Module  # eval mode, float32, on the CPU; outputs logits (N, classes)
    trial: TrialConfig
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    priors: np.ndarray | None  # (classes,) natural class frequencies, or None
    prior_adjust: bool  # apply the prior adjustment by default
    prior_strength: float  # logits + strength * log(priors)
    fingerprint: str  # of the training data (data_fingerprint)
    metrics: dict[str, Any]
    versions: dict[str, str]
    info: dict[str, Any]  # the whole bundle.json

    @property
    def adjusts(self) -> bool:
        """Whether probabilities are prior-adjusted by default."""
        return self.prior_adjust and self.priors is not None and self.prior_strength != 0

    def adjust(self, logits: np.ndarray) -> np.ndarray:
        """Prior-adjusted logits (N, classes); the raw logits when the bundle has no priors."""
        from pqfn.ensemble import adjust

        return logits if self.priors is None else adjust(logits, self.priors, self.prior_strength)

    def probabilities(self, logits: np.ndarray, adjust: bool | None = None) -> np.ndarray:
        """Class probabilities (N, classes): prior-adjusted when `adjust` (default: as the bundle says)."""
        from pqfn.ensemble import softmax

        return softmax(self.adjust(logits) if (self.adjusts if adjust is None else adjust) else logits)


def data_fingerprint(ds: Dataset, masks: bool = False) -> str:
    """sha256 of the decoded images, labels and package ids, in row order: the same decoded data -> the same
    fingerprint, whichever folder or cache it came from. Pass the rows the model was trained on. With `masks`
    (the model's dense head trained on the true masks, trial.mask_loss > 0) the decoded masks count too: other
    masks, another fingerprint; the data set must hold them (pqfn.data.with_masks)."""
    h = hashlib.sha256(b"pqfn-data-v1")
    h.update(json.dumps(list(ds.images.shape)).encode())
    h.update(np.ascontiguousarray(ds.images).tobytes())
    h.update(np.ascontiguousarray(ds.labels, dtype=np.int64).tobytes())
    h.update("\n".join(str(p) for p in ds.package_ids).encode())
    if masks:
        if ds.masks is None:
            raise ValueError("data_fingerprint(masks=True) needs a data set with its masks (pqfn.data.with_masks)")
        h.update(b"masks")
        h.update(np.ascontiguousarray(ds.masks, dtype=np.uint8).tobytes())
    return "sha256:" + h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _content_sha(info: Mapping[str, Any]) -> str:
    """sha256 of bundle.json's content without its own checksum (canonical JSON)."""
    body = {k: v for k, v in info.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("pqfn", "torch", "timm", "numpy", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def _jsonable(x: Any) -> Any:
    """Metrics as plain JSON (numpy scalars and arrays become numbers and lists)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return x


def _members(model: nn.Module) -> int:
    """0 for a single timm model; the member count for a pqfn.ensemble.FoldEnsemble."""
    from pqfn.ensemble import FoldEnsemble

    return len(model.members) if isinstance(model, FoldEnsemble) else 0


def _build(name: str, members: int) -> nn.Module:
    from pqfn.ensemble import FoldEnsemble
    from pqfn.model import build_model

    if members:
        return FoldEnsemble([build_model(name) for _ in range(members)])
    return build_model(name)


def write_bundle(
    folder: Path, cfg: TrialConfig, model: nn.Module, *, priors: Sequence[float] | np.ndarray | None,
    prior_adjust: bool, fingerprint: str, metrics: Mapping[str, Any], decode_size: int,
    prior_strength: float = 1.0, overwrite: bool = False,
) -> Path:
    """Write a bundle folder (atomically: a half-written bundle never appears under `folder`) and return it.

    model: a timm model built by pqfn.model.build_model(cfg.model), or a pqfn.ensemble.FoldEnsemble of them.
    priors: natural class frequencies (A, B, C, D) for the prior adjustment, or None.
    prior_adjust: whether predictions apply logits + prior_strength * log(priors) by default.
    decode_size: the data set's decode size (data.decode_size); the model's input size is cfg.resolution.
    An existing folder is refused unless overwrite.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise PqfnError(f"{folder}: already exists; pass overwrite=True (--overwrite) to replace the bundle")
    if priors is not None:
        p = np.asarray(priors, np.float64)
        if p.shape != (len(CLASSES),) or (p <= 0).any() or abs(p.sum() - 1) > 1e-3:
            raise PqfnError(f"bundle priors {p.tolist()}: expected {len(CLASSES)} positive frequencies summing to 1")
    members = _members(model)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    try:  # refuse now what load_bundle could not rebuild later
        _build(cfg.model, members).load_state_dict(state)
    except RuntimeError as e:
        raise PqfnError(f"bundle: the model does not fit {cfg.model} ({str(e).splitlines()[0]})") from None

    tmp = folder.with_name(folder.name + ".tmp-bundle")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / WEIGHTS_FILE))
    pre = Preprocessing(decode_size, cfg.resolution, cfg.reduce)
    info: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "classes": list(CLASSES),
        "architecture": {"timm_model": cfg.model, "in_chans": 1, "num_classes": len(CLASSES),
                         "ensemble_members": members,
                         "output": "logits" if not members else "log of the members' mean class probability"},
        "preprocessing": pre.describe(),
        "trial": cfg.model_dump(mode="json"),
        "priors": None if priors is None else [float(v) for v in priors],
        "prior_adjust": bool(prior_adjust),
        "prior_strength": float(prior_strength),
        "prior_rule": "adjusted logits = logits + prior_strength * log(priors); probabilities = softmax",
        "data_fingerprint": fingerprint,
        "metrics": _jsonable(metrics),
        "versions": _versions(),
        "files": {WEIGHTS_FILE: _sha256(tmp / WEIGHTS_FILE)},
    }
    info["content_sha256"] = _content_sha(info)
    (tmp / BUNDLE_FILE).write_text(json.dumps(info, indent=2))
    if folder.exists():
        old = folder.with_name(folder.name + ".old-bundle")
        folder.replace(old)
        tmp.replace(folder)
        shutil.rmtree(old)
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp.replace(folder)
    return folder


def _refuse(folder: Path, why: str) -> PqfnError:
    return PqfnError(f"{folder}: not a usable pqfn bundle: {why}")


def read_info(folder: Path) -> dict[str, Any]:
    """bundle.json, checked: format, version, its own checksum, and every listed file's sha256."""
    folder = Path(folder)
    if not folder.is_dir():
        raise _refuse(folder, "no such folder")
    if not (folder / BUNDLE_FILE).is_file():
        raise _refuse(folder, f"{BUNDLE_FILE} is missing")
    try:
        info = read_json(folder / BUNDLE_FILE, "bundle.json")
    except PqfnError as e:  # binary, not UTF-8, truncated, not JSON: the reader's line says which
        raise _refuse(folder, str(e)) from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise _refuse(folder, f"{BUNDLE_FILE} is not a {FORMAT} file")
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise _refuse(folder, f"format version {version} is not the version this pqfn reads ({FORMAT_VERSION}); "
                              f"use the pqfn that wrote it (versions in {BUNDLE_FILE})")
    if info.get("content_sha256") != _content_sha(info):
        raise _refuse(folder, f"{BUNDLE_FILE} was altered (its content no longer matches its sha256)")
    _check_layout(folder, info)
    for name, want in info["files"].items():
        f = folder / name
        if not f.is_file():
            raise _refuse(folder, f"{name} is missing")
        if _sha256(f) != want:
            raise _refuse(folder, f"{name} was altered (sha256 differs from {BUNDLE_FILE})")
    return info


# What load_bundle reads from bundle.json, with the JSON types it needs: a block that is missing or of
# another type is refused by name (a hand-edited or foreign bundle.json, re-checksummed or not).
_LAYOUT: dict[str, tuple[type, ...]] = {
    "classes": (list,), "architecture": (dict,), "architecture.timm_model": (str,),
    "architecture.ensemble_members": (int,), "preprocessing": (dict,), "preprocessing.decode_size": (int,),
    "preprocessing.resolution": (int,), "trial": (dict,), "priors": (list, type(None)), "prior_adjust": (bool,),
    "prior_strength": (int, float), "data_fingerprint": (str,), "metrics": (dict,), "versions": (dict,),
    "files": (dict,),
}


def _check_layout(folder: Path, info: dict[str, Any]) -> None:
    for key, types in _LAYOUT.items():
        block, _, sub = key.partition(".")
        value = info.get(block) if not sub else info.get(block, {}).get(sub)
        if value is None and type(None) not in types:
            raise _refuse(folder, f"{BUNDLE_FILE} lacks `{key}`; expected a bundle written by `pqfn` (write_bundle)")
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise _refuse(folder, f"{BUNDLE_FILE} `{key}` is {type(value).__name__}; expected "
                                  f"{' or '.join(t.__name__ for t in types)}")
    pre, arch = info["preprocessing"], info["architecture"]
    if pre["decode_size"] < 1 or pre["resolution"] < 1 or arch["ensemble_members"] < 0:
        raise _refuse(folder, f"{BUNDLE_FILE} preprocessing sizes {pre['decode_size']}, {pre['resolution']} or "
                              f"ensemble_members {arch['ensemble_members']} are out of range")
    if info["priors"] is not None and (len(info["priors"]) != len(CLASSES)
                                       or not all(isinstance(v, (int, float)) and v > 0 for v in info["priors"])):
        raise _refuse(folder, f"{BUNDLE_FILE} priors {info['priors']}: expected {len(CLASSES)} positive numbers")
    if WEIGHTS_FILE not in info["files"]:
        raise _refuse(folder, f"{BUNDLE_FILE} `files` does not list {WEIGHTS_FILE}")


def load_bundle(folder: Path | str) -> Bundle:
    """Read and verify a bundle; the model is rebuilt in eval mode on the CPU."""
    from pqfn.config import validate_as

    folder = Path(folder)
    info = read_info(folder)
    if tuple(info["classes"]) != CLASSES:
        raise _refuse(folder, f"classes {info['classes']} differ from this pqfn's {list(CLASSES)}")
    try:
        cfg = validate_as(TrialConfig, info["trial"], f"{folder / BUNDLE_FILE} trial")
    except ConfigError as e:
        raise _refuse(folder, f"its trial config does not validate here ({e})") from None
    arch = info["architecture"]
    try:
        model = _build(arch["timm_model"], int(arch["ensemble_members"]))
    except TrialError as e:  # a model name this timm lacks: say which bundle asks for it
        raise _refuse(folder, f"its architecture.timm_model {arch['timm_model']!r} is not a model of this timm "
                              f"({str(e).removeprefix('trial.model: ')}); use the pqfn and timm that wrote it (versions in {BUNDLE_FILE})") from None
    try:
        state = read_safetensors(folder / WEIGHTS_FILE, "the bundle's weights")
    except PqfnError as e:
        raise _refuse(folder, str(e)) from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, OSError, ValueError) as e:
        raise _refuse(folder, f"{WEIGHTS_FILE} does not fit {arch['timm_model']} ({str(e).splitlines()[0]})") from None
    pre = info["preprocessing"]
    if (pre.get("mean"), pre.get("std")) != (MEAN, STD):
        raise _refuse(folder, f"normalisation mean {pre.get('mean')} std {pre.get('std')} is not this pqfn's ({MEAN}, {STD})")
    reduce = pre.get("reduce", "bilinear")
    if reduce not in REDUCTIONS:
        raise _refuse(folder, f"{BUNDLE_FILE} preprocessing.reduce {reduce!r}: expected one of {list(REDUCTIONS)}")
    priors = None if info["priors"] is None else np.asarray(info["priors"], np.float64)
    return Bundle(
        folder=folder, model=model.eval(), trial=cfg, classes=tuple(info["classes"]),
        preprocessing=Preprocessing(int(pre["decode_size"]), int(pre["resolution"]), reduce),
        priors=priors, prior_adjust=bool(info["prior_adjust"]), prior_strength=float(info["prior_strength"]),
        fingerprint=str(info["data_fingerprint"]), metrics=dict(info["metrics"]), versions=dict(info["versions"]),
        info=info,
    )
