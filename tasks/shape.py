"""The shape of a sweep config, declared once: every mapping the YAML may hold and the keys it allows.

Each mapping of a config (a trial's ``data``, ``poison``, ``model`` and ``train`` sections, a detector entry,
the ``unlearn`` section and its parts; the engine's top level and ``resources``) is one :class:`Mapping`, and
:meth:`Mapping.problems` is the one check of a value against it: that it is a mapping, and that every key is
allowed, each problem a message naming the key's path and what is allowed. What the values themselves may be
is declared beside the functions that take them (the registries' constraints, ``registry.check_value``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Mapping", "TRIAL_SECTIONS", "DETECTOR_ENTRY", "UNLEARN", "UNLEARN_GUARD", "UNLEARN_METHOD",
           "UNLEARN_SELECTIONS"]


@dataclass(frozen=True)
class Mapping:
    """A mapping with a fixed set of keys.

    ``expected`` says what the value must be when it is not a mapping ("{keys}" is replaced by the sorted
    keys); ``unknown`` how a key outside ``keys`` is reported ("is not known", "is not a key of unlearn").
    """

    keys: frozenset[str]
    expected: str = "a mapping (keys: {keys})"
    unknown: str = "is not known"

    def listed(self) -> str:
        return ", ".join(sorted(self.keys))

    def problems(self, path: str, value: Any) -> tuple[list[str], dict | None]:
        """The problems of ``value`` at ``path`` ("" for the top level), and the value with its unknown keys
        dropped (None when it is not a mapping), so that the later checks still see the rest."""
        if not isinstance(value, dict):
            return [f"{path} must be {self.expected.format(keys=self.listed())}; got {value!r}"], None
        prefix = f"{path}." if path else ""
        unknown = [key for key in value if key not in self.keys]
        errors = [f"{prefix}{key} {self.unknown} (allowed: {self.listed()}); remove it" for key in unknown]
        return errors, {key: item for key, item in value.items() if key in self.keys}


def _keys(*names: str) -> frozenset[str]:
    return frozenset(names)


# a trial's sections (train's keys are its TrainConfig fields, declared with their constraints in tasks/train.py)
TRIAL_SECTIONS = {
    "data": Mapping(_keys("name", "n_train", "n_test", "seed", "root", "params")),
    "poison": Mapping(_keys("method", "rate", "params")),
    "model": Mapping(_keys("name", "params")),
}
DETECTOR_ENTRY = Mapping(_keys("name", "params", "label"), "a detector name or a mapping with 'name'")
UNLEARN = Mapping(_keys("methods", "selections", "guard"), "a mapping with keys methods and selections",
                  "is not a key of unlearn")
UNLEARN_GUARD = Mapping(_keys("max_retain_drop"), "a mapping {{max_retain_drop: a number in [0, 1]}}",
                        "is not a key of guard")
UNLEARN_METHOD = Mapping(_keys("name", "params"), "a method name or {{name: ..., params: {{...}}}}",
                         "is not a key of a method")
UNLEARN_SELECTIONS = {
    kind: Mapping(keys, "a mapping with a kind", f"is not a key of a {kind} selection")
    for kind, keys in (("oracle", _keys("kind", "fraction", "fractions")), ("flagged", _keys("kind", "detector")),
                       ("top", _keys("kind", "detector", "fraction", "fractions")))
}
