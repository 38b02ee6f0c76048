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
import shutil
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pqfn.bundle import Bundle, load_bundle
from pqfn.config import CLASS_NAMES, CLASSES
from pqfn.data import IMAGE_SUFFIXES, UNREADABLE, SkippedImagesWarning, decode_image, unreadable
from pqfn.errors import DataError
from pqfn.io import (
    MARKER,
    check_not_on_inputs,
    check_output_paths,
    check_replaceable,
    read_csv,
    swap_in_folder,
    write_marker,
    written_by,
)

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


class DuplicateInputsWarning(UserWarning):
    """The same scan was given more than once (a repeated manifest row, a file also inside a given folder)."""


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


def _listed(path: Path) -> list[InputImage]:
    """A manifest given as an input: its rows, refused with one line when it has none or none of them exists."""
    items = _read_manifest(path)[0]
    if not items:
        raise DataError(f"{path}: the manifest lists no scans (no row with a path)")
    if not any(it.file.is_file() for it in items):
        raise DataError(f"{path}: none of the {len(items)} path(s) it lists exists, e.g. {items[0].name!r} "
                        f"(paths are relative to the manifest's folder {path.parent})")
    return items


def _folder(p: Path, skipped: list[str]) -> list[InputImage]:
    """A folder's scans (recursively); an empty folder or one without image files is refused by name."""
    meta: dict[Path, dict[str, str]] = {}
    masks: set[Path] = set()
    if (p / "manifest.csv").is_file():
        listed, masks = _read_manifest(p / "manifest.csv")
        meta = {it.file.resolve(): it.meta for it in listed}
    items, others, files = [], [], 0
    for f in sorted(p.rglob("*")):
        if f.is_symlink():
            try:
                f.resolve(strict=True)
            except (OSError, RuntimeError):  # a link to itself, a loop, or to nothing
                skipped.append(f"{f} (symlink loop or broken link)")
                continue
        if not f.is_file():
            continue
        files += 1
        suffix = f.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            if f.resolve() not in masks:
                items.append(InputImage(f, str(f.relative_to(p)), meta.get(f.resolve(), {})))
        elif suffix not in COMPANION_SUFFIXES:
            others.append(f)
    skipped += [f"{f} (not an image)" for f in others]
    if not files:
        raise DataError(f"{p}: the folder is empty; expected scans ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if not items:
        raise DataError(f"{p}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) among its {files} file(s)"
                        + (f", e.g. {others[0].name}" if others else ""))
    return items


def collect_inputs(inputs: Iterable[str | Path]) -> tuple[list[InputImage], list[str]]:
    """Files, folders and manifests -> the images to classify (each file once), and the files left out.

    An input that cannot give a scan (an empty folder, a folder without image files, a manifest whose paths
    are all missing) is one DataError naming it. A scan given twice is classified once; the repeats are
    listed in one DuplicateInputsWarning.
    """
    items: list[InputImage] = []
    skipped: list[str] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            items += _folder(p, skipped)
        elif p.is_file() and p.suffix.lower() == ".csv":
            items += _listed(p)
        elif p.is_file():
            items.append(InputImage(p, p.name))  # named explicitly: tried whatever its suffix
        else:
            raise DataError(f"{p}: no such file or folder")
    seen: set[str] = set()
    unique: list[InputImage] = []
    repeats: list[str] = []
    for it in items:
        key = os.path.realpath(it.file)
        if key in seen:
            repeats.append(str(it.file))
        else:
            seen.add(key)
            unique.append(it)
    if repeats:
        listing = ", ".join(repeats[:5]) + (f" and {len(repeats) - 5} more" if len(repeats) > 5 else "")
        warnings.warn(f"{len(repeats)} scan(s) given more than once (a repeated manifest row, or a file also in a "
                      f"given folder), classified and counted once: {listing}", DuplicateInputsWarning, stacklevel=2)
    return unique, skipped


def _decode(item: InputImage, size: int) -> np.ndarray | str:
    try:
        return decode_image(item.file, size)
    except UNREADABLE as e:
        return unreadable(item.file, e)


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


# How --overwrite recognises predict's own earlier output: the tables by their first columns, the overlay
# folder by its marker (pqfn.io.MARKER). Anything else at those paths is never replaced.
PREDICTIONS_HEAD = "path,predicted,prob_"
SUMMARY_HEAD = "package_id,metallization,cycles,n_scans,worst_predicted"
EXPLAIN_COMMAND = "pqfn predict --explain"


def _starts_with(path: Path, head: str) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(head)).decode("utf-8", "replace") == head
    except OSError:
        return False


