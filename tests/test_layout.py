"""The science runs without Ray and on Windows: importing every tasks module never imports ray, and
works without ``fcntl``."""

import pytest
import pkgutil
import subprocess
import sys
from pathlib import Path

from poisonsweep import tasks


def _import_every_tasks_module(prelude: str = "", check: str = "") -> list[str]:
    """Import every module under tasks/ in a fresh interpreter after ``prelude``, then run ``check``."""
    modules = [m.name for m in pkgutil.walk_packages(tasks.__path__, "poisonsweep.tasks.")]
    code = "import importlib, sys\n" + prelude + \
        "".join(f"importlib.import_module({m!r})\n" for m in modules) + check
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parents[1], timeout=120)
    assert result.returncode == 0, result.stderr
    return modules


@pytest.mark.slow  # starts Ray or a subprocess
def test_tasks_never_import_ray():
    modules = _import_every_tasks_module(
        check="assert 'ray' not in sys.modules, [m for m in sys.modules if m.startswith('ray')]\n")
    assert len(modules) > 10


@pytest.mark.slow  # starts Ray or a subprocess
def test_tasks_import_without_fcntl():
    # Windows has no fcntl: a None entry in sys.modules makes every `import fcntl` raise ImportError
    modules = _import_every_tasks_module(prelude="sys.modules['fcntl'] = None\n",
                                         check="assert sys.modules['fcntl'] is None\n")
    assert {"poisonsweep.tasks.poisons", "poisonsweep.tasks.poisons.flip", "poisonsweep.tasks.trial"} <= set(modules)
