from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pqfn.cli import main
from pqfn.dfi import compatibility, load_design, load_thresholds, score
from pqfn.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TH = ROOT / "configs/dfi/cowos-thresholds.yaml"
DESIGN = ROOT / "configs/dfi/cowos-design.yaml"


def test_compatibility_shape() -> None:
    assert compatibility(1.0) == pytest.approx(0.5)
    r = np.linspace(-50, 50, 2001)
    c = np.array([compatibility(x) for x in r])
    assert np.all(np.diff(c) > 0) and np.all(np.abs(c) < 1)
    assert compatibility(-2.0) == pytest.approx(-compatibility(2.0))  # odd
    assert compatibility(1.0, steepness=4) == pytest.approx(0.5)
    assert compatibility(2.0, steepness=4) > compatibility(2.0)  # sharper transition


def _files(tmp_path: Path, th: str, design: str) -> tuple[Path, Path]:
    (tmp_path / "t.yaml").write_text(th)
    (tmp_path / "d.yaml").write_text(design)
    return tmp_path / "t.yaml", tmp_path / "d.yaml"


def test_both_directions(tmp_path: Path) -> None:
    t, d = _files(tmp_path, "parameters:\n  pitch: {threshold: 10, weight: 0.5}\n  void: {threshold: 4, direction: smaller_is_better, weight: 0.5}\n",
                  "parameters:\n  pitch: 20\n  void: 2\n")
    res = score(load_thresholds(t), load_design(d))
    p, v = res.parameters
    assert p.ratio == 2.0 and v.ratio == 2.0  # 20/10 and 4/2
    assert res.cmx_ray == pytest.approx(2 / math.pi * math.atan(2.0))


def test_total_always_in_unit_interval(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 7))
        w = rng.random(n)
        w /= w.sum()
        th = "normalize: true\nparameters:\n" + "".join(
            f"  p{i}: {{threshold: {rng.uniform(0.1, 100):.4f}, weight: {w[i]:.6f}, direction: {rng.choice(['larger_is_better', 'smaller_is_better'])}}}\n"
            for i in range(n))
        ds = "parameters:\n" + "".join(f"  p{i}: {10 ** rng.uniform(-3, 3):.6g}\n" for i in range(n))
        t, d = _files(tmp_path, th, ds)
        assert 0 <= score(load_thresholds(t), load_design(d)).cmx_ray <= 1


def test_worked_example() -> None:
    res = score(load_thresholds(TH), load_design(DESIGN))
    want = {"bump_pitch": 45 / 40, "bump_rdl_spacing": 1.2, "rdl_rdl_spacing": 0.8, "interconnect_spacing": 1.5,
            "rdl_tsv_spacing": 1.0, "tsv_pitch": 0.8}
    for p in res.parameters:
        assert p.ratio == pytest.approx(want[p.name])
    assert res.cmx_ray == pytest.approx(0.5103, abs=5e-5)  # the figure in README.md


@pytest.mark.parametrize(
    ("th", "design", "match"),
    [
        ("parameters:\n  a: {threshold: 1, weight: -0.5}\n  b: {threshold: 1, weight: 1.5}\n", "parameters: {a: 1, b: 1}\n", "weight >= 0"),
        ("parameters:\n  a: {threshold: 1, weight: 0.5}\n  b: {threshold: 1, weight: 0.4}\n", "parameters: {a: 1, b: 1}\n", "sum to 0.9, expected 1"),
        ("parameters:\n  a: {threshold: 1, weight: 0.5}\n  b: {threshold: 1, weight: 0.5}\n", "parameters: {a: 1}\n", r"missing \['b'\]"),
        ("parameters:\n  a: {threshold: 1, weight: 1}\n", "parameters: {a: 1, c: 2}\n", r"\['c'\] not defined"),
        ("parameters:\n  a: {threshold: 0, weight: 1}\n", "parameters: {a: 1}\n", "threshold > 0"),
        ("parameters:\n  a: {threshold: 1, weight: 1}\n", "parameters: {a: -3}\n", "value > 0"),
        ("parameters:\n  a: {threshold: 1, weight: 1, unit: um}\n", "parameters: {a: {value: 1, unit: nm}}\n", "unit 'nm' differs from 'um'"),
        ("parameters:\n  a: {threshold: 1, weight: 1, colour: red}\n", "parameters: {a: 1}\n", "unknown key"),
    ],
)
def test_bad_inputs_one_line(tmp_path: Path, th: str, design: str, match: str) -> None:
    t, d = _files(tmp_path, th, design)
    with pytest.raises(ConfigError, match=match) as e:
        score(load_thresholds(t), load_design(d))
    assert "\n" not in str(e.value) and ("t.yaml" in str(e.value) or "d.yaml" in str(e.value))


def test_normalize_rescales_weights(tmp_path: Path) -> None:
    t, d = _files(tmp_path, "normalize: true\nparameters:\n  a: {threshold: 1, weight: 2}\n  b: {threshold: 1, weight: 2}\n",
                  "parameters: {a: 1, b: 3}\n")
    res = score(load_thresholds(t), load_design(d))
    assert [p.weight for p in res.parameters] == [0.5, 0.5]


def test_cli_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dfi", str(TH), str(DESIGN), "--format", "json", "--plot", str(tmp_path / "f.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cmx_ray"] == pytest.approx(0.5103, abs=5e-5) and len(out["parameters"]) == 6
    assert (tmp_path / "f.png").stat().st_size > 1000
    (tmp_path / "bad.yaml").write_text("parameters: {bump_pitch: 1}\n")
    assert main(["dfi", str(TH), str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]
