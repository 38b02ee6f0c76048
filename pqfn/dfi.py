"""CMx-ray: a design-for-inspection (DFI) score of how compatible a package design is with X-ray.

The reference (Electronic Device Failure Analysis, vol. 26 no. 3) describes the score but the
fragment we have lacks its equations. These are OUR RECONSTRUCTION of its description:

    r_n = T_n / P_n   for a parameter where larger is easier to resolve (pitches, spacings)
    r_n = P_n / T_n   for a parameter where smaller is easier
    C_n = (2 / pi) * arctan(r_n ** k)        (Eq. 2: inverse tangent, bounded by -1 and 1;
                                               in [0, 1) for the positive ratios of physical sizes;
                                               exactly 0.5 at threshold; k = steepness, default 1)
    CMx-ray = sum_n W_n * C_n,  W_n >= 0,  sum_n W_n = 1      (Eqs. 3 and 4)

T_n is the test design's value and P_n the DFI threshold (set by the "DFI evaluator" from feature
geometry, material and imaging resolution, Eq. 1). CMx-ray lies in [0, 1]; closer to 1 means
easier to inspect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr

from pqfn.config import read_yaml, validate_as
from pqfn.errors import ConfigError

WEIGHT_TOLERANCE = 1e-6


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    _source: str = PrivateAttr("")  # the file it came from, for error messages


def _finite_at_least(lo: float, strict: bool, what: str) -> Any:
    def check(v: float) -> float:
        if not math.isfinite(v) or v < lo or (strict and v == lo):
            raise ValueError(f"expected a {what} {'>' if strict else '>='} {lo:g}")
        return v

    return AfterValidator(check)


Positive = Annotated[float, _finite_at_least(0, True, "value")]


class ThresholdSpec(_Strict):
    threshold: Annotated[float, _finite_at_least(0, True, "threshold")]
    direction: Literal["larger_is_better", "smaller_is_better"] = "larger_is_better"
    weight: Annotated[float, _finite_at_least(0, False, "weight")]
    unit: str = "um"
    description: str = ""


class Thresholds(_Strict):
    architecture: str = ""
    steepness: float = Field(1.0, gt=0, allow_inf_nan=False)  # k in C_n = (2/pi) arctan(r_n ** k)
    normalize: bool = False  # true: divide the weights by their sum instead of requiring sum = 1
    parameters: dict[str, ThresholdSpec]


class ValueSpec(_Strict):
    value: Positive
    unit: str = "um"


class Design(_Strict):
    design: str = ""
    parameters: dict[str, ValueSpec]


def compatibility(ratio: float, steepness: float = 1.0) -> float:
    """C_n = (2 / pi) * arctan(ratio ** k): odd in the ratio, bounded by -1 and 1, 0.5 at ratio 1."""
    try:
        r = math.copysign(abs(ratio) ** steepness, ratio)
    except OverflowError:  # |r|**k beyond the float range: arctan is pi/2 there to double precision
        r = math.copysign(math.inf, ratio)
    return 2.0 / math.pi * math.atan(r)


@dataclass(frozen=True)
class ParameterScore:
    name: str
    value: float
    threshold: float
    unit: str
    direction: str
    ratio: float
    score: float
    weight: float

    @property
    def contribution(self) -> float:
        return self.weight * self.score


@dataclass(frozen=True)
class DfiResult:
    architecture: str
    design: str
    steepness: float
    parameters: list[ParameterScore]

    @property
    def cmx_ray(self) -> float:
        return sum(p.contribution for p in self.parameters)

    def as_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture, "design": self.design, "steepness": self.steepness,
            "parameters": [p.__dict__ | {"contribution": p.contribution} for p in self.parameters],
            "cmx_ray": self.cmx_ray,
        }


def load_thresholds(path: Path) -> Thresholds:
    th = validate_as(Thresholds, read_yaml(path), str(path))
    if not th.parameters:
        raise ConfigError(f"{path}: parameters: expected at least one parameter")
    total = sum(p.weight for p in th.parameters.values())
    if total <= 0:
        raise ConfigError(f"{path}: parameters: the weights sum to 0; expected a positive sum")
    if not math.isfinite(total):
        raise ConfigError(f"{path}: parameters: the weights sum beyond the range of numbers; expected weights summing to 1")
    if not th.normalize and abs(total - 1) > WEIGHT_TOLERANCE:
        raise ConfigError(f"{path}: parameters: weights sum to {total:.6g}, expected 1 (or set normalize: true)")
    th._source = str(path)
    return th


def load_design(path: Path) -> Design:
    data = read_yaml(path)
    params = data.get("parameters")
    if isinstance(params, dict):  # allow the short form `name: 45` (unit um)
        data["parameters"] = {k: ({"value": v} if isinstance(v, int | float) else v) for k, v in params.items()}
    d = validate_as(Design, data, str(path))
    d._source = str(path)
    return d


def score(th: Thresholds, design: Design) -> DfiResult:
    """Each parameter's ratio and C_n, weighted into CMx-ray (weights normalised if th.normalize)."""
    tsrc = th._source or "thresholds"
    dsrc = design._source or "design"
    missing = [k for k in th.parameters if k not in design.parameters]
    unknown = [k for k in design.parameters if k not in th.parameters]
    if missing:
        raise ConfigError(f"{dsrc}: parameters: missing {missing} that {tsrc} defines")
    if unknown:
        raise ConfigError(f"{dsrc}: parameters: {unknown} not defined in {tsrc}; expected only {list(th.parameters)}")
    total = sum(p.weight for p in th.parameters.values())
    out = []
    for name, spec in th.parameters.items():
        val = design.parameters[name]
        if val.unit != spec.unit:
            raise ConfigError(f"{dsrc}: parameters.{name}: unit {val.unit!r} differs from {spec.unit!r} in {tsrc}")
        ratio = val.value / spec.threshold if spec.direction == "larger_is_better" else spec.threshold / val.value
        if not math.isfinite(ratio) or ratio == 0:  # finite inputs, but their quotient over- or underflows
            raise ConfigError(f"{dsrc}: parameters.{name}: value {val.value:g} and threshold {spec.threshold:g} "
                              f"({tsrc}) differ by more than floating point can represent; expected both in {spec.unit}")
        w = spec.weight / total if th.normalize else spec.weight
        out.append(ParameterScore(name, val.value, spec.threshold, spec.unit, spec.direction, ratio,
                                  compatibility(ratio, th.steepness), w))
    return DfiResult(th.architecture, design.design, th.steepness, out)


