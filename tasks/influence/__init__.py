"""Influence functions (Koh & Liang 2017) and TracIn (Pruthi et al. 2020) for classifiers trained
with cross-entropy, in plain PyTorch (``torch.func``). No Ray here: the per-sample work is handed
to a ``map_shards(fn, shared, shards)`` callable (a plain map, or the engine's actor pool).

Definitions (theta = the chosen parameter subset, g_i = gradient of sample i's loss at theta)

- ``H`` is the Hessian of the training objective: the mean cross-entropy Hessian over the
  training samples (or a seeded subset of ``hessian_samples``), plus ``l2 * I`` for the L2 term
  the optimiser applied (``train.weight_decay``), plus ``damping * I``.
- **Self-influence** of training sample i: ``g_i^T H^{-1} g_i`` (Koh & Liang §5.4 rank points to
  check by it; it is n times the predicted loss increase on z_i when z_i is left out). Positive
  for a positive definite H; higher = more suspicious.
- **Train -> test influence**: ``(1/n) g_test^T H^{-1} g_i``, the first-order prediction of how the
  test loss changes when training sample i is removed and the model retrained (Koh & Liang's
  ``predicted_loss_diffs``). Negative: removing i lowers the test loss, i is *harmful*;
  positive: i is *helpful*.
- ``grad_norm`` takes H = I (Kronfluence's "identity"; self-influence = ||g_i||^2).
- ``tracin`` sums over saved checkpoints c: lr_c <g_c(test), g_c(i)>, self-influence
  lr_c ||g_c(i)||^2 (TracInCP, no 1/n). Positive = proponent, the same sign as "helpful".

Solvers for H^{-1} v, and what to do when one fails (each raises ``InfluenceSolverError``
whose message says the same):

- ``exact``: the explicit Hessian (at most ``EXACT_MAX_PARAMS`` parameters; for a linear head in
  closed Kronecker form), Cholesky-factored in float64; self-influence ||L^{-1} g||^2 by triangular
  solves. A non-convex model can make ``H + damping I`` indefinite: raise ``damping`` above the
  most negative eigenvalue (the message prints it; Koh & Liang chose damping that way).
- ``cg``: conjugate gradients on Hessian-vector products, one solve per right-hand side, batched.
  Negative curvature (p^T H p <= 0) or no convergence in ``cg_maxiter``: raise ``damping``
  (conditioning) or ``cg_maxiter``.
- ``lissa``: Koh & Liang's stochastic recursion h <- v + h - (H_batch h)/scale, estimate h/scale,
  averaged over ``repeats``. It converges only if scale exceeds the largest eigenvalue of the
  mini-batch Hessians, and needs depth >> scale / damping steps. Divergence (the iterate grows
  past ``LISSA_GROWTH`` x its bound): raise ``lissa_scale`` ("auto" = 2 x the largest
  eigenvalue of H found by power iteration).
- ``arnoldi``: Schioppa et al. 2022: ``iters`` Arnoldi steps on H, keep the ``rank``
  eigenpairs of largest magnitude, H^{-1} ~ V diag(1/(lambda + damping)) V^T. A kept
  eigenvalue with lambda + damping <= 0: raise ``damping``.

Defaults: ``damping = 0.01`` (Koh & Liang's MNIST CNN value). Precision: ``exact``, ``grad_norm``
and ``tracin`` on a linear head run in the model's dtype with float64 sums and factors
(``CLOSED_FORM_SOLVERS``); otherwise float64 wherever the functional part is small (the linear
head, or at most ``FLOAT64_MAX_PARAMS`` parameters), else the model's dtype with float64 small
matrices.
"""

from poisonsweep.tasks.influence.gradients import (  # noqa: F401
    EXACT_MAX_PARAMS, FLOAT64_MAX_PARAMS, PARAM_SUBSETS, WORK_BUDGET, GradBatch, GradientModel, gradient_model, grad_batches,
    hessian_matrix,
    hvp, linear_head_grads, linear_head_hessian, per_sample_grads, select_parameters, uses_head_features,
)
from poisonsweep.tasks.influence.scoring import (  # noqa: F401
    DEFAULT_SHARD_SIZE, InfluencePayload, InfluenceScores, InfluenceTerm, SolverSettings,
    fit_influence, score_influence, score_shard, shard_indices,
)
from poisonsweep.tasks.influence.solvers import (  # noqa: F401
    CLOSED_FORM_SOLVERS, DEFAULT_DAMPING, LISSA_GROWTH, LISSA_RESIDUAL, SOLVERS, CholeskyInverse,
    FactorInverse, IdentityInverse, InfluenceSolverError, IterativeInverse, LissaNotConverged, arnoldi_inverse,
    conjugate_gradient, exact_inverse, largest_eigenvalue, lissa,
)
