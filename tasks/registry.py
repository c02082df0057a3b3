"""Name -> function registries with declared parameter constraints.

Every pluggable kind (datasets, poisons, models, detectors, unlearning methods) is one
function plus one ``@registry.register(...)`` line. Each entry declares the keyword
parameters a config may set and what values they allow, so that ``engine/config.py``
can check a whole sweep before any trial starts.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])  # a registered function: the decorator returns it as it is


class ConfigError(ValueError):
    """A config that is not allowed: ``errors`` lists every problem, each naming its key and what is allowed.

    ``ConfigError("poison.rate must be ...")`` carries one problem and reads as it; with a list, or a
    ``source`` (the file or flag the problems come from), the message counts them under that source.
    ``errors`` and ``source`` survive pickling, so a problem found on a Ray worker arrives whole.
    """

    def __init__(self, errors: str | list[str], source: str | None = None):
        self.errors = [errors] if isinstance(errors, str) else list(dict.fromkeys(errors))
        self.source = source
        self._given = (errors, source)  # what pickling rebuilds it from
        if source is None and isinstance(errors, str):
            message = errors
        else:
            listed = "\n".join(f"  - {error}" for error in self.errors)
            message = f"{source or 'config'} has {len(self.errors)} problem(s):\n{listed}"
        super().__init__(message)

    def __reduce__(self) -> tuple[type, tuple[str | list[str], str | None]]:
        return type(self), self._given


class TrialWarning(UserWarning):
    """A warning about a trial's science (e.g. an inverse-Hessian solver that has not converged): the
    trial records it in its ``trials`` row (column ``warnings``) and the summary shows it."""


@dataclass(frozen=True)
class Interval:
    """A number in [low, high] (either bound may be None, meaning unbounded)."""

    kind: type[Any]  # Integral, float...: Any, so that a value of this kind compares with the bounds
    low: float | None = None
    high: float | None = None
    closed: str = "both"  # "both", "left", "right", "neither"

    def describe(self) -> str:
        name = "an int" if self.kind is Integral else "a number"
        left = "[" if self.closed in ("both", "left") and self.low is not None else "("
        right = "]" if self.closed in ("both", "right") and self.high is not None else ")"
        low = "-inf" if self.low is None else self.low
        high = "inf" if self.high is None else self.high
        return f"{name} in {left}{low}, {high}{right}"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, self.kind):
            return False
        if value != value:  # NaN is no number in any interval
            return False
        if value in (math.inf, -math.inf) and (self.low is None or self.high is None):
            return False  # an unbounded side is open: "(0, inf)" holds no inf
        if self.low is not None:
            if value < self.low or (value == self.low and self.closed in ("right", "neither")):
                return False
        if self.high is not None:
            if value > self.high or (value == self.high and self.closed in ("left", "neither")):
                return False
        return True


# What a ``BelowData`` bound counts, and how its error message names that count.
DATA_COUNTS = {"classes": "classes", "train_samples": "training samples"}


@dataclass(frozen=True)
class BelowData(Interval):
    """An int in [low, N - 1], N a count of the trial's data: ``of="classes"`` (the dataset's number of
    classes, for a class index or a class offset) or ``of="train_samples"`` (the training samples).

    ``accepts`` checks the part known without data; ``Entry.data_bound_errors`` checks ``< N`` once the
    dataset's registry entry (``num_classes``), the config's ``data.n_train`` or the loaded data says N,
    before any trial starts.
    """

    kind: type[Any] = Integral
    low: float | None = 0
    of: str = "classes"

    def describe(self) -> str:
        return f"an int in [{self.low}, N - 1] (N: the {DATA_COUNTS[self.of]})"


CLASS_INDEX = BelowData()  # a class: 0 .. K - 1


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values."""

    values: tuple

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)

    def accepts(self, value: Any) -> bool:
        return value in self.values


@dataclass(frozen=True)
class OfType:
    """Any value of the given type(s) (bool is never taken for a number)."""

    types: tuple
    label: str

    def describe(self) -> str:
        return self.label

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) and bool not in self.types:
            return False
        return isinstance(value, self.types)


NONE = OfType((type(None),), "null")
BOOL = OfType((bool,), "a boolean")
STR = OfType((str,), "a string")
INT_LIST = OfType((list, tuple), "a list of ints")


def check_value(key: str, value: Any, allowed: list) -> str | None:
    """Return an error message if ``value`` satisfies none of ``allowed``, else None."""
    if any(c.accepts(value) for c in allowed):
        return None
    what = " or ".join(c.describe() for c in allowed)
    return f"{key} must be {what}; got {value!r}"