def format_table(res: DfiResult) -> str:
    head = f"{'parameter':<22} {'value':>9} {'threshold':>9} {'unit':<4} {'direction':<10} {'ratio':>7} {'C_n':>7} {'weight':>7} {'W*C':>7}"
    lines = [f"CMx-ray of {res.design or 'design'} ({res.architecture or 'architecture'}), steepness k={res.steepness:g}", head,
             "-" * len(head)]
    for p in res.parameters:
        d = "larger" if p.direction == "larger_is_better" else "smaller"
        ratio = f"{p.ratio:>7.3f}" if p.ratio < 1e3 else f"{p.ratio:>7.3g}"  # extreme ratios stay in their column
        lines.append(f"{p.name:<22} {p.value:>9.4g} {p.threshold:>9.4g} {p.unit:<4} {d:<10} {ratio} "
                     f"{p.score:>7.4f} {p.weight:>7.3f} {p.contribution:>7.4f}")
    lines.append("-" * len(head))
    lines.append(f"{'CMx-ray':<22} {res.cmx_ray:>79.4f}")
    return "\n".join(lines)


def plot_scores(res: DfiResult, path: Path) -> None:
    """C_n against the ratio (the reference's Fig. 10 shape), with the design's parameters marked."""
    import numpy as np

    from pqfn.report import pyplot, save_fig

    plt = pyplot()
    # Up to 20 the curve's shape is visible; a parameter beyond is drawn at the right edge with its ratio.
    hi = min(max(3.0, 1.2 * max(p.ratio for p in res.parameters)), 20.0)
    r = np.linspace(0, hi, 300)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    with np.errstate(over="ignore"):  # r**k overflows to inf for steep k; arctan(inf) = pi/2 is right
        curve = 2 / np.pi * np.arctan(r**res.steepness)
    ax.plot(r, curve, color="k", label=f"C = (2/pi) arctan(r^{res.steepness:g})")
    ax.axvline(1, color="grey", ls=":", lw=1)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    groups: dict[tuple[float, float], list[str]] = {}
    for p in res.parameters:  # parameters at the same ratio share one marker and one label
        groups.setdefault((round(p.ratio, 6), round(p.score, 6)), []).append(p.name)
    for i, ((ratio, c), names) in enumerate(sorted(groups.items())):
        x = min(ratio, hi)
        label = ", ".join(names) + (f" (r={ratio:.3g})" if ratio > hi else "")
        ax.plot(x, c, "o", ms=7, clip_on=False)
        up = i % 2 == 0  # alternate labels above and below the curve so neighbours do not collide
        ax.annotate(label, (x, c), textcoords="offset points", xytext=(-6 if up else 8, 8 if up else -12),
                    ha="right" if up else "left", fontsize=8)
    ax.set_xlabel("ratio r = design value / threshold (inverted where smaller is better)")
    ax.set_ylabel("compatibility score C_n")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, hi)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"CMx-ray = {res.cmx_ray:.3f} for {res.design or 'design'} (our reconstruction of Eq. 2)")
    save_fig(fig, path)
