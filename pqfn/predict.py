"""Classify new scans with a model bundle: `pqfn predict` and its Python call `predict()`.

Inputs are image files, folders (searched recursively for image files) and manifest CSVs (a `path` column,
relative to the CSV; label, package_id, metallization and cycles are optional and copied to the output).
A folder holding a manifest.csv (as `pqfn synth` writes) takes its metadata from it, and the mask files
that manifest names are not scans. Decoding is training's (pqfn.data.decode_image, then the bundle's
resize), so a scan gives the same input here as in the held-out evaluation.

Per package and thermal-cycle step, the summary reports the worst predicted state, in the order
D (none) < A (die pad) < B (bond pad) < C (both): delamination on a wire-bonding surface is a reject
criterion of moisture-sensitivity qualification (J-STD-020) where die-pad delamination alone need not be,
so B ranks above A, and C, which has both, is worst.
"""

from __future__ import annotations

import csv
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import UnidentifiedImageError

from pqfn.bundle import Bundle, load_bundle
from pqfn.config import CLASS_NAMES, CLASSES
from pqfn.data import IMAGE_SUFFIXES, SkippedImagesWarning, decode_image
from pqfn.errors import DataError
from pqfn.io import read_csv

SEVERITY = ("D", "A", "B", "C")  # least to most severe (module docstring)
META_COLUMNS = ("label", "package_id", "metallization", "cycles")
COMPANION_SUFFIXES = {".csv", ".json", ".yaml", ".yml", ".md"}  # a data set's own files, not scans


@dataclass(frozen=True)
class InputImage:
    file: Path  # as opened
    name: str  # relative to its folder or manifest (overlay file names)
    meta: dict[str, str] = field(default_factory=dict)  # META_COLUMNS from a manifest


@dataclass
class Predictions:
    """One row per readable image (path, predicted, prob_*, raw_prob_*, manifest columns) and the
    per-package summary; skipped lists the inputs that were not read (and why)."""

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    skipped: list[str]
    seconds: float  # wall time, decoding included
    adjusted: bool  # prob_* carry the prior adjustment

    @property
    def images_per_s(self) -> float:
        return len(self.rows) / self.seconds if self.seconds > 0 else float("nan")

    def accuracy(self) -> dict[str, float] | None:
        """Accuracy and balanced accuracy against the manifest labels, when every row has one of the classes."""
        labelled = [r for r in self.rows if r.get("label") in CLASSES]
        if not labelled or len(labelled) != len(self.rows):
            return None
        y = np.array([CLASSES.index(r["label"]) for r in labelled])
        p = np.array([CLASSES.index(r["predicted"]) for r in labelled])
        recalls = [float((p[y == k] == k).mean()) for k in range(len(CLASSES)) if (y == k).any()]
        return {"accuracy": float((y == p).mean()), "balanced_accuracy": float(np.mean(recalls)), "n": len(y)}


def _read_manifest(path: Path) -> tuple[list[InputImage], set[Path]]:
    """A manifest's scans (with their metadata) and the mask files it names (binary, non-UTF-8 or ragged
    files: one DataError line naming the file)."""
    items, masks = [], set()
    for _, r in read_csv(path, "manifest", required=("path",), error=DataError, expected="path[,label,package_id,...]"):
        rel = (r.get("path") or "").strip()
        if not rel:
            continue
        meta = {k: (r.get(k) or "").strip() for k in META_COLUMNS if (r.get(k) or "").strip()}
        items.append(InputImage(path.parent / rel, rel, meta))
        if (r.get("mask") or "").strip():
            masks.add((path.parent / r["mask"].strip()).resolve())
    return items, masks


def collect_inputs(inputs: Iterable[str | Path]) -> tuple[list[InputImage], list[str]]:
    """Files, folders and manifests -> the images to classify, and the files left out as not images."""
    items: list[InputImage] = []
    skipped: list[str] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            meta: dict[Path, dict[str, str]] = {}
            masks: set[Path] = set()
            if (p / "manifest.csv").is_file():
                listed, masks = _read_manifest(p / "manifest.csv")
                meta = {it.file.resolve(): it.meta for it in listed}
            for f in sorted(x for x in p.rglob("*") if x.is_file()):
                suffix = f.suffix.lower()
                if suffix in IMAGE_SUFFIXES:
                    if f.resolve() not in masks:
                        items.append(InputImage(f, str(f.relative_to(p)), meta.get(f.resolve(), {})))
                elif suffix not in COMPANION_SUFFIXES:
                    skipped.append(f"{f} (not an image)")
        elif p.is_file() and p.suffix.lower() == ".csv":
            items.extend(_read_manifest(p)[0])
        elif p.is_file():
            items.append(InputImage(p, p.name))  # named explicitly: tried whatever its suffix
        else:
            raise DataError(f"{p}: no such file or folder")
    return items, skipped


def _decode(item: InputImage, size: int) -> np.ndarray | str:
    try:
        return decode_image(item.file, size)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        return f"{item.file} ({'not found' if isinstance(e, FileNotFoundError) else type(e).__name__})"


