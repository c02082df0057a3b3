"""Influence detector benchmarks: mislabel-detection curves and self-influence throughput.

1. Koh & Liang's mislabel experiment (Fig. 6): flip 10 % of the training labels at random
   (``random_flip``), train, rank the training set by each score, and report the share of flipped
   labels found when checking the top 5/10/20/30 % -- for self-influence (exact, last layer),
   training loss, gradient norm, TracIn and random order.
2. Self-influence throughput on MNIST 7,500 with keras_cnn: the exact last-layer solver (in process,
   and on 1 and 2 Ray actors) against one plain forward pass over the same samples, Captum's
   ``TracInCPFast.self_influence`` on the same model and samples, and full-model Arnoldi.

Usage::

    python benchmarks/bench_influence.py                      # everything, a few minutes on 2 cores
    python benchmarks/bench_influence.py --datasets digits --seeds 3 --no-throughput

Writes a markdown report (``--out``, default results/bench_influence.md) with the command, the
machine and every number; its tables go into benchmarks/RESULTS.md, section 4.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score


from poisonsweep.tasks.data import load_dataset
from poisonsweep.tasks.detect.base import DetectionContext, serial_map
from poisonsweep.tasks.detect.influence import detect as influence_detect
from poisonsweep.tasks.influence import SolverSettings, fit_influence, score_influence
from poisonsweep.tasks.models import build_model
from poisonsweep.tasks.poisons import apply_poison
from poisonsweep.tasks.train import TrainConfig, predict_logits, train_model

CHECKED = (0.05, 0.10, 0.20, 0.30)
SETUPS = {  # dataset -> (n_train, model, model params, epochs)
    "digits": (None, "mlp", {"hidden": 128, "depth": 1}, 30),
    "mnist": (7500, "keras_cnn", {}, 3),
}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{os.cpu_count()} cores ({cpu}), GPU {gpu}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads in process), Python {platform.python_version()}")


def load_avg() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def recall_at(scores: np.ndarray, is_poison: np.ndarray, fractions=CHECKED) -> list[float]:
    """Share of the poisoned samples among the top ``fraction`` of scores, per fraction."""
    order = np.argsort(-scores, kind="stable")
    return [float(is_poison[order[:int(round(f * len(scores)))]].sum() / is_poison.sum()) for f in fractions]


def prepare(dataset: str, seed: int, epochs: int | None):
    """Poison 10 % of the labels at random, train, and return (context, is_poison, train seconds)."""
    n_train, model_name, model_params, default_epochs = SETUPS[dataset]
    data = load_dataset(dataset, n_train=n_train, n_test=1000 if dataset == "mnist" else None, seed=0)
    poisoned = apply_poison(data, "random_flip", rate=0.1, seed=seed)
    model = build_model(model_name, data.in_shape, data.num_classes, model_params, seed=seed)
    config = TrainConfig(epochs=epochs or default_epochs, batch_size=128, lr=1e-3, device="cpu")
    start = time.perf_counter()
    history = train_model(model, poisoned.x_train, poisoned.labels, config, seed=seed, keep_checkpoints=True)
    seconds = time.perf_counter() - start
    context = DetectionContext(model=model, x_train=poisoned.x_train, labels=poisoned.labels.numpy(),
                               num_classes=data.num_classes, train_config=config, x_test=data.x_test,
                               y_test=data.y_test.numpy(), checkpoints=history.checkpoints, seed=seed)
    return context, poisoned.is_poison, seconds


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def curve_scores(context: DetectionContext, seed: int) -> dict[str, tuple[np.ndarray, float]]:
    """Every ranking of the curve, with its seconds."""
    out = {}
    out["influence (exact, last layer)"] = timed(lambda: influence_detect(context, seed=seed).scores)
    out["training loss"] = timed(lambda: context.losses)
    out["grad_norm (last layer)"] = timed(lambda: influence_detect(context, seed=seed, solver="grad_norm").scores)
    out["tracin (last layer, all epochs)"] = timed(lambda: influence_detect(context, seed=seed, solver="tracin").scores)
    out["random"] = (np.random.default_rng(seed).random(len(context.labels)), 0.0)
    return out


def run_curves(datasets: list[str], seeds: dict[str, int], epochs: int | None, lines: list[str]) -> dict:
    kept = {}
    for dataset in datasets:
        n_seeds = seeds[dataset]
        results: dict[str, list[list[float]]] = {}
        seconds: dict[str, list[float]] = {}
        aurocs: dict[str, list[float]] = {}
        accuracy = []
        for seed in range(n_seeds):
            context, is_poison, train_seconds = prepare(dataset, seed, epochs)
            accuracy.append(float((predict_logits(context.model, context.x_test).argmax(1).numpy()
                                   == context.y_test).mean()))
            for name, (scores, secs) in curve_scores(context, seed).items():
                results.setdefault(name, []).append(recall_at(scores, is_poison))
                aurocs.setdefault(name, []).append(roc_auc_score(is_poison, scores))
                seconds.setdefault(name, []).append(secs)
            print(f"{dataset} seed {seed}: trained in {train_seconds:.1f}s, test acc {accuracy[-1]:.3f}", flush=True)
            if seed == 0:
                kept[dataset] = (context, is_poison)
        n_train, model_name, model_params, default_epochs = SETUPS[dataset]
        lines += [f"### {dataset} ({len(context.labels)} train, {model_name} {model_params or ''}, "
                  f"{epochs or default_epochs} epochs Adam 1e-3, random_flip 10 %, {n_seeds} seeds)", "",
                  f"Test accuracy of the poisoned model: {np.mean(accuracy):.3f} ± {np.std(accuracy):.3f}.", "",
                  "| ranking | " + " | ".join(f"found @ {int(f * 100)} % checked" for f in CHECKED)
                  + " | AUROC | seconds |", "|---|" + "---|" * (len(CHECKED) + 2)]
        for name, rows in results.items():
            mean, std = np.mean(rows, 0), np.std(rows, 0)
            cells = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in zip(mean, std))
            auroc = f"{np.mean(aurocs[name]):.4f} ± {np.std(aurocs[name]):.4f}"
            lines.append(f"| {name} | {cells} | {auroc} | {np.mean(seconds[name]):.2f} |")
        lines.append("")
    return kept


def captum_self_influence(model, x, labels, batch_size: int, folder: str):
    """A zero-argument call of Captum's TracInCPFast.self_influence on the final weights (one checkpoint, lr 1)."""
    from captum.influence import TracInCPFast

    path = os.path.join(folder, f"final-{id(model)}.pt")
    torch.save(model.state_dict(), path)

    def load(net, checkpoint):
        net.load_state_dict(torch.load(checkpoint))
        return 1.0

    dataset = torch.utils.data.TensorDataset(x, torch.as_tensor(labels))
    tracin = TracInCPFast(model, final_fc_layer=model.head, train_dataset=dataset, checkpoints=[path],
                          checkpoints_load_func=load, loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"),
                          batch_size=batch_size, vectorize=False)
    return lambda: tracin.self_influence(inputs=None, show_progress=False).double().numpy()


