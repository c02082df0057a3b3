"""Issue 25's scale benchmark: every registered detector's seconds and peak memory at several training-set
sizes of MNIST and on a CIFAR-sized synthetic input (3 x 32 x 32), beside one training epoch measured in
the same run, with the growth exponent between the last two sizes.

For each input a keras_cnn is trained for one epoch (timed: the "epoch" row) on one-shift 1 % data; the
model, data and per-sample losses go to a temporary directory, and every detector runs in its own
subprocess (``--worker``), so its peak memory is that process's peak RSS (``resource.getrusage``),
reported beside the RSS after loading (the detector's own share is the difference). Each worker times
the forward pass for the features (which every detector needs) apart from the detector itself.

    python benchmarks/bench_detectors_scale.py                      # n = 7,500, 25,000, 50,000 + CIFAR-sized
    python benchmarks/bench_detectors_scale.py --sizes 2000,4000 --cifar-n 2000 --detectors spectre,scan
    python benchmarks/bench_detectors_scale.py --device cuda --out results/scale_gpu.json
    python benchmarks/bench_detectors_scale.py --detectors knn,knn:search=exact,activation_clustering:search=exact

A detector may carry parameters, ``NAME:key=value:key=value`` (values read as YAML), to set one variant beside
another; every row also measures the detection against the poison mask (AUROC, P@n, F1; measurement only).

Seconds are wall-clock: note the machine and its ``uptime`` load average beside them (printed first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

import poisonsweep.tasks.detect  # noqa: F401  (registers the detectors)
from poisonsweep.tasks.data import load_dataset
from poisonsweep.tasks.data.base import as_dataset
from poisonsweep.tasks.metrics import detection_metrics
from poisonsweep.tasks.detect.base import DETECTORS, DetectionContext
from poisonsweep.tasks.models import build_model
from poisonsweep.tasks.poisons import apply_poison
from poisonsweep.tasks.train import TrainConfig, resolve_device, train_model

MODEL = "keras_cnn"
POISON = ("one_shift", 0.01, {"shift": 1})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="7500,25000,50000", help="MNIST training-set sizes, comma-separated")
    parser.add_argument("--cifar-n", type=int, default=50000, help="size of the synthetic 3x32x32 input (0: skip)")
    parser.add_argument("--detectors", default="", help="comma-separated names (default: every registered one)")
    parser.add_argument("--device", default="cpu", help="train.device of the trial (cpu, cuda, auto)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per process")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds a detector may take before it is stopped")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--worker", nargs=2, metavar=("DIR", "DETECTOR"), help=argparse.SUPPRESS)
    return parser.parse_args()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def synthetic_cifar(n: int, seed: int = 0):
    """n random 3x32x32 images in ten classes, each class a fixed random pattern plus noise (learnable)."""
    rng = np.random.default_rng(seed)
    patterns = rng.random((10, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, n + 1000)
    x = np.clip(0.5 * patterns[y] + 0.5 * rng.random((n + 1000, 3, 32, 32), dtype=np.float32), 0, 1)
    return as_dataset("synthetic_cifar", x[:n], y[:n], x[n:], y[n:], 10, None, None, seed)


def prepare(name: str, data, directory: Path, device: str) -> dict:
    """Poison, train one epoch (timed) and save what a detector's context needs."""
    method, rate, params = POISON
    poisoned = apply_poison(data, method, rate=rate, seed=0, params=params)
    model = build_model(MODEL, data.in_shape, data.num_classes, None, seed=0)
    config = TrainConfig(epochs=1, batch_size=64, lr=1e-3, device=device)
    started = time.perf_counter()
    history = train_model(model, poisoned.x_train, poisoned.labels, config, seed=0, keep_checkpoints=True)
    epoch = time.perf_counter() - started
    torch.save({"state": model.state_dict(), "in_shape": data.in_shape, "x_train": poisoned.x_train,
                "labels": poisoned.labels.numpy(), "is_poison": poisoned.is_poison,
                "x_test": data.x_test[:1000], "y_test": data.y_test[:1000].numpy(),
                "checkpoints": history.checkpoints, "sample_losses": history.sample_losses, "device": device},
               directory / "trial.pt")
    return {"input": name, "n": len(poisoned.labels), "detector": "epoch", "seconds": epoch}


def detector_spec(spec: str) -> tuple[str, dict]:
    """``NAME:key=value:...`` as the registered name and its parameters."""
    name, *pairs = spec.split(":")
    return name, {key: yaml.safe_load(value) for key, value in (pair.split("=", 1) for pair in pairs)}


