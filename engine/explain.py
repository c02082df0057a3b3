"""What the numbers of ``show`` and ``report`` mean: one glossary, printed by ``poisonsweep explain
METRIC``, returned by ``poisonsweep.explain`` and written into every report (its last section).

Also the rule for an attack that did not take (:func:`attack_not_taken`): a poison whose success
is not above chance leaves unlearning nothing to repair, so the report says its unlearning rows are
not meaningful instead of letting "success after" read as a repair.
"""

from __future__ import annotations

import math

from poisonsweep.tasks.registry import ConfigError

# poison success at most this far above chance (1/K, K classes) counts as "the attack did not take"
ATTACK_MARGIN = 0.05

# name -> (title, text); the title is how the summary and the report label the column
GLOSSARY: dict[str, tuple[str, str]] = {
    "auroc": ("AUROC", (
        "Area under the ROC curve of a detector's scores against the poison mask: the chance that a random "
        "poison scores above a random clean sample (ties count one half). 0.5 is chance, 1 a perfect ranking. "
        "Below 0.5 is a signal with the wrong sign, not no signal: the poisons score LOW, as when a backdoor "
        "detector (abl_isolation) meets label flips. It reads the scores only, not the detector's flags.")),
    "precision_at_n": ("P@n (precision@n)", (
        "Share of poisons among the n highest-scored training samples, n = the number of poisons. At that budget "
        "precision equals recall, so it compares rankings at the one budget a perfect detector would use, "
        "whatever each detector's own flag rule. Chance is the poison rate; 1 is perfect.")),
    "auprc": ("AUPRC", (
        "Average precision of the scores against the poison mask (area under the precision-recall curve). "
        "Chance is the poison rate, so compare it across rates with care; 1 is perfect.")),
    "recall_at_10": ("recall@10%", (
        "Share of ALL poisons found among the top-scored 10 % of the training set (recall_at_5 and recall_at_20 "
        "likewise). It cannot exceed min(1, 0.10 / rate): at a 33 % poison rate the top 10 % of the data holds "
        "at most 0.10 / 0.33 = 0.30 of the poisons, so 0.30 is a perfect score there. Chance is 0.10. "
        "The report's 'Poisons found vs data checked' figure shows the whole curve, with the ideal.")),
    "f1": ("F1 (of own flags)", (
        "F1 of the samples the detector flagged by its own label-free rule (its paper's rule, or an estimate of "
        "the contamination; never tuned on the truth) against the poison mask: the harmonic mean of precision "
        "and recall of those flags. A detector can rank well (high AUROC) and flag badly (low F1) when its rule "
        "flags too many or too few; 'flagged' is how many it flagged. '–' when it flags none.")),
    "n_flagged": ("flagged", (
        "How many training samples the detector flagged by its own rule (mean over seeds). Compare it with "
        "'poisoned', the number of poisons: the gap is what its rule over- or under-flags.")),
    "activation_clustering": ("activation_clustering score", (
        "Scores lie in [0, 2): 1 + s for members of a cluster judged poisonous, s in [0, 1) for every other "
        "sample, so every flagged sample scores above every unflagged one and a score of 1 or more means "
        "'flagged'. s ranks samples within each half: with exclusionary reclassification (the default) it is "
        "the share of the sample's neighbours whose label differs from its own; with a size analysis, its soft "
        "membership of the smaller cluster times how suspicious that cluster's size is.")),
    "abl_isolation": ("abl_isolation score (negative values)", (
        "Score = -log(loss) of each sample early in training (the losses of the trial's own second epoch): "
        "higher = fitted more easily = more suspicious, as in Anti-Backdoor Learning. It is negative whenever "
        "the loss is above 1 (a score of -2.3 is a loss of 10), i.e. for every sample the model had not fitted "
        "yet. On label flips the poisons are fitted slowest, so they score lowest and AUROC falls towards 0: the "
        "sign is the paper's (backdoor direction), never chosen from the truth; 'loss' is the flip direction.")),
    "poison_success": ("poison success", (
        "How well the poison works on its test inputs, per method: one_shift, test predictions equal to the "
        "shifted label; random_flip, the test error rate; pair_flip, source-class test images predicted as the "
        "target; badnets, the attack success rate on triggered test images of non-target classes; flip, "
        "triggered source-class test images classified as the target. For a targeted poison a model that "
        "ignores it scores about 1/K (K classes) or less.")),
    "attack_not_taken": ("attack did not take", (
        f"A setting whose mean poison success (before unlearning) is at most 1/K + {ATTACK_MARGIN:g} (K classes: "
        "chance for a model that ignores a targeted poison, plus a margin for seed noise) is marked 'attack did "
        "not take'. Its model already behaves as if unpoisoned, so its unlearning rows repair nothing: 'success "
        "after' at or near 'success before' is not a failure of the method, and a drop is noise. For an "
        "error-rate poison (random_flip) the bound is lenient: a test error that low means the flips did not "
        "hurt. The rule reads the recorded success and K only, never the poison mask.")),
    "identified": ("identified (unlearning)", (
        "identified_fraction, always a share of the POISONS: for an oracle selection it is f, the share of the "
        "true poisons handed to unlearning (set in the config); for a flagged or top-q selection it is the share "
        "of the poisons its forget set actually holds (its recall, mean over seeds). A top-q selection's q, a "
        "share of the whole training set, is the column top_fraction.")),
    "f": ("f (unlearning)", (
        "In the unlearning table of `show`: the identified fraction, a share of the poisons (see 'identified'): "
        "the oracle's f as set in the config, or for a detector's selection the share of the poisons it "
        "caught.")),
    "clean_test_acc": ("clean acc", (
        "Accuracy on the clean test set, with the test set's true labels ('clean acc after': after unlearning).")),
    "retain_acc_after": ("retain acc / min retain acc", (
        "Accuracy on the training samples kept (not in the forget set) after unlearning; 'min retain acc' is "
        "the worst seed, shown as collapsed below 0.5, so that one seed's collapse is not averaged away.")),
}

