"""Peak memory of ``compact`` on a big record (issue 22): 2,000 trials x 10,000 score rows (20 M rows).

Two steps are measured, each in a fresh process (the record is copied first, so each starts from the
same files), and each process prints its peak resident memory (``ru_maxrss``: tracemalloc does not
see Arrow's buffers) and the peak of pyarrow's memory pool:

* ``per-trial``: compacting the 2,000 per-trial files of every table into one compacted file each;
* ``merge``: merging the 9 compacted files of each table (9 earlier compactions of ~222 trials each)
  into one (``engine/record/compaction.py`` ``_merge_compacted``).

The record is synthetic, in the sink's schemas (trials rows through ``write_trial_table``, scores
written straight from arrays: ``Table.from_pylist`` of 20 M dicts would take longer than the
measurement). Which code is measured is whichever ``poisonsweep`` the child imports: run it with
``PYTHONPATH`` pointing at a checkout to measure that checkout.

Usage::

    python benchmarks/bench_record_memory.py build --out /tmp/bigrecord
    python benchmarks/bench_record_memory.py measure --record /tmp/bigrecord --step per-trial
    python benchmarks/bench_record_memory.py measure --record /tmp/bigrecord --step merge
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GENERATIONS = 9  # compacted files before the merge: one more than compact_table's merge_above (8)


def _scores(tid: str, rows: int, rng):
    import pyarrow as pa

    from poisonsweep.engine.record import SCHEMAS

    half = rows // 2
    index = np.tile(np.arange(half), 2)
    label = rng.integers(0, 10, half)
    return pa.Table.from_arrays([
        pa.array([tid] * rows), pa.array(["loss"] * half + ["knn"] * half), pa.array(index),
        pa.array(np.tile(label, 2)), pa.array(np.tile(label, 2)), pa.array(np.tile(label < 1, 2)),
        pa.array(rng.random(rows)), pa.array(rng.random(rows) < 0.1),
    ], schema=SCHEMAS["scores"])


def build(out: Path, trials: int, rows: int) -> None:
    """Two records beside each other: ``per-trial`` (every trial in its own files) and ``merge`` (the same
    trials compacted in ``GENERATIONS`` steps, so each table has that many compacted files)."""
    import pyarrow.parquet as pq

    from poisonsweep.engine import record
    from poisonsweep.engine.record import TABLES, write_trial_table

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    base = out / "per-trial"
    ids = [f"{i:016x}" for i in range(trials)]
    (base / "scores").mkdir(parents=True)
    for tid in ids:
        pq.write_table(_scores(tid, rows, rng), base / "scores" / f"{tid}.parquet")
        for table in TABLES:
            if table not in ("trials", "scores"):
                write_trial_table(str(base), table, tid, [])
        write_trial_table(str(base), "trials", tid, [{"trial_id": tid, "status": "ok", "tables": ["scores"]}])
    print(f"built {trials} trials x {rows} score rows in {time.perf_counter() - start:.0f} s", flush=True)
    merge = out / "merge"
    shutil.copytree(base, merge)
    cuts = np.linspace(0, trials, GENERATIONS + 1).astype(int)
    names = sorted(p.stem for p in (merge / "trials").glob("*.parquet"))
    for lo, hi in zip(cuts, cuts[1:]):  # compact_table without the merge: GENERATIONS compacted files
        for table in TABLES:
            record.compact_table(str(merge), table, set(names[lo:hi]), merge_above=10 ** 6)
    print(f"and compacted in {GENERATIONS} generations; {time.perf_counter() - start:.0f} s in all", flush=True)


def measure(record_dir: Path, step: str) -> dict:
    """In this process: the step on a fresh copy of the record; its time and peak memory."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    import poisonsweep
    from poisonsweep.engine import record

    with tempfile.TemporaryDirectory(dir=record_dir.parent) as scratch:
        out = Path(scratch) / "record"
        shutil.copytree(record_dir / step, out)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        if step == "per-trial":
            done = record.compact(str(out))
        else:
            done = [record.compact_table(str(out), table, set()) for table in ("scores", "trials")]
        seconds = time.perf_counter() - start
        rows = ds.dataset(str(out / "scores"), format="parquet").count_rows()
    return {"step": step, "code": str(Path(poisonsweep.__file__).parent), "seconds": round(seconds, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_before_mib": round(rss_before / 1024), "arrow_pool_peak_mib": round(pa.default_memory_pool().max_memory()
                                                                                  / 2 ** 20),
            "scores_rows": rows, "written": {d.table: d.written for d in done if d.written}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--trials", type=int, default=2000)
    b.add_argument("--rows", type=int, default=10_000)
    m = sub.add_parser("measure")
    m.add_argument("--record", type=Path, required=True)
    m.add_argument("--step", choices=["per-trial", "merge"], required=True)
    m.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.command == "build":
        build(args.out, args.trials, args.rows)
    elif args.child:
        print(json.dumps(measure(args.record, args.step)))
    else:  # a fresh process, so that ru_maxrss is this step's alone
        result = subprocess.run([sys.executable, __file__, "measure", "--record", str(args.record), "--step",
                                 args.step, "--child"], capture_output=True, text=True, check=True)
        print(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
