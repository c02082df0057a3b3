"""Peak memory of ``read_idx`` on a decompression bomb (issue 22 point 11).

A gzipped IDX file whose header declares 60000 x 28 x 28 bytes (47 MB) but which inflates to 3 GiB. The
reader must stop after the header's size; run ``measure`` with ``PYTHONPATH`` pointing at another checkout to
measure that checkout's reader.

Usage::

    python benchmarks/bench_idx_bomb.py build [PATH]
    python benchmarks/bench_idx_bomb.py measure [PATH]
"""

from __future__ import annotations

import gzip
import resource
import struct
import sys
import time
from pathlib import Path

DEFAULT = "/tmp/idx-bomb/train-images-idx3-ubyte.gz"


def build(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(bytes([0, 0, 0x08, 3]) + struct.pack(">III", 60000, 28, 28))
        block = bytes(2**24)
        for _ in range(3 * 2**30 // 2**24):
            f.write(block)
    print(f"{path}: {path.stat().st_size / 1e6:.0f} MB gzipped")


def measure(path: Path) -> None:
    from poisonsweep.tasks.data.readers import read_idx

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.time()
    try:
        read_idx(path)
        outcome = "read in full"
    except Exception as error:  # the outcome is what we report
        outcome = f"{type(error).__name__}: {str(error)[:120]}"
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"+{grown:.0f} MB peak RSS, {time.time() - start:.1f} s, {outcome}")


if __name__ == "__main__":
    step, target = sys.argv[1], Path(sys.argv[2] if len(sys.argv) > 2 else DEFAULT)
    {"build": build, "measure": measure}[step](target)
