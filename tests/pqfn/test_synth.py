from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pqfn.cli import main
from pqfn.config import SynthConfig
from pqfn.synth import class_counts, generate


def _arrays(root: Path, records: list) -> list[np.ndarray]:
    return [np.asarray(Image.open(root / r.path)) for r in records]


def test_deterministic_per_seed(tmp_path: Path) -> None:
    cfg = SynthConfig(packages={"Ag": 2, "NiPdAu": 2, "Cu": 1}, image_size=64, cycle_step=500)
    a = generate(cfg, tmp_path / "a", workers=1)
    b = generate(cfg, tmp_path / "b", workers=2)
    c = generate(cfg.model_copy(update={"seed": 1}), tmp_path / "c", workers=1)
    assert a == b
    assert (tmp_path / "a/manifest.csv").read_text() == (tmp_path / "b/manifest.csv").read_text()
    assert all(np.array_equal(x, y) for x, y in zip(_arrays(tmp_path / "a", a), _arrays(tmp_path / "b", b), strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(_arrays(tmp_path / "a", a), _arrays(tmp_path / "c", c), strict=True))


@pytest.fixture(scope="module")
def default_small(tmp_path_factory: pytest.TempPathFactory) -> list:
    # The study's 140 packages and 0..1000 cycles, at a small image size to stay fast.
    return generate(SynthConfig(image_size=64), tmp_path_factory.mktemp("synth"))


def test_metallization_trend_at_1000_cycles(default_small: list) -> None:
    share = {}
    for metal in ("NiPdAu", "Ag", "Cu"):
        last = [r for r in default_small if r.metallization == metal and r.cycles == 1000]
        share[metal] = np.mean([r.label in ("A", "C") for r in last])
    assert share["NiPdAu"] > share["Ag"] > share["Cu"] == 0


def test_study_defaults_and_class_b_rarest(default_small: list) -> None:
    assert len({r.package_id for r in default_small}) == 140
    assert sorted({r.cycles for r in default_small}) == list(range(0, 1001, 100))
    counts = class_counts(default_small)
    assert min(counts, key=counts.get) == "B" and counts["B"] > 0
    # Labels follow from the simulated delamination: nothing is delaminated before cycling.
    assert all(r.label == "D" for r in default_small if r.cycles == 0)
    # Delamination only grows: once die-pad delaminated, a package stays so.
    by_pkg: dict[str, list] = {}
    for r in default_small:
        by_pkg.setdefault(r.package_id, []).append(r)
    for scans in by_pkg.values():
        die = [r.label in ("A", "C") for r in sorted(scans, key=lambda r: r.cycles)]
        assert die == sorted(die)


def test_synth_cli_preview_and_refuses_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    args = ["synth", str(out), "--ag", "2", "--nipdau", "2", "--cu", "2", "--image-size", "64", "--cycle-step", "500", "--preview"]
    assert main(args) == 0
    assert (out / "preview.png").stat().st_size > 1000
    assert (out / "manifest.csv").read_text().startswith("path,label,package_id,metallization,cycles")
    before = (out / "manifest.csv").read_text()
    assert main(args) == 2
    assert "already holds a data set" in capsys.readouterr().err
    assert (out / "manifest.csv").read_text() == before


def test_amplitudes_follow_the_reflection_coefficients() -> None:
    from pqfn import synth

    assert abs(synth.R_PAD - 0.73) < 0.01  # mold | Cu: a bonded pad
    assert abs(synth.R_AIR - 1.0) < 1e-3  # mold | air: delamination or a void
    assert synth.reflection(6.5, 0.0004) < 0  # the air gap inverts the phase


def test_pristine_scans_carry_bright_features_that_are_not_delamination(tmp_path: Path) -> None:
    # Voids (air, |R| = 1) in the mold of cycle-0 scans: bright pixels outside any pad, with an empty mask.
    cfg = SynthConfig(packages={"Ag": 6, "NiPdAu": 0, "Cu": 0}, image_size=200, cycle_step=1000, seed=3)
    recs = generate(cfg, tmp_path, workers=1)
    fresh = [r for r in recs if r.cycles == 0]
    assert all(r.label == "D" for r in fresh)
    for r in fresh:
        assert not np.asarray(Image.open(tmp_path / r.mask)).any()
    # the void level (0.64-0.92) sits above the mold (0.22-0.28) by far more than the noise
    bright_spots = [int((np.asarray(Image.open(tmp_path / r.path)) > 200).sum()) for r in fresh]
    assert sum(s > 0 for s in bright_spots) >= 2


def test_a_data_folder_of_an_earlier_simulator_is_refused(tmp_path: Path) -> None:
    import json

    from pqfn.config import DataConfig
    from pqfn.data import ensure_synthetic
    from pqfn.errors import DataError

    syn = SynthConfig(packages={"Ag": 1, "NiPdAu": 0, "Cu": 0}, image_size=64, cycle_step=1000)
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "manifest.csv").write_text("path,label\n")
    (folder / "synth.json").write_text(json.dumps(syn.model_dump(mode="json")))  # version 1 wrote no "simulator"
    with pytest.raises(DataError, match="earlier version of the simulator"):
        ensure_synthetic(DataConfig(path=folder, synthetic=syn))
