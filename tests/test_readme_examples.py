"""The README's "Analysis afterwards" examples (pandas, polars, DuckDB) run against a small record,
and give the numbers computed here from the rows that were written.

The examples come from README.md between ``<!-- analysis-examples -->`` and
``<!-- /analysis-examples -->``.
"""

import re
from pathlib import Path

import numpy as np
import pytest

from poisonsweep.engine.record import compact, write_trial

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- analysis-examples -->", "<!-- /analysis-examples -->"
DETECTORS = ["loss", "spectral_signature"]
RATES = [0.1, 0.3]
SEEDS = [0, 1]
N_TRAIN = 100


def analysis_section() -> str:
    readme = (ROOT / "README.md").read_text()
    assert START in readme, "README.md lost its analysis examples section"
    source = readme
    assert START in source and END in source, "the analysis section's markers are missing"
    return source.split(START, 1)[1].split(END, 1)[0]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", analysis_section(), flags=re.S)


def example(library: str) -> str:
    """The one block that imports ``library``."""
    blocks = [b for b in python_blocks() if re.search(rf"^import {library}\b", b, flags=re.M)]
    assert len(blocks) == 1, f"expected one {library} example, found {len(blocks)}"
    return blocks[0]


def _trial(rng, tid: str, rate: float, seed: int, status: str = "ok") -> tuple[dict, dict]:
    """One synthetic trial's rows, and the truths the examples must reproduce."""
    trial_row = {"trial_id": tid, "sweep": "quickstart", "status": status, "seed": seed, "data_name": "digits",
                 "poison_method": "one_shift", "poison_rate": rate, "model_name": "mlp",
                 "clean_test_acc": float(rng.uniform(0.5, 1)), "poison_success": float(rng.uniform(0, 0.5))}
    keys = {k: trial_row[k] for k in ("trial_id", "data_name", "poison_method", "poison_rate", "seed")}
    is_poison = np.zeros(N_TRAIN, dtype=bool)
    is_poison[rng.choice(N_TRAIN, int(rate * N_TRAIN), replace=False)] = True
    detections, scores, truth = [], [], {}
    for detector in DETECTORS:
        flagged = rng.random(N_TRAIN) < 0.2
        auroc = float(rng.uniform(0.4, 1.0))  # the table's value; only its averaging is under test here
        detections.append({**keys, "detector": detector, "auroc": auroc})
        scores += [{"trial_id": tid, "detector": detector, "index": i, "is_poison": bool(is_poison[i]),
                    "score": float(rng.random()), "flagged": bool(flagged[i])} for i in range(N_TRAIN)]
        truth[detector] = {"auroc": auroc, "recall": (flagged & is_poison).sum() / is_poison.sum()}
    return {"trials": [trial_row], "detections": detections, "scores": scores}, {**trial_row, "by_detector": truth}


@pytest.fixture(scope="module", params=["per-trial files", "compacted"])
def record(tmp_path_factory, request):
    """``<cwd>/results/quickstart`` with 2 rates x 2 seeds ok, one failed trial and one half-written one;
    as a sweep writes it, and after ``poisonsweep compact`` (the half-written trial stays uncompacted)."""
    cwd = tmp_path_factory.mktemp("analysis")
    out = str(cwd / "results" / "quickstart")
    rng = np.random.default_rng(0)
    truths = []
    for rate in RATES:
        for seed in SEEDS:
            tables, truth = _trial(rng, f"ok{rate}{seed}", rate, seed)
            write_trial(out, truth["trial_id"], tables)
            truths.append(truth)
    # a failed trial, and one whose detections and scores exist but whose trials row is not written yet:
    # the examples must leave both out
    failed, _ = _trial(rng, "failed", 0.1, 2, status="failed")
    write_trial(out, "failed", failed)
    partial, _ = _trial(rng, "partial", 0.1, 3)
    write_trial(out, "partial", partial)
    (Path(out) / "trials" / "partial.parquet").unlink()
    if request.param == "compacted":
        compact(out)
        assert len(list((Path(out) / "scores").glob("*.parquet"))) == 2  # the compacted file + the partial trial's
    return cwd, truths


def run_example(library: str, cwd: Path, monkeypatch) -> dict:
    monkeypatch.chdir(cwd)
    namespace: dict = {}
    exec(compile(example(library), f"<{library} example>", "exec"), namespace)
    return namespace


def expected_auroc(truths: list[dict]) -> dict:
    """(detector, rate) -> the AUROCs of its ok seeds."""
    values: dict = {}
    for truth in truths:
        for detector, metrics in truth["by_detector"].items():
            values.setdefault((detector, truth["poison_rate"]), []).append(metrics["auroc"])
    return values


def test_the_section_has_one_example_per_library():
    blocks = python_blocks()
    assert len(blocks) == 3
    for library in ("pandas", "polars", "duckdb"):
        assert 'out = "results/quickstart"' in example(library)


def test_pandas_example_gives_mean_auroc_per_detector_and_rate(record, monkeypatch):
    cwd, truths = record
    auroc = run_example("pandas", cwd, monkeypatch)["auroc"]
    expected = expected_auroc(truths)
    assert len(auroc) == len(expected) == len(DETECTORS) * len(RATES)
    for key, values in expected.items():
        assert auroc.loc[key, "count"] == len(SEEDS)
        assert auroc.loc[key, "mean"] == pytest.approx(np.mean(values))
        assert auroc.loc[key, "std"] == pytest.approx(np.std(values, ddof=1))


def test_polars_example_gives_the_share_of_poisons_flagged(record, monkeypatch):
    cwd, truths = record
    recall = run_example("polars", cwd, monkeypatch)["recall"]
    assert recall["detector"].to_list() == sorted(DETECTORS)
    for detector, value, trials in recall.select("detector", "recall", "trials").iter_rows():
        assert trials == len(truths)  # neither the failed nor the half-written trial
        assert value == pytest.approx(np.mean([t["by_detector"][detector]["recall"] for t in truths]))


def test_duckdb_example_joins_detections_with_their_trials(record, monkeypatch):
    cwd, truths = record
    rows = run_example("duckdb", cwd, monkeypatch)["table"].fetchall()
    expected = expected_auroc(truths)
    assert len(rows) == len(expected)
    for detector, rate, model, auroc, clean_acc, seeds in rows:
        assert model == "mlp" and seeds == len(SEEDS)
        assert auroc == pytest.approx(np.mean(expected[(detector, rate)]))
        accuracies = [t["clean_test_acc"] for t in truths if t["poison_rate"] == rate]
        assert clean_acc == pytest.approx(np.mean(accuracies))
