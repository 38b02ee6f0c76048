"""One typed config for everything: YAML file + `key.sub=value` overrides -> a frozen, validated object.

Unknown keys, wrong types and impossible values raise ConfigError with one line naming the
file (or the override), the key and what was expected.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pqfn.errors import ConfigError
from pqfn.io import plain
from pqfn.io import read_yaml as _read_yaml

CLASSES: tuple[str, ...] = ("A", "B", "C", "D")
CLASS_NAMES = {
    "A": "die-pad delamination",
    "B": "bond-pad delamination",
    "C": "die-pad and bond-pad delamination",
    "D": "no delamination",
}
METALLIZATIONS: tuple[str, ...] = ("Ag", "NiPdAu", "Cu")

ClassName = Literal["A", "B", "C", "D"]
Metal = Literal["Ag", "NiPdAu", "Cu"]


M = TypeVar("M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_STUDY_PACKAGES: dict[Metal, int] = {"Ag": 50, "NiPdAu": 50, "Cu": 40}


class SynthConfig(_Strict):
    """Synthetic CSAM data set (see pqfn/synth.py). Defaults mirror the reference study."""

    packages: dict[Metal, int] = Field(default_factory=lambda: _STUDY_PACKAGES.copy())
    max_cycles: int = Field(1000, ge=0)
    cycle_step: int = Field(100, ge=1)
    image_size: int = Field(400, ge=64, le=2048)  # pixels; 400 px ~ 8 mm at 20 um per pixel
    difficulty: float = Field(1.0, gt=0, le=5)  # 1 = default; larger = noisier, fainter delamination
    seed: int = 0

    @field_validator("packages")
    @classmethod
    def _packages(cls, v: dict[str, int]) -> dict[str, int]:
        if any(n < 0 for n in v.values()) or sum(v.values()) < 1:
            raise ValueError("expected non-negative package counts with at least one package")
        return v


class DataConfig(_Strict):
    source: Literal["synthetic", "manifest", "folders"] = "synthetic"
    # synthetic: folder the data set is generated into on first use; manifest: the CSV file;
    # folders: the root holding one sub-folder per class.
    path: Path = Path("data/synthetic")
    synthetic: SynthConfig = SynthConfig()
    # Maps label values / class-folder names to the four classes; identity for A/B/C/D.
    class_map: dict[str, ClassName] = Field(default_factory=dict)
    # Regular expression applied to a file name (folders source) to extract the package id:
    # the named group `package` if present, else group 1.
    package_regex: str | None = None
    test_manifest: Path | None = None  # a separate held-out manifest instead of test_fraction
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    split_seed: int = 0
    decode_size: int = Field(400, ge=16, le=2048)  # every image is decoded once to this square size
    strict: bool = False  # True: an unreadable image is an error instead of a warning
    cache_dir: Path | None = None  # decoded-array cache; default ~/.cache/pqfn

    @field_validator("package_regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"expected a valid regular expression ({e})") from None
        return v


class OptimizerConfig(_Strict):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only


class AugmentConfig(_Strict):
    """Training-fold augmentation (the study's random rotation and contrast)."""

    rotation_deg: float = Field(15.0, ge=0, le=180)  # uniform in [-rotation_deg, +rotation_deg]
    contrast: float = Field(0.2, ge=0, lt=1)  # contrast factor uniform in [1 - c, 1 + c]
    hflip: bool = False
    # gain factor uniform in [1 - g, 1 + g] (scan-session gain drift); 0 = off
    gain: float = Field(0.0, ge=0, lt=1)
    # a random one of the square package's 8 symmetries (90-degree rotations, each mirrored or not): exact, no
    # interpolation. A QFN with leads on all four sides looks the same under them, and delamination starts at any
    # corner or edge, so the label never changes; a bond-pad patch seen on one side teaches all four.
    dihedral: bool = False


class TrialConfig(_Strict):
    """Everything one cross-validated trial needs. The sweep varies keys of this block."""

    model: str = "resnet18"  # any timm model name
    pretrained: Path | None = None  # local weights file (.safetensors or torch); never downloaded
    folds: int = Field(5, ge=2, le=20)
    # Repeated cross-validation: the K folds drawn afresh this many times (fold seed trial.seed + r; a package
    # is never split within a repeat). K x repeats fold models train, so a trial costs `repeats` times as much;
    # the selection's standard errors shrink with the extra folds (corrected for overlapping training sets).
    repeats: int = Field(1, ge=1, le=10)
    epochs: int = Field(10, ge=1)
    data_size: int = Field(840, ge=4)  # images in the balanced CV pool, data_size / 4 per class
    resolution: int = Field(100, ge=16, le=1024)
    # How the decoded scan is shrunk to `resolution` (pqfn.data.resize_uint8): bilinear (antialiased: each pixel
    # the mean of its window) or max (each pixel the brightest of its window, so a bond-pad patch of a pixel or
    # two keeps its amplitude; README, "Is the CNN worth it?"). Bundles record it; enlarging is always bilinear.
    reduce: Literal["bilinear", "max"] = "bilinear"
    batch_size: int = Field(8, ge=2)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: Literal["none", "cosine"] = "cosine"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # Weight of the dense loss on the true delamination masks (0 = off); needs trial.model=resnet18_dense (a
    # ResNet-18 with a dense delamination head, pqfn.model.DenseResNet18) and a mask for every image (a
    # manifest's mask column; pqfn synth writes them). README, "Is the CNN worth it?".
    mask_loss: float = Field(0.0, ge=0)
    augment: AugmentConfig = AugmentConfig()
    max_copies: int = Field(3, ge=0)  # at most this many augmented copies of one original image
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0)  # torch CPU threads; 0 = leave torch's default
    # bf16 autocast and channels-last memory format. auto: bf16 where the hardware computes it natively
    # (CUDA with bf16 support; CPUs with AVX512-BF16 or AMX), channels_last always (`pqfn bench` measures both).
    bf16: bool | Literal["auto"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    # Convolutions whose output map has at most 16 pixels (ResNet-18's layer4 at 100-128 px) computed as one
    # matrix product over unfolded patches (pqfn.model.SmallMapConv2d): the same convolution, the same weights,
    # about twice as fast forward and backward on CPUs, where oneDNN's kernels for such maps are slow.
    # auto: matmul on CPU, native on CUDA (cuDNN); native: always the framework's convolution.
    small_maps: Literal["auto", "matmul", "native"] = "auto"
    eval_batch_size: int = Field(256, ge=1)
    # Measure train/val metrics every N epochs (and always after the last): measuring costs about a third
    # of a small trial (every image of every fold in eval mode). Records, reports and checkpoints follow it.
    eval_every: int = Field(1, ge=1)
    # folds trained at once in threads; auto: on CPU as many as trial.threads (each on one thread), else 1
    parallel_folds: int | Literal["auto"] = "auto"

    @field_validator("parallel_folds")
    @classmethod
    def _parallel(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("expected auto or a whole number >= 1")
        return v

    @field_validator("data_size")
    @classmethod
    def _balanced(cls, v: int) -> int:
        if v % len(CLASSES):
            raise ValueError(f"expected a multiple of {len(CLASSES)} (data_size / 4 images per class)")
        return v


class SpaceSpec(_Strict):
    """One search axis: exactly one of choice, uniform, loguniform, randint (inclusive bounds)."""

    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one(self) -> SpaceSpec:
        set_ = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError("expected exactly one of choice, uniform, loguniform, randint")
        if self.choice is not None and not self.choice:
            raise ValueError("expected a non-empty choice list")
        for k in ("uniform", "loguniform", "randint"):
            b = getattr(self, k)
            if b is not None and not b[0] <= b[1]:
                raise ValueError(f"expected {k} [low, high] with low <= high")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("expected loguniform bounds > 0")
        return self


class AshaConfig(_Strict):
    enabled: bool = False
    metric: str = "val/loss"  # a metric that does not reward underfitting
    mode: Literal["min", "max"] = "min"
    grace_period: int = Field(2, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


class SearchConfig(_Strict):
    type: Literal["optuna", "grid"] = "optuna"
    # Keys are dotted paths into the trial block, e.g. "trial.resolution".
    space: dict[str, SpaceSpec] = Field(default_factory=dict)
    # grid only: one-axis-at-a-time designs. Each entry varies ONE key over its values while every
    # other key keeps the trial block's value; the grid is the union of the axes (the study's design).
    axes: list[dict[str, list[Any]]] = Field(default_factory=list)
    num_samples: int = Field(0, ge=0)  # optuna: trials (0 -> 8); grid: repeats of the whole grid (0 -> 1)
    max_concurrent: int = Field(2, ge=1)
    seed: int = 0
    # shuffled-grid: each configuration of a finite (all-choice) space at most once, in seeded random order
    sampler: Literal["tpe", "random", "nsga2", "shuffled-grid"] = "tpe"
    n_startup_trials: int = Field(4, ge=0)  # TPE random start-up trials (Optuna's default is 10)
    # single: minimise -metric (+ penalties for a missed class and, with selection.max_gap, a gap above it):
    # what the selection rewards, never a prize for fitting less ("gap" is its old name, kept as an alias);
    # multi: NSGA-II on (selection metric max, gap min). Its front holds configurations that fit less by design, and
    # it proposes them more (tests/pqfn/test_selection_traps.py); the selection still never picks one. Explore with it,
    # search with single.
    objective: Literal["single", "gap", "multi"] = "single"
    asha: AshaConfig = AshaConfig()
    max_failures: int = Field(1, ge=0)  # retries of a failing trial from its checkpoint
    # Epochs between trial checkpoints (all folds' state: ~670 MB at the paper's five folds, written and waited
    # for). auto: every measured epoch on a CPU trial; on a GPU, whose epochs take seconds, once the training
    # time since the last checkpoint is 20x what writing that one took (checkpoints <= ~5 % of the wall time).
    checkpoint_every: int | Literal["auto"] = "auto"
    progress_every_s: float = Field(10.0, gt=0)  # seconds between the console's progress lines

    @field_validator("checkpoint_every")
    @classmethod
    def _every(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("expected auto or a whole number of epochs >= 1")
        return v

    @model_validator(mode="after")
    def _samples(self) -> SearchConfig:
        if self.sampler == "shuffled-grid" and any(sp.choice is None for sp in self.space.values()):
            raise ValueError("sampler shuffled-grid: expected only choice axes in search.space")
        if self.num_samples == 0:
            object.__setattr__(self, "num_samples", 1 if self.type == "grid" else 8)
        return self


class SelectionConfig(_Strict):
    """Least-overfitting configuration that still learns every class (README, "Sweeps"; pqfn/selection.py).

    Noise: the standard error (SE) of a k-fold mean is corrected for overlapping training sets
    (Nadeau-Bengio: fold std * sqrt(1/k + 1/(k-1))); trials that share folds (same data_size, folds, seed,
    max_copies) are compared by their per-fold differences, others by their two SEs combined.

    1. informative: a completed trial with every input finite, mean `metric` >= floor, worst class's
       recall (val/min_recall, mean of folds) >= min_class_recall and gap <= max_gap (when set);
    2. contenders: informative trials SHOWN to be within `tolerance` of the best informative trial's
       metric (shortfall + se_multiplier SE <= tolerance); with tolerance null, those not shown below it
       (shortfall <= se_multiplier SE, which lets noisy trials in);
    3. the winner: the contender with the smallest gap + se_multiplier SE (noise counts against a trial).
    """

    metric: Literal["val/bal_acc", "val/f1", "val/acc"] = "val/bal_acc"
    gap_metric: Literal["gap/acc", "gap/loss"] = "gap/acc"
    floor: float | None = Field(0.4, ge=0, le=1)  # metric at least this (chance: 0.25 for 4 classes)
    min_class_recall: float | None = Field(0.2, ge=0, le=1)  # every class found this often (a blind class: ~0)
    # How many corrected standard errors make "within noise" (k - 1 degrees of freedom at k folds: one SE is
    # about 58 % two-sided confidence at 3 folds, 63 % at 5; 2 SE about 82 % and 88 %).
    se_multiplier: float = Field(1.0, ge=0)
    # The most `metric` the selection gives up for a smaller gap, and only when shown (shortfall + k SE);
    # null: the lenient test (not shown below the best), in which noise widens the door.
    tolerance: float | None = Field(0.05, ge=0, le=1)
    # A constraint on the gap (same in the search objective): a trial above it is not informative; null: none.
    max_gap: float | None = Field(None, ge=-1, le=10)


class EvaluateConfig(_Strict):
    """Held-out evaluation of the selected configuration (README, "The final model")."""

    enabled: bool = True
    # ensemble: the selected trial's fold models, averaged (no retraining); retrain: one model on the whole pool
    final_model: Literal["ensemble", "retrain"] = "ensemble"
    # Class priors at deployment. The models train on a class-balanced pool (equal priors); real scans
    # have the natural frequencies. logits + strength * log(prior): 0 = raw, 1 = full Bayes correction,
    # auto = the strength in {0, 0.25, 0.5, 0.75, 1} that maximises prior-weighted macro-F1 on the
    # selected trial's out-of-fold predictions (never on the held-out packages).
    prior_strength: float | Literal["auto"] = "auto"
    # The natural class frequencies (A, B, C, D); default: those of the search pool's original images.
    priors: tuple[float, float, float, float] | None = None
    # Hindsight audit (audit.json, W&B): every completed trial's fold ensemble scored on the held-out packages
    # after the selection, never used to select. audit_console: also print it at the end of a sweep.
    audit: bool = True
    audit_console: bool = False

    @field_validator("prior_strength")
    @classmethod
    def _strength(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and not 0 <= v <= 1:
            raise ValueError("expected auto or a number in [0, 1]")
        return v

    @field_validator("priors")
    @classmethod
    def _priors(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and (min(v) <= 0 or abs(sum(v) - 1) > 1e-3):
            raise ValueError("expected four positive class frequencies (A, B, C, D) summing to 1")
        return v


class ResourcesConfig(_Strict):
    cpus_per_trial: float = Field(1.0, gt=0)
    # None: 0.25 when the cluster has GPUs when the sweep starts, else 0 (an autoscaling cluster whose GPU nodes
    # are not up yet has none then: set it). A trial trains on exactly the GPUs Ray grants it, the CPU on none.
    gpus_per_trial: float | None = Field(None, ge=0)
    # true: output_dir and data.path are on a filesystem every node mounts at the same path
    # (required when the cluster spans several hosts)
    shared_storage: bool = False


class WandbConfig(_Strict):
    # auto: online when WANDB_API_KEY is set, else offline. The key is read from the environment only.
    mode: Literal["auto", "offline", "online", "disabled"] = "auto"
    project: str = "pqfn"
    entity: str | None = None


class Config(_Strict):
    name: str = Field("sweep", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_dir: Path = Path("runs")
    data: DataConfig = DataConfig()
    trial: TrialConfig = TrialConfig()
    search: SearchConfig = SearchConfig()
    selection: SelectionConfig = SelectionConfig()
    resources: ResourcesConfig = ResourcesConfig()
    wandb: WandbConfig = WandbConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @field_validator("search")
    @classmethod
    def _space_keys(cls, v: SearchConfig) -> SearchConfig:
        if v.axes and v.type != "grid":
            raise ValueError("axes: expected search.type grid (axes define a one-axis-at-a-time grid)")
        if v.axes and v.space:
            raise ValueError("expected either space or axes, not both")
        for axis in v.axes:
            if len(axis) != 1 or not all(isinstance(vals, list) and vals for vals in axis.values()):
                raise ValueError(f"axes entry {axis!r}: expected one key with a non-empty list of values")
        for key in [*v.space, *(k for axis in v.axes for k in axis)]:
            parts = key.split(".")
            node: Any = TrialConfig
            if parts[0] != "trial" or len(parts) < 2:
                raise ValueError(f"space key {key!r}: expected a dotted path into the trial block, e.g. trial.resolution")
            for p in parts[1:]:
                fields = getattr(node, "model_fields", None)
                if fields is None or p not in fields:
                    raise ValueError(f"space key {key!r}: {p!r} is not a trial setting")
                node = fields[p].annotation
        return v


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['trial.epochs=3', 'name=x'] -> {'trial.epochs': 3, 'name': 'x'} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_./-]*", key):
            raise ConfigError(f"override {pair!r}: expected key.sub=value")
        try:
            out[key] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def get_dotted(data: Any, key: str) -> Any:
    for p in key.split("."):
        data = data[p] if isinstance(data, dict) else getattr(data, p)
    return data


def _short(value: Any, limit: int = 80) -> str:
    text = repr(plain(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_text(e: Any) -> str:
    """One pydantic error -> 'key: what was expected (got value)'."""
    loc = ".".join(str(x) for x in e["loc"])
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    got = "" if e["type"] in ("extra_forbidden", "missing") else f" (got {_short(e.get('input'))})"
    return f"{loc or '<top>'}: {msg}{got}"


def _format_errors(err: ValidationError, source: str, overrides: dict[str, Any], label: str = "override") -> str:
    """`label` says where the overrides came from: "override" is the command line, anything else
    (a search-space point, the sweep's path fixing) is named as such, never as something the user typed."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        src = source
        for k, v in overrides.items():
            if loc == k or loc.startswith(k + "."):
                shown = str(plain(v))[:60]  # as typed: trial.epochs=zero, not 'zero'
                src = f"override {k}={shown}" if label == "override" else f"{label} ({k}={shown})"
        parts.append(f"{src}: {_error_text(e)}")
    return "; ".join(parts)


def validate_as(model: type[M], data: Any, source: str, overrides: dict[str, Any] | None = None,
                label: str = "override") -> M:
    """Validate data as `model`; errors become one ConfigError line naming source and key."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, overrides or {}, label)) from None


def validate(data: dict[str, Any], source: str, overrides: dict[str, Any] | None = None, label: str = "override") -> Config:
    return validate_as(Config, data, source, overrides, label)


def read_yaml(path: Path, what: str = "YAML file") -> dict[str, Any]:
    """A YAML file holding a mapping; unreadable, binary, non-UTF-8 or malformed files give one ConfigError."""
    return _read_yaml(path, what, ConfigError)


def check_search_values(cfg: Config, source: str, overrides: dict[str, Any] | None = None) -> None:
    """Every value the search can propose (each choice, each bound, each axis value) must be a valid setting.

    Checked when the file is loaded, so the message names the file and the search.space key the value
    sits under, instead of surfacing later as an "override" the user never typed.
    """
    base = cfg.model_dump(mode="json")
    proposals: list[tuple[str, str, Any]] = []  # (where in the file, trial key, value)
    for key, spec in cfg.search.space.items():
        if spec.choice is not None:
            proposals += [(f"search.space.{key}.choice", key, v) for v in spec.choice]
        for kind in ("uniform", "loguniform", "randint"):
            bounds = getattr(spec, kind)
            if bounds is not None:
                proposals += [(f"search.space.{key}.{kind}", key, v) for v in bounds]
    for i, axis in enumerate(cfg.search.axes):
        proposals += [(f"search.axes[{i}].{key}", key, v) for key, values in axis.items() for v in values]
    for where, key, value in proposals:
        data = copy.deepcopy(base)
        set_dotted(data, key, value)
        try:
            Config.model_validate(data)
        except ValidationError as e:
            src = source
            for k, v in (overrides or {}).items():
                if where == k or where.startswith((k + ".", k + "[")):
                    src = f"override {k}={str(plain(v))[:60]}"
            detail = _error_text(e.errors()[0])
            if detail.startswith(key + ": "):  # the usual case: the value itself is out of range
                detail = detail[len(key) + 2 :].rsplit(" (got ", 1)[0]
            raise ConfigError(f"{src}: {where}: value {_short(value)} is not a valid {key}: {detail}") from None


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    path = Path(path)
    data = read_yaml(path)
    data.setdefault("name", path.stem)
    ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    for k, v in ov.items():
        set_dotted(data, k, v)
    cfg = validate(data, str(path), ov)
    check_search_values(cfg, str(path), ov)
    return cfg


def with_overrides(cfg: Config, overrides: dict[str, Any], source: str = "search space point") -> Config:
    """A new Config with dotted keys replaced (used by the sweep for each trial).

    `source` names where the values came from in error messages (e.g. "search space point",
    "--no-wandb"); they are never reported as command-line overrides.
    """
    data = cfg.model_dump(mode="json")
    for k, v in overrides.items():
        set_dotted(data, k, v)
    return validate(data, source, overrides, label=source)


# Every config key that holds a path. A Ray Job runs in a temporary copy of the project that Ray may
# delete, and workers start in their own folders, so the driver and `pqfn submit` make these absolute.
PATH_KEYS: tuple[str, ...] = ("output_dir", "data.path", "data.cache_dir", "data.test_manifest", "trial.pretrained")


def absolutize_paths(cfg: Config) -> Config:
    """The config with every path key (PATH_KEYS) absolute, resolved against the current folder (~ expanded)."""
    ov: dict[str, Any] = {}
    for key in PATH_KEYS:
        p = get_dotted(cfg, key)
        if p is not None:
            ov[key] = str(Path(p).expanduser().resolve())
    return with_overrides(cfg, ov, source="absolute paths")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def uses_masks(cfg: Config) -> bool:
    """Whether some trial of this configuration trains with the mask loss (so the data set's masks are decoded)."""
    return (cfg.trial.mask_loss > 0 or "trial.mask_loss" in cfg.search.space
            or any("trial.mask_loss" in axis for axis in cfg.search.axes))
