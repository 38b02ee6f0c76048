"""Load a CSAM data set once: a manifest CSV or class folders -> Dataset (uint8 (N, H, W) + metadata).

Decoded arrays are cached (keyed by the files' paths, sizes and modification times and the
decode size), so a second run does not decode again; a changed file invalidates the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from pqfn.config import CLASSES, DataConfig
from pqfn.errors import DataError
from pqfn.io import check_output_paths, read_csv

if TYPE_CHECKING:
    import torch

# Files with other suffixes in class folders (notes, .DS_Store, exports) are not scans: skipped silently.
IMAGE_SUFFIXES = {".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg"}
CACHE_VERSION = 1


class SkippedImagesWarning(UserWarning):
    pass


# Images above this many pixels are not decoded (PIL's decompression-bomb limit, about 9459 x 9459): a tiny
# file can claim 20000 x 20000 pixels and take gigabytes to decode. They are listed like any unreadable file.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# PIL warns between 1x and 2x its limit and raises above; decode_image refuses both itself, so the warning
# would only repeat what the skipped-files line says.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageTooLarge(ValueError):
    pass


# What decoding a user's file can raise; each becomes a skipped-file entry (or a data.strict error).
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def unreadable(file: Path, e: BaseException) -> str:
    """One skipped-file entry: the file and why it was not read."""
    if isinstance(e, FileNotFoundError):
        why = "not found"
    elif isinstance(e, (ImageTooLarge, Image.DecompressionBombError)):
        size = f"{e}, " if isinstance(e, ImageTooLarge) else ""
        why = f"too large to decode safely: {size}over the {MAX_PIXELS:,}-pixel limit"
    else:
        why = type(e).__name__
    return f"{file} ({why})"


@dataclass(frozen=True)
class Dataset:
    """Decoded images and their metadata; row i of every array describes image i."""

    images: np.ndarray  # (N, H, W) uint8
    labels: np.ndarray  # (N,) int64 index into CLASSES
    package_ids: np.ndarray  # (N,) str; the image path when no package id is known
    metallization: np.ndarray  # (N,) str, "" when unknown
    cycles: np.ndarray  # (N,) int64, -1 when unknown
    paths: np.ndarray  # (N,) str, as given in the manifest or relative to the root folder
    is_test: np.ndarray  # (N,) bool: from a separate test manifest
    files: np.ndarray  # (N,) str, the image file as opened (relative paths resolved against the manifest)
    has_package_ids: bool = True
    # (N, H, W) uint8 ground-truth masks at the decoded size (0 none, 1 die pad, 2 bond pad), decoded once
    # by with_masks() when training needs them (trial.mask_loss); None otherwise
    masks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> Dataset:
        return Dataset(
            self.images[idx], self.labels[idx], self.package_ids[idx], self.metallization[idx],
            self.cycles[idx], self.paths[idx], self.is_test[idx], self.files[idx], self.has_package_ids,
            None if self.masks is None else self.masks[idx],
        )


def with_masks(ds: Dataset, why: str = "trial.mask_loss > 0", manifest: Path | None = None) -> Dataset:
    """`ds` with the ground-truth mask of every image that can train (not a separate test manifest's) decoded
    once, at the images' size (read-only, shared like the images); a test manifest's rows get empty masks. Masks
    are looked up in `manifest` (the configured one), else in the nearest manifest.csv above each image. A
    missing or unreadable mask, or one that contradicts its image's label (a D scan with delaminated pixels, an
    A or C scan without die-pad pixels, ...), is one DataError naming the image and `why` masks are needed."""
    if ds.masks is not None:
        return ds
    rows = np.flatnonzero(~ds.is_test)
    masks = np.zeros(ds.images.shape, np.uint8)
    try:
        masks[rows] = load_masks(ds.subset(rows), ds.images.shape[-1], manifest=manifest)
    except DataError as e:
        raise DataError(f"{why} needs a mask for every image: {e}") from None
    die, bond = (masks[rows] == 1).any((1, 2)), (masks[rows] == 2).any((1, 2))
    label = ds.labels[rows]
    wrong = np.flatnonzero((die != np.isin(label, (0, 2))) | (bond != np.isin(label, (1, 2))))
    if len(wrong):
        i = rows[wrong[0]]
        raise DataError(
            f"{why}: the mask of {ds.files[i]} contradicts its label {CLASSES[ds.labels[i]]} "
            f"(die-pad pixels: {'yes' if die[wrong[0]] else 'no'}, bond-pad pixels: {'yes' if bond[wrong[0]] else 'no'}; "
            f"{len(wrong)} image(s) in all); expected A = die pad only, B = bond pad only, C = both, D = none"
        )
    masks.setflags(write=False)
    return dataclasses.replace(ds, masks=masks)


@dataclass(frozen=True)
class _Row:
    file: Path
    path: str
    label: int
    package_id: str
    metallization: str
    cycles: int
    is_test: bool


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pqfn"


def _label_index(value: str, cfg: DataConfig, where: str) -> int:
    name = cfg.class_map.get(value, value)
    if name not in CLASSES:
        known = sorted(set(CLASSES) | set(cfg.class_map))
        raise DataError(f"{where}: label {value!r} is not a class; expected one of {known} (map others with data.class_map)")
    return CLASSES.index(name)


def read_manifest(path: Path, cfg: DataConfig, is_test: bool = False) -> list[_Row]:
    # read_csv rejects binary, non-UTF-8 and ragged files with one line naming the file (and line)
    table = read_csv(path, "manifest", required=("path", "label"), error=DataError,
                     expected="path,label[,package_id,metallization,cycles]")
    rows = []
    for i, r in table:
        where = f"{path} line {i}"
        if not r["path"].strip():
            raise DataError(f"{where}: empty path")
        cyc_raw = (r.get("cycles") or "").strip()
        try:
            cyc = int(float(cyc_raw)) if cyc_raw else -1
        except (ValueError, OverflowError):
            raise DataError(f"{where}: cycles {cyc_raw!r} is not a number") from None
        rel = r["path"].strip()
        rows.append(_Row(
            file=(path.parent / rel), path=rel, label=_label_index(r["label"].strip(), cfg, where),
            package_id=(r.get("package_id") or "").strip(), metallization=(r.get("metallization") or "").strip(),
            cycles=cyc, is_test=is_test,
        ))
    if not rows:
        raise DataError(f"{path}: manifest has no rows")
    return rows


def read_folders(root: Path, cfg: DataConfig) -> list[_Row]:
    if not root.is_dir():
        raise DataError(f"{root}: data.path is not a folder (data.source: folders expects one sub-folder per class)")
    rx = re.compile(cfg.package_regex) if cfg.package_regex else None
    rows = []
    ignored: list[str] = []  # not image files
    unmatched: list[str] = []  # image files in which package_regex finds no package id
    classes = [p for p in sorted(root.iterdir()) if p.is_dir() and (p.name in CLASSES or p.name in cfg.class_map)]
    for sub in classes:
        label = _label_index(sub.name, cfg, str(sub))
        for file in sorted(p for p in sub.rglob("*") if p.is_file()):
            rel = str(file.relative_to(root))
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                ignored.append(rel)
                continue
            pkg = ""
            if rx is not None:
                m = rx.search(file.name)
                if m:
                    pkg = (m.group("package") if "package" in rx.groupindex else m.group(1 if rx.groups else 0)) or ""
                if not pkg:
                    unmatched.append(rel)
            rows.append(_Row(file, rel, label, pkg, "", -1, False))
    if not classes:
        raise DataError(f"{root}: no class folders found; expected sub-folders {list(CLASSES)} or names in data.class_map")
    if not rows:
        also = f" ({len(ignored)} other file(s) ignored, e.g. {ignored[0]})" if ignored else ""
        raise DataError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders{also}")
    if rx is not None and unmatched:
        if len(unmatched) == len(rows):
            # Silently making every image its own group would leak scans of one package across folds.
            raise DataError(
                f"data.package_regex {cfg.package_regex!r} finds no package id in any of the {len(rows)} image file "
                f"names, e.g. {Path(unmatched[0]).name!r}; expected a pattern whose group `package` (or group 1) "
                "captures the package id, e.g. '(?P<package>P\\d+)_'"
            )
        warnings.warn(
            f"data.package_regex {cfg.package_regex!r} finds no package id in {len(unmatched)} of {len(rows)} image "
            f"file names (e.g. {Path(unmatched[0]).name!r}): each of those is its own group, so scans of one "
            "package may land in different folds (leakage)",
            stacklevel=3,
        )
    return rows


def decode_image(file: Path, size: int) -> np.ndarray:
    """One image file -> (size, size) uint8 grayscale. 16-bit images are scaled by 255/65535."""
    with Image.open(file) as src:
        w, h = src.size
        if w * h > MAX_PIXELS:  # before load(): the header alone says how much memory decoding would take
            raise ImageTooLarge(f"{w} x {h} pixels")
        src.load()
        im: Image.Image = src
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            arr = np.asarray(im, dtype=np.float64)
            hi = 65535.0 if im.mode != "I" or arr.max() > 255 else 255.0
            im = Image.fromarray(np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8))
        elif im.mode == "F":
            arr = np.asarray(im, dtype=np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            im = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8))
        elif im.mode != "L":
            im = im.convert("L")  # RGB false colour, palette, RGBA -> luminance
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return np.asarray(im, dtype=np.uint8)


REDUCTIONS = ("bilinear", "max")  # trial.reduce: how a scan is shrunk to the model's resolution


def resize_uint8(images: torch.Tensor, resolution: int, reduce: str = "bilinear") -> torch.Tensor:
    """(N, H, W) uint8 -> (N, 1, r, r) uint8: the one resize of training, evaluation, `pqfn predict` and the
    cheap baselines' analysis size (torch is imported here, not by every data user).

    reduce="bilinear": antialiased bilinear, which averages each output pixel's window (speckle, and a bright
    patch smaller than the window, alike). reduce="max": when shrinking, each output pixel is the brightest of
    its window (torch adaptive_max_pool2d), so a bright patch of a pixel or two keeps its amplitude at a lower
    resolution; when enlarging (nothing to keep), bilinear as above."""
    import torch
    import torch.nn.functional as F

    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    x = images.unsqueeze(1).float()
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        if reduce == "max" and x.shape[-1] >= resolution and x.shape[-2] >= resolution:
            x = F.adaptive_max_pool2d(x, resolution)
        else:
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _cache_key(rows: list[_Row], cfg: DataConfig) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{cfg.decode_size}".encode())
    for r in rows:
        try:
            st = r.file.stat()
            h.update(f"{r.file.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{r.file}|missing\n".encode())
    return h.hexdigest()[:20]


def _decode_all(rows: list[_Row], cfg: DataConfig) -> tuple[np.ndarray, list[int], list[str]]:
    out = np.empty((len(rows), cfg.decode_size, cfg.decode_size), np.uint8)
    kept: list[int] = []
    bad: list[str] = []
    for i, r in enumerate(rows):
        try:
            out[len(kept)] = decode_image(r.file, cfg.decode_size)
            kept.append(i)
        except UNREADABLE as e:
            bad.append(unreadable(r.file, e))
    return out[: len(kept)], kept, bad


def load_dataset(cfg: DataConfig, *, cache: bool = True, log: bool = True, masks: bool = False) -> Dataset:
    """Read the configured source (generating the synthetic set on first use) and decode it once; with `masks`,
    every image's ground-truth mask too (trial.mask_loss: see pqfn.config.uses_masks)."""
    ds = _load_dataset(cfg, cache=cache, log=log)
    return with_masks(ds, manifest=cfg.path if cfg.source == "manifest" else None) if masks else ds


