"""Plugins (issue 23): a plain module outside the repository adds a detector, a poison and a model to a sweep.

Without Ray: the public API, loading by path / package / import name / entry point, the one-line errors
before anything runs, validation of a plugin's parameters, its hash in ``code_version``, the registry
metadata that replaced the engine's name checks (and a scan that the engine names no entry). With Ray (one
small sweep): ``examples/plugin/`` copied outside the repository and the working directory, run through the
``poisonsweep run`` CLI, its rows read back, ``list`` marking its entries, and an edit making its trials stale.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import poisonsweep
from poisonsweep.engine import plugins as plugins_module
from poisonsweep.engine.config import ConfigError, build_sweep, load_sweep
from poisonsweep.engine.plugins import PluginError, import_in_worker, load_plugins, source_hash
from poisonsweep.engine.resolve import trial_id
from poisonsweep.engine.resume import code_version, trials_to_run
from poisonsweep.tasks.registry import Interval, Options
from poisonsweep.tasks.trial import run_resolved_trial

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "plugin"
REGISTRIES = [poisonsweep.DATASETS, poisonsweep.POISONS, poisonsweep.MODELS, poisonsweep.DETECTORS,
              poisonsweep.UNLEARNERS]
TINY = {"data": {"name": "digits", "n_train": 200, "n_test": 50}, "model": {"name": "mlp", "params": {"hidden": 8}},
        "train": {"epochs": 1}, "detectors": ["loss"]}


@pytest.fixture(autouse=True)
def registries_restored():
    """Each test's plugins leave the registries, ``sys.modules`` and the loaded-plugin table as they were."""
    entries = [dict(r._entries) for r in REGISTRIES]
    modules, loaded = set(sys.modules), dict(plugins_module._LOADED)
    yield
    for registry, saved in zip(REGISTRIES, entries):
        registry._entries.clear()
        registry._entries.update(saved)
    plugin_tops = {name.split(".")[0] for name in set(plugins_module._LOADED) - set(loaded)}
    for name in set(sys.modules) - modules:  # only the plugins' modules: torch and others import lazily
        if name.split(".")[0] in plugin_tops or name.startswith("psp_"):
            del sys.modules[name]
    plugins_module._LOADED.clear()
    plugins_module._LOADED.update(loaded)


def write_detector_plugin(path: Path, name: str, body: str = "scores = context.losses") -> Path:
    path.write_text(textwrap.dedent(f"""
        import numpy as np
        from poisonsweep import DETECTORS, Detection, Interval, flag_top

        @DETECTORS.register("{name}", {{"fraction": [Interval(float, 0, 1)]}})
        def detect(context, *, seed, fraction=0.1):
            '''A test detector.'''
            {body}
            return Detection(scores=np.asarray(scores, dtype=float), flagged=flag_top(scores, fraction))
        """))
    return path


def test_the_plugin_api_is_importable_from_poisonsweep_and_documented():
    from poisonsweep.tasks.detect.base import DETECTORS
    from poisonsweep.tasks.registry import Interval

    assert poisonsweep.DETECTORS is DETECTORS and poisonsweep.Interval is Interval
    assert "loss" in poisonsweep.DETECTORS and "digits" in poisonsweep.DATASETS  # ours are registered on access
    for name in ["DATASETS", "POISONS", "MODELS", "DETECTORS", "UNLEARNERS", "Dataset", "PoisonedData", "SplitModel",
                 "DetectionContext", "Detection", "Interval", "Options"]:
        assert name in poisonsweep.__all__ and name in dir(poisonsweep)
        value = getattr(poisonsweep, name)
        assert (type(value).__doc__ if name.isupper() else value.__doc__), f"{name} has no docstring"
    assert poisonsweep.DETECTORS.register.__doc__


