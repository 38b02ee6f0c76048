"""The search space is data: the sweep YAML's `search` block -> the searcher's space (one function each)."""

from __future__ import annotations

import itertools
from typing import Any

from pqfn.config import Config, SearchConfig, get_dotted
from pqfn.errors import ConfigError


def optuna_space(search: SearchConfig) -> dict[str, Any]:
    """{dotted key: optuna distribution} for OptunaSearch."""
    import optuna.distributions as od

    out: dict[str, Any] = {}
    for key, spec in search.space.items():
        if spec.choice is not None:
            out[key] = od.CategoricalDistribution(spec.choice)
        elif spec.uniform is not None:
            out[key] = od.FloatDistribution(*spec.uniform)
        elif spec.loguniform is not None:
            out[key] = od.FloatDistribution(*spec.loguniform, log=True)
        elif spec.randint is not None:
            out[key] = od.IntDistribution(*spec.randint)
    if not out:
        raise ConfigError("search.space: expected at least one axis for an optuna search")
    return out


def grid_points(cfg: Config) -> list[dict[str, Any]]:
    """Every configuration of a grid search as a dict of dotted-key overrides.

    `search.space` (choice axes only): the cartesian product. `search.axes`: one axis at a time,
    each point fills the other axes' keys with the trial block's values; duplicates (the centre
    point shared by every axis) are run once.
    """
    s = cfg.search
    if s.axes:
        keys = [k for axis in s.axes for k in axis]
        centre = {k: get_dotted(cfg.model_dump(mode="json"), k) for k in keys}
        points: list[dict[str, Any]] = []
        for axis in s.axes:
            ((key, values),) = axis.items()
            for v in values:
                p = centre | {key: v}
                if p not in points:
                    points.append(p)
        return points
    bad = [k for k, spec in s.space.items() if spec.choice is None]
    if bad:
        raise ConfigError(f"search.space.{bad[0]}: a grid search needs choice axes (or use search.type: optuna)")
    if not s.space:
        raise ConfigError("search: a grid search needs search.space (choice axes) or search.axes")
    keys = list(s.space)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(s.space[k].choice or [] for k in keys))]
