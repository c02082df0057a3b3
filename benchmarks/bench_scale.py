"""Sweeps of 100 to 10,000+ tiny trials: time to the first trial, engine cost per trial, driver memory,
and what compaction does to the record (files, and the time of ``report``, ``show`` and a DuckDB query).

1. Scale: for each N, ``poisonsweep run`` (the CLI, in a fresh process, as a user runs it) on N tiny
   trials (digits, 300 samples, an MLP, the loss detector; one at a time, so a trial's work and the
   engine's are not mixed up by two trials sharing 2 cores). Measured from the trials table:
   seconds from the command's start to the first trial's start; engine overhead per trial =
   (first start to last finish) / trials - the mean time a trial spends inside ``record_trial``;
   the driver's peak resident memory (``ru_maxrss`` of the CLI process). ``--stop-after S`` sends
   the driver Ctrl-C (SIGINT) S seconds after its first trial started, so a big N is measured over
   a stretch of trials, and checks that it exits cleanly.
2. Record: a synthetic record of N trials written by the sink's own writer (``write_trial``: one
   file per table per trial, as a sweep writes it; 300 scores rows per trial), then
   ``poisonsweep show``, ``poisonsweep report`` and a DuckDB query, timed before and after
   ``poisonsweep compact``.

Usage::

    python benchmarks/bench_scale.py scale --trials 100 1000 10000 --stop-after 0 0 120
    python benchmarks/bench_scale.py record --trials 10000
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # its sibling scripts; poisonsweep itself is installed

from bench_engine import SMALL_TRIAL  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
       "COLUMNS": "150"}


def _config(n: int, path: Path) -> Path:
    import yaml

    raw = {**SMALL_TRIAL, "name": f"scale{n}", "sweep": {"seed": list(range(n))},
           "resources": {"cpu": 1, "max_concurrent": 1, "max_failures": 0}}
    path.write_text(yaml.safe_dump(raw))
    return path


def driver(config: str, out: str) -> None:
    """The child process: the CLI's ``run``; its peak memory is printed when it ends."""
    from poisonsweep.engine.cli import app

    try:
        app(["run", config, "--out", out], standalone_mode=False)
    finally:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"DRIVER_PEAK_MB {peak:.0f}", flush=True)


def _first_start(out: Path, timeout: float) -> float | None:
    """Wall time (epoch seconds) of the first recorded trial's start, waiting up to ``timeout``."""
    import pyarrow.parquet as pq

    deadline = time.time() + timeout
    while time.time() < deadline:
        files = list((out / "trials").glob("*.parquet")) if (out / "trials").is_dir() else []
        if files:
            return pq.read_table(files[0], columns=["started_at"]).column(0)[0].as_py().timestamp()
        time.sleep(0.2)
    return None


