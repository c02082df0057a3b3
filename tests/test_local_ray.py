"""A private local Ray (``poisonsweep run`` without ``--address``) listens on the loopback only.

Checked with ``ss -ltnpH``: every listening TCP socket of the driver's process tree (GCS, raylet,
workers, agents, the driver's own core worker) after one task has run. Skipped where ``ss`` is absent.
"""

import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test starts Ray, a subprocess or a server

SCRIPT = r"""
import os, subprocess
import ray
from ray._private import ray_constants
from poisonsweep.engine.cluster import init_ray

init_ray(None, False)
assert ray.get(ray.remote(lambda: 1).remote()) == 1
assert ray_constants.ENABLE_RAY_CLUSTER  # restored for a later ray.init in this process
table = [line.split(None, 2) for line in subprocess.run(["ps", "-e", "-o", "pid=,ppid=,comm="], capture_output=True,
                                                        text=True).stdout.splitlines()]
tree, grew = {os.getpid()}, True
while grew:
    grew = {int(pid) for pid, ppid, _ in table if int(ppid) in tree} - tree
    tree |= grew
for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
    if any(f"pid={pid}," in line for pid in tree):
        print("LISTEN", line.split()[3])
ray.shutdown()
"""

LOOPBACK = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")


@pytest.mark.skipif(shutil.which("ss") is None or shutil.which("ps") is None, reason="needs ss and ps")
def test_a_local_ray_listens_on_the_loopback_only():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=180,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    listening = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("LISTEN")]
    assert len(listening) >= 3, result.stdout  # GCS, raylet, the driver's core worker at least
    assert all(address.startswith(LOOPBACK) for address in listening), listening