def check_outputs(bundle_folder: Path, inputs: Iterable[str | Path], items: Sequence[InputImage], *,
                  out: Path | None = None, summary: Path | None = None, explain: Path | None = None,
                  overwrite: bool = False) -> None:
    """Before any work: outputs are writable, land on no input (the bundle, an input file or folder, a listed
    scan), and replace only predict's own earlier output, and only with overwrite."""
    check_output_paths(folders={"--explain": explain}, files={"--out": out, "summary": summary}, create_parents=True)
    pairs = [("bundle", Path(bundle_folder))] + [("input", Path(p)) for p in inputs]
    pairs += [("scan", it.file) for it in items]
    check_not_on_inputs({"--out": out, "summary": summary, "--explain": explain}, pairs)
    for key, path, head, what in [
        ("--out", out, PREDICTIONS_HEAD, f"a predictions CSV whose header starts {PREDICTIONS_HEAD!r}"),
        ("summary", summary, SUMMARY_HEAD, f"a per-package summary whose header starts {SUMMARY_HEAD!r}"),
    ]:
        if path is not None:
            check_replaceable(key, path, overwrite, mine=_starts_with(path, head), what=what)
    if explain is not None:
        check_replaceable("--explain", explain, overwrite, mine=written_by(explain, EXPLAIN_COMMAND),
                          what=f"an overlay folder that `pqfn predict --explain` wrote, marked by its {MARKER} file")


def predict(
    bundle: Bundle | Path | str, inputs: Iterable[str | Path] | str | Path, *, batch: int = 64,
    device: str = "auto", adjust: bool | None = None, explain_dir: Path | str | None = None,
    progress: bool = False, workers: int | None = None, overwrite: bool = False,
) -> Predictions:
    """Classify images with a bundle (a folder or a loaded Bundle).

    adjust: prob_* and `predicted` with the prior adjustment (default: as the bundle says); raw_prob_* are
    always the unadjusted probabilities. explain_dir: write a Grad-CAM overlay PNG per image there (for the
    predicted class); an existing one is replaced only with overwrite and only when predict wrote it.
    Unreadable files and non-images in folders are listed in one SkippedImagesWarning.
    workers: decoding threads (default: up to 4).
    """
    t0 = time.perf_counter()
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    inputs = list(inputs)
    folder = bundle.folder if isinstance(bundle, Bundle) else Path(bundle)
    items, skipped = collect_inputs(inputs)
    explain = Path(explain_dir) if explain_dir is not None else None
    check_outputs(folder, inputs, items, explain=explain, overwrite=overwrite)
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    return classify(b, items, skipped, batch=batch, device=device, adjust=adjust, explain=explain,
                    progress=progress, workers=workers, t0=t0)


def classify(
    b: Bundle, items: Sequence[InputImage], skipped: list[str], *, batch: int = 64, device: str = "auto",
    adjust: bool | None = None, explain: Path | None = None, progress: bool = False, workers: int | None = None,
    t0: float | None = None,
) -> Predictions:
    """predict() after the inputs are collected and the outputs checked. The overlays are written into a
    hidden folder beside `explain` and moved there only when every image is done."""
    from tqdm.auto import tqdm

    from pqfn.trial import pick_device, predict_logits

    t0 = time.perf_counter() if t0 is None else t0
    if batch < 1:
        raise DataError(f"batch {batch}: expected a positive number of images per batch")
    dev = pick_device(device)
    model = b.model.to(dev)
    use_adjust = b.adjusts if adjust is None else (adjust and b.priors is not None)
    pre = b.preprocessing
    rows: list[dict[str, Any]] = []
    used: set[str] = set()
    skipped = list(skipped)
    workers = workers or min(4, os.cpu_count() or 1)
    explain = None if explain is None else explain.absolute()  # "." has no name to stage beside
    stage = None if explain is None else explain.parent / f".{explain.name}.partial-{os.getpid()}"
    try:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
            write_marker(stage, EXPLAIN_COMMAND)
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
                if stage is not None:
                    _explain(stage, model, x, pred, prob, images, ok, used, dev)
        bar.close()
        if skipped:
            listing = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
            warnings.warn(f"skipped {len(skipped)} file(s): {listing}", SkippedImagesWarning, stacklevel=2)
        if not rows:
            raise DataError(f"none of the {len(items)} image file(s) among the inputs could be read, e.g. "
                            f"{items[0].file if items else '(none)'} (each is listed in the warning above)")
        if stage is not None and explain is not None:
            swap_in_folder(stage, explain)
    except BaseException:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    return Predictions(rows, summarise(rows), skipped, time.perf_counter() - t0, bool(use_adjust))


def _explain(folder: Path, model: torch.nn.Module, x: torch.Tensor, pred: np.ndarray, prob: np.ndarray,
             images: np.ndarray, ok: list[tuple[InputImage, np.ndarray]], used: set[str], dev: torch.device) -> None:
    from pqfn.explain import dense_maps, gradcam, has_dense_head, save_overlay

    # A model with a dense head (resnet18_dense) shows its own mask-trained map, which lies on the true
    # delamination far more often than Grad-CAM's (README, "Use the model"); any other model, Grad-CAM's.
    dense = has_dense_head(model)
    heat = dense_maps(model, x, pred, device=dev) if dense else gradcam(model, x, pred, device=dev)
    for i, (it, _) in enumerate(ok):
        c = CLASSES[pred[i]]
        title = (f"{it.name}\npredicted {c} ({CLASS_NAMES[c]}), p = {prob[i, pred[i]]:.2f}; "
                 + ("dense-head map" if dense else "Grad-CAM"))
        save_overlay(folder / _overlay_name(it.name, used), images[i], heat[i], title)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows as CSV (columns in first-seen order; probabilities with 6 decimals), written atomically."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    tmp.replace(path)


def summary_path(out: Path) -> Path:
    """Where the per-package summary goes beside the predictions CSV."""
    return out.with_name(out.stem + "_packages.csv")
