"""Run a command in a fresh process and measure its wall time and peak RSS."""
from __future__ import annotations

import resource
import subprocess
import time


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes of the largest child so far, stdout).

    ru_maxrss of RUSAGE_CHILDREN is the maximum over all waited-for children, so run the
    heaviest measurement first or one per process if several are compared.
    """
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, out.stdout