def _load_dataset(cfg: DataConfig, *, cache: bool, log: bool) -> Dataset:
    cache_dir = cfg.cache_dir or default_cache_dir()
    if cache:  # before any decoding: a cache path that cannot be a folder must not cost a full decode first
        check_output_paths(folders={"data.cache_dir": cache_dir})
    if cfg.source == "synthetic":
        rows = read_manifest(ensure_synthetic(cfg, log=log), cfg)
    elif cfg.source == "manifest":
        rows = read_manifest(cfg.path, cfg)
    else:
        rows = read_folders(cfg.path, cfg)
    if cfg.test_manifest is not None:
        rows += read_manifest(cfg.test_manifest, cfg, is_test=True)

    key = _cache_key(rows, cfg)
    cache_file = cache_dir / f"decoded-{key}.npz"
    images: np.ndarray | None = None
    kept: list[int] = []
    bad: list[str] = []
    if cache and cache_file.exists():
        try:
            with np.load(cache_file) as z:
                images, kept, bad = z["images"], list(z["kept"]), json.loads(str(z["bad"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            images = None  # a damaged cache is rebuilt, never trusted
    if images is None:
        if log:
            print(f"pqfn: decoding {len(rows)} images to {cfg.decode_size} px ...", file=sys.stderr)
        images, kept, bad = _decode_all(rows, cfg)
        if cache:
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp.npz")
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
                np.savez(tmp, images=images, kept=np.array(kept, np.int64), bad=json.dumps(bad))
                tmp.replace(cache_file)
            except OSError as e:  # the cache only saves time: a full disk must not lose the decoded data
                tmp.unlink(missing_ok=True)
                warnings.warn(f"data.cache_dir {cache_dir}: cannot write the decoded cache ({e.strerror or e}); "
                              "continuing without it", stacklevel=2)
    if bad:
        listing = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        if cfg.strict:
            raise DataError(f"{len(bad)} unreadable image(s) (data.strict is true): {listing}")
        warnings.warn(f"skipped {len(bad)} unreadable image(s): {listing}", SkippedImagesWarning, stacklevel=2)
    if not kept:
        raise DataError(f"{cfg.path}: no readable images")
    rows = [rows[i] for i in kept]

    has_ids = all(r.package_id for r in rows)
    no_id = [r for r in rows if not r.package_id]
    # Where the ids come from decides the advice; with package_regex set, read_folders has already said
    # how many file names it did not match, so only test-manifest rows are left to mention here.
    hints = []
    if any(not r.is_test for r in no_id) and not (cfg.source == "folders" and cfg.package_regex):
        hints.append("set data.package_regex" if cfg.source == "folders" else f"add a package_id column to {cfg.path}")
    if any(r.is_test for r in no_id):
        hints.append(f"add a package_id column to {cfg.test_manifest} (data.test_manifest)")
    if hints:
        warnings.warn(
            f"{len(no_id)} image(s) have no package id, e.g. {no_id[0].path}: each such image is its own group, so "
            f"scans of one package may land in different folds (leakage). To fix it, {' and '.join(hints)}.",
            stacklevel=2,
        )
    return Dataset(
        images=images,
        labels=np.array([r.label for r in rows], np.int64),
        package_ids=np.array([r.package_id or f"image:{r.path}" for r in rows]),
        metallization=np.array([r.metallization for r in rows]),
        cycles=np.array([r.cycles for r in rows], np.int64),
        paths=np.array([r.path for r in rows]),
        files=np.array([str(r.file) for r in rows]),
        is_test=np.array([r.is_test for r in rows], bool),
        has_package_ids=has_ids,
    )


def ensure_synthetic(cfg: DataConfig, log: bool = True) -> Path:
    """Generate the synthetic set into cfg.path unless a complete one with the same settings is there."""
    from pqfn.synth import generate

    check_output_paths(folders={"data.path": cfg.path})  # the set is generated into it
    manifest = cfg.path / "manifest.csv"
    stamp = cfg.path / "synth.json"
    from pqfn.synth import SIMULATOR_VERSION

    want = cfg.synthetic.model_dump(mode="json") | {"simulator": SIMULATOR_VERSION}
    if manifest.exists():
        try:
            have = json.loads(stamp.read_text())
        except (OSError, ValueError):
            have = None
        if have == want:
            return manifest
        if isinstance(have, dict) and have.get("simulator") != SIMULATOR_VERSION and \
                {k: v for k, v in have.items() if k != "simulator"} == cfg.synthetic.model_dump(mode="json"):
            raise DataError(
                f"{cfg.path}: holds a data set made by an earlier version of the simulator (synth.json has no "
                f"simulator {SIMULATOR_VERSION}); delete the folder (it is made again in seconds) or choose another data.path"
            )
        raise DataError(
            f"{cfg.path}: holds a data set made with other settings than data.synthetic "
            f"({stamp.name} differs); choose another data.path or delete the folder"
        )
    if log:
        n = sum(cfg.synthetic.packages.values())
        print(f"pqfn: generating synthetic CSAM data ({n} packages) into {cfg.path} ...", file=sys.stderr)
    cfg.path.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(want))  # before the images: the manifest, written last, marks completion
    generate(cfg.synthetic, cfg.path)
    return manifest


# Ground-truth delamination masks (synthetic data sets; see pqfn/synth.py). They are read on demand for
# the rows that need them, never decoded into the Dataset: only the localisation check uses them.
MASK_COLUMN = "mask"


def manifest_masks(manifest: Path) -> dict[Path, Path]:
    """The manifest's `mask` column: resolved image file -> mask file ({} without that column)."""
    table = read_csv(manifest, "manifest", required=("path",), error=DataError)  # binary/ragged: one line
    if MASK_COLUMN not in table.columns:
        return {}
    return {
        (manifest.parent / r["path"].strip()).resolve(): manifest.parent / r[MASK_COLUMN].strip()
        for _, r in table if r["path"].strip() and r[MASK_COLUMN].strip()
    }


def _find_mask(file: Path, tables: dict[Path, dict[Path, Path]]) -> Path | None:
    """The mask of one image: from the nearest manifest.csv above it that names it (tables caches them)."""
    target = file.resolve()
    for folder in target.parents:
        manifest = folder / "manifest.csv"
        if manifest not in tables:
            tables[manifest] = manifest_masks(manifest) if manifest.is_file() else {}
        if target in tables[manifest]:
            return tables[manifest][target]
    return None


def load_masks(files: Dataset | Sequence[str | Path], size: int, *, manifest: Path | None = None) -> np.ndarray:
    """Ground-truth masks of image files (or of a Dataset's rows) -> (N, size, size) uint8.

    Values as written by pqfn synth: 0 none, 1 delaminated die pad, 2 delaminated bond pad. Resized by
    area coverage: an output pixel is marked when any part of it covers a delaminated pixel (so a small
    bond-pad patch survives a low resolution); a pixel covering both kinds is marked bond pad. The mask
    of an image is found in `manifest` when given, else in the nearest manifest.csv above the image.
    """
    paths = [Path(f) for f in (files.files if isinstance(files, Dataset) else files)]
    tables: dict[Path, dict[Path, Path]] = {}
    if manifest is not None:
        tables[manifest] = manifest_masks(manifest)
    out = np.zeros((len(paths), size, size), np.uint8)
    missing: list[str] = []
    for i, f in enumerate(paths):
        mask_file = tables[manifest].get(f.resolve()) if manifest is not None else None
        mask_file = mask_file or _find_mask(f, tables)
        if mask_file is None:
            missing.append(str(f))
            continue
        try:
            with Image.open(mask_file) as im:  # a palette PNG's values are its indices (annotation tools write those)
                m = np.asarray(im if im.mode == "P" else im.convert("L"), np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"{mask_file}: cannot read mask ({type(e).__name__})") from None
        for value in (1, 2):  # die pad first, so bond pad wins where both cover a pixel
            plane = Image.fromarray((m == value).astype(np.float32))
            if plane.size != (size, size):
                plane = plane.resize((size, size), Image.Resampling.BOX)
            out[i][np.asarray(plane) > 0] = value
    if missing:
        raise DataError(
            f"no ground-truth mask for {len(missing)} image(s), e.g. {missing[0]}: masks come from a manifest's "
            f"'{MASK_COLUMN}' column (pqfn synth writes them; regenerate a data set made before masks existed)"
        )
    return out