def test_a_plugin_file_relative_to_the_config_is_imported_before_the_config_is_checked(tmp_path):
    write_detector_plugin(tmp_path / "psp_rel.py", "psp_rel_detector")
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**TINY, "plugins": ["psp_rel.py"], "detectors": ["psp_rel_detector"]}))
    sweep = load_sweep(config)  # from another working directory: the path is the config's
    assert [p.module for p in sweep.plugins] == ["psp_rel"]
    assert sweep.plugins[0].path == str(tmp_path / "psp_rel.py")
    assert sweep.trials[0]["detectors"][0]["params"] == {"fraction": 0.1}  # its defaults filled in like ours
    bad = {**TINY, "plugins": ["psp_rel.py"], "detectors": [{"name": "psp_rel_detector", "params": {"fraction": 2}}]}
    with pytest.raises(ConfigError, match=r"detectors\[0\].params.fraction must be a number in \[0, 1\]; got 2"):
        build_sweep(bad, base_dir=tmp_path)


def test_a_package_folder_and_an_import_name_are_plugins_too(tmp_path, monkeypatch):
    package = tmp_path / "psp_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from . import methods\n")
    write_detector_plugin(package / "methods.py", "psp_pkg_detector")
    sweep = build_sweep({**TINY, "plugins": ["./psp_pkg"], "detectors": ["psp_pkg_detector"]}, base_dir=tmp_path)
    assert sweep.plugins[0].path == str(package) and sweep.plugins[0].sha256 == source_hash(package)

    other = tmp_path / "on_path"
    other.mkdir()
    write_detector_plugin(other / "psp_named.py", "psp_named_detector")
    monkeypatch.syspath_prepend(str(other))
    sweep = build_sweep({**TINY, "plugins": ["psp_named"], "detectors": ["psp_named_detector"]})
    assert sweep.plugins[0].origin == "psp_named" and sweep.plugins[0].path == str(other / "psp_named.py")


@pytest.mark.parametrize("spec,message", [
    ("missing.py", r"plugin 'missing.py': .*missing.py does not exist \(a plugin path is relative to the config"),
    ("broken.py", r"plugin 'broken.py' failed to import: ZeroDivisionError: division by zero$"),
    ("no_such_module_psp", r"plugin 'no_such_module_psp' failed to import: ModuleNotFoundError"),
    ("./folder", r"is a folder without __init__.py"),
    ("bad-name.py", r"'bad-name' is not a valid module name"),
])
def test_a_bad_plugin_is_one_line_before_anything_runs(tmp_path, spec, message):
    (tmp_path / "broken.py").write_text("x = 1 / 0\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "bad-name.py").write_text("")
    with pytest.raises(ConfigError) as raised:
        build_sweep({**TINY, "plugins": [spec]}, base_dir=tmp_path)
    problems = raised.value.errors
    assert len(problems) == 1 and "\n" not in problems[0]
    assert re.search(message, problems[0]), problems[0]
    with pytest.raises(ConfigError, match="plugins must be a list"):
        build_sweep({**TINY, "plugins": "one.py"})


def test_installed_entry_point_plugins_load_for_every_sweep(tmp_path, monkeypatch):
    # a distribution as pip installs one: NAME.dist-info with entry_points.txt, beside its module
    dist = tmp_path / "psp_ep_dist-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: psp-ep-dist\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[poisonsweep.plugins]\nmine = psp_ep_module\n")
    write_detector_plugin(tmp_path / "psp_ep_module.py", "psp_ep_detector")
    monkeypatch.syspath_prepend(str(tmp_path))
    sweep = build_sweep({**TINY, "detectors": ["psp_ep_detector"]})  # no plugins: key at all
    assert [(p.module, p.origin) for p in sweep.plugins] == [("psp_ep_module", "entry point mine (psp-ep-dist)")]


def test_code_version_covers_each_plugins_source(tmp_path):
    plugin = write_detector_plugin(tmp_path / "psp_hash.py", "psp_hash_detector")
    raw = {**TINY, "plugins": [str(plugin)], "detectors": ["psp_hash_detector"]}
    before = build_sweep(raw)
    assert code_version() == code_version([]) and "plugins" not in code_version()  # old records stay current
    assert code_version(before.plugins).startswith(code_version() + ".plugins.")
    plugin.write_text(plugin.read_text() + "\n# edited\n")
    after = build_sweep(raw)  # the edited file is imported again: the hash is the code that runs
    assert after.ids == before.ids  # same science, same trial ...
    assert code_version(after.plugins) != code_version(before.plugins)  # ... but another code version
    assert sys.modules["psp_hash"].__file__ == str(plugin)


