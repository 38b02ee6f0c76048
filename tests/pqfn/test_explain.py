"""Grad-CAM through the grad-cam package, and the localisation score against hand-made masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pqfn.bundle import load_bundle
from pqfn.explain import cell_offset, gradcam, localisation_score, target_layers
from pqfn.model import build_model
from tests.pqfn.bundles import make_bundle


def test_localisation_score_by_hand() -> None:
    heat = np.zeros((6, 8, 8), np.float32)
    masks = np.zeros((6, 8, 8), np.uint8)
    labels = np.array([0, 0, 1, 2, 3, 0])  # A, A, B, C, D, A
    masks[0, :4, :4] = 1  # A: die-pad patch of 16/64 pixels, peak inside -> hit
    heat[0, 1, 2] = 1.0
    masks[1, :4, :4] = 1  # A: same patch, peak outside -> miss
    heat[1, 7, 7] = 1.0
    masks[2, 0, 7] = 2  # B: one bond-pad pixel, peak on it -> hit
    heat[2, 0, 7] = 1.0
    masks[3, 4:, 4:] = 1  # C: constant heat map -> no peak -> miss
    heat[3] = 0.5
    heat[4, 3, 3] = 1.0  # D: not scored
    heat[5, 0, 0] = 1.0  # A whose mask vanished at this resolution: not scored, counted
    s = localisation_score(heat, masks, labels)
    assert s["A"] == pytest.approx({"n": 2, "n_empty_mask": 1, "peak_hit": 0.5, "random": 0.25, "margin": 0.25,
                                    "se": np.sqrt(0.25 / 2)})
    assert s["B"]["peak_hit"] == 1.0 and s["B"]["random"] == pytest.approx(1 / 64)
    assert s["C"]["peak_hit"] == 0.0 and s["C"]["n"] == 1
    assert s["all"]["n"] == 4 and s["all"]["peak_hit"] == 0.5


def test_gradcam_points_at_the_evidence() -> None:
    # logit 0 = mean of the rectified feature map, so class 0's evidence is where the image is bright;
    # logit 1 is its negative: the bright patch speaks against it, so its map is coldest there.
    conv = nn.Conv2d(1, 1, 1)
    head = nn.Linear(1, 4, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
        head.weight.copy_(torch.tensor([[1.0], [-1.0], [0.0], [0.0]]))
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    images = torch.full((2, 1, 16, 16), 40, dtype=torch.uint8)
    images[:, :, 10:13, 2:5] = 250  # a bright "delaminated" patch
    heat = gradcam(model, images, [0, 1])
    assert heat.shape == (2, 16, 16) and heat.dtype == np.float32
    y, x = np.unravel_index(heat[0].argmax(), heat[0].shape)
    assert 10 <= y < 13 and 2 <= x < 5 and heat[0].max() == pytest.approx(1.0, abs=1e-5)
    assert heat[1, 10:13, 2:5].max() == 0.0 and heat[1, :8].min() > 0.5


def test_gradcam_on_a_bundle_model_and_its_layer(tmp_path: Path) -> None:
    b = load_bundle(make_bundle(tmp_path / "b", members=2, model_name="resnet18"))
    layers = target_layers(b.model, 32)
    assert len(layers) == 2 and layers[0] is b.model.members[0].layer1  # stride 4: 8x8 cells at 32 px
    assert target_layers(b.model, 64, max_stride=8)[0] is b.model.members[0].layer2
    assert target_layers(b.model, 16, max_stride=8)[1] is b.model.members[1].layer1  # stride 8: only 2x2 cells
    images = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    heat = gradcam(b.model, images, [0, 2, 3])
    assert heat.shape == (3, 32, 32) and heat.min() >= 0 and heat.max() <= 1 + 1e-6


@pytest.mark.parametrize("stride", [4, 8, 16])
def test_heat_map_cells_sit_where_they_look(stride: int) -> None:
    """Where the (corrected) heat map puts a cell is where that cell's evidence comes from: the centroid of
    d(cell)/d(input) of a ResNet-18. Uncorrected, grad-cam's upsampling puts it (stride - 1) / 2 px off."""
    torch.manual_seed(0)
    model, res = build_model("resnet18").eval(), 64
    (layer,) = target_layers(model, res, max_stride=stride, min_cells=1)
    seen: dict[str, torch.Tensor] = {}
    hook = layer.register_forward_hook(lambda _m, _i, out: seen.__setitem__("f", out))
    x = torch.randn(1, 1, res, res, requires_grad=True)
    model(x)
    hook.remove()
    cells = seen["f"].shape[-1]
    assert res // cells == stride
    i = cells // 2
    seen["f"][0, :, i, i].sum().backward()
    g = x.grad[0, 0].abs()  # type: ignore[index]
    coords = torch.arange(res, dtype=torch.float32)
    centroid = float((g.sum(1) * coords).sum() / g.sum()), float((g.sum(0) * coords).sum() / g.sum())
    upsampled = (i + 0.5) * stride - 0.5  # where grad-cam's resize puts cell i's centre
    for c in centroid:
        assert abs(upsampled - cell_offset(res, cells) - c) < 1.0
        assert abs(upsampled - c) > (stride - 1) / 2 - 1.0  # the offset is real, not a no-op


def test_gradcam_maps_land_on_the_evidence_through_strided_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three stride-2 "same" convolutions (stride 8, as a ResNet's stage 2): a bright patch centred on pixel
    32 is seen by cell 4 (centred on 4 x 8 = 32). The corrected map peaks on the patch; grad-cam's own
    upsampling would put cell 4 at 35.5, off the patch."""
    convs = [nn.Conv2d(1, 1, 3, stride=2, padding=1, bias=False) for _ in range(3)]
    head = nn.Linear(1, 4, bias=False)
    with torch.no_grad():
        for c in convs:
            c.weight.fill_(1 / 9)
        head.weight.copy_(torch.tensor([[1.0], [0.0], [0.0], [0.0]]))
    model = nn.Sequential(*convs, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    images = torch.full((1, 1, 64, 64), 128, dtype=torch.uint8)  # about 0 after the normalisation
    images[:, :, 31:34, 31:34] = 255
    heat = gradcam(model, images, [0])[0]
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert 31 <= y <= 33 and 31 <= x <= 33
    monkeypatch.setattr("pqfn.explain.cell_offset", lambda resolution, cells: 0.0)
    y, x = np.unravel_index(gradcam(model, images, [0])[0].argmax(), heat.shape)
    assert y >= 35 and x >= 35  # (stride - 1) / 2 = 3.5 px down and right