# What an entry may need from the trial that runs it; ``run_resolved_trial`` reads these, never a name.
NEEDS = ("checkpoints", "artifact_dir", "sample_losses")

# How the report may rebuild a poison's training images from a trial's config (images are never stored):
# "apply" runs the poison again with the trial's seed and checks given labels, true labels and poison mask;
# "clean" is for a poison that changes labels only and costs minutes to run again (FLIP trains experts):
# the report shows the clean images, which are the trial's images, and checks the true labels only.
REBUILDS = ("apply", "clean")


@functools.cache
def _signature(fn: Callable) -> inspect.Signature:
    """``inspect.signature``, once per function: a sweep resolves the same few entries for every trial."""
    return inspect.signature(fn)


def with_new_names(mapping: dict[str, Any], renamed: dict[str, str], prefix: str,
                   whose: str = "") -> tuple[dict[str, Any], list[str], list[str]]:
    """``mapping`` with every old key of ``renamed`` (old -> new) moved to its new name, a note for each old
    name used, and an error where one setting is given under both names (the old key is then dropped)."""
    mapping, notes, errors = dict(mapping), [], []
    for old, new in renamed.items():
        if old not in mapping:
            continue
        value = mapping.pop(old)
        if new in mapping:
            errors.append(f"{prefix}.{old} and {prefix}.{new} are one setting ({old!r} is its old name); keep {new!r}")
            continue
        mapping[new] = value
        notes.append(f"{prefix}.{old} is now called {prefix}.{new}{whose}; the old name still works, rename it "
                     "in the config")
    return mapping, notes, errors


