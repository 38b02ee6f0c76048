from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pqfn.config import Config, load_config, parse_overrides, with_overrides
from pqfn.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SWEEP_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))


def test_there_are_sweep_configs() -> None:
    names = {p.stem for p in SWEEP_CONFIGS}
    assert {"quickstart", "paper"} <= names


@pytest.mark.parametrize("path", SWEEP_CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.name
    assert cfg.search.space or cfg.search.axes


def test_overrides_are_typed_and_applied(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs/quickstart.yaml", ["trial.epochs=3", "trial.optimizer.lr=0.01", "name=x1"])
    assert cfg.trial.epochs == 3 and cfg.trial.optimizer.lr == 0.01 and cfg.name == "x1"
    with pytest.raises(ValidationError):  # frozen
        cfg.trial.epochs = 4  # type: ignore[misc]


def _err(tmp_path: Path, text: str, overrides: list[str] | None = None) -> str:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    msg = _err(tmp_path, "trial:\n  epoch: 3\n")
    assert "bad.yaml" in msg and "trial.epoch" in msg and "unknown key" in msg


def test_wrong_type_and_impossible_values(tmp_path: Path) -> None:
    msg = _err(tmp_path, "trial:\n  batch_size: many\n")
    assert "trial.batch_size" in msg and "integer" in msg and "'many'" in msg
    assert "trial.resolution" in _err(tmp_path, "trial: {resolution: 8}\n")
    assert "trial.folds" in _err(tmp_path, "trial: {folds: 1}\n")
    assert "multiple of 4" in _err(tmp_path, "trial: {data_size: 841}\n")


def test_override_errors_name_the_override(tmp_path: Path) -> None:
    msg = _err(tmp_path, "name: ok\n", ["trial.epochs=zero"])
    assert "override trial.epochs=zero" in msg
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_overrides(["trial.epochs"])


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    assert "not valid YAML" in _err(tmp_path, "trial: [1, 2\n")
    assert "expected a mapping" in _err(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_search_space_keys_must_be_trial_settings(tmp_path: Path) -> None:
    msg = _err(tmp_path, "search:\n  space:\n    trial.resolutoin: {choice: [32]}\n")
    assert "trial.resolutoin" in msg
    msg = _err(tmp_path, "search:\n  space:\n    trial.resolution: {choice: [32], uniform: [1, 2]}\n")
    assert "exactly one of" in msg


def test_with_overrides_validates() -> None:
    cfg = load_config(ROOT / "configs/quickstart.yaml")
    assert with_overrides(cfg, {"trial.resolution": 32}).trial.resolution == 32
    with pytest.raises(ConfigError, match="trial.resolution"):
        with_overrides(cfg, {"trial.resolution": 4})
