"""Batched training-fold augmentation (random rotation and contrast) as tensor ops on CPU or GPU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment_batch(
    x: torch.Tensor, gen: torch.Generator, rotation_deg: float, contrast: float, hflip: bool = False,
    gain: float = 0.0, dihedral: bool = False,
) -> torch.Tensor:
    return augment_with_masks(x, None, gen, rotation_deg, contrast, hflip, gain, dihedral)[0]


def augment_with_masks(
    x: torch.Tensor, masks: torch.Tensor | None, gen: torch.Generator, rotation_deg: float, contrast: float,
    hflip: bool = False, gain: float = 0.0, dihedral: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: (B, 1, H, W) float in [0, 1] -> same shape, each image rotated, contrast-scaled, (gain > 0) multiplied
    by a gain factor at random (a scanner's gain drifts between sessions) and (dihedral) turned by a multiple of
    90 degrees and mirrored at random (the square package's symmetries). The memory format of x is kept.

    Random numbers come from `gen`, a generator on x's device: drawn there, no host-to-device copy per batch
    (which would make a GPU step wait for the host). Draws differ between CPU and CUDA for the same seed.

    masks: (B, C, H, W) float 0/1 planes (or None) that take the same rotation, mirror and turn as their image and
    no photometric change; a rotated mask stays 0/1 (a pixel is marked when any part of it is covered, so a
    1-pixel patch survives). The random draws are the same with and without masks.
    """
    b = x.shape[0]
    u = torch.rand(b, 3, generator=gen, device=gen.device).to(x.dtype)
    if rotation_deg > 0 or hflip:
        angle = (u[:, 0] * 2 - 1) * math.radians(rotation_deg)
        cos, sin = torch.cos(angle), torch.sin(angle)
        flip = torch.where(u[:, 2] < 0.5, -1.0, 1.0).to(x.dtype) if hflip else torch.ones_like(cos)
        theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
        theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if masks is not None:
            # any coverage marks a pixel, as in every resize of a mask: a rotated 1-pixel patch is not lost
            masks = (F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 1e-3).to(masks.dtype)
    if contrast > 0:
        factor = (1 - contrast + 2 * contrast * u[:, 1]).view(b, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * factor + mean).clamp_(0, 1)
    if gain > 0:  # its own draw, so the other augmentations' random numbers are those of a run without it
        g = (1 - gain + 2 * gain * torch.rand(b, generator=gen, device=gen.device)).to(x.device, x.dtype).view(b, 1, 1, 1)
        x = (x * g).clamp_(0, 1)
    if dihedral:  # its own draw too; one of the 8 symmetries of the square per image
        which = torch.randint(0, 8, (b,), generator=gen, device=gen.device).to(x.device)
        turns, mirror = (which // 2).view(b, 1, 1, 1), (which % 2 == 1).view(b, 1, 1, 1)
        x = _turn(x, turns, mirror)
        if masks is not None:
            masks = _turn(masks, turns, mirror)
    return x, masks


def _turn(x: torch.Tensor, turns: torch.Tensor, mirror: torch.Tensor) -> torch.Tensor:
    """Each image of x turned by its number of quarter turns, then mirrored where `mirror`; memory format kept."""
    y = x
    for q in (1, 2, 3):  # torch.where, not indexing by a mask: no host synchronisation on a GPU
        y = torch.where(turns == q, torch.rot90(x, q, dims=(2, 3)), y)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return torch.where(mirror, y.flip(3), y).contiguous(memory_format=fmt)
