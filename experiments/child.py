"""One command in a fresh process: its wall time, exit code, output and its own peak memory."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
import time


@dataclasses.dataclass(frozen=True)
class Finished:
  code: int
  wall: float  # seconds
  peak_rss_gb: float  # this child's own peak resident memory, not the maximum over all children
  output: str  # its stdout and stderr, interleaved


def run_child(command: list[str], cwd: str, env: dict) -> Finished:
  start = time.perf_counter()
  with tempfile.TemporaryFile('w+') as log:
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    log.seek(0)
    return Finished(proc.returncode, wall, usage.ru_maxrss * 1024 / 1e9, log.read())
