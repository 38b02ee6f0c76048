from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pqfn.data as data_mod
from pqfn.config import DataConfig
from pqfn.data import SkippedImagesWarning, load_dataset
from pqfn.errors import DataError


def _folder_set(root: Path) -> Path:
    """Class folders with every supported format, mixed sizes, and some bad files."""
    rng = np.random.default_rng(0)
    for c in "ABCD":
        (root / c).mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (40, 40), np.uint8)).save(root / "A/P01_c100.png")
    Image.fromarray(rng.integers(0, 255, (30, 50), np.uint8)).save(root / "A/P02_c100.bmp")
    Image.fromarray(np.full((64, 64), 32768, np.uint16)).save(root / "B/P03_c200.tif")  # 16-bit
    Image.fromarray(rng.integers(0, 255, (50, 50, 3), np.uint8), "RGB").save(root / "C/P04_c300.jpg")
    Image.fromarray(rng.integers(0, 255, (45, 45, 3), np.uint8), "RGB").save(root / "D/P05_c0.png")  # false colour
    (root / "D/P06_c0.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")  # corrupt
    (root / "D/notes.txt").write_text("not an image")
    return root


def test_folders_all_formats_mixed_sizes(tmp_path: Path) -> None:
    root = _folder_set(tmp_path / "scans")
    cfg = DataConfig(source="folders", path=root, decode_size=32, package_regex=r"(?P<package>P\d+)_", cache_dir=tmp_path / "c")
    with pytest.warns(SkippedImagesWarning) as rec:
        ds = load_dataset(cfg, log=False)
    msg = str(rec[0].message)
    assert "1 unreadable" in msg and "P06_c0.png" in msg and "notes.txt" not in msg  # not an image: skipped
    assert ds.images.shape == (5, 32, 32) and ds.images.dtype == np.uint8
    assert list(ds.labels) == [0, 0, 1, 2, 3]
    assert list(ds.package_ids) == ["P01", "P02", "P03", "P04", "P05"]
    tif = ds.images[2]
    assert abs(int(tif.mean()) - 128) <= 1  # 16-bit mid-grey -> 8-bit mid-grey


def test_strict_mode_is_an_error(tmp_path: Path) -> None:
    root = _folder_set(tmp_path / "scans")
    cfg = DataConfig(source="folders", path=root, decode_size=32, strict=True, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="1 unreadable image"):
        load_dataset(cfg, log=False)


def test_missing_package_ids_warn(tmp_path: Path) -> None:
    root = _folder_set(tmp_path / "scans")
    cfg = DataConfig(source="folders", path=root, decode_size=32, cache_dir=tmp_path / "c")
    with pytest.warns(UserWarning, match="no package id.*package_regex"):
        ds = load_dataset(cfg, log=False)
    assert not ds.has_package_ids and len(set(ds.package_ids)) == len(ds)


def _manifest(tmp_path: Path, text: str) -> DataConfig:
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "m.csv").write_text(text)
    return DataConfig(source="manifest", path=tmp_path / "m.csv", decode_size=16, cache_dir=tmp_path / "c")


def test_manifest_errors_name_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"m.csv: manifest lacks column\(s\) \['label'\]"):
        load_dataset(_manifest(tmp_path, "path\nx.png\n"), log=False)
    with pytest.raises(DataError, match=r"m.csv line 3: label 'E' is not a class"):
        load_dataset(_manifest(tmp_path, "path,label\nx.png,A\nx.png,E\n"), log=False)
    with pytest.raises(DataError, match=r"line 2: cycles 'many' is not a number"):
        load_dataset(_manifest(tmp_path, "path,label,cycles\nx.png,A,many\n"), log=False)


def test_class_map(tmp_path: Path) -> None:
    cfg = _manifest(tmp_path, "path,label,package_id\nx.png,none,p1\nx.png,diepad,p2\n")
    cfg = cfg.model_copy(update={"class_map": {"none": "D", "diepad": "A"}})
    ds = load_dataset(cfg, log=False)
    assert list(ds.labels) == [3, 0]


def test_decoded_once_then_cached_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _folder_set(tmp_path / "scans")
    (root / "D/P06_c0.png").unlink()
    (root / "D/notes.txt").unlink()
    cfg = DataConfig(source="folders", path=root, decode_size=32, package_regex=r"(P\d+)", cache_dir=tmp_path / "c")
    first = load_dataset(cfg, log=False)
    assert len(list((tmp_path / "c").glob("decoded-*.npz"))) == 1

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(data_mod, "decode_image", boom)
    second = load_dataset(cfg, log=False)  # from the cache: no decoding
    assert np.array_equal(first.images, second.images)
    monkeypatch.undo()
    Image.fromarray(np.full((40, 40), 200, np.uint8)).save(root / "A/P01_c100.png")  # the file changes
    third = load_dataset(cfg, log=False)
    assert int(third.images[0].mean()) == 200
    assert len(list((tmp_path / "c").glob("decoded-*.npz"))) == 2


def test_synthetic_source_generated_once(tiny_data_cfg: DataConfig, tiny_ds: data_mod.Dataset) -> None:
    assert (tiny_data_cfg.path / "manifest.csv").exists()
    assert len(tiny_ds) == 18 * 5 and tiny_ds.has_package_ids
    assert set(tiny_ds.metallization) == {"Ag", "NiPdAu", "Cu"}
    bad = tiny_data_cfg.model_copy(update={"synthetic": tiny_data_cfg.synthetic.model_copy(update={"seed": 9})})
    with pytest.raises(DataError, match="other settings"):
        load_dataset(bad, log=False)


def test_no_warning_for_clean_data(tiny_data_cfg: DataConfig) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset(tiny_data_cfg, log=False)


def test_max_reduce_keeps_a_one_pixel_patch_that_bilinear_averages_away() -> None:
    import torch

    from pqfn.data import resize_uint8

    scan = torch.full((1, 128, 128), 60, dtype=torch.uint8)
    scan[0, 41, 90] = 250  # a bond-pad patch of one pixel at 128 px
    kept = resize_uint8(scan, 64, "max")[0, 0]
    assert kept.shape == (64, 64) and int(kept[20, 45]) == 250  # 2 x 2 window (40-41, 90-91): its brightest
    assert int((kept == 250).sum()) == 1 and int(kept.min()) == 60
    averaged = resize_uint8(scan, 64, "bilinear")[0, 0]
    assert int(averaged.max()) < 130  # diluted into its window's background
    # Enlarging has nothing to keep: both reductions are the same bilinear interpolation.
    assert torch.equal(resize_uint8(scan, 160, "max"), resize_uint8(scan, 160, "bilinear"))
    with pytest.raises(ValueError, match="reduce must be one of"):
        resize_uint8(scan, 64, "nearest")
