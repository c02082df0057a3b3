"""Corrective unlearning: remove a poison's effect given the part of it that was identified.

Setting (Goel et al., "Corrective Machine Unlearning", TMLR 2024): some training samples were
manipulated, a detector (or an oracle) identifies a subset of them, the *forget set*; the rest of the
training set, unidentified poisons included, is the *retain set*. An unlearning method turns the
trained model into a new one that should no longer show the poison's effect (poison success) while
keeping clean accuracy.

An unlearning method takes the trained model, the retain and forget sets and returns a new model
(the protocol is in ``poisonsweep.tasks.unlearn.methods``).

Methods: ``retrain`` (exact unlearning, Goel et al.'s EU with k = -1), ``finetune`` (catastrophic
forgetting, CF), ``ssd`` (Selective Synaptic Dampening, Foster et al., AAAI 2024),
``gradient_ascent`` (bounded ascent on the forget loss), and in ``adaptive``
``assd`` (adaptive SSD) and ``potion`` (Schoepf et al. 2024). An optional accuracy guard
(``unlearn.guard``) refuses any method's update that costs too much retain accuracy.

Forget sets come from ``select_forget_set`` (oracle share of true poisons, a detector's flagged set,
or the top share of a detector's scores) and ``run_unlearning`` produces the rows of the
``unlearning`` table, one per selection x method.

Modules: ``methods`` (the ``UNLEARNERS`` registry and retrain, finetune, ssd, gradient ascent),
``adaptive`` (assd, potion), ``selection`` (forget-set selections and the config check) and ``run``
(``run_unlearning``, the retain/forget split and the accuracy guard).
"""

from poisonsweep.tasks.unlearn.methods import (FINETUNE_SHARE_OF_TRAINING, UNLEARNERS, finetune, gradient_ascent,
                                   minibatch_importance, retrain, ssd, ssd_dampen)
from poisonsweep.tasks.unlearn.adaptive import adaptive_alpha, assd, forget_share, potion  # registers assd, potion
from poisonsweep.tasks.unlearn.selection import (SELECTION_KINDS, check_unlearn_config, expand_selections, normalize_methods,
                                     select_forget_set)
from poisonsweep.tasks.unlearn.run import SUCCESS_EXAMPLES, run_unlearning, success_predictions

__all__ = [
    "FINETUNE_SHARE_OF_TRAINING", "SELECTION_KINDS", "SUCCESS_EXAMPLES", "UNLEARNERS", "adaptive_alpha", "assd",
    "check_unlearn_config", "expand_selections", "finetune", "forget_share", "gradient_ascent",
    "minibatch_importance", "normalize_methods", "potion", "retrain", "run_unlearning", "select_forget_set",
    "ssd", "ssd_dampen", "success_predictions",
]
