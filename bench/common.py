"""What the benchmarks share: timing a whole process, and the newest run's logged metrics."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def timed(
    cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[float, str]:
    """(wall seconds, stdout) of one whole process; a failure stops the benchmark."""
    t = time.perf_counter()
    proc = subprocess.run(
        cmd, env={**os.environ, **(env or {})}, cwd=cwd, capture_output=True, text=True
    )
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def newest_run(work: Path, task: str = "train") -> Path:
    return max((work / "logs" / task / "runs").iterdir(), key=lambda p: p.stat().st_mtime)


def logged(run: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every row of metrics.csv that logged `key`."""
    with open(run / "csv" / "metrics.csv") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


def ms_per_batch(run: Path) -> float:
    """Training ms per batch from ThroughputMonitor's clock (validation excluded), after the
    first tenth of the logged rows (warm-up)."""
    t, b = logged(run, "train/time"), logged(run, "train/batches")
    (_, t_a), (_, b_a) = t[len(t) // 10], b[len(b) // 10]
    return 1000 * (t[-1][1] - t_a) / (b[-1][1] - b_a)
