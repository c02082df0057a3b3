"""SPECTRE before and after issue 25, in one process on the same features: seconds, and the
lowest per-class rank correlation of the two scores.

"Before" is ``tasks/detect/spectre.py`` as of commit d0d9fba (numpy and scipy's ARPACK, the code issue 25
timed), read from git and run without its registration; "after" is today's ``spectre_scores``. Both score
the penultimate features that ``bench_decisions.py --cache DIR`` saved for one trained model (``.npz``).

    python benchmarks/bench_spectre_speedup.py results/bench_decisions/mnist_one_shift_0.01_1_s0.npz
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from poisonsweep.tasks.detect.spectre import spectre_scores

BEFORE = "d0d9fba"


def spectre_before():
    source = subprocess.run(["git", "show", f"{BEFORE}:tasks/detect/spectre.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    namespace: dict = {"__name__": "spectre_before"}
    exec(compile(source[:source.index("@DETECTORS.register(")], f"spectre@{BEFORE}", "exec"), namespace)
    return namespace["spectre_scores"]


def main() -> None:
    before = spectre_before()
    for path in sys.argv[1:]:
        arrays = np.load(path)
        features, labels = arrays["features"].astype(np.float64), arrays["labels"]
        timings, scores = {}, {}
        for name, score in (("before", before), ("after", spectre_scores)):
            started = time.perf_counter()
            result = score(features, labels, eps=0.1)
            timings[name] = time.perf_counter() - started
            scores[name] = np.asarray(result[0] if isinstance(result, tuple) else result, dtype=np.float64)
        # within each class (the old scores were divided by their class mean, today's are not)
        rho = min(spearmanr(scores["before"][labels == c], scores["after"][labels == c]).statistic
                  for c in np.unique(labels))
        print(f"| {Path(path).stem} | {len(labels):,} | {timings['before']:.1f} | {timings['after']:.1f} "
              f"| {timings['before'] / timings['after']:.1f}x | {rho:.4f} |", flush=True)


if __name__ == "__main__":
    main()
