"""Corrective unlearning benchmark: does each method remove the poison, given part of it?

For every poison set-up and seed: poison the training set, train the model, run the detectors, then
unlearn with each method on forget sets that identify a share f of the poisons, chosen by the oracle
(a random f of the true poisons) or by a detector (its top f * n_poison scores, same size as the
oracle's set, and its own flagged set). Prints a markdown report (clean test accuracy and poison
success after each method) and, with ``--out``, writes it to a file.

Plain Python on ``tasks.*`` (no Ray). Examples::

    python benchmarks/bench_unlearn.py --dataset digits --setups badnets:0.01 badnets:0.05 one_shift:0.33
    python benchmarks/bench_unlearn.py --dataset mnist --n-train 7500 --n-test 10000 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from sklearn.metrics import roc_auc_score


from poisonsweep.tasks.data import load_dataset
from poisonsweep.tasks.detect import DETECTORS, DetectionContext
from poisonsweep.tasks.models import build_model
from poisonsweep.tasks.poisons import apply_poison
from poisonsweep.tasks.metrics import poison_success
from poisonsweep.tasks.train import TrainConfig, accuracy, train_model
from poisonsweep.tasks.unlearn import run_unlearning

POISON_PARAMS = {"badnets": {"target": 0, "mode": "all_to_one"}, "one_shift": {}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--model", default="keras_cnn")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--setups", nargs="+", default=["badnets:0.01", "badnets:0.05", "one_shift:0.33"],
                        help="poison method:rate pairs")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.5, 1.0])
    parser.add_argument("--detectors", nargs="*", default=["loss", "spectral_signature", "activation_clustering"])
    parser.add_argument("--methods", nargs="+", default=["retrain", "finetune", "ssd", "gradient_ascent"],
                        help="method names, optionally with params: ssd:alpha=1,importance_on=retain")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    return parser.parse_args()


def parse_method(spec: str) -> dict:
    """``ssd:alpha=1,importance_on=retain`` -> ``{name: ssd, params: {alpha: 1.0, importance_on: retain}}``."""
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, value = item.split("=")
        params[key] = yaml.safe_load(value)
    return {"name": name, "params": params}


def run_setup(args, data, method: str, rate: float, seed: int) -> tuple[list[dict], dict]:
    """All unlearning rows of one poisoned trial, plus a summary of the trial before unlearning."""
    poisoned = apply_poison(data, method, rate=rate, seed=seed, params=POISON_PARAMS[method])
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=args.device)
    factory = lambda s: build_model(args.model, data.in_shape, data.num_classes, seed=s)  # noqa: E731
    start = time.perf_counter()
    model = factory(seed)
    history = train_model(model, poisoned.x_train, poisoned.labels, config, seed=seed)
    train_seconds = time.perf_counter() - start
    clean = factory(seed)  # the reference: same budget on the unpoisoned training set
    train_model(clean, data.x_train, data.y_train, config, seed=seed)

    context = DetectionContext(model=model, x_train=poisoned.x_train, labels=poisoned.labels.numpy(),
                               num_classes=data.num_classes, model_name=args.model, train_config=config,
                               x_test=data.x_test, y_test=data.y_test.numpy(), sample_losses=history.sample_losses,
                               seed=seed)
    detections = {name: DETECTORS.get(name).fn(context, seed=seed) for name in args.detectors}
    n_train, n_poison = len(poisoned.labels), poisoned.n_poisoned
    # a detector's top q of the training set with q = f * n_poison / n_train is as large as the oracle's f
    selections = [{"kind": "oracle", "fractions": args.fractions}]
    for name in args.detectors:
        selections.append({"kind": "top", "detector": name,
                           "fractions": [f * n_poison / n_train for f in args.fractions]})
        selections.append({"kind": "flagged", "detector": name})
    rows = run_unlearning(model, poisoned, data.x_test, data.y_test, detections,
                          {"methods": [parse_method(m) for m in args.methods], "selections": selections},
                          config, factory, seed)
    for i, row in enumerate(rows):
        row["label"] = args.methods[i % len(args.methods)]  # rows: per selection, the methods in order
        # f: the share of the poisons the selection was asked to identify
        kind = row["selection_kind"]
        row["f"] = {"oracle": row["identified_fraction"], "flagged": float("nan"),
                    "top": row["identified_fraction"] * n_train / n_poison}[kind]
    summary = {
        "seed": seed, "n_train": n_train, "n_poison": n_poison, "train_seconds": train_seconds,
        "clean_test_acc": accuracy(model, data.x_test, data.y_test), "poison_success": poison_success(model, poisoned),
        "clean_model_acc": accuracy(clean, data.x_test, data.y_test),
        "clean_model_poison_success": poison_success(clean, poisoned),
        **{f"auroc_{name}": roc_auc_score(poisoned.is_poison, d.scores) for name, d in detections.items()},
        **{f"flagged_{name}": int(d.flagged.sum()) for name, d in detections.items()},
    }
    return rows, summary


def report(args, results: dict, seconds: float) -> str:
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.processor() or 'x86-64'})"
    lines = [
        f"## {args.dataset} ({args.n_train or 'all'} train / {args.n_test or 'all'} test), {args.model}, "
        f"{args.epochs} epochs, seeds {args.seeds}",
        "",
        "Command: `python " + " ".join(sys.argv) + "`  ",
        f"Machine: {device}, torch {torch.__version__}, {args.threads} CPU thread(s); total {seconds:.0f} s.",
        "",
    ]
    for setup, (rows, summaries) in results.items():
        s = pd.DataFrame(summaries).mean(numeric_only=True)
        lines += [
            f"### {setup}: {s.n_poison:.0f} poisons of {s.n_train:.0f}",
            "",
            f"Before unlearning: clean test acc {s.clean_test_acc:.3f}, poison success {s.poison_success:.3f} "
            f"(a model trained on the clean set: acc {s.clean_model_acc:.3f}, poison success "
            f"{s.clean_model_poison_success:.3f}); training {s.train_seconds:.1f} s.  ",
            "Detector AUROC / flagged: " + ", ".join(
                f"{d} {s[f'auroc_{d}']:.3f} / {s[f'flagged_{d}']:.0f}" for d in args.detectors) + ".",
            "",
            _table(pd.DataFrame(rows), args.methods),
            "",
        ]
    return "\n".join(lines)


def _table(rows: pd.DataFrame, methods: list[str]) -> str:
    """One line per selection; per method 'clean acc / poison success' after unlearning (seed means)."""
    rows = rows.assign(f=rows.f.round(3))
    keys = ["selection", "selection_kind", "f"]
    means = rows.groupby(keys + ["label"], sort=False, dropna=False).mean(numeric_only=True).reset_index()
    header = "| selection | f | n_forget | precision | recall | " + " | ".join(methods) + " |"
    out = [header, "|" + "---|" * (5 + len(methods))]
    for key, group in means.groupby(keys, sort=False, dropna=False):
        by_method = group.set_index("label")
        first = group.iloc[0]
        name = key[0] if key[1] == "oracle" else f"{key[0]} ({key[1]})"
        cells = [f"{by_method.loc[m, 'clean_test_acc_after']:.3f} / {by_method.loc[m, 'poison_success_after']:.3f}"
                 for m in methods]
        f = "-" if np.isnan(key[2]) else f"{key[2]:.2f}"
        out.append(f"| {name} | {f} | {first.n_forget:.1f} | {first.forget_poison_share:.2f} | "
                   f"{first.poisons_in_forget:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, n_train=args.n_train, n_test=args.n_test, seed=0)
    start = time.perf_counter()
    results = {}
    for setup in args.setups:
        method, rate = setup.split(":")
        rows, summaries = [], []
        for seed in args.seeds:
            seed_rows, summary = run_setup(args, data, method, float(rate), seed)
            rows += seed_rows
            summaries.append(summary)
            print(f"{setup} seed {seed}: done after {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        results[f"{method} {float(rate):.0%}"] = (rows, summaries)
    text = report(args, results, time.perf_counter() - start)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
