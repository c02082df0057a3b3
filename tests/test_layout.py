"""The science runs without Ray: importing every tasks module never imports ray."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import tasks


def test_tasks_never_import_ray():
    modules = [m.name for m in pkgutil.walk_packages(tasks.__path__, "tasks.")]
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) + \
        "assert 'ray' not in sys.modules, [m for m in sys.modules if m.startswith('ray')]\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parents[1], timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(modules) > 10
