"""Anti-Backdoor Learning's isolation (Li et al., NeurIPS 2021, §4): backdoors are learned fastest.

Li et al. observe that a model fits backdoored samples much faster than clean ones: a trigger
is a simpler, stronger cue than the content of the image, so early in training the poisons'
loss falls towards zero while clean samples' does not. ABL trains for an "isolation" phase of
T_te epochs (20 of 100 in the paper; ``tuning_epochs`` = 10 in the authors' ``config.py``) with
the local gradient ascent loss sign(L − γ)·L, γ = 0.5, which holds every sample's loss near γ so
that only what is learned much faster than the rest falls below it, then computes every
sample's loss with that model and isolates the lowest-loss share p = 1 % (``isolation_ratio =
0.01``) as backdoor candidates.

What this detector follows and what it simplifies:

- It follows the criterion (lowest loss early in training = most suspicious) and the isolation
  rate: by default (``flag_rule="fraction"``) the top ``flag_fraction = 0.01`` of the scores are
  flagged, the paper's p.
- It does not train a second model. It reads the per-sample losses the trial's own training
  recorded (``TrainHistory.sample_losses``: each sample's cross-entropy in its minibatch, before
  that step), so the loss is plain cross-entropy, not the LGA loss with γ. The default
  ``epoch = 2`` takes the losses met in the second pass, i.e. from a model that has seen every
  sample once: the earliest point at which "fitted fast" is defined for every sample. With a
  one-epoch training the first (only) epoch is used.
- The score is −log(loss) (higher = fitted more easily = more suspicious); losses below
  float32's resolution near probability 1 (1.2e-7) tie.

Orientation: this is the backdoor-direction detector. On label noise (flips) the poisons are
fitted slowest, so this score ranks them last (AUROC near 0); ``loss`` is the label-noise
direction. Neither sign is chosen by looking at the truth. ``flag_rule="auto"`` flags the high
modified-z outliers of the score (``base.robust_outliers``) instead of the paper's fixed rate.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np

from poisonsweep.tasks.detect.base import (
    DETECTORS, FLAG_CONSTRAINTS, Detection, DetectionContext, flag_by_rule, robust_outliers,
)
from poisonsweep.tasks.registry import Interval

__all__ = ["ISOLATION_RATE", "abl_isolation", "early_loss_scores"]

ISOLATION_RATE = 0.01  # the paper's isolation ratio p
# float32 resolves 1 - p no finer than its machine epsilon, so smaller losses are ties
LOSS_FLOOR = float(np.finfo(np.float32).eps)


def early_loss_scores(sample_losses: np.ndarray, epoch: int) -> np.ndarray:
    """−log of each sample's minibatch loss in ``epoch`` (1-based; the last epoch if training was
    shorter), float64 (n,). ``sample_losses`` has shape (epochs, n_samples)."""
    sample_losses = np.asarray(sample_losses)
    if sample_losses.ndim != 2 or sample_losses.shape[0] == 0:
        raise ValueError("abl_isolation needs the per-sample losses recorded during training "
                         f"(TrainHistory.sample_losses, shape (epochs, n)); got shape {sample_losses.shape}")
    losses = sample_losses[min(epoch, sample_losses.shape[0]) - 1].astype(np.float64)
    return -np.log(np.maximum(losses, LOSS_FLOOR))


@DETECTORS.register(
    "abl_isolation",
    {"epoch": [Interval(Integral, 1)], **FLAG_CONSTRAINTS},
    help="Anti-Backdoor Learning isolation (Li et al. 2021): lowest training loss early on; flags 1 %",
    needs={"sample_losses"},
)
def abl_isolation(context: DetectionContext, *, seed: int, epoch: int = 2, flag_rule: str = "fraction",
                  flag_fraction: float = ISOLATION_RATE) -> Detection:
    """Early-training loss isolation; higher score = lower early loss = more suspicious.

    Parameters
    ----------
    context : DetectionContext
        Uses ``context.sample_losses`` (recorded by ``poisonsweep.tasks.train.train_model``).
    seed : int
        Unused: the losses come from the trial's own seeded training.
    epoch : int, default=2
        Training epoch (1-based) whose minibatch losses are read (module docstring).
    flag_rule : {"fraction", "auto"}, default="fraction"
        ``"fraction"``: the paper's isolation rule, the top ``flag_fraction``; ``"auto"``: high
        modified-z outliers of the scores (Iglewicz & Hoaglin 1993, |M| > 3.5).
    flag_fraction : float, default=0.01
        The paper's isolation rate p.

    Returns
    -------
    detection : Detection
        ``scores`` float64 (n_samples,), ``flagged`` bool (n_samples,).
    """
    if context.sample_losses is None:
        raise ValueError("abl_isolation needs the per-sample training losses in the detection context")
    scores = early_loss_scores(context.sample_losses, epoch)
    flagged = flag_by_rule(scores, flag_rule, flag_fraction, lambda: int(robust_outliers(scores).sum()))
    return Detection(scores=scores, flagged=flagged)
