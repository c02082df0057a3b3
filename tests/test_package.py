"""One import package: ``poisonsweep`` installs engine/ and tasks/ under its own name, so a user's
``tasks.py`` or another distribution's ``engine`` cannot break it; its public API runs a sweep; the
modules stay small and their imports point one way."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import poisonsweep

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of engine/ and tasks/ (and the package root)."""
    found = {"poisonsweep": ROOT / "__init__.py"}
    for path in sorted([*ROOT.joinpath("engine").rglob("*.py"), *ROOT.joinpath("tasks").rglob("*.py")]):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("poisonsweep",) + (parts[:-1] if parts[-1] == "__init__" else parts))
        found[name] = path
    return found


def test_every_package_folder_is_installed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"poisonsweep." + ".".join(p.parent.relative_to(ROOT).parts)
               for p in [*ROOT.joinpath("engine").rglob("__init__.py"), *ROOT.joinpath("tasks").rglob("__init__.py")]}
    assert folders | {"poisonsweep"} == listed


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The project modules ``name`` imports, at its top or anywhere inside it (an import inside a function runs
    when the function is first called: a loop through one fails then, half-initialised, or not at all), and
    the packages of each (importing ``a.b.c`` first runs ``a/b/__init__.py``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    targets |= {target.rsplit(".", depth)[0] for target in set(targets) for depth in range(1, target.count(".") + 1)}
    return {t for t in targets if t in modules and t != name}


def import_loop(graph: dict[str, set[str]]) -> list[str] | None:
    """The first import loop (``a -> b -> a``) of ``graph`` (module -> the modules it imports), or None.

    A submodule may import its own package: Python runs a package's ``__init__`` before its submodules, so
    that is no loop. A package's ``__init__`` importing its submodules (registration, re-exports) is an edge
    like any other: a submodule imported from outside runs it first, and a loop through it is a loop."""
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (loop := visit(target, path + [target])):
                return loop
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (loop := visit(name, [name])):
            return loop
    return None


def test_there_is_no_import_loop():
    """No loop at any level: the imports inside functions count too."""
    modules = _modules()
    loop = import_loop({name: _imports(name, path, set(modules)) for name, path in modules.items()})
    assert loop is None, "import loop: " + " -> ".join(loop or [])


def test_an_import_loop_through_a_function_or_a_package_is_found(tmp_path):
    """The loop test sees an import inside a function, and a loop through a package's ``__init__`` (``c``
    imports only ``p.leaf``, but that runs ``p/__init__``, which imports ``p.inner``, which imports ``c``)."""
    files = {
        "poisonsweep/engine/a.py": "def f():\n    from poisonsweep.engine.b import g\n",
        "poisonsweep/engine/b.py": "from poisonsweep.engine import a\n",
        "poisonsweep/engine/p/__init__.py": "from poisonsweep.engine.p.inner import h\n",
        "poisonsweep/engine/p/inner.py": "def h():\n    import poisonsweep.engine.c\n",
        "poisonsweep/engine/p/leaf.py": "x = 1\n",
        "poisonsweep/engine/c.py": "from poisonsweep.engine.p.leaf import x\n",
    }
    paths = {}
    for file, text in files.items():
        path = tmp_path / file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        parts = Path(file).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: _imports(name, path, set(paths)) for name, path in paths.items()}
    assert import_loop({k: v for k, v in graph.items() if k.endswith((".a", ".b"))}) in (
        ["poisonsweep.engine.a", "poisonsweep.engine.b", "poisonsweep.engine.a"],
        ["poisonsweep.engine.b", "poisonsweep.engine.a", "poisonsweep.engine.b"])
    loop = import_loop({k: v for k, v in graph.items() if not k.endswith((".a", ".b"))})
    assert loop is not None and {"poisonsweep.engine.c", "poisonsweep.engine.p"} <= set(loop)


def test_engine_imports_tasks_but_tasks_never_import_engine():
    offenders = [name for name, path in _modules().items() if name.startswith("poisonsweep.tasks")
                 and re.search(r"^\s*(from|import) poisonsweep\.engine", path.read_text(), re.M)]
    assert not offenders


