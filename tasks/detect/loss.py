"""Training-loss baseline: a sample the final model fits badly is suspicious.

A mislabelled sample disagrees with the clean samples around it, so a model that generalises
keeps a high cross-entropy on it against its given label (the converse of the small-loss
criterion of noisy-label learning, e.g. Co-teaching, Han et al. 2018). It is the simplest detector and the baseline the
others should beat.
"""

from __future__ import annotations

from numbers import Real

import numpy as np

from tasks.detect.base import DETECTORS, Detection, DetectionContext, flag_top
from tasks.registry import Interval

__all__ = ["loss"]


@DETECTORS.register(
    "loss",
    {"flag_fraction": [Interval(Real, 0, 1)]},
    help="Per-sample training cross-entropy of the final model against the given label.",
)
def loss(context: DetectionContext, *, seed: int, flag_fraction: float = 0.1) -> Detection:
    """Per-sample cross-entropy against the given labels; higher = more suspicious.

    Parameters
    ----------
    context : DetectionContext
        Uses ``context.losses``: −log softmax(model(x_i))[y_i] with the trained model in eval
        mode and y_i the given (possibly poisoned) label.
    seed : int
        Unused: the method is deterministic.
    flag_fraction : float, default=0.1
        Share of the training set flagged, highest losses first (``flag_top``).

    Returns
    -------
    detection : Detection
        ``scores`` float64 of shape (n_samples,), ``flagged`` bool of shape (n_samples,).
    """
    scores = np.asarray(context.losses, dtype=np.float64)
    return Detection(scores=scores, flagged=flag_top(scores, flag_fraction))