def _overlay_name(name: str, used: set[str]) -> str:
    stem = str(Path(name).with_suffix(""))
    out, k = stem + ".png", 1
    while out in used:
        out, k = f"{stem}-{k}.png", k + 1
    used.add(out)
    return out


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (package_id, cycles): scans, the worst predicted state (SEVERITY), the worst labelled state when
    labels are known, and counts per predicted class. Rows without a package id are left out."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("package_id"):
            groups.setdefault((r["package_id"], r.get("cycles", "")), []).append(r)

    def cyc_key(c: str) -> float:
        try:
            return float(c)
        except ValueError:
            return float("inf")

    out = []
    for (pkg, cyc), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], cyc_key(kv[0][1]))):
        row: dict[str, Any] = {"package_id": pkg, "metallization": rs[0].get("metallization", ""), "cycles": cyc,
                               "n_scans": len(rs), "worst_predicted": max((r["predicted"] for r in rs), key=SEVERITY.index)}
        labels = [r.get("label", "") for r in rs]
        if all(lab in SEVERITY for lab in labels):
            row["worst_label"] = max(labels, key=SEVERITY.index)
        row |= {f"n_{c}": sum(r["predicted"] == c for r in rs) for c in CLASSES}
        out.append(row)
    return out


def predict(
    bundle: Bundle | Path | str, inputs: Iterable[str | Path] | str | Path, *, batch: int = 64,
    device: str = "auto", adjust: bool | None = None, explain_dir: Path | str | None = None,
    progress: bool = False, workers: int | None = None,
) -> Predictions:
    """Classify images with a bundle (a folder or a loaded Bundle).

    adjust: prob_* and `predicted` with the prior adjustment (default: as the bundle says); raw_prob_* are
    always the unadjusted probabilities. explain_dir: write a Grad-CAM overlay PNG per image there (for the
    predicted class). Unreadable files and non-images in folders are listed in one SkippedImagesWarning.
    workers: decoding threads (default: up to 4).
    """
    from tqdm.auto import tqdm

    from pqfn.trial import pick_device, predict_logits

    t0 = time.perf_counter()
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    items, skipped = collect_inputs(inputs)
    dev = pick_device(device)
    model = b.model.to(dev)
    use_adjust = b.adjusts if adjust is None else (adjust and b.priors is not None)
    pre = b.preprocessing
    rows: list[dict[str, Any]] = []
    used: set[str] = set()
    workers = workers or min(4, os.cpu_count() or 1)
    explain = Path(explain_dir) if explain_dir is not None else None
    bar = tqdm(total=len(items), unit="img", disable=not progress or None, desc="pqfn predict")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for s in range(0, len(items), batch):
            chunk = items[s : s + batch]
            decoded = list(pool.map(lambda it: _decode(it, pre.decode_size), chunk))
            ok = [(it, d) for it, d in zip(chunk, decoded, strict=True) if isinstance(d, np.ndarray)]
            skipped += [d for d in decoded if isinstance(d, str)]
            bar.update(len(chunk))
            if not ok:
                continue
            images = np.stack([d for _, d in ok])  # (B, decode_size, decode_size) uint8
            x = pre.resize(images, dev)  # (B, 1, r, r) uint8
            logits = predict_logits(b.trial, model, x, dev).cpu().numpy().astype(np.float64)
            raw = b.probabilities(logits, adjust=False)
            prob = b.probabilities(logits, adjust=use_adjust)
            pred = prob.argmax(1)
            for i, (it, _) in enumerate(ok):
                row: dict[str, Any] = {"path": str(it.file), "predicted": CLASSES[pred[i]]}
                row |= {f"prob_{c}": float(prob[i, k]) for k, c in enumerate(CLASSES)}
                row |= {f"raw_prob_{c}": float(raw[i, k]) for k, c in enumerate(CLASSES)}
                row |= {k: it.meta[k] for k in META_COLUMNS if k in it.meta}
                rows.append(row)
            if explain is not None:
                _explain(explain, model, x, pred, prob, images, ok, used, dev)
    bar.close()
    if skipped:
        listing = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        warnings.warn(f"skipped {len(skipped)} file(s): {listing}", SkippedImagesWarning, stacklevel=2)
    if not rows:
        raise DataError("no readable images among the inputs")
    return Predictions(rows, summarise(rows), skipped, time.perf_counter() - t0, bool(use_adjust))


def _explain(folder: Path, model: torch.nn.Module, x: torch.Tensor, pred: np.ndarray, prob: np.ndarray,
             images: np.ndarray, ok: list[tuple[InputImage, np.ndarray]], used: set[str], dev: torch.device) -> None:
    from pqfn.explain import gradcam, save_overlay

    heat = gradcam(model, x, pred, device=dev)
    for i, (it, _) in enumerate(ok):
        c = CLASSES[pred[i]]
        title = f"{it.name}\npredicted {c} ({CLASS_NAMES[c]}), p = {prob[i, pred[i]]:.2f}"
        save_overlay(folder / _overlay_name(it.name, used), images[i], heat[i], title)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows as CSV (columns in first-seen order; probabilities with 6 decimals), written atomically."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    tmp.replace(path)


def summary_path(out: Path) -> Path:
    """Where the per-package summary goes beside the predictions CSV."""
    return out.with_name(out.stem + "_packages.csv")
