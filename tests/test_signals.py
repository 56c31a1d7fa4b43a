"""A training run told to stop (SIGTERM) mid-training saves last.ckpt and resumes from that step."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.conftest import ROOT, TINY_LM, run_cli, run_dirs

MAX_STEPS = 5000  # far more than the run gets through before it is stopped


def logged_losses(metrics_csv: Path) -> list[tuple[int, float]]:
    """(step, train/loss) rows of a run's csv/metrics.csv; [] while it is not yet readable."""
    try:
        with metrics_csv.open() as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error):
        return []
    return [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]


def test_sigterm_mid_training_saves_last_ckpt_and_resumes_from_that_step(tmp_path):
    args = [
        *TINY_LM,
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.val_check_interval=1000",
        "trainer.log_every_n_steps=1",
        # every logged step reaches the file at once, so the test sees training under way
        "+logger.csv.flush_logs_every_n_steps=1",
        "test=false",
    ]
    env = {**os.environ, "BIGMODEL_ROOT": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        seen: list[tuple[int, float]] = []
        while time.monotonic() < deadline and proc.poll() is None:
            found = list((tmp_path / "logs").glob("train/runs/*/csv/metrics.csv"))
            seen = logged_losses(found[0]) if found else []
            if len(seen) >= 5:  # optimizer steps are being taken
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"the run ended before it was stopped:\n{proc.stderr.read()}"
        assert len(seen) >= 5, "no training steps were logged in time"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # a stopped run is not a finished one: 128 + SIGTERM, as a shell reports it
    assert proc.returncode == 143, stderr[-3000:]

    (run,) = run_dirs(tmp_path)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    step = ckpt["global_step"]
    # saved mid-training: after the steps seen before the signal, long before the end
    assert 0 < seen[-1][0] <= step < MAX_STEPS, (seen[-1], step)
    assert {"sigterm": True, "step": step} in ckpt["callbacks"].values()
    losses_before = logged_losses(run / "csv" / "metrics.csv")
    assert losses_before[-1][0] < step

    # the same command with ckpt_path=last (README "Stopping and resuming"), 4 more steps
    run_cli(
        "train.py",
        *TINY_LM,
        "ckpt_path=last",
        f"trainer.max_steps={step + 4}",
        "trainer.log_every_n_steps=1",
        "test=false",
        cwd=tmp_path,
    )
    (resumed,) = [r for r in run_dirs(tmp_path) if r != run]
    after = logged_losses(resumed / "csv" / "metrics.csv")
    assert [s for s, _ in after] == [step, step + 1, step + 2, step + 3]
    # the weights came back too: its first loss is the stopped run's, not a fresh net's
    assert after[0][1] < losses_before[0][1] - 0.3, (losses_before[0], after[0])
    # (last.ckpt of the resumed run is written at its validations only, so its step depends on
    # where the signal fell; the logged steps above are the check that it continued.)
