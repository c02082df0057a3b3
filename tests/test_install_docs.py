"""The README's install lines and the extras they name exist in pyproject.toml (issue 26, point 8)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_analysis_extra_holds_what_the_readme_examples_import():
    readme = (ROOT / "README.md").read_text()
    assert {"polars", "duckdb"} <= _names(_extras()["analysis"])
    assert '".[analysis]"' in readme
    examples = readme.split("<!-- analysis-examples -->", 1)[1].split("<!-- /analysis-examples -->", 1)[0]
    imported = set(re.findall(r"^import (\w+)", examples, flags=re.M)) - {"pandas"}
    assert imported <= _names(_extras()["analysis"]), imported


def test_the_readme_has_a_cpu_only_install_line_and_keeps_its_two_commands():
    readme = (ROOT / "README.md").read_text()
    cpu = [line for line in readme.splitlines() if "download.pytorch.org/whl/cpu" in line]
    assert cpu and all("pip install torch" in line and "pip install -e ." in line for line in cpu)
    assert "pip install -e . && poisonsweep run configs/quickstart.yaml" in readme
    assert 'pip install -e ".[test]" && pytest' in readme


def test_the_mlflow_extra_names_the_client():
    assert "mlflow-skinny" in _names(_extras()["mlflow"])
