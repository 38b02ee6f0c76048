"""Grad-CAM heat maps (the maintained `grad-cam` package) and their check against the true delamination.

Grad-CAM weighs a convolutional stage's activation maps by the gradient of one class's logit, so the heat
map shows where the evidence for that class lies, at the stage's resolution, upsampled to the input
(target_layers says which stage). A prior adjustment adds a constant to each logit, so it does not
change the maps.

Localisation score (synthetic data, where pqfn synth writes the true masks): for each delaminated scan,
is the heat map's peak on a delaminated pixel? The share of hits per class is compared with a random heat
map's: a peak placed uniformly at random hits with probability equal to the mask's area fraction, so the
random score of a class is the mean area fraction of its masks. Scores use masks at the heat map's
resolution (pqfn.data.load_masks: a pixel counts as delaminated when any part of it is).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from pqfn.bundle import Preprocessing
from pqfn.config import CLASSES
from pqfn.data import Dataset
from pqfn.model import DenseResNet18

# Grad-CAM's stage: the deepest with stride <= MAX_STRIDE that keeps >= MIN_CELLS cells across (target_layers)
MAX_STRIDE, MIN_CELLS = 4, 4


def _members(model: nn.Module) -> list[nn.Module]:
    group = getattr(model, "members", None)  # a FoldEnsemble's members
    return list(group) if isinstance(group, nn.ModuleList) else [model]


def target_layers(model: nn.Module, resolution: int, max_stride: int = MAX_STRIDE,
                  min_cells: int = MIN_CELLS) -> list[nn.Module]:
    """The Grad-CAM layer of each timm model (each member of a FoldEnsemble): the deepest feature stage with
    stride <= max_stride whose map keeps at least `min_cells` cells across at this input resolution.

    Why not the last stage, Grad-CAM's usual choice: at the resolutions small CSAM models use (32-80 px) a
    ResNet's last stage is 1x1 to 3x3, a map that cannot point anywhere. Measured with maps aligned
    (cell_offset) on 149 delaminated scans of 68 unseen synthetic packages (pqfn synth --seed 7), for two
    quickstart fold ensembles (80 px): the peak hit the true delamination for 46 % / 36 % of them at
    stride 4, 33 % / 22 % at stride 8, 30 % / 29 % at stride 16, against 10 % for a random peak
    (README, "Use the model", has the per-class figures: die-pad patches are found at stride 4, the
    C class's evidence at stride 16).
    """
    members = _members(model)
    layers = []
    for m in members:
        info = getattr(m, "feature_info", None)
        stages = [f for f in info if isinstance(f, dict) and "module" in f] if isinstance(info, list) else []
        if stages:
            fit = [f for f in stages if int(f.get("reduction", 1)) <= max_stride
                   and resolution // int(f.get("reduction", 1)) >= min_cells] or stages[:1]
            layers.append(m.get_submodule(fit[-1]["module"]))
        else:  # not a timm model with feature_info: its last convolution
            convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
            if not convs:
                raise ValueError(f"{type(m).__name__} has no convolution for Grad-CAM")
            layers.append(convs[-1])
    return layers


def _prepared(model: nn.Module, images: torch.Tensor | np.ndarray, target_classes: Sequence[int] | np.ndarray,
              device: torch.device | str | None) -> tuple[nn.Module, torch.Tensor, list[int]]:
    """The checked inputs of a heat map: the model in float32 eval mode (on `device`), images (N, 1, r, r), N classes."""
    x_all = torch.as_tensor(images)
    classes = [int(c) for c in np.asarray(target_classes).reshape(-1)]
    if x_all.ndim != 4 or x_all.shape[1] != 1 or len(classes) != len(x_all):
        raise ValueError(f"expected images (N, 1, r, r) and N target classes, got {tuple(x_all.shape)} and {len(classes)}")
    if device is not None:
        model = model.to(device)
    return model.float().eval(), x_all, classes


def gradcam(model: nn.Module, images: torch.Tensor | np.ndarray, target_classes: Sequence[int] | np.ndarray, *,
            batch_size: int = 32, device: torch.device | str | None = None, max_stride: int = MAX_STRIDE) -> np.ndarray:
    """Grad-CAM of `target_classes` for images (N, 1, r, r) uint8 (already at the model's resolution).

    Returns (N, r, r) float32 in [0, 1], each map scaled to its own maximum (all zeros where no location
    speaks for the class). The model runs in float32, eval mode, on `device` (default: where it is).
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, x_all, classes = _prepared(model, images, target_classes, device)
    out = np.zeros((len(x_all), x_all.shape[-2], x_all.shape[-1]), np.float32)
    layers = target_layers(model, x_all.shape[-1], max_stride)
    cells: list[int] = []  # the stage's map size, as grad-cam saw it (every member's stage has the same stride)
    with GradCAM(model=model, target_layers=layers) as cam:
        for s in range(0, len(x_all), batch_size):
            x = Preprocessing.normalise(x_all[s : s + batch_size])
            targets: list[Any] = [ClassifierOutputTarget(c) for c in classes[s : s + batch_size]]
            out[s : s + len(x)] = cam(input_tensor=x, targets=targets)
            cells = cells or [a.shape[-1] for a in cam.activations_and_grads.activations[:1]]
    # Checked out here: grad-cam's __exit__ swallows an IndexError raised inside the block.
    if len(x_all) and not cells:
        raise RuntimeError("grad-cam recorded no activations of the target layer")
    shift = cell_offset(x_all.shape[-1], cells[0]) if cells else 0.0
    if shift:
        out = np.stack([ndimage.shift(h, (-shift, -shift), order=1, mode="nearest") for h in out]).clip(0, 1)
    return out


def has_dense_head(model: nn.Module) -> bool:
    """Whether every member of `model` has pqfn.model's dense delamination head (trial.model resnet18_dense)."""
    members = _members(model)
    return bool(members) and all(isinstance(m, DenseResNet18) for m in members)


# The dense head's channels (die pad, bond pad) that speak for each class: A the die pad, B the bond pad,
# C and D either (D: where the model sees delamination most, had there been any).
DENSE_CHANNELS = {"A": (0,), "B": (1,), "C": (0, 1), "D": (0, 1)}


def dense_maps(model: nn.Module, images: torch.Tensor | np.ndarray, target_classes: Sequence[int] | np.ndarray, *,
               batch_size: int = 32, device: torch.device | str | None = None) -> np.ndarray:
    """The dense head's own map (resnet18_dense): per cell, the probability that the target class's finding
    (DENSE_CHANNELS) is delaminated there, the maximum over its channels, averaged over a FoldEnsemble's
    members, upsampled to the input with cell i centred on pixel 8 x i, where it looks and where its training
    window is centred (pqfn.model.cell_targets), at any resolution.

    Unlike Grad-CAM, which shows where the evidence for a class lies, this map is trained (trial.mask_loss > 0)
    to be the delamination itself. images (N, 1, r, r) uint8 at the model's resolution -> (N, r, r) float32 in
    [0, 1]. Raises ValueError for a model without a dense head (has_dense_head)."""
    import torch.nn.functional as F

    if not has_dense_head(model):
        raise ValueError(f"{type(model).__name__} has no dense delamination head (trial.model resnet18_dense)")
    model, x_all, classes = _prepared(model, images, target_classes, device)
    members = [m for m in _members(model) if isinstance(m, DenseResNet18)]
    dev = next(model.parameters()).device
    r = x_all.shape[-1]
    out = np.zeros((len(x_all), x_all.shape[-2], r), np.float32)
    pick = torch.zeros(len(classes), 2, dtype=torch.bool)
    for i, c in enumerate(classes):
        pick[i, list(DENSE_CHANNELS[CLASSES[c]])] = True
    with torch.no_grad():
        for s in range(0, len(x_all), batch_size):
            x = Preprocessing.normalise(x_all[s : s + batch_size].to(dev))
            prob = torch.stack([torch.sigmoid(m.cell_logits(x).float()) for m in members]).mean(0)  # (B, 2, h, w)
            chosen = prob.masked_fill(~pick[s : s + len(x), :, None, None].to(prob.device), 0.0).amax(1, keepdim=True)
            # cell i's centre lands on pixel stride x i + (stride - 1) / 2 here; the shift below puts it on stride x i
            up = F.interpolate(chosen, scale_factor=DenseResNet18.STRIDE, mode="bilinear", align_corners=False)
            out[s : s + len(x)] = up[:, 0, : x_all.shape[-2], :r].cpu().numpy()
    shift = (DenseResNet18.STRIDE - 1) / 2
    if len(out):
        out = np.stack([ndimage.shift(h, (-shift, -shift), order=1, mode="nearest") for h in out]).clip(0, 1)
    return out


def cell_offset(resolution: int, cells: int) -> float:
    """How far (input pixels, down and right) Grad-CAM's upsampling places each cell from where it looks.

    grad-cam stretches the (cells x cells) map over the input as if cell i were centred on pixel
    (i + 0.5) x stride - 0.5. In a network whose strided convolutions and pools pad "same" (odd kernels,
    padding (k - 1) / 2: every timm ResNet), cell i is centred on pixel i x stride: measured as the centroid
    of d(cell)/d(input) for ResNet-18 at 64 px, stride 8: pixel 16.1-16.6 for cell 2, where the upsampled map
    puts 19.5. Uncorrected, every heat map sits (stride - 1) / 2 pixels down and right of the evidence.
    """
    stride = resolution / cells
    return (stride - 1) / 2 if stride > 1 else 0.0


def localisation_score(heat: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, float]]:
    """Per delaminated class (A, B, C) and over all of them ("all"): does the Grad-CAM peak fall inside the
    true delaminated region?

    heat (N, r, r), masks (N, r, r) (0 = none, else delaminated; same resolution), labels (N,) class indices.
    Scans labelled D, and delaminated scans whose mask vanished at this resolution (counted as n_empty_mask),
    are left out. A map without a peak (constant, e.g. all zeros) counts as a miss. Per class:
      n            scans scored
      peak_hit     share of them whose heat-map maximum lies on a delaminated pixel
      random       the same for a uniformly random peak: the mean mask area fraction
      margin       peak_hit - random
      se           binomial standard error of peak_hit, sqrt(p (1 - p) / n)
    """
    heat, masks, labels = np.asarray(heat), np.asarray(masks), np.asarray(labels)
    if heat.shape != masks.shape or heat.ndim != 3 or len(labels) != len(heat):
        raise ValueError(f"expected heat and masks (N, r, r) and labels (N,), got {heat.shape}, {masks.shape}, {labels.shape}")
    flat_mask = masks.reshape(len(masks), -1) > 0
    hit = peak_hits(heat, masks)
    area = flat_mask.mean(1)
    nonempty = flat_mask.any(1)
    d = CLASSES.index("D")
    out: dict[str, dict[str, float]] = {}
    groups = {c: labels == i for i, c in enumerate(CLASSES) if i != d}
    groups["all"] = labels != d
    for name, of_class in groups.items():
        sel = of_class & nonempty
        n = int(sel.sum())
        p = float(hit[sel].mean()) if n else float("nan")
        rnd = float(area[sel].mean()) if n else float("nan")
        out[name] = {
            "n": n, "n_empty_mask": int((of_class & ~nonempty).sum()), "peak_hit": p, "random": rnd,
            "margin": p - rnd, "se": float(np.sqrt(p * (1 - p) / n)) if n else float("nan"),
        }
    return out


def save_overlay(path: Path, image: np.ndarray, heat: np.ndarray, title: str, alpha: float = 0.45) -> None:
    """The scan (H, W) uint8 in gray with the heat map (r, r) in [0, 1] over it, stretched to the scan's size."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    h, w = image.shape
    fig = Figure(figsize=(4.0, 4.4))
    ax = fig.subplots()
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, extent=(0, w, h, 0))
    # extent maps the coarse heat map onto the same pixel frame; bilinear smooths its blocks
    ax.imshow(heat, cmap="jet", alpha=alpha, vmin=0, vmax=1, extent=(0, w, h, 0), interpolation="bilinear")
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=100)


def peak_hits(heat: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N,) bool: does each map's maximum lie on a delaminated pixel? A map without a peak (constant) misses."""
    n = len(heat)
    flat_heat, flat_mask = heat.reshape(n, -1), masks.reshape(n, -1) > 0
    peak = flat_heat.argmax(1)
    return (flat_heat.max(1) > flat_heat.min(1)) & flat_mask[np.arange(n), peak]  # type: ignore[no-any-return]


def brightest_pixel_maps(x: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Localisation baseline 1: the scan itself, lightly blurred (sigma in pixels at the model's resolution), as
    a heat map. Delamination is the brightest thing in a C-scan, so its peak is a strong cheap guess."""
    x = np.asarray(x, np.float32).reshape(len(x), x.shape[-2], x.shape[-1])
    return np.stack([ndimage.gaussian_filter(a, sigma) for a in x]) if len(x) else x


def fixed_location_maps(train_masks: np.ndarray, train_labels: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Localisation baseline 2: for a scan of class c, the mean of the training scans' masks of class c (where
    class-c delamination usually is), the same map for every scan of that class; zeros without such scans."""
    r = train_masks.shape[-2:]
    means = {c: (train_masks[train_labels == c] > 0).mean(0) if (train_labels == c).any() else np.zeros(r)
             for c in np.unique(labels)}
    return np.stack([means[c] for c in labels]).astype(np.float32) if len(labels) else np.zeros((0, *r), np.float32)


def localisation_report(model: nn.Module, ds: Dataset, rows: np.ndarray, train_rows: np.ndarray, resolution: int, *,
                        reduce: str = "bilinear", max_stride: int = MAX_STRIDE, batch_size: int = 32,
                        device: torch.device | str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Grad-CAM's localisation score on ds[rows] (holdout_localisation's dict) and, beside it, both cheap
    localisation baselines on the same scans (brightest pixel of the lightly blurred scan; the mean training mask
    of the scan's class, from `train_rows`), each hit rate with a package-bootstrap interval, and Grad-CAM minus
    each baseline paired by package; for a model with a dense head (resnet18_dense) its own map the same way
    ("dense_map", "dense_map_minus"). Raises DataError without masks."""
    import contextlib

    from pqfn import bootstrap
    from pqfn.data import load_masks
    from pqfn.errors import DataError

    rows, x, masks, heat = _delaminated_heat(model, ds, rows, resolution, max_stride, batch_size, device, reduce)
    labels = ds.labels[rows]
    score = localisation_score(heat, masks, labels)
    train = np.unique(np.asarray(train_rows))
    train = train[ds.labels[train] != CLASSES.index("D")]
    maps = {"brightest_pixel": brightest_pixel_maps(x.numpy())}
    with contextlib.suppress(DataError):  # the training scans' masks (a data set may have them for test packages only)
        maps["fixed_location"] = fixed_location_maps(load_masks(ds.subset(train), resolution), ds.labels[train], labels)
    hits = {"gradcam": peak_hits(heat, masks)} | {name: peak_hits(m, masks) for name, m in maps.items()}
    models = ["gradcam"]
    if has_dense_head(model):  # the dense head's own map, scored the same way (of the TRUE class, as Grad-CAM)
        hits["dense_map"] = peak_hits(dense_maps(model, x, labels, batch_size=batch_size, device=device), masks)
        models.append("dense_map")
    keep = (masks.reshape(len(masks), -1) > 0).any(1)  # a mask that vanished at this resolution is not scored
    groups = ds.package_ids[rows]
    d = CLASSES.index("D")
    sets = {c: keep & (labels == i) for i, c in enumerate(CLASSES) if i != d} | {"all": keep}
    out: dict[str, Any] = {"level": bootstrap.LEVEL, "resamples": bootstrap.N_BOOT}
    for name, h in hits.items():
        out[name] = {c: {"n": int(sel.sum())} | bootstrap.rate_interval(h[sel], groups[sel]).to_dict()
                     for c, sel in sets.items()}
    for who in models:  # gradcam_minus, dense_map_minus: each map minus each baseline, paired by package
        out[f"{who}_minus"] = {}
        for name in maps:
            diff = {c: bootstrap.paired_rate_difference(hits[who][sel], hits[name][sel], groups[sel])
                    for c, sel in sets.items()}
            out[f"{who}_minus"][name] = {c: v.to_dict() | {"outcome": bootstrap.verdict(v)} for c, v in diff.items()}
    return score, out


def holdout_localisation(model: nn.Module, ds: Dataset, rows: np.ndarray, resolution: int, *,
                         reduce: str = "bilinear", max_stride: int = MAX_STRIDE, batch_size: int = 32,
                         device: torch.device | str | None = None) -> dict[str, dict[str, float]]:
    """The localisation score of `model` on ds[rows] (e.g. the held-out packages of a synthetic data set).

    Grad-CAM of each delaminated scan's TRUE class (does the evidence for what is there lie where it is?),
    at the model's input resolution, against the masks pqfn synth wrote (pqfn.data.load_masks; a data set
    without masks raises DataError). Returns localisation_score's dict.
    """
    rows, _, masks, heat = _delaminated_heat(model, ds, rows, resolution, max_stride, batch_size, device, reduce)
    return localisation_score(heat, masks, ds.labels[rows])


def _delaminated_heat(model: nn.Module, ds: Dataset, rows: np.ndarray, resolution: int, max_stride: int,
                      batch_size: int, device: torch.device | str | None, reduce: str = "bilinear",
                      ) -> tuple[np.ndarray, torch.Tensor, np.ndarray, np.ndarray]:
    """The delaminated rows of ds[rows] (D scans have nothing to point at), their images at the model's
    resolution (N, 1, r, r) uint8 (shrunk as the model's were, `reduce`), true masks and Grad-CAM maps of their TRUE class (N, r, r)."""
    from pqfn.data import load_masks
    from pqfn.errors import DataError

    rows = np.asarray(rows)
    rows = rows[ds.labels[rows] != CLASSES.index("D")]
    if len(rows) == 0:
        raise DataError("no delaminated (A, B, C) scan among them to localise")
    x = Preprocessing(ds.images.shape[-1], resolution, reduce).resize(ds.images[rows])
    masks = load_masks(ds.subset(rows), resolution)
    heat = gradcam(model, x, ds.labels[rows], batch_size=batch_size, device=device, max_stride=max_stride)
    return rows, x, masks, heat
