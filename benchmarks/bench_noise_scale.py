"""Issue 25 for knn / activation clustering: the blocked torch k-NN search beside scikit-learn's brute force,
and activation clustering's per-class PCA + 2-means, at growing n, with the growth exponent.

Synthetic penultimate features (10 Gaussian classes, 128 dimensions, like keras_cnn's) stand in for a
trained model's: the cost of these steps depends only on n, d and k. Example::

    python benchmarks/bench_noise_scale.py --sizes 12500 25000 50000
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from poisonsweep.tasks.detect.activation_clustering import split_class
from poisonsweep.tasks.detect.neighbours import nearest_neighbours


def synthetic_features(n: int, d: int = 128, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(scale=3.0, size=(classes, d))
    return centres[labels] + rng.normal(size=(n, d)), labels


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def clustering_seconds(features: np.ndarray, labels: np.ndarray) -> float:
    """activation clustering's per-class reduce + 2-means (what it does besides the reclassifier)."""
    return timed(lambda: [split_class(features[labels == c], n_components=10, reduce="pca", seed=0)
                          for c in np.unique(labels)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[12500, 25000, 50000])
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        features, labels = synthetic_features(n)
        row = {"n": n, "torch_knn": timed(lambda x=features: nearest_neighbours(x, args.k, device=args.device))}
        if not args.skip_sklearn:
            row["sklearn_knn"] = timed(lambda x=features: NearestNeighbors(n_neighbors=args.k, algorithm="brute")
                                       .fit(x).kneighbors())
        row["ac_clustering"] = clustering_seconds(features, labels)
        rows.append(row)
        print(row, flush=True)
    columns = [c for c in rows[0] if c != "n"]
    print(f"\ndevice {args.device}, torch threads {torch.get_num_threads()}, k={args.k}, d=128\n")
    print("| n | " + " | ".join(columns) + " |")
    print("|---:|" + "---:|" * len(columns))
    for row in rows:
        print(f"| {row['n']:,} | " + " | ".join(f"{row[c]:.2f} s" for c in columns) + " |")
    if len(rows) >= 2:
        first, last = rows[-2], rows[-1]
        exponents = [f"{c} n^{math.log(last[c] / first[c]) / math.log(last['n'] / first['n']):.2f}" for c in columns]
        print(f"\ngrowth {first['n']:,} -> {last['n']:,}: " + ", ".join(exponents))


if __name__ == "__main__":
    main()