def test_a_record_from_before_the_plugins_column_reads_as_no_plugins(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from poisonsweep.engine.record import damaged_files

    (tmp_path / "trials").mkdir()
    pq.write_table(pa.table({"trial_id": ["old"], "status": ["ok"], "code_version": ["0.1.0+src.abc"]}),
                   tmp_path / "trials" / "old.parquet")
    assert damaged_files(str(tmp_path)) == []
    trials = poisonsweep.load(str(tmp_path), ["trials"], as_pandas=True)["trials"]
    assert trials.plugins.isna().all() and list(trials.trial_id) == ["old"]


def test_a_worker_imports_the_shipped_copy_and_refuses_a_different_one(tmp_path, monkeypatch):
    plugin = write_detector_plugin(tmp_path / "psp_worker.py", "psp_worker_detector")
    [record] = [p.record() for p in load_plugins([str(plugin)])]
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(plugin, shipped / "psp_worker.py")
    del sys.modules["psp_worker"]
    monkeypatch.syspath_prepend(str(shipped))  # what py_modules does on a node
    import_in_worker([record])
    assert sys.modules["psp_worker"].__file__ == str(shipped / "psp_worker.py")
    (shipped / "psp_worker.py").write_text(plugin.read_text() + "# another copy\n")
    with pytest.raises(PluginError, match="has source hash .*, the driver's has " + record["sha256"]):
        import_in_worker([record])
    (shipped / "psp_worker.py").write_text("raise OSError('no GPU driver')\n")
    del sys.modules["psp_worker"]
    with pytest.raises(PluginError, match="failed to import on this node: OSError: no GPU driver"):
        import_in_worker([record])
    with pytest.raises(PluginError, match="is not importable on this node"):
        import_in_worker([{**record, "module": "psp_nowhere", "path": str(tmp_path / "gone.py")}])


def test_the_report_imports_a_recorded_plugin_only_where_its_unchanged_file_is(tmp_path):
    from poisonsweep.engine.plugins import column, load_recorded

    plugin = write_detector_plugin(tmp_path / "psp_recorded.py", "psp_recorded_detector")
    record = {"module": "psp_recorded", "origin": "psp_recorded.py", "path": str(plugin),
              "sha256": source_hash(plugin)}
    assert load_recorded([column([{**record, "sha256": "0" * 12}]), None]) == []  # another code: not imported
    assert "psp_recorded_detector" not in poisonsweep.DETECTORS
    assert load_recorded([column([record]), column([record])]) == ["psp_recorded"]
    assert "psp_recorded_detector" in poisonsweep.DETECTORS
    assert load_recorded([column([{**record, "module": "psp_gone", "path": str(tmp_path / "gone.py")}])]) == []


def test_entries_declare_placement_and_trial_checks_for_ours_and_a_plugins_alike(tmp_path):
    (tmp_path / "psp_meta.py").write_text(textwrap.dedent("""
        from poisonsweep import DETECTORS, Options

        def needs_sgd(params, trial):
            return None if trial["train"]["optimizer"] == "sgd" else "psp_meta needs train.optimizer: sgd"

        @DETECTORS.register("psp_meta", {"device": [Options(("cpu", "cuda"))]}, placement={"device"},
                            trial_check=needs_sgd)
        def detect(context, *, seed, device="cpu"):
            '''A detector with a placement parameter and a check across sections.'''
        """))
    raw = {**TINY, "plugins": ["psp_meta.py"], "train": {"epochs": 1, "optimizer": "sgd"}}
    on = {name: {"name": "psp_meta", "params": {"device": name}} for name in ("cpu", "cuda")}
    ids = {name: build_sweep({**raw, "detectors": [d]}, base_dir=tmp_path).ids for name, d in on.items()}
    assert ids["cpu"] == ids["cuda"]  # where it computes is not what it computes
    with pytest.raises(ConfigError, match=r"detectors\[0\]: psp_meta needs train.optimizer: sgd"):
        build_sweep({**raw, "train": {"optimizer": "adam"}, "detectors": ["psp_meta"]}, base_dir=tmp_path)
    @poisonsweep.DATASETS.register("psp_data", num_classes=10,
                                   trial_check=lambda params, trial: "psp_data needs a CNN" if trial["model"]["name"]
                                   == "mlp" else None)
    def psp_data(*, root, n_train, n_test, seed):
        """A dataset with a check across sections."""

    with pytest.raises(ConfigError, match=r"data: psp_data needs a CNN"):
        build_sweep({**TINY, "data": {"name": "psp_data"}})
    from poisonsweep.engine.resolve import identity

    @poisonsweep.UNLEARNERS.register("psp_unlearner", {"device": [Options(("cpu", "cuda"))], "steps": [Interval(int, 1)]},
                                     placement={"device"})
    def psp_unlearner(model, retain_x, retain_y, forget_x, forget_y, *, device="cpu", steps=1):
        """An unlearning method with a placement parameter."""

    methods = [{"name": "psp_unlearner", "params": {"device": "cuda", "steps": 2}}, {"name": "ssd", "params": {}}]
    assert identity({"unlearn": {"methods": methods}})["unlearn"]["methods"][0] == {"name": "psp_unlearner",
                                                                                    "params": {"steps": 2}}
    # our own entries follow the same rule: FLIP's device, the influence detector's TracIn check
    flip = [build_sweep({**TINY, "poison": {"method": "flip", "rate": 0.1, "params": {"device": d}}}).trials[0]
            for d in ("cpu", "auto")]
    assert trial_id(flip[0]) == trial_id(flip[1])
    with pytest.raises(ConfigError, match=r"detectors\[0\]: influence solver 'tracin' assumes SGD"):
        build_sweep({**TINY, "train": {"optimizer": "adam"},
                     "detectors": [{"name": "influence", "params": {"solver": "tracin"}}]})
    from poisonsweep.tasks.poisons.flip.artifacts import has_cached_experts

    entry = poisonsweep.POISONS.get("flip")
    assert entry.rebuild == "clean" and entry.rebuild_cached is has_cached_experts
    assert not has_cached_experts(tmp_path) and not has_cached_experts(None)
    (tmp_path / "flip-abc.npz").write_bytes(b"")
    assert has_cached_experts(tmp_path)


# strings in engine/ that equal an entry's name but are not about that entry: record tables and columns
# (the influence detector declares the "influence" table it fills), the documented default config, and text
RECORD_NAMES = "the record's own table and column names"
ALLOWED = {("engine/report/status.py", "none"): "the word shown when a setting has no ok seed",
           # glossary text on how to read these two detectors' score scales (issue 26, `poisonsweep explain`):
           # words for a reader, no behaviour; it could become registry metadata (an entry's own glossary text)
           ("engine/explain.py", "activation_clustering"): "glossary", ("engine/explain.py", "abl_isolation"): "glossary"}


def test_the_engine_names_no_registered_entry():
    from poisonsweep.engine.record import SCHEMAS

    names = {name: registry.kind for registry in REGISTRIES for name in registry.names()}
    record = set(SCHEMAS) | {f.name for schema in SCHEMAS.values() for f in schema}
    found = []
    for path in sorted((REPO / "engine").rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        tree = ast.parse(path.read_text())
        defaults = [node for node in ast.walk(tree) if isinstance(node, ast.AnnAssign)
                    and getattr(node.target, "id", None) == "TRIAL_DEFAULTS"]
        in_defaults = {id(n) for d in defaults for n in ast.walk(d)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
                    and id(node) not in in_defaults and node.value not in record
                    and (relative, node.value) not in ALLOWED):
                found.append(f"{relative}:{node.lineno} names the {names[node.value]} {node.value!r}")
    assert not found, "declare it in the entry's registry metadata instead:\n" + "\n".join(found)


def test_the_readmes_plugin_example_runs_a_trial(tmp_path):
    readme = (REPO / "README.md").read_text().split("## Add your own method", 1)[1].split("\n## ", 1)[0]
    source = re.search(r"```python\n(# my_methods.py.*?)```", readme, flags=re.S).group(1)
    (tmp_path / "readme_margin.py").write_text(source.replace('"margin"', '"readme_margin"'))
    config = {**TINY, "plugins": ["readme_margin.py"], "poison": {"method": "one_shift", "rate": 0.1},
              "detectors": [{"name": "readme_margin", "params": {"flag_fraction": 0.1}}]}
    sweep = build_sweep(config, base_dir=tmp_path)
    rows = run_resolved_trial(sweep.trials[0], log=lambda _: None).tables
    [detection] = rows["detections"]
    assert detection["detector"] == "readme_margin" and detection["n_flagged"] == 20
    scores = np.array([r["score"] for r in rows["scores"]])
    assert len(scores) == 200 and (-1 <= scores).all() and (scores <= 1).all()


def cli(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    return subprocess.run([sys.executable, "-m", "poisonsweep.engine.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


@pytest.mark.slow  # starts Ray or a subprocess
def test_the_example_plugin_runs_a_sweep_through_the_cli_from_outside_the_repository(tmp_path):
    home, cwd = tmp_path / "my_lab", tmp_path / "elsewhere"  # neither the repository nor the working directory
    home.mkdir()
    cwd.mkdir()
    plugin = home / "my_methods.py"
    shutil.copy(EXAMPLE / "my_methods.py", plugin)
    raw = yaml.safe_load((EXAMPLE / "digits_plugin.yaml").read_text())
    assert raw["plugins"] == ["my_methods.py"]
    raw.update(data={"name": "digits", "n_train": 300, "n_test": 100}, sweep={"data.name": ["digits", "digits_4x4"]})
    config = home / "digits_plugin.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"

    listed = cli("list", "-c", str(config), cwd=cwd)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    # the name column, its wrapped lines joined: "margin(plugin /tmp/.../my_methods.py)"
    names = "".join("".join(line.split("│")[1].split()) for line in listed.stdout.splitlines() if line.startswith("│"))
    for name in ("digits_4x4", "margin", "to_target", "tanh_mlp"):
        assert f"{name}(plugin{plugin})" in names, listed.stdout
    assert "loss(plugin" not in names and "digits(plugin" not in names  # ours are not marked

    first = cli("run", str(config), "--out", str(out), cwd=cwd)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 trials run" in first.stdout
    trials = pd.read_parquet(out / "trials").sort_values("data_name")
    assert list(trials.status) == ["ok", "ok"], trials.error.tolist()
    assert list(trials.data_name) == ["digits", "digits_4x4"]  # the plugin's dataset beside ours
    assert (trials.poison_method == "to_target").all() and (trials.model_name == "tanh_mlp").all()
    assert trials.n_poisoned.tolist() == [30, 30] and trials.n_train.tolist() == [300, 300]
    [recorded] = json.loads(trials.plugins.iloc[0])
    assert recorded["module"] == "my_methods" and recorded["path"] == str(plugin)
    assert recorded["sha256"] == source_hash(plugin) and ".plugins." in trials.code_version.iloc[0]
    detections = pd.read_parquet(out / "detections")
    assert sorted(detections.detector) == ["loss", "loss", "margin", "margin"]
    margin = detections[detections.detector == "margin"].merge(trials[["trial_id", "data_name"]])
    assert (margin.n_flagged == 30).all()
    assert margin[margin.data_name == "digits"].auroc.iloc[0] > 0.8  # a planted flip the trained model disagrees with
    scores = pd.read_parquet(out / "scores")
    mine = scores[scores.detector == "margin"]
    assert len(mine) == 600 and mine.is_poison.sum() == 60 and mine.flagged.sum() == 60
    assert mine.score.between(-1, 1).all()  # a difference of two probabilities

    plugin.write_text(plugin.read_text() + "\n# tuned the margin\n")
    again = cli("run", str(config), "--out", str(out), cwd=cwd)  # --rerun failed: kept, but reported stale
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 ok trial(s) were recorded by other code versions" in again.stdout and "0 trials run" in again.stdout
    sweep = load_sweep(config)
    version = code_version(sweep.plugins)
    assert version != trials.code_version.iloc[0]
    assert trials_to_run(str(out), sweep.ids, "stale", version) == sweep.ids
    assert trials_to_run(str(out), sweep.ids, "failed", version) == []
