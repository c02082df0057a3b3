"""Training-loss baseline: a sample the final model fits badly is suspicious.

A mislabelled sample disagrees with the clean samples around it, so a model that generalises
keeps a high cross-entropy on it against its given label (the converse of the small-loss
criterion of noisy-label learning, e.g. Co-teaching, Han et al. 2018). It is the simplest detector and the baseline the
others should beat.

Orientation: the score is oriented for label noise. A *learned* backdoor (BadNets) is the
opposite case: the trigger makes its samples the easiest of their label, so they get the
lowest losses and this detector ranks them last (AUROC near 0). The sign is never flipped on
the evidence of the truth; the detector built for that direction is ``abl_isolation``.
"""

from __future__ import annotations

import numpy as np

from poisonsweep.tasks.detect.base import DETECTORS, FLAG_CONSTRAINTS, Detection, DetectionContext
from poisonsweep.tasks.detect.label_issues import DEFAULT_FILTER, FILTERS, LABEL_NOISE_FLAG_RULES, decide_label_noise
from poisonsweep.tasks.registry import Options

__all__ = ["loss"]


@DETECTORS.register(
    "loss",
    {**FLAG_CONSTRAINTS, "flag_rule": [Options(LABEL_NOISE_FLAG_RULES)], "filter_by": [Options(FILTERS)]},
    help="Per-sample training cross-entropy of the final model against the given label.",
)
def loss(context: DetectionContext, *, seed: int, flag_rule: str = "cleanlab", flag_fraction: float = 0.1,
         filter_by: str = DEFAULT_FILTER) -> Detection:
    """Per-sample cross-entropy against the given labels; higher = more suspicious.

    Parameters
    ----------
    context : DetectionContext
        Uses ``context.losses``: −log softmax(model(x_i))[y_i] with the trained model in eval
        mode and y_i the given (possibly poisoned) label.
    seed : int
        Unused: the method is deterministic.
    flag_rule : {"cleanlab", "auto", "fraction"}, default="cleanlab"
        ``"cleanlab"`` flags what ``cleanlab.filter.find_label_issues`` finds on the same model's
        in-sample probabilities ``context.pred_probs`` with ``filter_by`` (Northcutt et al., JAIR
        2021; ``label_issues.decide_by_cleanlab``), and lifts the flagged losses by one constant
        so that every flagged sample scores at least as high as every unflagged one
        (``label_issues.lift_flagged``: the order inside each group is the loss order). cleanlab
        prunes per given label by the margin of the other class, which decides better than a
        global top-n of the losses (issue 24; benchmarks/RESULTS.md, "Label-noise decisions").
        ``"auto"`` flags the n highest losses, n = confident learning's estimate of the number of
        label errors from the same model's probabilities (``base.label_issue_count``); the
        score measures label noise, so the label-noise estimator sizes it. ``"fraction"``
        flags the top ``flag_fraction`` of the training set.
    flag_fraction : float, default=0.1
        Used only with ``flag_rule="fraction"``.
    filter_by : str, default="prune_by_noise_rate"
        ``find_label_issues``' method (its default), used only with ``flag_rule="cleanlab"``.

    Returns
    -------
    detection : Detection
        ``scores`` float64 of shape (n_samples,): the losses (lifted for the flagged samples
        under ``"cleanlab"``); ``flagged`` bool of shape (n_samples,).
    """
    scores = np.asarray(context.losses, dtype=np.float64)
    scores, flagged = decide_label_noise(scores, context, flag_rule=flag_rule, flag_fraction=flag_fraction,
                                         filter_by=filter_by)
    return Detection(scores=scores, flagged=flagged)
