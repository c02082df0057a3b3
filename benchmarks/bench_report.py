"""How the report's samples part (histograms, galleries, image rebuild) scales with the record.

Builds synthetic records without training: digits poisoned by BadNets with the real
``apply_poison`` (so the rebuilt images must match the recorded labels), and made-up scores for
three detectors (poisons score higher on average). Then times ``poisonsweep.engine.report.galleries.sample_figures``
(what this part adds to ``poisonsweep report``) and the whole ``write_report``, for more seeds per
setting and for more settings than the report shows.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_report.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from poisonsweep.engine.config import build_sweep, config_columns, trial_id
from poisonsweep.engine.report import write_report
from poisonsweep.engine.report.galleries import sample_figures
from poisonsweep.engine.record import write_trial_table
from poisonsweep.engine.summary import load, setting_columns
from poisonsweep.tasks.data import load_dataset
from poisonsweep.tasks.poisons import apply_poison

DETECTORS = ["loss", "spectral_signature", "activation_clustering"]


def synthetic_record(out: str, rates: list[float], seeds: list[int]) -> None:
    sweep = build_sweep({"name": "bench", "data": {"name": "digits"},
                         "poison": {"method": "badnets", "rate": rates[0], "params": {"target": 0}},
                         "model": {"name": "mlp"}, "detectors": DETECTORS,
                         "sweep": {"poison.rate": rates, "seed": seeds}}, out=out)
    data = load_dataset("digits")
    for config in sweep.trials:
        tid = trial_id(config)
        poisoned = apply_poison(data, "badnets", rate=config["poison"]["rate"], seed=config["seed"],
                                params=config["poison"]["params"])
        rng = np.random.default_rng(config["seed"])
        given, true = poisoned.labels.numpy(), poisoned.true_labels.numpy()
        rows = []
        for detector in DETECTORS:
            scores = rng.normal(size=len(given)) + 1.5 * poisoned.is_poison
            cut = np.quantile(scores, 0.9)
            rows += [{"trial_id": tid, "detector": detector, "index": i, "label_given": int(given[i]),
                      "label_true": int(true[i]), "is_poison": bool(poisoned.is_poison[i]), "score": float(scores[i]),
                      "flagged": bool(scores[i] >= cut)} for i in range(len(given))]
        write_trial_table(out, "scores", tid, rows)
        write_trial_table(out, "trials", tid, [{"trial_id": tid, **config_columns(config), "status": "ok",
                                                "n_train": len(given), "n_poisoned": poisoned.n_poisoned,
                                                "clean_test_acc": 0.9, "poison_success": 0.9}])


def main() -> None:
    cases = [("4 settings x 2 seeds", [0.02, 0.05, 0.1, 0.2], [0, 1]),
             ("4 settings x 20 seeds", [0.02, 0.05, 0.1, 0.2], list(range(20))),
             ("30 settings x 2 seeds", [round(0.01 * k, 2) for k in range(1, 31)], [0, 1])]
    print("| record | trials | score rows | samples part (s) | whole report (s) | settings pictured |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rates, seeds in cases:
        with tempfile.TemporaryDirectory() as tmp:
            out = f"{tmp}/sweep"
            synthetic_record(out, rates, seeds)
            trials = load(out, "trials")
            setting = setting_columns(trials)
            directory = Path(tmp) / "samples"
            directory.mkdir()
            start = time.perf_counter()
            shown, _ = sample_figures(out, trials, setting, directory)
            part = time.perf_counter() - start
            start = time.perf_counter()
            write_report(out, Path(tmp) / "report")
            whole = time.perf_counter() - start
            n_rows = len(trials) * len(DETECTORS) * int(trials["n_train"].iloc[0])
            assert shown["check"].str.startswith("all ").all(), shown["check"].tolist()
            print(f"| {name} | {len(trials)} | {n_rows:,} | {part:.1f} | {whole:.1f} | {len(shown)} |")


if __name__ == "__main__":
    main()