def plain_forward(model, x, batch_size: int = 512):
    """``model(x)`` in batches, no_grad, the model as trained (default memory layout)."""
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def interleaved(contenders: dict, repeats: int) -> dict[str, tuple[list[float], object]]:
    """Run every contender ``repeats`` times, round-robin (so load spikes hit all alike)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    outputs = {}
    for _ in range(repeats):
        for name, fn in contenders.items():
            outputs[name], secs = timed(fn)
            times[name].append(secs)
    return {name: (times[name], outputs[name]) for name in contenders}


def run_throughput(context: DetectionContext, is_poison: np.ndarray, actors: list[int], arnoldi: dict,
                   arnoldi_in_process: bool, repeats: int, lines: list[str]) -> None:
    from scipy.stats import spearmanr

    n = len(context.labels)
    model = context.model.eval()
    x, labels = context.x_train, context.labels

    def fresh(map_shards=serial_map) -> DetectionContext:
        return DetectionContext(model=model, x_train=x, labels=labels, num_classes=context.num_classes,
                                train_config=context.train_config, x_test=context.x_test, y_test=context.y_test,
                                map_shards=map_shards)

    warm = fresh()
    _ = warm.features
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    with tempfile.TemporaryDirectory() as folder:
        contenders = {
            "plain forward pass: model(x), batch 512, no_grad": lambda: plain_forward(model, x),
            "our forward pass: predict_logits (channels-last copy on the CPU)": lambda: predict_logits(model, x),
            "influence exact, last layer, incl. its feature pass": lambda: influence_detect(fresh(), seed=0).scores,
            "influence exact, last layer, features cached (as in a trial)": lambda: influence_detect(warm, seed=0).scores,
            "grad_norm, last layer, incl. its feature pass": lambda: influence_detect(fresh(), seed=0,
                                                                                      solver="grad_norm").scores,
            "Captum TracInCPFast.self_influence, batch 512": captum_self_influence(model, x, labels, 512, folder),
            "Captum TracInCPFast.self_influence, batch 128 (our CPU batch)":
                captum_self_influence(model, x, labels, 128, folder),
            "Captum TracInCPFast.self_influence, batch 128, given our channels-last copy":
                captum_self_influence(channels_last, x, labels, 128, folder),
        }
        measured = interleaved(contenders, repeats)
    rows = [(name, secs, out if name.startswith(("influence", "grad_norm", "Captum")) else None)
            for name, (secs, out) in measured.items()]
    forward = min(measured["our forward pass: predict_logits (channels-last copy on the CPU)"][0])
    exact_scores = measured["influence exact, last layer, incl. its feature pass"][1]
    grad_norm_scores = measured["grad_norm, last layer, incl. its feature pass"][1]
    captum_scores = measured["Captum TracInCPFast.self_influence, batch 512"][1]
    agreement = spearmanr(captum_scores, grad_norm_scores)[0]

    if actors:
        import ray

        ray.init(num_cpus=max(2, max(actors)), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        from poisonsweep.engine.shards import ActorPoolMap
        for count in actors:
            with ActorPoolMap(count, cpu_per_actor=1) as pool:
                cold, secs_cold = timed(lambda: influence_detect(fresh(pool), seed=0).scores)
                warm_pool = fresh(pool)
                warm_pool.features = warm.features
                secs_warm = [timed(lambda: influence_detect(warm_pool, seed=0).scores)[1]  # noqa: B023 (called at once)
                             for _ in range(repeats)]
            rows.append((f"influence exact, last layer, {count} actor(s), first call (starts actors)", [secs_cold], None))
            rows.append((f"influence exact, last layer, {count} actor(s), warm actors, features cached", secs_warm,
                         None))
            assert np.allclose(cold, exact_scores, rtol=1e-5), "sharded scores differ from the in-process scores"
    if arnoldi:
        settings = SolverSettings(solver="arnoldi", l2=context.train_config.weight_decay, **arnoldi)
        payload, secs = timed(lambda: fit_influence(model, x, labels, settings, params="all"))
        rows.append((f"arnoldi, all parameters: fit on the driver ({arnoldi})", [secs], None))
        runs = [("in process", serial_map)] if arnoldi_in_process else []
        runs += [(f"{count} actor(s), incl. actor start", ActorPoolMap(count, cpu_per_actor=1)) for count in actors]
        for label, map_shards in runs:
            full, secs = timed(lambda: score_influence(payload, map_shards).self_influence)  # noqa: B023
            rows.append((f"arnoldi, all parameters: scoring, {label}", [secs], full))
            if map_shards is not serial_map:
                map_shards.close()

    lines += [f"### Self-influence throughput, MNIST {n}, keras_cnn ({sum(p.numel() for p in model.parameters()):,} "
              f"parameters, last layer {model.head.weight.numel() + model.head.bias.numel():,})", "",
              f"Each of the first eight rows ran {repeats} times, round-robin; seconds = the fastest run (the median "
              "in brackets). x forward = fastest seconds / our fastest forward pass.", "",
              "| what | seconds | samples/s | x forward | AUROC | found @ 5/10/20/30 % |", "|---|---|---|---|---|---|"]
    for name, secs, scores in rows:
        best = min(secs)
        seconds = f"{best:.2f}" + (f" ({float(np.median(secs)):.2f})" if len(secs) > 1 else "")
        auroc = f"{roc_auc_score(is_poison, scores):.4f}" if scores is not None else ""
        found = " / ".join(f"{r:.3f}" for r in recall_at(scores, is_poison)) if scores is not None else ""
        lines.append(f"| {name} | {seconds} | {n / best:,.0f} | {best / forward:.2f} | {auroc} | {found} |")
    lines += ["", f"Spearman(Captum TracInCPFast, our grad_norm last layer) = {agreement:.4f} (Captum drops the "
              "bias gradient, ||dL/dz||^2 ||h||^2, ours is ||dL/dz||^2 (||h||^2 + 1)).", ""]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="digits,mnist", help="comma-separated, from: " + ",".join(SETUPS))
    parser.add_argument("--seeds", type=int, default=5, help="poison/train seeds of the digits curve")
    parser.add_argument("--mnist-seeds", type=int, default=1, help="poison/train seeds of the MNIST curve")
    parser.add_argument("--mnist-train", type=int, default=7500, help="MNIST training samples")
    parser.add_argument("--epochs", type=int, default=None, help="override the training epochs of every set-up")
    parser.add_argument("--no-throughput", action="store_true", help="skip the MNIST throughput part")
    parser.add_argument("--actors", default="1,2", help="actor counts for the throughput part ('' for none)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each throughput contender")
    parser.add_argument("--arnoldi-iters", type=int, default=20)
    parser.add_argument("--arnoldi-rank", type=int, default=10)
    parser.add_argument("--arnoldi-hessian-samples", type=int, default=256)
    parser.add_argument("--arnoldi-damping", type=float, default=0.01)
    parser.add_argument("--no-arnoldi", action="store_true")
    parser.add_argument("--arnoldi-in-process", action="store_true",
                        help="also score full-model Arnoldi in process (slow: about 2x the 2-actor time)")
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "results" / "bench_influence.md"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    SETUPS["mnist"] = (args.mnist_train,) + SETUPS["mnist"][1:]
    start, load_start = time.perf_counter(), load_avg()
    lines = ["## Influence detector (issue 3)", "",
             "Command: `python " + " ".join(["benchmarks/bench_influence.py"] + sys.argv[1:]) + "`",
             f"Machine: {machine()}.", ""]
    datasets = [d for d in args.datasets.split(",") if d]
    if not args.no_throughput and "mnist" not in datasets:
        datasets.append("mnist")
    kept = run_curves(datasets, {"digits": args.seeds, "mnist": args.mnist_seeds}, args.epochs, lines)
    if not args.no_throughput:
        arnoldi = {} if args.no_arnoldi else {"arnoldi_iters": args.arnoldi_iters, "arnoldi_rank": args.arnoldi_rank,
                                              "hessian_samples": args.arnoldi_hessian_samples, "damping": args.arnoldi_damping}
        actors = [int(a) for a in args.actors.split(",") if a]
        run_throughput(*kept["mnist"], actors, arnoldi, args.arnoldi_in_process, args.repeats, lines)
    lines += [f"Total {time.perf_counter() - start:.0f} s; load average (1/5/15 min) {load_start} at the start, "
              f"{load_avg()} at the end: the machine is shared with other jobs, so timings are noisy.", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
