"""Issue 24's decision table: each detector's AUROC, P@n and own F1 beside cleanlab's filter on the same model.

For every set-up it trains one model (keras_cnn by default, 3 epochs), runs the chosen detectors at
their defaults on it, and scores ``cleanlab.filter.find_label_issues`` (its default
``prune_by_noise_rate``) on that model's own in-sample probabilities: the simplest peer, no extra
training. One process, no Ray: the record's numbers come from the same detector functions.

Each trained model (its weights) and its arrays (labels, truth, in-sample probabilities, penultimate
features, every detector's scores and flags) are kept under ``--cache``; a later run with the same
``--cache`` loads the saved model instead of training it, so a changed decision rule is re-scored
on the same model.
Example (the label-noise subset, seed 0)::

    python benchmarks/bench_decisions.py --datasets mnist fashion_mnist --setups noise --seeds 0 \
        --cache results/bench_decisions
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import poisonsweep.tasks.detect  # noqa: F401  (registers the detectors)
from poisonsweep.tasks.detect.base import DETECTORS, DetectionContext
from poisonsweep.tasks.detect.label_issues import cleanlab_flags
from poisonsweep.tasks.metrics import detection_metrics
from poisonsweep.tasks.train import accuracy
from poisonsweep.tasks.trial import prepare_trial

PAIRS = ((0, 6), (3, 5), (4, 9))  # class pairs of the pair flips (T-shirt/shirt, dress/sandal, coat/boot)
NOISE_SETUPS = [("one_shift", 0.01, {"shift": 1}), ("one_shift", 0.10, {"shift": 1}), ("one_shift", 0.33, {"shift": 1}),
                ("random_flip", 0.33, {})] + [("pair_flip", 0.05, {"source": s, "target": t}) for s, t in PAIRS]
BACKDOOR_SETUPS = [("badnets", 0.05, {"target": 0, "mode": "all_to_one"}),
                   ("badnets", 0.10, {"target": 0, "mode": "all_to_one"}),
                   ("badnets", 0.10, {"mode": "all_to_all"}), ("badnets", 0.33, {"mode": "all_to_all"})]
FLIP_SETUPS = [("flip", 0.02, {"recipe": "fast"})]  # 2 experts: the paper's 50 take hours on a CPU
SETUPS = {"noise": NOISE_SETUPS, "backdoor": BACKDOOR_SETUPS, "flip": FLIP_SETUPS,
          "all": NOISE_SETUPS + BACKDOOR_SETUPS + FLIP_SETUPS}
DETECTORS_DEFAULT = ("loss", "knn", "influence", "activation_clustering")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    parser.add_argument("--setups", choices=sorted(SETUPS), default="noise")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--n-train", type=int, default=7500)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--model", default="keras_cnn")
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS_DEFAULT),
                        help="names, or name:key=value,... for non-default parameters")
    parser.add_argument("--cache", type=Path, default=None, help="keep / reuse each trained model's arrays here")
    parser.add_argument("--only", default=None, help="run only set-ups whose name contains this text")
    parser.add_argument("--rescore", action="store_true", help="only re-decide the models saved under --cache")
    parser.add_argument("--jsonl", type=Path, default=None,
                        help="append every row here (one JSON object a line), for --summarise")
    parser.add_argument("--summarise", nargs="+", type=Path, default=None,
                        help="only print the mean ± std over seeds of the rows in these JSON-lines files")
    return parser.parse_args()


def setup_name(method: str, rate: float, params: dict) -> str:
    detail = params.get("mode") or (f"{params['source']}→{params['target']}" if "source" in params else "")
    return " ".join(part for part in (method, detail, f"{100 * rate:g} %") if part)


def trial_config(dataset: str, method: str, rate: float, params: dict, seed: int, args) -> dict:
    return {"data": {"name": dataset, "root": None, "n_train": args.n_train, "n_test": 2000, "seed": 0},
            "poison": {"method": method, "rate": rate, "params": params},
            "model": {"name": args.model, "params": {}},
            "train": {"epochs": args.epochs, "batch_size": 64, "lr": 0.001, "optimizer": "adam"},
            "detectors": [dict(zip(("name", "params"), detector_spec(name))) for name in args.detectors], "seed": seed}


def detector_spec(text: str) -> tuple[str, dict]:
    """``"activation_clustering:reclassifier=retrain,k=20"`` -> (name, params); values parsed as YAML."""
    import yaml

    name, _, rest = text.partition(":")
    params = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in rest.split(",") if item)}
    return name, params


def run_setup(config: dict, detectors: list[str], saved_model: Path | None = None) -> list[dict]:
    """Train once (or load the model a previous run saved), run every detector and cleanlab's filter on
    that model; one row each."""
    trial = prepare_trial(config)
    started = time.perf_counter()
    if saved_model is not None and saved_model.exists():
        trial.model.load_state_dict(torch.load(saved_model))
    else:
        trial.train_alone()
    train_seconds = time.perf_counter() - started
    test_accuracy = accuracy(trial.model, trial.data.x_test, trial.data.y_test)
    poisoned = trial.poisoned
    context = DetectionContext(
        model=trial.model, x_train=poisoned.x_train, labels=poisoned.labels.numpy(),
        num_classes=trial.data.num_classes, model_name=config["model"]["name"], model_params={},
        train_config=trial.train_config, seed=config["seed"])
    is_poison = poisoned.is_poison
    rows, arrays = [], {}
    for name in detectors:
        start = time.perf_counter()
        entry, params = detector_spec(name)
        detection = DETECTORS.get(entry).fn(context, seed=config["seed"], **params)
        arrays[f"{name}_scores"], arrays[f"{name}_flagged"] = detection.scores, detection.flagged
        rows.append({"detector": name, **detection_metrics(detection.scores, detection.flagged, is_poison),
                     "seconds": time.perf_counter() - start})
    start = time.perf_counter()
    peer = cleanlab_flags(context.labels, context.pred_probs)
    rows.append({"detector": "cleanlab filter (in-sample)",
                 **detection_metrics(context.losses, peer, is_poison), "seconds": time.perf_counter() - start})
    for row in rows:
        row.update(n_poisoned=int(is_poison.sum()), train_seconds=train_seconds, test_accuracy=test_accuracy)
    arrays.update(labels=context.labels, is_poison=is_poison, pred_probs=context.pred_probs,
                  features=context.features.astype(np.float32))
    return rows, arrays, trial.model


def table(results: list[tuple[str, str, int, list[dict]]]) -> str:
    lines = ["| data | set-up | seed | test acc | detector | AUROC | P@n | own F1 | flags / poisons | F1 / P@n | s |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for dataset, setup, seed, rows in results:
        for row in rows:
            ratio = row["f1"] / row["precision_at_n"] if row["precision_at_n"] else float("nan")
            lines.append(f"| {dataset} | {setup} | {seed} | {row['test_accuracy']:.3f} | {row['detector']} "
                         f"| {row['auroc']:.3f} | {row['precision_at_n']:.3f} | {row['f1']:.3f} "
                         f"| {row['n_flagged']} / {row['n_poisoned']} | {ratio:.2f} | {row['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.rescore:
        print(rescore(args.cache))
        return
    if args.summarise:
        print(summary_table(args.summarise))
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = []
    for dataset in args.datasets:
        for method, rate, params in SETUPS[args.setups]:
            name = setup_name(method, rate, params)
            if args.only and args.only not in name:
                continue
            for seed in args.seeds:
                started = time.perf_counter()
                tag = f"{dataset}_{method}_{rate}_{'_'.join(map(str, params.values()))}_s{seed}"
                saved = args.cache / f"{tag}.pt" if args.cache else None
                rows, arrays, model = run_setup(trial_config(dataset, method, rate, params, seed, args), args.detectors,
                                                saved)
                if args.cache:
                    args.cache.mkdir(parents=True, exist_ok=True)
                    np.savez_compressed(args.cache / f"{tag}.npz", **arrays)
                    torch.save(model.state_dict(), args.cache / f"{tag}.pt")
                results.append((dataset, name, seed, rows))
                if args.jsonl:
                    with args.jsonl.open("a") as out:
                        for row in rows:
                            out.write(json.dumps({"dataset": dataset, "setup": name, "seed": seed,
                                                  "n_train": args.n_train, **row}, default=float) + "\n")
                print(f"{dataset} {name} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
                print(table(results[-1:]), flush=True)
    print("\n" + table(results))


def summary_table(paths: list[Path]) -> str:
    """One row per (data, size, set-up), one column per detector: mean over the seeds found of AUROC · P@n ·
    **own F1 ± its std** (mean flags). The last row of a repeated (set-up, seed, detector) wins, so a rerun
    replaces its earlier rows."""
    rows = {}
    for path in paths:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows[row["dataset"], row["n_train"], row["setup"], row["detector"], row["seed"]] = row
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for (dataset, n_train, setup, detector, _), row in rows.items():
        cells.setdefault((dataset, n_train, setup), {}).setdefault(detector, []).append(row)
    peer = "cleanlab filter (in-sample)"
    detectors = [peer] + list(dict.fromkeys(d for by in cells.values() for d in by if d != peer))
    lines = ["| data | n | set-up | seeds | test acc | poisons | " + " | ".join(detectors) + " |",
             "|---|---:|---|---:|---:|---:|" + "---:|" * len(detectors)]
    for (dataset, n_train, setup), by_detector in cells.items():
        any_rows = next(iter(by_detector.values()))
        row = [dataset, f"{n_train:,}", setup, str(len(any_rows)), f"{np.mean([r['test_accuracy'] for r in any_rows]):.3f}",
               str(any_rows[0]["n_poisoned"])]
        for detector in detectors:
            group = by_detector.get(detector)
            if not group:
                row.append("")
                continue
            f1 = [r["f1"] for r in group]
            spread = f" ± {np.std(f1):.2f}" if len(group) > 1 else ""
            row.append(f"{np.mean([r['auroc'] for r in group]):.2f} · {np.mean([r['precision_at_n'] for r in group]):.2f}"
                       f" · **{np.mean(f1):.2f}{spread}** ({np.mean([r['n_flagged'] for r in group]):.0f})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def rescore(cache: Path) -> str:
    """The table again from every model saved under ``cache``, with today's decision rules on its saved
    arrays: loss and cleanlab's filter from the in-sample probabilities, knn from the saved features
    (exact search, k = 50), influence from its saved self-influence scores; no training."""
    from poisonsweep.tasks.detect.knn import deep_knn
    from poisonsweep.tasks.detect.label_issues import decide_by_cleanlab

    lines = []
    for path in sorted(cache.glob("*.npz")):
        arrays = np.load(path)
        labels, is_poison, probs = arrays["labels"], arrays["is_poison"], arrays["pred_probs"]
        losses = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-300, None))
        rows = {"loss": decide_by_cleanlab(losses, labels, probs)}
        knn = deep_knn(arrays["features"].astype(np.float64), labels, probs.shape[1], 50)
        rows["knn"] = (knn.scores, knn.flagged)
        if "influence_scores" in arrays:
            rows["influence"] = decide_by_cleanlab(arrays["influence_scores"], labels, probs)
        rows["cleanlab filter (in-sample)"] = (losses, cleanlab_flags(labels, probs))
        for name, (scores, flagged) in rows.items():
            m = detection_metrics(scores, flagged, is_poison)
            lines.append(f"| {path.stem} | {name} | {m['auroc']:.3f} | {m['precision_at_n']:.3f} | {m['f1']:.3f} "
                         f"| {m['n_flagged']} / {int(is_poison.sum())} | {m['f1'] / m['precision_at_n']:.2f} |")
    return "\n".join(["| model | detector | AUROC | P@n | own F1 | flags / poisons | F1 / P@n |",
                      "|---|---|---:|---:|---:|---:|---:|", *lines])


if __name__ == "__main__":
    main()
