"""Benchmarks' child processes: one command in a fresh process (its wall time, exit code, output
and its own peak memory), and settings run in alternation."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
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


def alternate(names, rounds: int, run, out: str, meta: dict) -> list[dict]:
  """``run(name, round, workdir) -> dict`` for every name in turn, ``rounds`` times, so a busy
  spell of the machine hits every setting alike; each run gets a fresh workdir, and every
  finished run is printed and written to ``out`` at once, so a later failure keeps it."""
  runs = []
  root = tempfile.mkdtemp(prefix='alternate-')
  try:
    for r in range(rounds):
      for name in names:
        runs.append(run(name, r, os.path.join(root, f'{name}-{r}')))
        print(json.dumps(runs[-1], ensure_ascii=False), flush=True)
        with open(out, 'w') as f:
          json.dump({**meta, 'runs': runs}, f, indent=1, ensure_ascii=False)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  return runs