def scale(n: int, stop_after: float, root: Path) -> str:
    import pandas as pd

    out = root / f"scale{n}"
    config = _config(n, root / f"scale{n}.yaml")
    load = os.getloadavg()[0]
    started = time.time()
    child = subprocess.Popen([sys.executable, __file__, "driver", str(config), str(out)], env=ENV, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    interrupted = ""
    if stop_after > 0:
        first = _first_start(out, timeout=600)
        if first is not None:
            time.sleep(max(0.0, first + stop_after - time.time()))
            child.send_signal(signal.SIGINT)
            sent = time.time()
            try:
                child.wait(timeout=120)
                interrupted = f"Ctrl-C: exit {child.returncode} after {time.time() - sent:.1f} s"
            except subprocess.TimeoutExpired:
                interrupted = "Ctrl-C: still running after 120 s, killed"
                child.kill()
    output = child.communicate()[0]
    wall = time.time() - started
    peak = next((line.split()[1] for line in output.splitlines() if line.startswith("DRIVER_PEAK_MB")), "?")
    trials = pd.read_parquet(out / "trials", columns=["status", "started_at", "finished_at", "total_seconds"])
    first = trials.started_at.min().timestamp()
    span = (trials.finished_at.max() - trials.started_at.min()).total_seconds()
    done = len(trials)
    overhead = span / done - trials.total_seconds.mean() if done > 1 else float("nan")
    files = sum(1 for _ in out.rglob("*") if _.is_file())
    note = f" ({interrupted})" if interrupted else ""
    if child.returncode not in (0, None) and not interrupted:
        print(output[-3000:], file=sys.stderr)
    return (f"| {n:,} | {done:,}{note} | {first - started:.1f} | {span / done:.3f} | {trials.total_seconds.mean():.3f} "
            f"| **{overhead:.3f}** | {peak} | {files:,} | {wall:.0f} | {load:.1f} |")


# ------------------------------------------------------------------------------------------------- record


def synthetic_record(out: str, n: int, n_train: int = 300, seed: int = 0) -> None:
    """``n`` trials' rows (trials, detections, scores; 2 poison rates x n/2 seeds) written one trial at a
    time by the sink's writer, as a sweep writes them."""
    from poisonsweep.engine.config import build_sweep, config_columns, key_columns, trial_id
    from poisonsweep.engine.report import write_plan
    from poisonsweep.engine.record import write_trial

    raw = {**SMALL_TRIAL, "name": f"record{n}", "sweep": {"poison.rate": [0.1, 0.2], "seed": list(range(n // 2))}}
    sweep = build_sweep(raw, out=out)
    write_plan(sweep)
    rng = np.random.default_rng(seed)
    for config in sweep.trials:
        tid = trial_id(config)
        keys = {"trial_id": tid, **key_columns(config)}
        is_poison = rng.random(n_train) < config["poison"]["rate"]
        score = rng.random(n_train) + is_poison
        flagged = score > 1.0
        row = {"trial_id": tid, **config_columns(config), "status": "ok", "n_train": n_train,
               "n_poisoned": int(is_poison.sum()), "clean_test_acc": float(rng.uniform(0.8, 0.95)),
               "poison_success": float(rng.uniform(0, 0.2)), "train_seconds": 0.1, "total_seconds": 0.2}
        detection = {**keys, "detector": "loss", "method": "loss", "params": "{}", "auroc": float(rng.uniform(0.7, 1)),
                     "auprc": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "n_flagged": int(flagged.sum()),
                     "recall_at_10": 0.5, "seconds": 0.01}
        scores = {"trial_id": [tid] * n_train, "detector": ["loss"] * n_train, "index": list(range(n_train)),
                  "label_given": [0] * n_train, "label_true": [0] * n_train, "is_poison": is_poison.tolist(),
                  "score": score.tolist(), "flagged": flagged.tolist()}
        write_trial(out, tid, {"trials": [row], "detections": [detection],
                               "scores": [dict(zip(scores, values)) for values in zip(*scores.values())]})


DUCKDB_QUERY = """
select d.detector, d.poison_rate, avg(d.auroc) as auroc, count(*) as n
from read_parquet('{out}/detections/*.parquet') d
join read_parquet('{out}/trials/*.parquet') t using (trial_id)
where t.status = 'ok' group by all order by all
"""


def _timed(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=ENV, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return time.perf_counter() - start


def _duckdb_seconds(out: str) -> float:
    import duckdb

    start = time.perf_counter()
    rows = duckdb.sql(DUCKDB_QUERY.format(out=out)).fetchall()
    assert sum(r[-1] for r in rows) > 0
    return time.perf_counter() - start


def record(n: int, root: Path) -> list[str]:
    out = str(root / f"record{n}")
    start = time.perf_counter()
    synthetic_record(out, n)
    written = time.perf_counter() - start
    cli = [sys.executable, "-m", "poisonsweep.engine.cli"]
    lines = []
    for stage in ("per-trial files", "compacted"):
        if stage == "compacted":
            compact = _timed(cli + ["compact", out])
            lines.append(f"| `poisonsweep compact` | {compact:.1f} | – |")
        files = sum(1 for _ in Path(out).rglob("*.parquet"))
        show = _timed(cli + ["show", out])
        report = _timed(cli + ["report", out, "--out", str(root / f"report-{stage[:3]}")])
        duck = _duckdb_seconds(out)
        lines.append(f"| {stage}: {files:,} Parquet files | show {show:.1f} · report {report:.1f} · "
                     f"DuckDB {duck:.2f} | load {os.getloadavg()[0]:.1f} |")
    return [f"| write {n:,} trials one at a time (`write_trial`) | {written:.0f} | – |"] + lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "driver":
        driver(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["scale", "record"])
    parser.add_argument("--trials", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--stop-after", type=float, nargs="+", default=None,
                        help="per N: seconds after the first trial's start to send Ctrl-C (0: run to the end)")
    parser.add_argument("--keep", help="write here instead of a temporary directory")
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(args.keep or temporary)
        root.mkdir(parents=True, exist_ok=True)
        if args.part == "scale":
            stops = args.stop_after or [0] * len(args.trials)
            print("| trials planned | trials run | s to first trial start | s per trial (span / trials) | "
                  "s inside `record_trial` | engine overhead s/trial | driver peak MB | files in out | wall s | load |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
            for n, stop in zip(args.trials, stops):
                print(scale(n, stop, root), flush=True)
        else:
            for n in args.trials:
                print("| step | seconds | |\n|---|---|---|")
                print("\n".join(record(n, root)), flush=True)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
