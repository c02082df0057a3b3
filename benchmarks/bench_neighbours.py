"""The neighbour searches of knn / activation clustering / SCAn: the exact search against the HNSW graph
(``tasks/detect/neighbours.py``) on MNIST training inputs (784 values, the space of activation clustering's
vote): seconds of each, the graph's recall of the true k nearest neighbours, and how many plurality votes of
those neighbours' labels the graph leaves unchanged.

    python benchmarks/bench_neighbours.py --sizes 7500,25000,50000 --k 50

Seconds are wall-clock; note the ``uptime`` load average printed first.
"""

from __future__ import annotations

import argparse
import subprocess
import time

import numpy as np
import torch

from poisonsweep.tasks.data import load_dataset
from poisonsweep.tasks.detect.knn import plurality_labels
from poisonsweep.tasks.detect.neighbours import nearest_neighbours


def timed(search: str, points: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    _, indices = nearest_neighbours(points, k, search=search)
    return time.perf_counter() - started, indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="7500,25000,50000")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}; threads {args.threads}")
    print("| n | exact s | graph s | recall of the true k | votes unchanged |\n|---:|---:|---:|---:|---:|")
    for n in (int(size) for size in args.sizes.split(",")):
        data = load_dataset("mnist", n_train=n, n_test=100, seed=0)
        points = data.x_train.reshape(n, -1).numpy()
        labels = np.asarray(data.y_train)
        exact_seconds, exact = timed("exact", points, args.k)
        graph_seconds, graph = timed("hnsw", points, args.k)
        recall = np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(graph, exact)])
        votes = np.mean(plurality_labels(labels[graph], 10) == plurality_labels(labels[exact], 10))
        print(f"| {n:,} | {exact_seconds:.1f} | {graph_seconds:.1f} | {recall:.4f} | {votes:.4f} |", flush=True)


if __name__ == "__main__":
    main()