@pytest.mark.slow  # starts Ray or a subprocess
def test_a_wheel_installs_next_to_a_tasks_py_and_an_unrelated_engine(tmp_path):
    """``pip install .`` as a wheel into a fresh venv, then import it from a folder holding a user's
    ``tasks.py`` and another ``engine`` package: both stay theirs, ours stays ours."""
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    if built.returncode != 0 and "setuptools" in built.stderr and ("network" in built.stderr.lower()
                                                                   or "connection" in built.stderr.lower()):
        pytest.skip("the wheel's build backend (setuptools>=77) cannot be fetched here")
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(wheels.glob("poisonsweep-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies come from this interpreter's site-packages (a path entry, so its .pth files,
    # and with them any editable install of poisonsweep, are not run)
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "dependencies.pth").write_text("\n".join(deps) + "\n")
    installed = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    names = {line.split("/")[0] for line in subprocess.run(
        [sys.executable, "-m", "zipfile", "-l", str(wheel)], capture_output=True, text=True).stdout.split()
        if "/" in line}
    assert names == {"poisonsweep", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}

    user = tmp_path / "user_project"
    (user / "engine").mkdir(parents=True)
    (user / "engine" / "__init__.py").write_text("WHOSE = 'the user'\n")
    (user / "tasks.py").write_text("WHOSE = 'the user'\n")
    code = ("import poisonsweep, poisonsweep.engine.config, poisonsweep.tasks.trial, engine, tasks, sys\n"
            "assert engine.WHOSE == tasks.WHOSE == 'the user'\n"
            "assert 'site-packages' in poisonsweep.__file__, poisonsweep.__file__\n"
            "assert 'ray' not in sys.modules\n"
            "from poisonsweep.tasks.registry import NEEDS\n"
            "print(poisonsweep.run.__module__, poisonsweep.run_trial.__module__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([str(python), "-c", code], cwd=user, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["poisonsweep.engine.api", "poisonsweep.engine.api"]


TINY = {"name": "api", "data": {"name": "digits", "n_train": 200, "n_test": 100},
        "poison": {"method": "one_shift", "rate": 0.1}, "model": {"name": "mlp", "params": {"hidden": 16, "depth": 1}},
        "train": {"epochs": 1}, "detectors": ["loss"], "sweep": {"seed": [0, 1]}}


def test_run_trial_runs_one_trial_without_ray():
    rows = poisonsweep.run_trial(TINY, overrides=["sweep.seed=[3]"], log=lambda _: None)
    (trial,) = rows.tables["trials"]
    assert trial["n_train"] == 200 and trial["n_poisoned"] == 20
    assert [d["detector"] for d in rows.tables["detections"]] == ["loss"]
    with pytest.raises(poisonsweep.ConfigError, match="index 5"):
        poisonsweep.run_trial(TINY, index=5)


@pytest.fixture
def ray_stopped_after():
    yield
    import ray

    ray.shutdown()  # run() started Ray in this process; later tests start their own


@pytest.mark.slow  # starts Ray or a subprocess
def test_run_load_report_through_the_python_api(tmp_path, ray_stopped_after):
    notes = []
    outcome = poisonsweep.run(TINY, out=str(tmp_path / "out"), echo=notes.append)
    assert (outcome.ran, outcome.skipped, outcome.failed) == (2, 0, {})
    tables = poisonsweep.load(outcome.out)
    assert tables["trials"].num_rows == 2 and set(tables["trials"].column("status").to_pylist()) == {"ok"}
    detections = poisonsweep.load(outcome.out, ["detections"], as_pandas=True)["detections"]
    assert list(detections["detector"]) == ["loss", "loss"]
    assert list(poisonsweep.load(outcome.out, "trials")) == ["trials"]  # one name is one table
    again = poisonsweep.run(TINY, out=str(tmp_path / "out"))
    assert (again.ran, again.skipped) == (0, 2)  # resumed: nothing to do
    page = poisonsweep.report(outcome.out, tmp_path / "report").html
    assert Path(page).is_file()
    with pytest.raises(poisonsweep.ConfigError, match="poison.rate"):
        poisonsweep.run({**TINY, "poison": {"method": "one_shift", "rate": 2}}, out=str(tmp_path / "bad"))
    with pytest.raises(poisonsweep.ConfigError, match="unknown table"):
        poisonsweep.load(outcome.out, ["nope"])
