"""``poisonsweep plan`` (a sweep previewed without Ray, and the warning when ``--set`` drops or narrows
an axis, also printed by ``run``) and ``poisonsweep explain`` (one glossary for the CLI, the API and
the report, with the report's note on an attack that did not take)."""

import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import poisonsweep
from poisonsweep.engine.cli import app
from poisonsweep.engine.explain import ATTACK_MARGIN, GLOSSARY, explain
from poisonsweep.engine.report import write_report
from poisonsweep.engine.record import write_trial

# a "paired" axis: the whole poison section is swept, so method and rate change together
PAIRED = """name: paired
data: {name: digits, n_train: 200}
poison: {method: one_shift, rate: 0.1}
model: {name: mlp}
detectors: [loss]
sweep:
  poison:
    - {method: one_shift, rate: 0.1}
    - {method: random_flip, rate: 0.3}
  seed: [0, 1]
"""


@pytest.fixture
def paired(tmp_path):
    path = tmp_path / "paired.yaml"
    path.write_text(PAIRED)
    return path


def _said(result) -> str:
    return " ".join(result.output.split())


def test_plan_lists_axes_and_first_trials_with_their_paired_values(paired):
    plan = poisonsweep.plan(paired, n=3)
    assert (plan.n_trials, plan.grid_points, list(plan.axes)) == (4, 4, ["poison", "seed"])
    assert [(row["poison.method"], row["poison.rate"], row["seed"]) for row in plan.first] == [
        ("one_shift", 0.1, 0), ("one_shift", 0.1, 1), ("random_flip", 0.3, 0)]
    sweep = poisonsweep.engine.api.load_config(paired)  # the trials run would run, in its order
    assert [row["trial_id"] for row in plan.first] == sweep.ids[:3] and not plan.warnings
    said = _said(CliRunner().invoke(app, ["plan", str(paired)]))
    assert "sweep paired: 4 trials" in said and "axes (2 x 2)" in said
    assert "poison: {method: one_shift, rate: 0.1}, {method: random_flip, rate: 0.3}" in said


def test_set_that_drops_a_paired_axis_warns_in_plan_and_run(paired):
    plan = poisonsweep.plan(paired, ["poison.rate=0.5"])
    assert plan.n_trials == 2 and list(plan.axes) == ["seed"]
    [warning] = plan.warnings
    assert "removes the sweep axis 'poison'" in warning and "from 4 to 2 points" in warning
    assert "poison.method, poison.rate" in warning  # what the section swept, so the loss is visible
    said = _said(CliRunner().invoke(app, ["plan", str(paired), "--set", "poison.rate=0.5"]))
    assert "warning: --set poison.rate=0.5 removes the sweep axis 'poison'" in said
    # run prints the same warning before anything starts (here it stops at the data check: n_train too large)
    result = CliRunner().invoke(app, ["run", str(paired), "--set", "poison.rate=0.5", "--set", "data.n_train=99999"])
    assert result.exit_code == 2 and "warning: --set poison.rate=0.5 removes the sweep axis 'poison'" in _said(result)


def test_narrowing_an_axis_warns_and_setting_it_whole_does_not(paired):
    [warning] = poisonsweep.plan(paired, ["sweep.seed=[0]"]).warnings
    assert "narrows the sweep axis 'seed' from 2 to 1 values" in warning
    assert not poisonsweep.plan(paired, ["sweep.seed=[0,1,2]"]).warnings
    assert not poisonsweep.plan(paired, ["model.params.hidden=8"]).warnings  # not a swept key


def test_plan_starts_no_ray_and_never_expands_a_huge_grid(paired, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # any `import ray` now fails
    assert poisonsweep.plan(paired).n_trials == 4
    huge = tmp_path / "huge.yaml"
    huge.write_text(PAIRED.replace("seed: [0, 1]", f"seed: {list(range(1000))}\n  train.lr: {[0.1] * 1000}"))
    with pytest.raises(poisonsweep.ConfigError, match="2,000,000 grid points"):
        poisonsweep.plan(huge)


def test_explain_has_one_text_for_cli_and_api():
    for name in ["P@n", "recall@10%", "f1", "AUROC", "activation_clustering", "abl", "f", "identified",
                 "poison_success", "attack_not_taken"]:
        result = CliRunner().invoke(app, ["explain", name])
        assert result.exit_code == 0 and " ".join(explain(name).split()) == _said(result)
    assert "0.30" in explain("recall@10%") and "[0, 2)" in explain("activation_clustering")
    assert all(title in poisonsweep.explain() for title, _ in GLOSSARY.values())
    result = CliRunner().invoke(app, ["explain", "nonsense"])
    assert result.exit_code == 2 and "precision_at_n" in _said(result)


def test_recall_at_10_tops_out_at_030_at_a_33_percent_rate():
    """The glossary's claim, checked on the metric itself: a perfect ranking at rate 0.33 finds 0.30."""
    from poisonsweep.tasks.metrics import detection_metrics

    is_poison = np.arange(3000) < 990  # 33 %
    perfect = detection_metrics(is_poison.astype(float), is_poison, is_poison)
    assert perfect["recall_at_10"] == pytest.approx(300 / 990) and perfect["auroc"] == 1.0


def _unlearned_trial(out: str, trial_id: str, rate: float, success: float) -> None:
    keys = {"trial_id": trial_id, "data_name": "digits", "poison_method": "one_shift", "poison_rate": rate, "seed": 0}
    unlearning = [{**keys, "selection": "oracle", "selection_kind": "oracle", "identified_fraction": 1.0,
                   "method": "retrain", "clean_test_acc_before": 0.9, "clean_test_acc_after": 0.9,
                   "poison_success_before": success, "poison_success_after": success, "retain_acc_after": 0.9}]
    write_trial(out, trial_id, {"trials": [{**keys, "status": "ok", "num_classes": 10, "n_poisoned": 5,
                                            "clean_test_acc": 0.9, "poison_success": success}],
                                "unlearning": unlearning})


def test_report_has_the_glossary_and_names_the_setting_whose_attack_did_not_take(tmp_path):
    out = str(tmp_path / "sweep")
    _unlearned_trial(out, "low", 0.01, 0.011)  # the quickstart's 1 %: the model ignores the shift
    _unlearned_trial(out, "edge", 0.1, 0.1 + ATTACK_MARGIN + 0.01)  # just above the bound: taken
    report = write_report(out, tmp_path / "report")
    text = " ".join(report.markdown.read_text().split())
    assert "## Glossary" in text and all(title in text for title, _ in GLOSSARY.values())
    assert "Attack did not take" in text and "digits · one_shift at 1% (poison success 0.011, chance 1/10)" in text
    assert "at 10%" not in text.split("Attack did not take")[1].split("|")[0]
    assert "Glossary" in report.html.read_text()


def test_a_long_axis_lists_its_first_values_and_its_length(paired):
    plan = poisonsweep.plan(paired, ["sweep.seed=[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14]"], n=2)
    [line] = [line for line in plan.lines() if line.startswith("  seed:")]
    assert line == "  seed: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, … (15 values)"
    assert len(plan.first) == 2 and plan.n_trials == 30
