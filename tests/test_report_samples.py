"""The report's samples: galleries against a DuckDB ranking of the record, images rebuilt from the
trial config (triggers where the poison stamped them, a warning where the config no longer
reproduces the record), histograms with the detector's own threshold, what was run, the
unlearning picture, and the page rendered in a real headless browser.

The record is two real tiny BadNets trials (digits, an MLP, seeds 0 and 1) with unlearning, run
without Ray through ``poisonsweep.engine.worker.record_trial``.
"""

import json

import duckdb
import numpy as np
import pandas as pd
import pytest

from poisonsweep.engine.config import build_sweep
from poisonsweep.engine.report import write_plan, write_report
from poisonsweep.engine.report.galleries import GALLERY_MISSED, GALLERY_TOP
from poisonsweep.engine.report.samples import flag_threshold, gallery_rows, read_scores, rebuild_images, unlearning_examples
from poisonsweep.engine.worker import record_trial
from poisonsweep.tasks.unlearn import SUCCESS_EXAMPLES
from browser import check_page, find_browser

PATCH = 3
SWEEP = {
    "name": "tiny_badnets",
    "data": {"name": "digits", "n_train": 300, "n_test": 100},
    "poison": {"method": "badnets", "rate": 0.1, "params": {"target": 0, "patch_size": PATCH}},
    "model": {"name": "mlp", "params": {"hidden": 32, "depth": 1}},
    "train": {"epochs": 3, "batch_size": 32, "lr": 0.05, "optimizer": "sgd"},
    "detectors": ["loss", "spectral_signature"],
    "unlearn": {"methods": ["ssd"], "selections": [{"kind": "oracle", "fractions": [0.5, 1.0]},
                                                   {"kind": "flagged", "detector": "loss"}]},
    "sweep": {"seed": [0, 1]},
}


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("samples") / "sweep")
    sweep = build_sweep(SWEEP, out=out)
    write_plan(sweep)
    rows = [record_trial(trial, out, version="test+abc") for trial in sweep.trials]
    assert all(row["status"] == "ok" for row in rows), [row["error"] for row in rows]
    shown = next(row for row in rows if row["seed"] == 0)
    return out, shown, write_report(out)


def test_galleries_show_the_top_ranked_and_the_lowest_ranked_poisons_of_the_sql_ranking(record):
    out, trial, _ = record
    scores = read_scores(out, trial["trial_id"])
    rows = gallery_rows(scores, GALLERY_TOP, GALLERY_MISSED)
    ranked = duckdb.sql(f"""
        select detector, index, is_poison,
               row_number() over (partition by detector order by score desc, index) as r
        from read_parquet('{out}/scores/{trial["trial_id"]}.parquet')""").df()
    for detector, part in ranked.groupby("detector"):
        top = part[part["r"] <= GALLERY_TOP].sort_values("r")
        shown = rows[(rows["detector"] == detector) & (rows["part"] == "top")]
        assert shown["index"].tolist() == top["index"].tolist()
        assert shown["rank"].tolist() == list(range(1, GALLERY_TOP + 1))
        lowest = part[part["is_poison"]].sort_values("r").tail(GALLERY_MISSED)
        missed = rows[(rows["detector"] == detector) & (rows["part"] == "missed")]
        assert missed["index"].tolist() == lowest["index"].tolist()
        assert missed["rank"].tolist() == lowest["r"].tolist()


def test_rebuilt_images_carry_the_trigger_exactly_where_the_record_says_poison(record):
    out, trial, _ = record
    rows = gallery_rows(read_scores(out, trial["trial_id"]), GALLERY_TOP, GALLERY_MISSED)
    rebuilt = rebuild_images(trial["config_json"], out, rows)
    assert rebuilt.exact and rebuilt.checked == len(rows)
    checkerboard = (np.add.outer(np.arange(PATCH), np.arange(PATCH)) % 2 == 0).astype(np.float32)
    for row in rows.drop_duplicates("index").itertuples():
        corner = rebuilt.images[row.index][0, -PATCH:, -PATCH:]
        # digits' bottom-right corner is near-black: only a stamped image shows the pattern
        assert np.array_equal(corner, checkerboard) == row.is_poison, row.index


