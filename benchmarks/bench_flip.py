"""FLIP benchmark: does a label-only poison plant a trigger backdoor, and do the detectors see it?

For each trigger set-up: run FLIP's expert + label stage once (cached in a temporary artifact
directory, as a sweep would), then for each budget b = rate * n train a user model on

- the FLIP labels,
- ``random->target``: b random non-target labels set to the target (the paper's random baseline),
- ``pair``: b random source-class labels set to the target (``pair_flip``; what FLIP's flips look like),

and report clean test accuracy (CTA), the poison test accuracy (PTA: triggered source-class test
images classified as the target) and the same share *without* the trigger (``src->tgt``), which
separates a trigger backdoor (PTA >> src->tgt) from plain source/target confusion. The detectors
score the FLIP-poisoned training set (AUROC against the flipped mask).

Plain Python on ``tasks.*`` (no Ray). Examples::

    python benchmarks/bench_flip.py --out results/bench_flip.md   (then into benchmarks/RESULTS.md, section 7)
    python benchmarks/bench_flip.py --dataset digits --setups sinusoid checkerboard:3
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


from poisonsweep.tasks.data import load_dataset
from poisonsweep.tasks.detect import DETECTORS, DetectionContext
from poisonsweep.tasks.poisons import apply_poison
from poisonsweep.tasks.poisons.flip import SINUSOID_AMPLITUDE, flip, random_flips_to_target, resolve_recipe, stamp_trigger
from poisonsweep.tasks.metrics import detection_metrics
from poisonsweep.tasks.models import build_model
from poisonsweep.tasks.train import TrainConfig, accuracy, predict_logits, train_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--n-train", type=int, default=7500)
    parser.add_argument("--n-test", type=int, default=10000)
    parser.add_argument("--source", type=int, default=9)
    parser.add_argument("--target", type=int, default=4)
    parser.add_argument("--setups", nargs="+", default=["sinusoid", "checkerboard:3", "sinusoid:0.3"],
                        help="trigger[:amplitude for sinusoid | :patch size for checkerboard]")
    parser.add_argument("--rates", nargs="+", type=float, default=[0.01, 0.02, 0.05])
    parser.add_argument("--recipe", choices=["paper", "fast"], default="fast",
                        help="FLIP's expert/label settings (tasks.poisons.flip.RECIPES); the flags below override it")
    parser.add_argument("--n-experts", type=int, default=None)
    parser.add_argument("--expert-epochs", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--model", default="mlp", help="the user's model (the experts use mlp)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="user-model seeds")
    parser.add_argument("--detectors", nargs="+", default=["loss", "spectral_signature", "activation_clustering"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    return parser.parse_args()


def setup_params(spec: str, args) -> dict:
    """``sinusoid:0.3`` -> the FLIP params of that trigger."""
    trigger, _, value = spec.partition(":")
    params = {"trigger": trigger, "source": args.source, "target": args.target, "recipe": args.recipe,
              "n_experts": args.n_experts, "expert_epochs": args.expert_epochs, "iterations": args.iterations,
              "device": args.device}
    if value:
        params["amplitude" if trigger == "sinusoid" else "patch_size"] = float(value) if trigger == "sinusoid" \
            else int(value)
    return params


def describe(params: dict) -> str:
    if params["trigger"] == "sinusoid":
        amplitude = params.get("amplitude", SINUSOID_AMPLITUDE)
        scale = " (the paper's 6/255)" if amplitude == SINUSOID_AMPLITUDE else f" ({amplitude * 255:.0f}/255)"
        return f"sinusoid `1xs`, amplitude {amplitude:.4f}{scale}"
    return f"checkerboard {params.get('patch_size', 3)}x{params.get('patch_size', 3)} (bottom-right)"


def evaluate(args, data, labels: torch.Tensor, params: dict, seed: int):
    """Train a user model on ``labels``; return it, CTA, PTA and the source->target share without trigger."""
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=args.device)
    model = build_model(args.model, data.in_shape, data.num_classes, seed=seed)
    train_model(model, data.x_train, labels, config, seed=seed)
    source = data.x_test[data.y_test == params["source"]]
    triggered = stamp_trigger(source, params["trigger"], patch_size=params.get("patch_size", 3),
                              amplitude=params.get("amplitude", SINUSOID_AMPLITUDE))
    share = lambda x: (predict_logits(model, x).argmax(1) == params["target"]).float().mean().item()  # noqa: E731
    return model, config, accuracy(model, data.x_test, data.y_test), share(triggered), share(source)


def detector_aurocs(args, data, model, config, poisoned, seed: int) -> dict:
    context = DetectionContext(model=model, x_train=poisoned.x_train, labels=poisoned.labels.numpy(),
                               num_classes=data.num_classes, model_name=args.model, train_config=config,
                               x_test=data.x_test, y_test=data.y_test.numpy(), seed=seed)
    out = {}
    for name in args.detectors:
        detection = DETECTORS.get(name).fn(context, seed=seed)
        out[name] = detection_metrics(detection.scores, detection.flagged, poisoned.is_poison)["auroc"]
    return out


def run_setup(args, data, params: dict, artifact_dir: str, start: float) -> list[str]:
    clean = [evaluate(args, data, data.y_train, params, s)[2:] for s in args.seeds]
    rows, aurocs, info = [], {}, {}
    for rate in args.rates:
        poisoned = flip(data, rate=rate, seed=0, artifact_dir=artifact_dir, **params)
        info = poisoned.info
        b = poisoned.n_poisoned
        baselines = {
            "FLIP": poisoned.labels,
            "random->target": torch.as_tensor(random_flips_to_target(data.y_train.numpy(), b, target=params["target"],
                                                                     seed=0)),
            "pair (source->target)": apply_poison(data, "pair_flip", rate=rate, seed=0, params={
                "source": params["source"], "target": params["target"]}).labels,
        }
        for name, labels in baselines.items():
            results = []
            for seed in args.seeds:
                model, config, *scores = evaluate(args, data, labels, params, seed)
                results.append(scores)
                if name == "FLIP" and seed == args.seeds[0]:
                    aurocs[rate] = detector_aurocs(args, data, model, config, poisoned, seed)
            cta, pta, confusion = np.mean(results, axis=0)
            extra = f"{poisoned.info['flips_source_to_target']}/{b}" if name == "FLIP" else "-"
            rows.append(f"| {rate:.0%} ({b}) | {name} | {cta:.3f} | {pta:.3f} | {confusion:.3f} | {extra} |")
        print(f"{params['trigger']} {rate}: done after {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    cta, pta, confusion = np.mean(clean, axis=0)
    lines = [
        f"### {describe(params)}",
        "",
        f"Experts + label stage: {info['expert_seconds']:.1f} s + {info['label_seconds']:.1f} s, once for all budgets "
        f"and seeds (artifact `{info['artifact_key']}`).",
        "",
        "| budget (b) | labels | CTA | PTA | src->tgt (no trigger) | FLIP flips source->target |",
        "|---|---|---|---|---|---|",
        f"| 0 | clean | {cta:.3f} | {pta:.3f} | {confusion:.3f} | - |",
        *rows,
        "",
        "Detector AUROC on the FLIP-poisoned set (seed " + str(args.seeds[0]) + "): " + "; ".join(
            f"{rate:.0%}: " + ", ".join(f"{d} {v:.3f}" for d, v in aurocs[rate].items()) for rate in args.rates) + ".",
        "",
    ]
    return lines


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, n_train=args.n_train, n_test=args.n_test, seed=0)
    start = time.perf_counter()
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.processor() or 'x86-64'})"
    recipe = resolve_recipe(args.recipe, n_experts=args.n_experts, expert_epochs=args.expert_epochs,
                            iterations=args.iterations)
    lines = [
        f"## FLIP on {args.dataset} ({len(data.y_train)} train / {len(data.y_test)} test), source {args.source} -> "
        f"target {args.target}",
        "",
        f"Recipe `{args.recipe}`. Experts: {recipe['n_experts']} x mlp, SGD lr {recipe['expert_lr']} "
        f"(x0.1 at epochs {list(recipe['expert_lr_milestones'])}), momentum 0.9 (Nesterov), wd 2e-4, batch 256, "
        f"{recipe['expert_epochs']} epochs, checkpoints every 10 steps after the first epoch; label stage "
        f"{recipe['iterations']} passes, logits lr 150 / momentum 0.5. User model: {args.model}, Adam lr {args.lr}, "
        f"{args.epochs} epochs, batch {args.batch_size}; CTA/PTA are means over user seeds {args.seeds}.  ",
        "Command: `python " + " ".join(sys.argv) + "`  ",
        f"Machine: {device}, torch {torch.__version__}, {args.threads} CPU thread(s).",
        "",
    ]
    with tempfile.TemporaryDirectory() as artifact_dir:
        for spec in args.setups:
            lines += run_setup(args, data, setup_params(spec, args), artifact_dir, start)
    lines.append(f"Total {time.perf_counter() - start:.0f} s.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
