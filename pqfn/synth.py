"""Synthetic CSAM C-scans of over-molded PQFN lead frames under thermal cycling.

Each simulated package keeps its geometry, metallization and delamination "seeds" across its
scans; delamination starts at pad edges and corners and grows with thermal cycles, so the label
of a scan (A/B/C/D) follows from what was drawn into it:

- die-pad delamination is frequent on NiPdAu, less frequent and later on Ag, absent on bare Cu;
- bond-pad (lead) delamination is small and rarer, so class B (bond-pad only) is the rarest.

Imaging (simulator version 2; README, "Synthetic CSAM data", has the table): amplitudes follow the
reflection coefficient at the gated interface, R = (Z2 - Z1) / (Z2 + Z1), from acoustic impedances:
a bonded lead frame under mold reflects |R| = 0.73 of what an air gap (delamination, |R| = 1.0)
reflects, so delamination is only about 1.4x brighter than the pad it lifts from. Pristine packages
carry bright features that are not delamination: mold voids (air, |R| = 1.0, fixed per package), tie
bars (metal), and ringing along the package edge. Gain and contrast drift between scan sessions (one
session per thermal-cycling step, shared by every package scanned in it) and between scans. Also mold
filler speckle, transducer blur, small misalignment and rotation, scan-line noise. Geometry is defined
at 400 px (~20 um per pixel, an ~8 mm package) and scaled to `image_size`.

Every scan also gets its ground-truth mask, `masks/<metal>/<package>_c<cycles>.png` (the manifest's
`mask` column): uint8, MASK_NONE where nothing is delaminated, MASK_DIE_PAD on delaminated die-pad
pixels, MASK_BOND_PAD on delaminated bond-pad (lead) pixels, in the scan's own coordinates (the same
misalignment and rotation, before blur). It is exactly what the label was derived from, so a D scan
has an empty mask, A die-pad pixels only, B bond-pad only, C both.
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from pqfn.config import CLASSES, SynthConfig

# Probability that a package develops die-pad delamination at all, and the cycle range of onset.
DIE_PROB = {"NiPdAu": 0.92, "Ag": 0.6, "Cu": 0.0}
DIE_ONSET = {"NiPdAu": (100.0, 600.0), "Ag": (300.0, 900.0), "Cu": (0.0, 0.0)}
# Bond-pad (lead) delamination: rarer, later.
BOND_PROB = {"NiPdAu": 0.5, "Ag": 0.45, "Cu": 0.3}
BOND_ONSET = {"NiPdAu": (200.0, 900.0), "Ag": (300.0, 1000.0), "Cu": (500.0, 1000.0)}
# Acoustic impedances (MRayl = density x longitudinal sound speed) and the reflection coefficient at the
# gated interface. The finishes (Ag spot plating 2-5 um, NiPdAu under 2 um) are far thinner than a
# wavelength in the mold (about 30 um at 100 MHz), so every pad echoes like the Cu lead frame beneath.
IMPEDANCE = {"mold": 6.5, "Cu": 41.8, "Ag": 38.0, "Au": 63.8, "Ni": 49.6, "air": 0.0004}


def reflection(z1: float, z2: float) -> float:
    return (z2 - z1) / (z2 + z1)


R_PAD = abs(reflection(IMPEDANCE["mold"], IMPEDANCE["Cu"]))  # 0.73: a bonded pad
R_AIR = abs(reflection(IMPEDANCE["mold"], IMPEDANCE["air"]))  # 1.00: a delamination or a void (phase-inverted)
FULL_LEVEL = 0.92  # displayed amplitude of |R| = 1 at unit gain and difficulty 1
SIMULATOR_VERSION = 2  # recorded in synth.json: a data folder made by another version is not reused
MASK_NONE, MASK_DIE_PAD, MASK_BOND_PAD = 0, 1, 2  # values in the per-scan mask PNGs
MIN_PIXELS = 6  # a delaminated region smaller than this (at 400 px) is not counted (or drawn)

N_LEADS = 7  # per side
LEAD_W, LEAD_L = 22.0, 46.0  # at 400 px
BODY = (24.0, 376.0)  # package body extent at 400 px
DIE_HALF = 95.0  # die-pad half size at 400 px


@dataclass(frozen=True)
class ScanRecord:
    path: str
    label: str
    package_id: str
    metallization: str
    cycles: int
    mask: str = ""  # the ground-truth mask PNG, relative to the data set folder


def _smooth_field(rng: np.random.Generator, size: int, cells: int = 10) -> np.ndarray:
    """A smooth random field in about [-1, 1], fixed per package, that roughens patch edges."""
    coarse = rng.standard_normal((cells, cells))
    f = ndimage.zoom(coarse, size / cells, order=3)[:size, :size]
    return np.clip(f / 1.5, -1.5, 1.5)


def _leads(scale: float) -> list[tuple[float, float, float, float, float, float]]:
    """(y0, y1, x0, x1, inner_y, inner_x) for every lead: rectangles along the four edges."""
    lo, hi = BODY[0] * scale, BODY[1] * scale
    w, ln = LEAD_W * scale, LEAD_L * scale
    centers = np.linspace(lo + 0.16 * (hi - lo), hi - 0.16 * (hi - lo), N_LEADS)
    out = []
    for c in centers:
        out.append((lo, lo + ln, c - w / 2, c + w / 2, lo + ln, c))  # top: inner end at bottom
        out.append((hi - ln, hi, c - w / 2, c + w / 2, hi - ln, c))  # bottom
        out.append((c - w / 2, c + w / 2, lo, lo + ln, c, lo + ln))  # left
        out.append((c - w / 2, c + w / 2, hi - ln, hi, c, hi - ln))  # right
    return out


def _tie_bars(yy: np.ndarray, xx: np.ndarray, c0: np.ndarray, half: float, s: float) -> np.ndarray:
    """The four tie bars: metal strips (8 px wide at 400 px) from the die pad's corners to the body's corners."""
    out = np.zeros(yy.shape, bool)
    lo, hi = BODY[0] * s, BODY[1] * s
    for dy, dx in ((-1, -1), (-1, 1), (1, -1), (1, 1)):
        p = np.array([c0[0] + dy * half, c0[1] + dx * half])
        q = np.array([lo if dy < 0 else hi, lo if dx < 0 else hi])
        d = q - p
        t = np.clip(((yy - p[0]) * d[0] + (xx - p[1]) * d[1]) / float(d @ d), 0, 1)
        out |= np.hypot(yy - (p[0] + t * d[0]), xx - (p[1] + t * d[1])) < 4 * s
    return out


def _voids(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, allowed: np.ndarray, s: float) -> np.ndarray:
    """Mold voids (air pockets left by molding, so present from cycle 0 on): 0-4 per package (Poisson, mean
    1.5), 2-5 px radius at 400 px, in the mold away from the metal."""
    out = np.zeros(yy.shape, bool)
    where = np.flatnonzero(allowed)
    for _ in range(min(int(rng.poisson(1.5)), 4)):
        if len(where) == 0:
            break
        cy, cx = np.unravel_index(where[rng.integers(len(where))], yy.shape)
        out |= np.hypot(yy - cy, xx - cx) < rng.uniform(2.0, 5.0) * s
    return out & allowed


def _simulate_package(args: tuple[SynthConfig, str, str, int, str]) -> list[ScanRecord]:
    cfg, metal, package_id, pkg_index, out_dir = args
    size = cfg.image_size
    s = size / 400.0
    rng = np.random.default_rng([cfg.seed, pkg_index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # Fixed per package: geometry jitter, delamination seeds and growth.
    c0 = size / 2 + rng.uniform(-4, 4, 2) * s
    half = DIE_HALF * s * rng.uniform(0.95, 1.05)
    die_pad = (np.abs(yy - c0[0]) < half) & (np.abs(xx - c0[1]) < half)
    leads = _leads(s)
    lead_mask = np.zeros((size, size), bool)
    for y0, y1, x0, x1, _, _ in leads:
        lead_mask |= (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
    body = (yy >= BODY[0] * s) & (yy < BODY[1] * s) & (xx >= BODY[0] * s) & (xx < BODY[1] * s)
    rough = _smooth_field(rng, size)

    has_die = rng.random() < DIE_PROB[metal]
    die_onset = rng.uniform(*DIE_ONSET[metal])
    die_rate = rng.uniform(0.10, 0.22)  # growth of the normalised radius per 100 cycles
    # Origins at a corner or an edge midpoint of the die pad (where stress concentrates).
    n_origins = 1 + int(rng.random() < 0.4)
    origins = []
    for _ in range(n_origins):
        if rng.random() < 0.7:
            oy, ox = rng.choice([-1, 1], 2)
        else:
            side = rng.integers(4)
            oy, ox = [(-1, 0), (1, 0), (0, -1), (0, 1)][side]
        origins.append((c0[0] + oy * half, c0[1] + ox * half))
    die_dist = np.min([np.hypot(yy - oy, xx - ox) for oy, ox in origins], axis=0) / (2 * half)

    has_bond = rng.random() < BOND_PROB[metal]
    bond_onset = rng.uniform(*BOND_ONSET[metal])
    bond_rate = rng.uniform(0.15, 0.3)
    affected = rng.choice(len(leads), size=int(rng.integers(1, 4)), replace=False)
    bond_dist = np.full((size, size), np.inf, np.float32)
    bond_region = np.zeros((size, size), bool)
    for i in affected:
        y0, y1, x0, x1, iy, ix = leads[i]
        inside = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
        d = np.hypot(yy - iy, xx - ix) / (LEAD_W * s)
        bond_dist = np.where(inside, np.minimum(bond_dist, d), bond_dist)
        bond_region |= inside

    mold_level = rng.uniform(0.22, 0.28)
    delam_level = FULL_LEVEL * R_AIR - 0.12 * (cfg.difficulty - 1)
    # Features that are not delamination, from their own generator: the delamination histories (labels,
    # masks) stay those of the same seed in simulator version 1.
    frng = np.random.default_rng([cfg.seed, pkg_index, 2])
    pad_level = FULL_LEVEL * R_PAD * frng.uniform(0.96, 1.04)  # surface roughness, oxide: a few percent
    tie_bars = _tie_bars(yy, xx, c0, half, s)
    metal_px = die_pad | lead_mask | tie_bars
    voids = _voids(frng, yy, xx, body & ~ndimage.binary_dilation(metal_px, iterations=max(1, round(3 * s))), s)
    void_level = FULL_LEVEL * R_AIR * frng.uniform(0.7, 1.0)  # an air pocket near, not always at, the gate depth
    edge = body & ~ndimage.binary_erosion(body, iterations=max(1, round(3 * s)))  # ringing at the package edge
    edge_level = FULL_LEVEL * frng.uniform(0.5, 0.65)
    noise = 0.05 * cfg.difficulty
    min_px = MIN_PIXELS * s * s

    records = []
    cycles_list = list(range(0, cfg.max_cycles + 1, cfg.cycle_step))
    for k, cyc in enumerate(cycles_list):
        srng = np.random.default_rng([cfg.seed, pkg_index, k, 1])
        die_r = 0.12 + die_rate * (cyc - die_onset) / 100.0 if has_die and cyc >= die_onset else -1.0
        bond_r = 0.25 + bond_rate * (cyc - bond_onset) / 100.0 if has_bond and cyc >= bond_onset else -1.0
        die_delam = die_pad & (die_dist + 0.18 * rough < min(die_r, 1.2))
        bond_delam = bond_region & (bond_dist + 0.25 * rough < min(bond_r, 1.3))
        die_on = die_delam.sum() >= min_px
        bond_on = bond_delam.sum() >= min_px
        label = {(True, False): "A", (False, True): "B", (True, True): "C", (False, False): "D"}[(die_on, bond_on)]

        scene = np.where(body, mold_level, 0.08).astype(np.float32)
        scene = np.where(edge, edge_level, scene)
        scene = np.where(metal_px, pad_level, scene)
        scene = np.where(voids, void_level, scene)
        delam = (die_delam if die_on else False) | (bond_delam if bond_on else False)
        if np.any(delam):
            # Delaminated areas: strong, mottled reflection (air gap), phase-inverted.
            scene = np.where(delam, delam_level + 0.05 * rough, scene)
        # Misalignment and rotation of the package in the scan.
        angle = np.deg2rad(srng.uniform(-3, 3))
        shift = srng.uniform(-8, 8, 2) * s
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        centre = np.array([size / 2, size / 2])
        offset = centre - rot @ centre - shift
        scene = ndimage.affine_transform(scene, rot, offset=offset, order=1, mode="constant", cval=0.08)
        # The mask under the same transform (nearest neighbour keeps the class values); it draws no
        # random numbers, so the images stay bit-identical to those of a simulator without masks.
        truth = np.zeros((size, size), np.uint8)
        if die_on:
            truth[die_delam] = MASK_DIE_PAD
        if bond_on:
            truth[bond_delam] = MASK_BOND_PAD  # leads and die pad never overlap
        if die_on or bond_on:  # an empty mask stays empty under any transform
            truth = ndimage.affine_transform(truth, rot, offset=offset, order=0, mode="constant", cval=MASK_NONE)
        # Transducer blur, mold filler speckle, gain and contrast, scan-line noise.
        speckle = ndimage.gaussian_filter(srng.standard_normal((size, size)).astype(np.float32), 0.7 * s)
        img = ndimage.gaussian_filter(scene, 1.4 * s) + noise * 1.8 * speckle
        gain, gamma = srng.uniform(0.85, 1.15), srng.uniform(0.85, 1.2)
        # The scan session of this cycling step (shared by every package scanned in it): transducer, water
        # temperature and gate are set up afresh, so gain and contrast drift between sessions.
        session = np.random.default_rng([cfg.seed, k, 3])
        gain *= session.uniform(0.85, 1.15)
        gamma *= session.uniform(0.9, 1.1)
        img = np.clip(img * gain, 0, 1) ** gamma
        lines = noise * 0.5 * srng.standard_normal((size, 1))
        lines[srng.random((size, 1)) < 0.01] += noise * 3
        img = img + lines + srng.uniform(-0.03, 0.03)
        arr = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)

        rel = f"{metal}/{package_id}_c{cyc:04d}.png"
        Image.fromarray(arr).save(os.path.join(out_dir, rel), compress_level=1)
        mask_rel = f"masks/{rel}"
        Image.fromarray(truth).save(os.path.join(out_dir, mask_rel), compress_level=1)
        records.append(ScanRecord(rel, label, package_id, metal, cyc, mask_rel))
    return records


def generate(cfg: SynthConfig, out_dir: str | Path, workers: int | None = None) -> list[ScanRecord]:
    """Write the images and manifest.csv into out_dir (created). Deterministic per cfg.seed."""
    out = Path(out_dir)
    jobs = []
    idx = 0
    for metal in ("Ag", "NiPdAu", "Cu"):
        n = cfg.packages.get(metal, 0)  # type: ignore[call-overload]
        if n:
            (out / metal).mkdir(parents=True, exist_ok=True)
            (out / "masks" / metal).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            jobs.append((cfg, metal, f"{metal}-{i + 1:03d}", idx, str(out)))
            idx += 1
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            results = list(ex.map(_simulate_package, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        results = [_simulate_package(j) for j in jobs]
    records = [r for rs in results for r in rs]
    tmp = out / "manifest.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "package_id", "metallization", "cycles", "mask"])
        for r in records:
            w.writerow([r.path, r.label, r.package_id, r.metallization, r.cycles, r.mask])
    tmp.replace(out / "manifest.csv")  # the manifest appears last: its presence means "complete"
    return records


def class_counts(records: list[ScanRecord]) -> dict[str, int]:
    return {c: sum(r.label == c for r in records) for c in CLASSES}


def contact_sheet(records: list[ScanRecord], root: str | Path, out_png: str | Path, per_class: int = 6) -> None:
    """A PNG with `per_class` examples of each class (latest cycles first), labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pqfn.config import CLASS_NAMES

    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(len(CLASSES), per_class, figsize=(2.2 * per_class, 2.5 * len(CLASSES)))
    for row, c in enumerate(CLASSES):
        pool = [r for r in records if r.label == c]
        pick = [pool[i] for i in rng.permutation(len(pool))[:per_class]] if pool else []
        for col in range(per_class):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(pick):
                r = pick[col]
                ax.imshow(np.asarray(Image.open(Path(root) / r.path)), cmap="gray", vmin=0, vmax=255)
                ax.set_title(f"{r.package_id}\n{r.cycles} cycles", fontsize=8)
        axes[row, 0].text(
            -0.08, 0.5, f"{c}: {CLASS_NAMES[c]}\n({len(pool)} scans)", transform=axes[row, 0].transAxes,
            ha="right", va="center", fontsize=9,
        )
    fig.suptitle("Synthetic CSAM C-scans by class (bright patches = delamination)")
    fig.tight_layout(rect=(0.12, 0, 1, 0.97))
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