@dataclass
class Entry:
    """One registered function and what it declares about itself.

    ``needs``: what the trial must hand over ("checkpoints": per-epoch weights, for TracIn;
    "artifact_dir": a directory shared by the sweep's trials, for cached work such as FLIP's
    experts; "sample_losses": per-sample training losses), a fixed set or a function of the
    entry's params. ``tables``: the extra record tables its result carries (a detector's
    ``Detection.extras[table]`` rows). ``eligible``: for a poison, ``eligible(class_counts, **params)``
    = how many training samples it may poison, so an impossible rate is caught before any trial.
    ``num_classes``: for a dataset, its number of classes, so that class indices (``BelowData``
    constraints) are checked without loading it (None: checked once the data is loaded).
    ``placement``: parameters that say where the entry computes, not what (e.g. ``device``): left out of
    the trial's identity, so moving a trial to a GPU does not make it a new trial.
    ``rebuild`` (a poison): how the report rebuilds its images, one of ``REBUILDS``; ``rebuild_cached``:
    for ``"clean"``, ``rebuild_cached(artifact_dir)`` says whether the sweep's cached work makes running it
    again cheap (the report then shows its success set too).
    ``trial_check``: ``trial_check(params, trial) -> str | None``, a problem of the entry's params given the
    rest of the trial config (e.g. TracIn needs ``train.optimizer: sgd``), reported before any trial starts.
    ``module``: the module that registered it (``poisonsweep.tasks...`` for ours, a plugin's name otherwise).
    ``renamed``: old parameter name -> the name it has now; a config may still use the old one, which
    the sweep maps to the new one before any check and notes (:meth:`with_new_names`).
    """

    name: str
    fn: Callable
    constraints: dict[str, list] = field(default_factory=dict)
    help: str = ""
    needs: frozenset | Callable[[dict], frozenset] = frozenset()
    tables: tuple[str, ...] = ()
    eligible: Callable | None = None
    num_classes: int | None = None
    placement: frozenset = frozenset()
    rebuild: str = "apply"
    rebuild_cached: Callable[[str], bool] | None = None
    trial_check: Callable[[dict, dict], str | None] | None = None
    module: str = ""
    renamed: dict[str, str] = field(default_factory=dict)  # a parameter's old name -> its name now

    def with_new_names(self, prefix: str, params: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
        """:func:`with_new_names` of ``params`` by this entry's ``renamed``."""
        return with_new_names(params, self.renamed, prefix, f" (of {self.name!r})")

    def needs_for(self, params: dict[str, Any]) -> frozenset:
        """What this entry needs when run with ``params`` (registry defaults filled in)."""
        return frozenset(self.needs({**self.defaults(), **params}) if callable(self.needs) else self.needs)

    def defaults(self) -> dict[str, Any]:
        """The keyword defaults of the function, for the constrained parameters."""
        sig = _signature(self.fn)
        return {
            k: sig.parameters[k].default
            for k in self.constraints
            if sig.parameters[k].default is not inspect.Parameter.empty
        }

    def data_bound_errors(self, prefix: str, params: dict[str, Any], counts: dict[str, int | None],
                          dataset: str = "the dataset") -> list[str]:
        """Problems of ``params`` with ``BelowData`` constraints, given the known data ``counts`` (keys of
        ``DATA_COUNTS``; a count that is None or absent is not checked). Values that fail
        ``check_params`` are left to it."""
        errors = []
        for key, value in params.items():
            for bound in self.constraints.get(key, []):
                limit = counts.get(bound.of) if isinstance(bound, BelowData) else None
                if limit is not None and bound.accepts(value) and value >= limit:
                    errors.append(f"{prefix}.{key} must be an int in [{bound.low}, {limit - 1}] ({dataset} has "
                                  f"{limit} {DATA_COUNTS[bound.of]}); got {value}")
        return errors

    def check_params(self, prefix: str, params: dict[str, Any]) -> list[str]:
        """All problems with ``params`` (unknown keys and bad values), as messages."""
        errors = []
        for key, value in params.items():
            if key not in self.constraints:
                allowed = ", ".join(sorted(self.constraints)) or "none"
                errors.append(
                    f"{prefix}.{key} is not a parameter of {self.name!r} (allowed: {allowed}); remove it"
                )
                continue
            message = check_value(f"{prefix}.{key}", value, self.constraints[key])
            if message:
                errors.append(message)
        return errors


def _same_function(a: Callable, b: Callable) -> bool:
    """The same function defined again (its module re-imported), by module and qualified name."""
    return (getattr(a, "__module__", None), getattr(a, "__qualname__", None)) == (
        getattr(b, "__module__", None), getattr(b, "__qualname__", None))


class Registry:
    """A named set of entries of one kind, e.g. ``DETECTORS``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, constraints: dict[str, list] | None = None, help: str = "", *,
                 needs: frozenset | set | tuple | Callable[[dict], frozenset] = frozenset(),
                 tables: tuple[str, ...] = (), eligible: Callable | None = None, num_classes: int | None = None,
                 placement: frozenset | set | tuple = frozenset(), rebuild: str = "apply",
                 rebuild_cached: Callable[[str], bool] | None = None,
                 trial_check: Callable[[dict, dict], str | None] | None = None,
                 renamed: dict[str, str] | None = None) -> Callable[[F], F]:
        """Register the decorated function as ``name`` (see :class:`Entry` for what each argument declares).
        Registering the same function again (same module and qualified name: a re-imported plugin, a
        re-run notebook cell) replaces it; another function under a taken name is an error."""
        def decorator(fn: F) -> F:
            if name in self._entries and not _same_function(self._entries[name].fn, fn):
                raise ValueError(f"a {self.kind} is already registered under the name {name!r}")
            constraints_ = constraints or {}
            params = inspect.signature(fn).parameters
            missing = [k for k in constraints_ if k not in params]
            if missing:
                raise ValueError(f"{self.kind} {name!r} declares constraints for unknown parameters {missing}")
            unknown = [] if callable(needs) else sorted(set(needs) - set(NEEDS))
            if unknown:
                raise ValueError(f"{self.kind} {name!r} needs {unknown}; known needs: {', '.join(NEEDS)}")
            unknown = sorted(set(placement) - set(constraints_))
            if unknown:
                raise ValueError(f"{self.kind} {name!r} declares placement parameters {unknown} it has no "
                                 "constraints for")
            wrong = {old: new for old, new in (renamed or {}).items() if new not in constraints_ or old in constraints_}
            if wrong:
                raise ValueError(f"{self.kind} {name!r}: renamed must map old names to declared parameters; got {wrong}")
            if rebuild not in REBUILDS:
                raise ValueError(f"{self.kind} {name!r}: rebuild must be one of {', '.join(REBUILDS)}; got {rebuild!r}")
            summary = help or (fn.__doc__ or "").strip().split("\n")[0]
            fixed_needs = needs if callable(needs) else frozenset(needs)
            self._entries[name] = Entry(name, fn, constraints_, summary, fixed_needs, tuple(tables), eligible,
                                        num_classes, frozenset(placement), rebuild, rebuild_cached, trial_check,
                                        getattr(fn, "__module__", "") or "", dict(renamed or {}))
            return fn

        return decorator

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None
