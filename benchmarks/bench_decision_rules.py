"""Decision rules tried for issue 24 and not adopted, re-decided on the models ``bench_decisions.py`` saved.

No training: each model saved under ``--cache`` (``bench_decisions.py --cache DIR``) is loaded and judged by

- activation clustering's cluster rule (exclusionary reclassification by the input-space 50-NN vote, the
  detector's defaults otherwise): ``majority``, today's (a cluster is poisonous when at most half its members
  are reclassified as their label); ``chen l/p``, the paper's (Chen et al. 2018, §4.1; ART's
  ``ex_re_threshold``): poisonous unless l / p > T, T = 1, with l the members reclassified as their label and
  p those reclassified as the most common other label; and each of them ``+ member``: only the members of a
  poisonous cluster that the vote gives another label are flagged (those the paper's repair would relabel);
- on label-noise set-ups, a label-noise ensemble: cleanlab's ``find_label_issues`` on the mean of the model's
  in-sample probabilities and the 50-NN vote shares in its penultimate features (cleanlab's documented way to
  combine models: average their ``pred_probs``), scored by 1 - the mean probability of the given label.

Example::

    python benchmarks/bench_decision_rules.py --cache results/bench_decisions --datasets fashion_mnist \\
        --only "one_shift 1 %" "all_to_all 33" --seeds 0 1 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bench_decisions import SETUPS, setup_name, trial_config
from poisonsweep.tasks.detect import activation_clustering as ac
from poisonsweep.tasks.detect.base import DetectionContext
from poisonsweep.tasks.detect.knn import vote_counts
from poisonsweep.tasks.detect.label_issues import cleanlab_flags
from poisonsweep.tasks.detect.neighbours import nearest_neighbours
from poisonsweep.tasks.metrics import detection_metrics
from poisonsweep.tasks.trial import prepare_trial

K = 50  # the detectors' default neighbours


def chen_ratio_rule(predicted: np.ndarray, label: int, in_small: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    """Chen et al.'s l / p test on both clusters of a class; neither is flagged when both fail it (as today's)."""
    clusters = (in_small, ~in_small)
    poisonous = []
    for members in clusters:
        counts = np.bincount(predicted[members], minlength=max(int(predicted.max()), label) + 1)
        own = counts[label]
        counts[label] = 0
        poisonous.append(counts.max() > 0 and own <= threshold * counts.max())
    flagged = np.zeros(len(predicted), dtype=bool)
    if not all(poisonous):
        for members, is_poisonous in zip(clusters, poisonous):
            flagged[members] = is_poisonous
    return flagged


def only_relabelled(rule):
    """``rule``, keeping only the members whose own vote is another label."""
    return lambda predicted, label, in_small: rule(predicted, label, in_small) & (predicted != label)


RULES = {"majority": ac.judge_by_reclassification, "chen l/p": chen_ratio_rule,
         "majority + member": only_relabelled(ac.judge_by_reclassification),
         "chen l/p + member": only_relabelled(chen_ratio_rule)}


def cluster_rule_rows(context: DetectionContext, is_poison: np.ndarray, seed: int) -> dict[str, dict]:
    labels = np.asarray(context.labels)
    features = np.asarray(context.features, dtype=np.float64)
    splits = {c: ac.split_class(features[labels == c], n_components=10, reduce="pca", seed=seed) for c in np.unique(labels)}
    predicted, disagreement = ac.cached_reclassification(context, "input", K, "auto")
    rows = {}
    for name, rule in RULES.items():
        flagged = np.zeros(len(labels), dtype=bool)
        for c, split in splits.items():
            if split is not None:
                members = np.flatnonzero(labels == c)
                flagged[members] = rule(predicted[members], c, split.in_small)
        rows[f"activation_clustering {name}"] = detection_metrics(disagreement * K / (K + 1) + flagged, flagged, is_poison)
    return rows


def ensemble_row(context: DetectionContext, is_poison: np.ndarray) -> dict:
    labels = np.asarray(context.labels)
    _, neighbours = nearest_neighbours(np.asarray(context.features, dtype=np.float64), K, search="exact")
    mean_probs = (context.pred_probs + vote_counts(labels[neighbours], context.num_classes) / K) / 2
    flagged = cleanlab_flags(labels, mean_probs)
    return detection_metrics(1 - mean_probs[np.arange(len(labels)), labels], flagged, is_poison)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--only", nargs="+", default=None, help="set-ups whose name contains one of these")
    parser.add_argument("--n-train", type=int, default=7500)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    args.model, args.detectors = "keras_cnn", []
    print("| data | set-up | seed | rule | AUROC | P@n | own F1 | flags / poisons |\n|---|---|---:|---|---:|---:|---:|---:|")
    for dataset in args.datasets:
        for method, rate, params in SETUPS["all"]:
            name = setup_name(method, rate, params)
            if args.only and not any(text in name for text in args.only):
                continue
            for seed in args.seeds:
                saved = args.cache / f"{dataset}_{method}_{rate}_{'_'.join(map(str, params.values()))}_s{seed}.pt"
                if not saved.exists():
                    continue
                trial = prepare_trial(trial_config(dataset, method, rate, params, seed, args))
                trial.model.load_state_dict(torch.load(saved))
                poisoned = trial.poisoned
                context = DetectionContext(model=trial.model, x_train=poisoned.x_train, labels=poisoned.labels.numpy(),
                                           num_classes=trial.data.num_classes, seed=seed)
                rows = cluster_rule_rows(context, poisoned.is_poison, seed)
                if method in ("one_shift", "random_flip", "pair_flip"):
                    rows["label-noise ensemble (model + 50-NN shares)"] = ensemble_row(context, poisoned.is_poison)
                for rule, m in rows.items():
                    print(f"| {dataset} | {name} | {seed} | {rule} | {m['auroc']:.3f} | {m['precision_at_n']:.3f} "
                          f"| {m['f1']:.3f} | {m['n_flagged']} / {int(poisoned.is_poison.sum())} |", flush=True)


if __name__ == "__main__":
    main()
