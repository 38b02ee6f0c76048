"""pqfn predict: mixed image formats, folders, manifests, the per-package summary, the CLI."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pqfn.cli import main
from pqfn.config import CLASSES, DataConfig
from pqfn.data import SkippedImagesWarning, decode_image
from pqfn.predict import predict, summarise
from tests.pqfn.bundles import make_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "b")


def _mixed_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (48, 48), np.uint8)).save(root / "a.png")  # 8-bit, decode size
    Image.fromarray(rng.integers(0, 65536, (64, 64)).astype(np.uint16)).save(root / "sub" / "b.tif")  # 16-bit
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), np.uint8)).save(root / "sub" / "c.JPG")  # RGB, not square
    Image.fromarray(rng.integers(0, 256, (30, 30), np.uint8)).save(root / "d.bmp")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "notes.txt").write_text("operator notes")
    return root


def test_mixed_formats_one_warning_probabilities_sum_to_one(tmp_path: Path, bundle: Path) -> None:
    folder = _mixed_folder(tmp_path / "scans")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = predict(bundle, [folder], batch=3)
    skipped = [w for w in caught if issubclass(w.category, SkippedImagesWarning)]
    assert len(skipped) == 1 and "broken.png" in str(skipped[0].message) and "notes.txt" in str(skipped[0].message)
    assert sorted(Path(r["path"]).name for r in res.rows) == ["a.png", "b.tif", "c.JPG", "d.bmp"]
    for r in res.rows:
        assert r["predicted"] in CLASSES
        assert sum(r[f"prob_{c}"] for c in CLASSES) == pytest.approx(1, abs=1e-9)
        assert sum(r[f"raw_prob_{c}"] for c in CLASSES) == pytest.approx(1, abs=1e-9)
        assert r["predicted"] == max(CLASSES, key=lambda c: r[f"prob_{c}"])
    assert res.adjusted and res.summary == []  # no package ids without a manifest
    raw = predict(bundle, folder / "a.png", adjust=False)
    assert not raw.adjusted and raw.rows[0]["prob_A"] == raw.rows[0]["raw_prob_A"]
    # The same decoding as training: a 16-bit scan decodes like its 8-bit version.
    b16 = decode_image(folder / "sub" / "b.tif", 48)
    assert b16.dtype == np.uint8 and b16.shape == (48, 48) and b16.std() > 0


def test_synth_folder_uses_its_manifest_and_skips_masks(tmp_path: Path, bundle: Path, tiny_data_cfg: DataConfig,
                                                        tiny_ds: object) -> None:
    root = tiny_data_cfg.path  # a pqfn synth folder: images, masks/, manifest.csv, synth.json
    with (root / "manifest.csv").open() as f:
        manifest = list(csv.DictReader(f))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedImagesWarning)  # masks, manifest.csv, synth.json: not reported
        res = predict(bundle, [root], batch=64)
    assert len(res.rows) == len(manifest)
    assert all(r["package_id"] and r["label"] in CLASSES and "masks" not in r["path"] for r in res.rows)
    assert len(res.summary) == len({(m["package_id"], m["cycles"]) for m in manifest})
    assert res.accuracy() is not None and set(res.summary[0]) >= {"package_id", "cycles", "worst_predicted", "worst_label"}
    # Through the manifest itself: the same rows.
    assert len(predict(bundle, root / "manifest.csv").rows) == len(manifest)


def test_worst_state_order() -> None:
    rows = [{"package_id": "P1", "cycles": "100", "predicted": p, "label": lab}
            for p, lab in [("A", "D"), ("B", "A"), ("D", "D")]]
    rows += [{"package_id": "P1", "cycles": "20", "predicted": p} for p in ("D", "C", "A")]
    rows += [{"predicted": "C"}]  # no package id: not summarised
    s = summarise(rows)
    assert [(r["cycles"], r["worst_predicted"]) for r in s] == [("20", "C"), ("100", "B")]
    assert s[1]["worst_label"] == "A" and "worst_label" not in s[0] and s[1]["n_B"] == 1


def test_cli_predict_writes_tables_and_overlays(tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (48, 48), np.uint8)).save(scans / f"P{i}_c100.png")
    (scans / "list.csv").write_text("path,package_id,cycles\nP0_c100.png,P0,100\nP1_c100.png,P1,100\n")
    out = tmp_path / "out" / "pred.csv"
    args = ["predict", str(bundle), str(scans / "list.csv"), "--out", str(out), "--explain", str(tmp_path / "cam")]
    assert main(args) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "predicted", *(f"prob_{c}" for c in CLASSES), *(f"raw_prob_{c}" for c in CLASSES),
                             "package_id", "cycles"]
    assert (tmp_path / "out" / "pred_packages.csv").read_text().startswith("package_id,metallization,cycles,n_scans,worst_predicted")
    assert sorted(p.name for p in (tmp_path / "cam").iterdir()) == [".pqfn-output", "P0_c100.png", "P1_c100.png"]
    assert "images/s" in capsys.readouterr().out
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main(["predict", str(bundle), str(tmp_path / "nowhere")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_explain_shows_a_dense_models_own_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pqfn.explain as ex

    dense = make_bundle(tmp_path / "dense", members=2, model_name="resnet18_dense")
    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 48), np.uint8)).save(scans / "P0_c0.png")
    titles: list[str] = []
    monkeypatch.setattr(ex, "gradcam", lambda *a, **k: pytest.fail("Grad-CAM used for a dense-head model"))
    real_overlay = ex.save_overlay
    monkeypatch.setattr(ex, "save_overlay", lambda path, image, heat, title: (titles.append(title),
                                                                             real_overlay(path, image, heat, title)))
    before = (scans / "P0_c0.png").read_bytes()
    predict(dense, [scans], explain_dir=tmp_path / "maps")
    assert (tmp_path / "maps" / "P0_c0.png").is_file() and titles and titles[0].endswith("dense-head map")
    assert (scans / "P0_c0.png").read_bytes() == before
