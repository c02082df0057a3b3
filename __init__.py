"""poisonsweep: sweep label-poisoning experiments (poison, train, detect, unlearn), recorded in Parquet.

The public Python API, for notebooks and scripts (the CLI is a thin layer over it)::

    import poisonsweep
    outcome = poisonsweep.run("configs/quickstart.yaml", out="results/quickstart")
    tables = poisonsweep.load("results/quickstart")        # {"trials": pyarrow.Table, ...}
    poisonsweep.report("results/quickstart")
    rows = poisonsweep.run_trial(config)                   # one trial, no Ray
    print(*poisonsweep.plan("configs/quickstart.yaml").lines(), sep="\n")  # what run would run, no Ray
    print(poisonsweep.explain("recall_at_10"))             # what a metric means
    side_by_side = poisonsweep.compare(["results/a", "results/b"])  # same settings, differences
    latex = poisonsweep.export("results/quickstart", "latex")       # detector x setting table

Names are imported on first use, so ``import poisonsweep.tasks`` never pulls in Ray. A config problem
raises ``poisonsweep.ConfigError`` before anything runs.
"""

from __future__ import annotations

from importlib import import_module

__all__ = ["ConfigError", "compare", "explain", "export", "load", "plan", "report", "run", "run_trial"]

_API = {"run": "poisonsweep.engine.api", "load": "poisonsweep.engine.api", "report": "poisonsweep.engine.api",
        "run_trial": "poisonsweep.engine.api", "plan": "poisonsweep.engine.api", "explain": "poisonsweep.engine.api",
        "ConfigError": "poisonsweep.tasks.registry",
        "compare": "poisonsweep.engine.compare", "export": "poisonsweep.engine.export"}


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'poisonsweep' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
