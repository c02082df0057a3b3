"""Trials per hour, packed (``poisonsweep.tasks.packed.run_pack``) against solo
(``poisonsweep.tasks.trial.run_resolved_trial``).

The trials are the reference MNIST set-up (7,500 training images, the Keras CNN, 3 epochs, Adam,
batch 64, one-shift flips at 1 % and 33 %, seeds 0, 1, ...) with the three cheap detectors
(activation clustering, spectral signature, loss), as in ``benchmarks/gpu_check.sh``. Solo: the
first ``--solo`` trials one after another. Packed: k trials in one ``run_pack`` call, for each k of
``--ks``. No Ray: this measures the science, not the engine. Every packed trial's clean accuracy is
compared with its solo twin's where one ran.

Usage (CPU, the numbers of benchmarks/RESULTS.md section 14):
    OMP_NUM_THREADS=1 python benchmarks/bench_pack.py --ks 2 4 8 --solo 2
GPU (a later session with a GPU; see benchmarks/gpu_pack.sh for the engine-level comparison):
    python benchmarks/bench_pack.py --device cuda --ks 4 8 16 32 64 --solo 4
Prints one Markdown table; ``--json PATH`` also writes the rows. ``--drift --n-train 2000`` instead
compares a packed model's weights and predictions with its solo twin's, next to a solo model trained
with 2 threads instead of 1 (RESULTS.md section 14).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DETECTORS = ["activation_clustering", "spectral_signature", "loss"]


def trial_configs(k: int, args) -> list[dict]:
    from poisonsweep.engine.config import build_sweep

    raw = {
        "data": {"name": "mnist", "n_train": args.n_train, "n_test": args.n_test, "root": args.data_root},
        "poison": {"method": "one_shift", "rate": 0.01, "params": {"shift": 1}},
        "model": {"name": "keras_cnn"},
        "train": {"epochs": args.epochs, "batch_size": 64, "lr": 0.001, "optimizer": "adam", "device": args.device},
        "detectors": DETECTORS,
        "sweep": {"seed": list(range((k + 1) // 2)), "poison.rate": [0.01, 0.33]},
    }
    return build_sweep(raw).trials[:k]


def measure(k: int, configs: list[dict], packed: bool) -> dict:
    from poisonsweep.tasks.packed import run_pack
    from poisonsweep.tasks.trial import run_resolved_trial

    start = time.perf_counter()
    results = run_pack(configs) if packed else [run_resolved_trial(c) for c in configs]
    wall = time.perf_counter() - start
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise failed[0]
    rows = [r.tables["trials"][0] for r in results]
    train = sum(r["train_seconds"] for r in rows)
    detect = sum(r["eval_seconds"] + r["detect_seconds"] for r in rows)
    prepare = sum(r["load_seconds"] + r["poison_seconds"] for r in rows)
    return {"mode": f"packed k={k}" if packed else f"solo x{k}", "trials": k, "wall_s": wall,
            "trials_per_hour": 3600 * k / wall, "train_s": train, "eval_detect_s": detect, "load_poison_s": prepare,
            "train_share": train / wall, "accuracy": [r["clean_test_acc"] for r in rows]}


def drift(n_train: int, epochs: int) -> None:
    """How far packing moves a model, next to how far torch's thread count moves it (float reordering both)."""
    import torch

    from poisonsweep.tasks.data import load_dataset
    from poisonsweep.tasks.models import build_model
    from poisonsweep.tasks.packed import train_packed
    from poisonsweep.tasks.train import TrainConfig, predict_logits, train_model

    data = load_dataset("mnist", n_train=n_train, n_test=2000, seed=0)
    config = TrainConfig(epochs=epochs, batch_size=64, lr=1e-3, device="cpu")

    def solo(threads: int):
        torch.set_num_threads(threads)
        model = build_model("keras_cnn", data.in_shape, 10, seed=0)
        train_model(model, data.x_train, data.y_train, config, seed=0)
        torch.set_num_threads(1)
        return model

    one, two = solo(1), solo(2)
    packed = [build_model("keras_cnn", data.in_shape, 10, seed=s) for s in (0, 1)]
    train_packed(packed, [data.x_train] * 2, [data.y_train] * 2, config, seeds=[0, 1])
    for name, a, b in (("solo, 1 thread vs solo, 2 threads", one, two), ("solo, 1 thread vs packed", one, packed[0]),
                       ("solo seed 0 vs packed seed 1", one, packed[1])):
        weights = max((a.state_dict()[k] - b.state_dict()[k]).abs().max().item() for k in a.state_dict())
        same = (predict_logits(a, data.x_test).argmax(1) == predict_logits(b, data.x_test).argmax(1)).float().mean()
        print(f"| {name} | {weights:.1e} | {100 * same.item():.1f} % |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--solo", type=int, default=2, help="how many trials to run solo (0: none)")
    parser.add_argument("--n-train", type=int, default=7500)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--drift", action="store_true", help="only compare packed and solo weights (--n-train, --epochs)")
    args = parser.parse_args()
    if args.drift:
        return drift(args.n_train, args.epochs)

    import torch

    torch.set_num_threads(args.threads)
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    rows = []
    if args.solo:
        rows.append(measure(args.solo, trial_configs(args.solo, args), packed=False))
        print(rows[-1], flush=True)
    for k in args.ks:
        rows.append(measure(k, trial_configs(k, args), packed=True))
        print(rows[-1], flush=True)
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    solo = rows[0] if args.solo else None
    print("\n| run | trials | wall s | trials/hour | x solo | training s (share) | eval+detect s | load+poison s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        speedup = f"{row['trials_per_hour'] / solo['trials_per_hour']:.2f}" if solo else "-"
        print(f"| {row['mode']} | {row['trials']} | {row['wall_s']:.0f} | {row['trials_per_hour']:.0f} | {speedup} | "
              f"{row['train_s']:.0f} ({100 * row['train_share']:.0f} %) | {row['eval_detect_s']:.0f} | "
              f"{row['load_poison_s']:.0f} |")
    if solo:
        for row in rows[1:]:
            gap = max(abs(a - b) for a, b in zip(row["accuracy"], solo["accuracy"]))
            print(f"{row['mode']}: largest clean-accuracy gap to the solo twins {gap:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
