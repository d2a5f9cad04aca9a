"""Run a command in a fresh process and measure its wall time and peak RSS."""
from __future__ import annotations

import os
import subprocess
import tempfile
import time


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes of this command's process tree, stdout).

    os.wait4 reports the resource use of that one child (and the children it waited for),
    so several commands measured from one process each get their own peak.
    """
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t0
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if child.returncode:
            raise subprocess.CalledProcessError(child.returncode, cmd, out.read(), err.read())
        return wall, usage.ru_maxrss * 1024, out.read()