def test_a_config_that_no_longer_reproduces_the_record_is_reported(record):
    out, trial, report = record
    rows = gallery_rows(read_scores(out, trial["trial_id"]), GALLERY_TOP, GALLERY_MISSED)
    config = json.loads(trial["config_json"])
    config["seed"] = 7  # another poison draw: other samples are poisoned
    rebuilt = rebuild_images(json.dumps(config), out, rows)
    assert rebuilt.checked == len(rows) and rebuilt.mismatches > 0 and not rebuilt.exact
    shown = pd.read_csv(report.directory / "samples_shown.csv")
    assert shown["check"].tolist() == [f"all {len(rows)} shown samples match the record"]
    assert shown["seed"].tolist() == [0]  # one trial per setting: the lowest seed


def test_flag_threshold_is_the_lowest_flagged_score():
    scores = pd.DataFrame({"score": [0.1, 0.9, 0.5, 0.7], "flagged": [False, True, False, True]})
    assert flag_threshold(scores) == 0.7
    assert flag_threshold(scores.assign(flagged=False)) is None


def test_the_unlearning_picture_takes_the_full_oracle_and_every_flagged_selection():
    runs = pd.DataFrame({"selection_kind": ["oracle", "oracle", "flagged", "top", "flagged"],
                         "identified_fraction": [0.5, 1.0, 0.3, 0.1, 0.2], "method": ["ssd"] * 5,
                         "success_predictions_after": [[1], [2], [3], [4], None]})
    chosen = unlearning_examples(runs)
    # the oracle at its largest fraction and the flagged run with predictions; top-q and unrecorded runs left out
    assert chosen["success_predictions_after"].tolist() == [[2], [3]]


def test_what_was_run_is_at_the_top(record):
    _, trial, report = record
    page = report.html.read_text()
    assert page.index("What was run") < page.index("Sweep config (as resolved)") < page.index("Trials per setting")
    markdown = report.markdown.read_text()
    assert "| code version | test+abc (2 trials) |" in markdown
    assert f"| machine · device | {trial['node']} · cpu (2 trials) |" in markdown
    assert "| seed | swept: 0, 1 |" in markdown
    assert '| poison.params.patch_size | 3 |' in markdown and '| train.momentum | 0.9 |' in markdown


def test_unlearning_predictions_are_recorded_and_pictured(record):
    out, trial, report = record
    rows = duckdb.sql(f"select selection_kind, success_predictions_before as b, success_predictions_after as a "
                      f"from read_parquet('{out}/unlearning/*.parquet')").df()
    assert len(rows) == 2 * 3 and all(len(p) == SUCCESS_EXAMPLES for p in rows["b"]) \
        and all(len(p) == SUCCESS_EXAMPLES for p in rows["a"])
    names = {p.name for p in report.figures}
    assert {"scores_digits_badnets_0.1.png", "samples_digits_badnets_0.1.png",
            "unlearning_examples_digits_badnets_0.1.png"} <= names


@pytest.mark.skipif(find_browser() is None, reason="no headless browser: apt-get install chromium")
def test_the_page_renders_in_a_browser_with_every_image_loaded_and_nothing_cut_off(record, tmp_path):
    _, _, report = record
    for width in (1280, 800):
        probe = check_page(report.html, tmp_path, width=width)
        assert len(probe["images"]) == len(report.figures)
        assert all(image["complete"] and image["natural"] > 0 and image["shown"] > 0
                   for image in probe["images"]), probe["images"]
        assert probe["past"] == [] and probe["scroll_width"] <= width, probe["past"]


@pytest.mark.skipif(find_browser() is None, reason="no headless browser: apt-get install chromium")
def test_the_browser_probe_sees_a_broken_image_and_a_cut_off_element(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><img alt="broken" src="data:image/png;base64,AAAA">'
                    '<div style="width:3000px">wide</div></body></html>')
    probe = check_page(page, tmp_path, width=800)
    assert probe["images"][0]["natural"] == 0
    assert probe["past"] == ["DIV: wide"] and probe["scroll_width"] > 800
