"""``poisonsweep plan``: what a sweep would run, without running it (no Ray, no data loaded).

The config is read, overridden, expanded and checked exactly as ``run`` does it
(:func:`poisonsweep.engine.config.load_sweep`; a grid over ``MAX_TRIALS`` points is counted from its
axes and refused, never expanded), so a plan that loads is a sweep that starts. What the plan adds:
the axes, the first few trials with the values they sweep, and the warnings of ``--set`` overrides
that removed or narrowed an axis (``run`` prints the same ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

TRIALS_SHOWN = 5
VALUES_SHOWN = 12  # an axis lists at most this many of its values


@dataclass
class SweepPlan:
    """A sweep as it would run: its size, grid axes, first trials and override warnings."""

    name: str
    out: str
    n_trials: int  # distinct trials (a grid that repeats a point runs it once)
    grid_points: int  # the product of the axes' lengths
    axes: dict[str, list]  # dotted key -> values, in grid order
    first: list[dict] = field(default_factory=list)  # trial_id, then each swept leaf key's resolved value
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The plan as plain text lines (what ``poisonsweep plan`` prints)."""
        repeated = f" ({self.grid_points:,} grid points, repeats run once)" if self.grid_points != self.n_trials else ""
        lines = [f"sweep {self.name}: {self.n_trials:,} trials{repeated} -> {self.out}"]
        lines += [f"warning: {w}" for w in self.warnings]
        if self.axes:
            lines.append(f"axes ({' x '.join(str(len(v)) for v in self.axes.values())}):")
            lines += [f"  {key}: {_listed(values)}" for key, values in self.axes.items()]
        else:
            lines.append("axes: none (one trial)")
        return lines


def _listed(values: list) -> str:
    more = f", … ({len(values):,} values)" if len(values) > VALUES_SHOWN else ""
    return ", ".join(compact(v) for v in values[:VALUES_SHOWN]) + more


def compact(value) -> str:
    """A config value in YAML flow style, on one line: ``{method: badnets, rate: 0.1}``."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {compact(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(compact(v) for v in value) + "]"
    if value is None:
        return "null"
    return f"{value:g}" if isinstance(value, float) else str(value)


def swept_leaves(axes: dict[str, list]) -> list[str]:
    """The dotted keys a trial's swept values sit at: an axis of plain values is itself, a section
    (values that are mappings, e.g. ``poison: [{method: a, rate: 0.1}, ...]``) is each key it sets."""
    leaves = []
    for key, values in axes.items():
        mappings = [v for v in values if isinstance(v, dict)]
        if len(mappings) < len(values) or not mappings:
            leaves.append(key)
        else:
            leaves += [f"{key}.{sub}" for sub in dict.fromkeys(k for v in mappings for k in v)]
    return leaves


def _dotted(config: dict, key: str):
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


def sweep_plan(sweep, n: int = TRIALS_SHOWN) -> SweepPlan:
    """The plan of a loaded ``Sweep``: its first ``n`` trials with their resolved swept values."""
    leaves = swept_leaves(sweep.grid)
    first = [{"trial_id": tid, **{leaf: _dotted(trial, leaf) for leaf in leaves}}
             for trial, tid in zip(sweep.trials[:n], sweep.ids[:n])]
    return SweepPlan(name=sweep.name, out=sweep.out, n_trials=len(sweep.trials),
                     grid_points=math.prod(len(v) for v in sweep.grid.values()), axes=dict(sweep.grid),
                     first=first, warnings=list(sweep.warnings))
