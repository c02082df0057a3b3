"""Poisons. Importing this package registers every poison in ``POISONS``.

``base`` holds the registry and what every poison shares; each family is one module
(``flips``, ``badnets``, ``flip``) that registers itself. Nothing here imports the trial.
"""

from poisonsweep.tasks.poisons import badnets, flip, flips  # noqa: F401  (register the label flips, BadNets, FLIP)
from poisonsweep.tasks.poisons.base import (
    POISONS, PoisonedData, apply_poison, apply_trigger, check_rate, choose, n_to_poison,
)

__all__ = ["POISONS", "PoisonedData", "apply_poison", "apply_trigger", "check_rate", "choose", "n_to_poison"]
