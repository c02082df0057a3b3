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

The plugin API: a plugin is a plain Python module that registers functions in the registries, and a sweep
names it in its config (``plugins: [my_methods.py]``; see ``examples/plugin/``)::

    from poisonsweep import DETECTORS, Detection, DetectionContext, Interval

    @DETECTORS.register("my_detector", {"fraction": [Interval(float, 0, 1)]})
    def my_detector(context: DetectionContext, *, seed: int, fraction: float = 0.1) -> Detection:
        ...

- ``DATASETS``: ``fn(*, root, n_train, n_test, seed) -> Dataset`` (``register(name, num_classes=K)``;
  ``as_dataset`` turns arrays into one, with seeded class-stratified ``n_train`` / ``n_test`` subsets).
- ``POISONS``: ``fn(data: Dataset, *, rate, seed, **params) -> PoisonedData`` (``eligible=``: how many
  samples it may poison, so an impossible rate fails before any trial).
- ``MODELS``: ``fn(in_shape, num_classes, **params) -> SplitModel`` (``features`` then a linear ``head``).
- ``DETECTORS``: ``fn(context: DetectionContext, *, seed, **params) -> Detection`` (higher score = more
  suspicious; never sees the truth).
- ``UNLEARNERS``: unlearning methods, as ``poisonsweep.tasks.unlearn.methods`` defines them.

Each ``register(name, constraints, help=..., *, needs=..., placement=..., rebuild=..., trial_check=...)``
declares the parameters a config may set (``Interval``, ``Options``, ``OfType``...) and the entry's special
cases (``poisonsweep.tasks.registry.Entry``); the engine reads only these, never an entry's name.

Names are imported on first use, so ``import poisonsweep.tasks`` never pulls in Ray. A config problem
raises ``poisonsweep.ConfigError`` before anything runs.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and editors; at run time each name is imported on first use
    # `name as name`: re-exported (PEP 484), so that strict checkers take them as the package's public names
    from poisonsweep.engine.api import (
        explain as explain, load as load, plan as plan, report as report, run as run, run_trial as run_trial,
    )
    from poisonsweep.engine.compare import compare as compare
    from poisonsweep.engine.export import export as export
    from poisonsweep.tasks.data import DATASETS as DATASETS, Dataset as Dataset
    from poisonsweep.tasks.data.base import as_dataset as as_dataset
    from poisonsweep.tasks.detect import (
        DETECTORS as DETECTORS, Detection as Detection, DetectionContext as DetectionContext, flag_top as flag_top,
    )
    from poisonsweep.tasks.models import MODELS as MODELS, SplitModel as SplitModel
    from poisonsweep.tasks.poisons import POISONS as POISONS, PoisonedData as PoisonedData
    from poisonsweep.tasks.registry import (
        BOOL as BOOL, NONE as NONE, STR as STR, ConfigError as ConfigError, Interval as Interval, OfType as OfType,
        Options as Options, TrialWarning as TrialWarning,
    )
    from poisonsweep.tasks.unlearn import UNLEARNERS as UNLEARNERS

_REGISTRY = "poisonsweep.tasks.registry"
_API = {"run": "poisonsweep.engine.api", "load": "poisonsweep.engine.api", "report": "poisonsweep.engine.api",
        "run_trial": "poisonsweep.engine.api", "plan": "poisonsweep.engine.api", "explain": "poisonsweep.engine.api",
        "ConfigError": _REGISTRY, "compare": "poisonsweep.engine.compare", "export": "poisonsweep.engine.export",
        # the plugin API: the registries (their modules register our own entries on import) and the types
        "DATASETS": "poisonsweep.tasks.data", "Dataset": "poisonsweep.tasks.data", "as_dataset": "poisonsweep.tasks.data.base",
        "POISONS": "poisonsweep.tasks.poisons", "PoisonedData": "poisonsweep.tasks.poisons",
        "MODELS": "poisonsweep.tasks.models", "SplitModel": "poisonsweep.tasks.models",
        "DETECTORS": "poisonsweep.tasks.detect", "Detection": "poisonsweep.tasks.detect",
        "DetectionContext": "poisonsweep.tasks.detect", "flag_top": "poisonsweep.tasks.detect",
        "UNLEARNERS": "poisonsweep.tasks.unlearn",
        "Interval": _REGISTRY, "Options": _REGISTRY, "OfType": _REGISTRY, "BOOL": _REGISTRY, "NONE": _REGISTRY,
        "STR": _REGISTRY, "TrialWarning": _REGISTRY}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'poisonsweep' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