def worker(directory: str, spec: str) -> None:
    """One detector on the saved trial, in this process; prints one JSON line."""
    name, params = detector_spec(spec)
    saved = torch.load(Path(directory) / "trial.pt", weights_only=False)
    model = build_model(MODEL, saved["in_shape"], 10, None, seed=0)
    model.load_state_dict(saved["state"])
    device = str(resolve_device(saved["device"]))
    context = DetectionContext(model=model, x_train=saved["x_train"], labels=saved["labels"], num_classes=10,
                               model_name=MODEL, train_config=TrainConfig(epochs=1, batch_size=64, lr=1e-3, device=device),
                               x_test=saved["x_test"], y_test=saved["y_test"], checkpoints=saved["checkpoints"],
                               sample_losses=saved["sample_losses"], device=device)
    loaded_rss = peak_rss_mib()
    started = time.perf_counter()
    context.features  # noqa: B018  (the forward pass every detector needs, timed apart)
    features_seconds = time.perf_counter() - started
    started = time.perf_counter()
    detection = DETECTORS.get(name).fn(context, seed=0, **params)
    seconds = time.perf_counter() - started
    measured = detection_metrics(np.asarray(detection.scores), np.asarray(detection.flagged), saved["is_poison"])
    print(json.dumps({"features_seconds": features_seconds, "seconds": seconds, "loaded_rss_mib": loaded_rss,
                      "peak_rss_mib": peak_rss_mib(), "flagged": int(detection.flagged.sum()),
                      **{key: float(measured[key]) for key in ("auroc", "precision_at_n", "f1")}}))


def run_detector(directory: Path, name: str, threads: int, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, __file__, "--worker", str(directory), name, "--threads", str(threads)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def growth_exponent(rows: list[dict], detector: str, sizes: list[int]) -> float | None:
    """log(t(n2) / t(n1)) / log(n2 / n1) over the last two MNIST sizes."""
    if len(sizes) < 2:
        return None
    times = {row["n"]: row.get("seconds") for row in rows if row["detector"] == detector and row["input"] == "mnist"}
    first, last = times.get(sizes[-2]), times.get(sizes[-1])
    if not first or not last:
        return None
    return math.log(last / first) / math.log(sizes[-1] / sizes[-2])


def markdown(rows: list[dict], sizes: list[int]) -> str:
    lines = ["| input | n | detector | seconds | share of an epoch | features s | peak RSS MiB | RSS after load MiB "
             "| growth n^ | AUROC | P@n | F1 | flags |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    epochs = {(row["input"], row["n"]): row["seconds"] for row in rows if row["detector"] == "epoch"}
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['input']} | {row['n']} | {row['detector']} | {row['error']} | | | | | | | | | |")
            continue
        share = row["seconds"] / epochs[(row["input"], row["n"])]
        growth = growth_exponent(rows, row["detector"], sizes) if row["input"] == "mnist" and row["n"] == sizes[-1] else None
        cells = [row["input"], f"{row['n']:,}", row["detector"], f"{row['seconds']:.2f}",
                 "" if row["detector"] == "epoch" else f"{share:.2f}",
                 f"{row.get('features_seconds', 0):.2f}" if "features_seconds" in row else "",
                 f"{row['peak_rss_mib']:.0f}" if "peak_rss_mib" in row else "",
                 f"{row['loaded_rss_mib']:.0f}" if "loaded_rss_mib" in row else "",
                 f"{growth:.2f}" if growth is not None else ""]
        cells += [f"{row[key]:.3f}" if key in row else "" for key in ("auroc", "precision_at_n", "f1")]
        cells.append(str(row.get("flagged", "")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(*args.worker)
        return
    sizes = [int(size) for size in args.sizes.split(",") if size]
    names = [name for name in args.detectors.split(",") if name] or DETECTORS.names()
    unknown = sorted({detector_spec(name)[0] for name in names} - set(DETECTORS.names()))
    if unknown:
        raise SystemExit(f"--detectors: unknown {unknown}; registered: {DETECTORS.names()}")
    print(f"# uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}; "
          f"torch threads {args.threads}; device {args.device}", flush=True)
    inputs = [("mnist", lambda n=n: load_dataset("mnist", n_train=n, n_test=1000, seed=0)) for n in sizes]
    if args.cifar_n:
        inputs.append(("synthetic_cifar", lambda: synthetic_cifar(args.cifar_n)))
    rows = []
    for input_name, load in inputs:
        with tempfile.TemporaryDirectory(prefix="bench_scale_") as directory:
            epoch = prepare(input_name, load(), Path(directory), args.device)
            rows.append(epoch)
            print(json.dumps(epoch), flush=True)
            for name in names:
                row = {"input": input_name, "n": epoch["n"], "detector": name,
                       **run_detector(Path(directory), name, args.threads, args.timeout)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(markdown(rows, sizes))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
