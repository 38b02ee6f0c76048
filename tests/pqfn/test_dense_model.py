"""resnet18_dense (pqfn.model.DenseResNet18) and trial.mask_loss: built by name, trained on the true masks,
masks that follow their image through augmentation, and the errors when a part is missing."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from pqfn.augment import augment_with_masks
from pqfn.config import DataConfig, SynthConfig, TrialConfig, uses_masks, validate
from pqfn.data import Dataset, load_dataset, with_masks
from pqfn.errors import DataError, TrialError
from pqfn.model import DENSE_MODEL, DenseResNet18, build_model, cell_targets, findings_log_probs
from pqfn.splits import split_test
from pqfn.synth import generate
from pqfn.trial import CrossValidation

TINY = dict(model=DENSE_MODEL, mask_loss=5.0, resolution=32, folds=2, epochs=1, data_size=40, batch_size=8,
            max_copies=10, device="cpu")


def test_built_by_name_like_any_timm_model() -> None:
    assert timm.is_model(DENSE_MODEL)
    m = build_model(DENSE_MODEL)
    assert isinstance(m, DenseResNet18)
    plain = build_model("resnet18")
    # every ResNet-18 weight is there, plus the 1x1 dense head (2 x 128 weights + 2 biases)
    extra = {k: v.shape for k, v in m.state_dict().items() if k not in plain.state_dict()}
    assert extra == {"dense.weight": torch.Size([2, 128, 1, 1]), "dense.bias": torch.Size([2])}
    m.eval()
    out = m(torch.randn(3, 1, 64, 64))
    assert out.shape == (3, 4) and torch.isfinite(out).all()


def test_findings_make_a_distribution_over_the_four_classes() -> None:
    z = torch.tensor([[8.0, -8.0], [-8.0, 8.0], [8.0, 8.0], [-8.0, -8.0], [0.3, -1.2]])
    lp = findings_log_probs(z)
    assert torch.allclose(lp.logsumexp(1), torch.zeros(5), atol=1e-6)
    assert lp[:4].argmax(1).tolist() == [0, 1, 2, 3]  # die pad only = A, bond pad only = B, both = C, none = D


def test_dense_loss_falls_where_the_mask_is_learned() -> None:
    torch.manual_seed(0)
    m = build_model(DENSE_MODEL)
    m.train()
    x = torch.zeros(4, 1, 32, 32)
    masks = torch.zeros(4, 2, 32, 32)
    x[:2, :, 5:11, 5:11] = 3.0  # a bright patch where the bond-pad plane is marked (centred on cell 1, 1)
    masks[:2, 1, 5:11, 5:11] = 1.0
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        m(x)
        loss = m.dense_loss(masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(RuntimeError, match="before a training forward"):
        m.dense_loss(masks)  # the cells of a forward are used once


def test_masks_follow_their_image_through_rotation_and_the_dihedral_turns() -> None:
    g = torch.Generator().manual_seed(3)
    masks = torch.zeros(8, 2, 24, 24)
    for i in range(8):
        masks[i, i % 2, 2 + i : 7 + i, 3 : 5 + i] = 1.0  # asymmetric blobs, so every turn and mirror shows
    x = masks[:, :1] * 0.6 + masks[:, 1:] * 0.9  # the image is its masks, drawn in two levels
    # no photometric change (contrast, gain), no interpolation: the image must still be its masks
    out, out_masks = augment_with_masks(x.clone(), masks.clone(), g, 0.0, 0.0, False, 0.0, True)
    assert out_masks is not None
    assert torch.equal(out, out_masks[:, :1] * 0.6 + out_masks[:, 1:] * 0.9)
    assert not torch.equal(out_masks, masks)  # something was turned
    # the same draws with and without masks
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, _ = augment_with_masks(x.clone(), masks.clone(), g1, 15.0, 0.2, False, 0.1, True)
    b, none = augment_with_masks(x.clone(), None, g2, 15.0, 0.2, False, 0.1, True)
    assert none is None and torch.equal(a, b)
    # a rotated mask stays 0/1, marks every pixel its patch touches (any coverage), and grows by little
    _, rot = augment_with_masks(x.clone(), masks.clone(), torch.Generator().manual_seed(1), 20.0, 0.0, False, 0.0, False)
    assert rot is not None and set(rot.unique().tolist()) <= {0.0, 1.0}
    assert masks.sum().item() <= rot.sum().item() < 2.5 * masks.sum().item()


def test_a_one_pixel_patch_survives_every_rotation() -> None:
    # the smallest bond-pad patches are what the CNN misses: their cell target must never be rotated away
    masks = torch.zeros(64, 2, 32, 32)
    masks[:, 1, 11, 19] = 1.0
    _, rot = augment_with_masks(torch.zeros(64, 1, 32, 32), masks, torch.Generator().manual_seed(0), 15.0, 0.0,
                                False, 0.0, True)
    assert rot is not None and (rot[:, 1].flatten(1).amax(1) == 1).all() and not rot[:, 0].any()


def test_a_trial_trains_the_dense_head_on_the_masks(tiny_ds: Dataset) -> None:
    ds = with_masks(tiny_ds)
    assert ds.masks is not None and ds.masks.shape == ds.images.shape and not ds.masks.flags.writeable
    pool = split_test(ds, 0.2, seed=0).pool
    cv = CrossValidation(TrialConfig(**TINY), ds, pool)
    assert cv.data.masks is not None and cv.data.masks.shape[1:] == (2, 32, 32)
    # the planes hold exactly the classes' findings: die pad for A and C, bond pad for B and C
    labels = cv.data.labels.numpy()
    die, bond = (cv.data.masks[:, 0].flatten(1).amax(1).numpy() > 0), (cv.data.masks[:, 1].flatten(1).amax(1).numpy() > 0)
    assert (die == np.isin(labels, [0, 2])).all() and (bond == np.isin(labels, [1, 2])).all()
    before = {k: v.clone() for k, v in cv.learners[0].model.dense.state_dict().items()}
    rec = cv.fit().final
    assert np.isfinite(rec["val/loss"])
    after = cv.learners[0].model.dense.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_mask_loss_needs_the_dense_model_and_the_masks(tiny_ds: Dataset, tmp_path: Path) -> None:
    pool = split_test(tiny_ds, 0.2, seed=0).pool
    with pytest.raises(TrialError, match="trial.mask_loss=5.0 needs trial.model=resnet18_dense"):
        CrossValidation(TrialConfig(**(TINY | {"model": "resnet18"})), tiny_ds, pool)
    with pytest.raises(TrialError, match="needs the data set's masks"):
        CrossValidation(TrialConfig(**TINY), tiny_ds, pool)  # masks not decoded
    # an image without a mask: one line naming it and why masks are needed
    files = tiny_ds.files.astype(object)
    files[0] = str(tmp_path / "elsewhere.png")
    ds = dataclasses.replace(tiny_ds, files=files)
    with pytest.raises(DataError, match=r"trial.mask_loss > 0 needs a mask for every image: .*elsewhere.png"):
        with_masks(ds)


def _manifest_set(tmp_path: Path) -> Path:
    """A small synthetic set whose manifest is not called manifest.csv, with palette-mode mask PNGs (as
    annotation tools write them)."""
    cfg = SynthConfig(packages={"Ag": 3, "NiPdAu": 3, "Cu": 2}, image_size=64, cycle_step=250)
    generate(cfg, tmp_path, workers=1)
    (tmp_path / "manifest.csv").rename(tmp_path / "labels.csv")
    for f in (tmp_path / "masks").rglob("*.png"):
        m = Image.open(f)
        p = Image.fromarray(np.asarray(m), mode="L").convert("P")
        p.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
        p.save(f)
        assert Image.open(f).mode == "P"
    return tmp_path / "labels.csv"


def test_masks_come_from_the_configured_manifest_and_palette_pngs(tmp_path: Path) -> None:
    manifest = _manifest_set(tmp_path)
    cfg = DataConfig(source="manifest", path=manifest, decode_size=32, cache_dir=tmp_path / "c")
    ds = load_dataset(cfg, log=False, masks=True)  # the label check inside passes only if every mask was read right
    assert ds.masks is not None and set(np.unique(ds.masks).tolist()) == {0, 1, 2}
    assert uses_masks(validate({"trial": {"model": DENSE_MODEL}, "search": {"type": "grid", "axes": [
        {"trial.mask_loss": [0, 10]}]}}, "t.yaml"))


def test_a_mask_that_contradicts_its_label_is_one_line(tmp_path: Path) -> None:
    manifest = _manifest_set(tmp_path)
    rows = list(csv.DictReader(manifest.open()))
    d = next(r for r in rows if r["label"] == "D")
    blank_of_a_d_scan = tmp_path / d["mask"]
    a = next(r for r in rows if r["label"] == "A")
    (tmp_path / a["mask"]).write_bytes(blank_of_a_d_scan.read_bytes())  # an A scan whose mask is empty
    before = {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
    cfg = DataConfig(source="manifest", path=manifest, decode_size=32, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"contradicts its label A \(die-pad pixels: no, bond-pad pixels: no; 1 image"):
        load_dataset(cfg, log=False, masks=True)
    assert {f: f.read_bytes() for f in before} == before  # nothing of the user's was touched


@pytest.mark.parametrize("r", [32, 100, 112])
def test_a_cell_learns_the_window_centred_where_it_looks(r: int) -> None:
    # stride 8: cell i looks at pixel 8i (pqfn.explain.cell_offset), so its target window is 8i-4 .. 8i+3, at
    # any resolution (at 100 px the stage has 13 cells, and r / cells = 7.7 is not the stride)
    cells = build_model(DENSE_MODEL).eval().cell_logits(torch.zeros(1, 1, r, r)).shape[-1]
    assert cells == -(-r // 8)

    def cell_of(y: int, x: int) -> list[list[int]]:
        masks = torch.zeros(1, 2, r, r)
        masks[0, 1, y, x] = 1.0
        t = cell_targets(masks, cells, DenseResNet18.STRIDE)
        assert t.shape == (1, 2, cells, cells) and not t[0, 0].any()
        return t[0, 1].nonzero().tolist()

    for i in range(1, cells - 1):
        assert cell_of(8 * i - 4, 8 * i + 3) == [[i, i]]  # the window's corners
        assert cell_of(8 * i - 5, 8 * i + 4) == [[i - 1, i + 1]]  # one pixel past them
    assert cell_of(r - 1, r - 1) == [[cells - 1, cells - 1]]  # the edge counts for the last cell
    assert cell_of(0, 0) == [[0, 0]]


def test_the_dense_map_puts_each_cell_where_it_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    from pqfn.explain import dense_maps

    for r in (100, 112):
        m = build_model(DENSE_MODEL).eval()
        cells = -(-r // 8)
        for i, j in ((3, 7), (cells - 2, 1)):
            hot = torch.full((1, 2, cells, cells), -8.0)
            hot[0, 0, i, j] = 8.0  # one die-pad cell
            monkeypatch.setattr(m, "cell_logits", lambda x, hot=hot: hot.expand(len(x), -1, -1, -1))
            heat = dense_maps(m, torch.zeros(1, 1, r, r, dtype=torch.uint8), [0])[0]
            y, x = np.unravel_index(heat.argmax(), heat.shape)
            assert abs(y - 8 * i) <= 1 and abs(x - 8 * j) <= 1, (r, i, j, y, x)


def test_the_dense_map_shows_each_classs_own_finding() -> None:
    from pqfn.ensemble import FoldEnsemble
    from pqfn.explain import dense_maps, has_dense_head

    members = [build_model(DENSE_MODEL) for _ in range(2)]
    for m, (die, bond) in zip(members, [(1.0, -1.0), (3.0, -3.0)], strict=True):
        with torch.no_grad():  # constant cells: a logit per channel, the same everywhere
            m.dense.weight.zero_()
            m.dense.bias.copy_(torch.tensor([die, bond]))
    ens = FoldEnsemble(members)
    assert has_dense_head(ens) and not has_dense_head(build_model("resnet18"))
    x = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    maps = dense_maps(ens, x, [0, 1, 2, 3])  # A, B, C, D
    assert maps.shape == (4, 32, 32)
    sig = torch.sigmoid(torch.tensor([1.0, 3.0, -1.0, -3.0])).tolist()
    die, bond = (sig[0] + sig[1]) / 2, (sig[2] + sig[3]) / 2  # each channel averaged over the members
    np.testing.assert_allclose(maps[:, 16, 16], [die, bond, die, die], rtol=1e-5)  # C and D: the larger channel
    with pytest.raises(ValueError, match="no dense delamination head"):
        dense_maps(build_model("resnet18"), x, [0, 1, 2, 3])


def test_the_dense_map_is_scored_beside_gradcam(tiny_ds: Dataset) -> None:
    from pqfn.explain import localisation_report

    ds = with_masks(tiny_ds)
    ho = split_test(ds, 0.2, seed=0)
    cv = CrossValidation(TrialConfig(**TINY), ds, ho.pool)
    cv.fit()
    model = cv.learners[0].model
    _, out = localisation_report(model, ds, ho.test, cv.entries, 32)
    n = out["gradcam"]["all"]["n"]
    assert n > 0 and out["dense_map"]["all"]["n"] == n and 0 <= out["dense_map"]["all"]["value"] <= 1
    assert set(out["dense_map_minus"]) == set(out["gradcam_minus"]) == {"brightest_pixel", "fixed_location"}
    assert out["dense_map_minus"]["brightest_pixel"]["all"]["outcome"] in {"beats", "tied", "loses"}
    _, plain = localisation_report(build_model("resnet18"), ds, ho.test, cv.entries, 32)
    assert "dense_map" not in plain and "dense_map_minus" not in plain