ALIASES = {
    "p@n": "precision_at_n", "precision@n": "precision_at_n", "pn": "precision_at_n",
    "recall@10%": "recall_at_10", "recall@10": "recall_at_10", "recall_at_5": "recall_at_10",
    "recall_at_20": "recall_at_10", "recall@5%": "recall_at_10", "recall@20%": "recall_at_10",
    "f1_of_own_flags": "f1", "flagged": "n_flagged", "abl": "abl_isolation", "ac": "activation_clustering",
    "identified_fraction": "identified", "success": "poison_success", "poison_success_before": "poison_success",
    "poison_success_after": "poison_success", "did_not_take": "attack_not_taken", "not_taken": "attack_not_taken",
    "clean_acc": "clean_test_acc", "retain_acc": "retain_acc_after", "min_retain_acc": "retain_acc_after",
    "min_retain": "retain_acc_after",
}


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def explain(metric: str | None = None) -> str:
    """The glossary entry of ``metric`` (a column name, or its label: ``P@n``, ``recall@10%``, ``f``), as
    ``title: text``; without ``metric``, every entry. ``ConfigError`` naming the known ones otherwise."""
    if metric is None:
        return "\n\n".join(f"{title}\n  {text}" for title, text in GLOSSARY.values())
    key = _key(metric)
    key = ALIASES.get(key, key)
    if key not in GLOSSARY:
        raise ConfigError(f"no explanation for {metric!r}; known: {', '.join(sorted(GLOSSARY))} "
                          f"(or P@n, recall@10%, flagged, abl, ...)")
    title, text = GLOSSARY[key]
    return f"{title}: {text}"


def attack_not_taken(poison_success: float, num_classes: float) -> bool:
    """The poison did not take: its success is at most ``1/K + ATTACK_MARGIN`` (unknown K or success: False)."""
    if not num_classes or math.isnan(num_classes) or math.isnan(poison_success):
        return False
    return poison_success <= 1 / num_classes + ATTACK_MARGIN
