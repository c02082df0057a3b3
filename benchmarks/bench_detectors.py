"""Issue 12's detector benchmark: ranking (AUROC, precision at n_poisoned) and each detector's own
decision (F1, flags vs poisons) on every set-up of ``configs/detectors_mnist.yaml``.

Runs the sweep through the CLI (so the record is the one users get) unless ``--table-only``, then
prints one markdown table from the Parquet record, mean ± std over seeds, and the issue's checks:
where some detector ranks with AUROC >= 0.99, does some detector's own F1 reach 0.90; does any
default rule flag more than twice the true number of poisons. Example::

    python benchmarks/bench_detectors.py --out results/detectors_mnist
    python benchmarks/bench_detectors.py --out results/detectors_mnist --set 'sweep.seed=[0,1,2]'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd


from poisonsweep.engine.summary import load

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "detectors_mnist.yaml"
RANKS_PERFECTLY = 0.99  # the targets
DECIDES_WELL = 0.90
MAX_FLAG_RATIO = 2.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--out", required=True, help="the sweep's output directory")
    parser.add_argument("--set", action="append", default=[], help="passed to `poisonsweep run --set`")
    parser.add_argument("--table-only", action="store_true", help="only print the table of an existing record")
    return parser.parse_args()


def setup_name(row: pd.Series) -> str:
    """``badnets all_to_one 10 %`` from a trial row."""
    params = json.loads(row.poison_params) if isinstance(row.poison_params, str) and row.poison_params else {}
    detail = params.get("mode") or ("{source}→{target}".format(**params) if "source" in params else "")
    return " ".join(part for part in (row.poison_method, detail, f"{100 * row.poison_rate:g} %") if part)


def mean_std(values: pd.Series, digits: int = 3) -> str:
    if values.isna().all():
        return "–"
    if len(values) == 1 or values.std() == 0:
        return f"{values.mean():.{digits}f}"
    return f"{values.mean():.{digits}f}±{values.std():.{digits}f}"


def collect(out: str) -> pd.DataFrame:
    """One row per (trial, detector) of the ``ok`` trials, with its set-up and n_poisoned."""
    trials = load(out, "trials")
    failed = trials[trials["status"] != "ok"]
    for _, row in failed.iterrows():
        print(f"FAILED trial {row.trial_id} ({row.poison_method} {row.poison_rate}): {row.error}", file=sys.stderr)
    ok = trials[trials["status"] == "ok"].copy()
    ok["setup"] = ok.apply(setup_name, axis=1)
    detections = load(out, "detections")
    columns = ["trial_id", "setup", "n_poisoned", "clean_test_acc", "poison_success"]
    frame = detections.merge(ok[columns], on="trial_id", how="inner")
    return frame.sort_values(["poison_method", "poison_rate", "setup"], kind="stable")  # detectors keep their order


def markdown_table(frame: pd.DataFrame) -> str:
    lines = ["| set-up | detector | seeds | AUROC | precision@n | F1 (own flags) | flagged / poisoned | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for (setup, detector), rows in frame.groupby(["setup", "detector"], sort=False):
        flags = f"{rows.n_flagged.mean():.0f} / {rows.n_poisoned.mean():.0f}"
        lines.append(f"| {setup} | {detector} | {len(rows)} | {mean_std(rows.auroc)} | {mean_std(rows.precision_at_n)} "
                     f"| {mean_std(rows.f1)} | {flags} | {mean_std(rows.seconds, 1)} |")
    return "\n".join(lines)


def setup_table(frame: pd.DataFrame) -> str:
    """The victims: clean test accuracy and poison success (attack success rate) per set-up."""
    victims = frame.drop_duplicates("trial_id")
    lines = ["| set-up | seeds | clean test acc | poison success | poisoned |", "|---|---|---|---|---|"]
    for setup, rows in victims.groupby("setup", sort=False):
        lines.append(f"| {setup} | {len(rows)} | {mean_std(rows.clean_test_acc)} | {mean_std(rows.poison_success)} "
                     f"| {rows.n_poisoned.mean():.0f} |")
    return "\n".join(lines)


def checks(frame: pd.DataFrame) -> list[str]:
    """The issue's targets, one line per set-up (on seed means) and one per over-flagging rule."""
    means = frame.groupby(["setup", "detector"], sort=False)[["auroc", "f1", "n_flagged", "n_poisoned"]].mean()
    lines = []
    for setup, rows in means.groupby(level="setup", sort=False):
        best_auroc, best_f1 = rows.auroc.max(), rows.f1.max()
        best = rows.f1.idxmax()[1] if rows.f1.notna().any() else "–"
        if best_auroc >= RANKS_PERFECTLY:
            verdict = "met" if best_f1 >= DECIDES_WELL else "MISSED"
            lines.append(f"- {setup}: best AUROC {best_auroc:.3f}, best own F1 {best_f1:.3f} ({best}): {verdict}")
        else:
            lines.append(f"- {setup}: best AUROC {best_auroc:.3f} < {RANKS_PERFECTLY} (F1 target not set), "
                         f"best own F1 {best_f1:.3f} ({best})")
    over = means[means.n_flagged > MAX_FLAG_RATIO * means.n_poisoned]
    lines += [f"- OVER-FLAGGING: {d} on {s} flags {r.n_flagged:.0f} for {r.n_poisoned:.0f} poisons"
              for (s, d), r in over.iterrows()] or [f"- no default rule flags more than {MAX_FLAG_RATIO:g}× the poisons"]
    return lines


def main() -> None:
    args = parse_args()
    if not args.table_only:
        command = [sys.executable, "-m", "poisonsweep.engine.cli", "run", str(args.config), "--out", args.out]
        for override in args.set:
            command += ["--set", override]
        subprocess.run(command, check=True)
    frame = collect(args.out)
    print(setup_table(frame))
    print()
    print(markdown_table(frame))
    print()
    print("\n".join(checks(frame)))


if __name__ == "__main__":
    main()
