"""Faults injected for real into a training subprocess: SIGKILL at random points and during a
checkpoint write, SIGTERM / SIGINT / SIGUSR1, a checkpoint write that the kernel refuses. Each
time the same command is run again (resume=auto in a fixed run directory) and must end where an
uninterrupted run ends, bit for bit.
"""

from __future__ import annotations

import csv
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import forkserver
from tests.conftest import ROOT, TINY_LM, run_cli
from tests.test_resume import assert_same_end, corpus

INTERVAL = 5  # callbacks.last_checkpoint.every_n_train_steps
ENV = {"OMP_NUM_THREADS": "1"}


def command(root: Path, run_dir: Path, max_steps: int = 120) -> list[str]:
    return [
        *TINY_LM,
        f"data.path={corpus(root)}",
        "model.net.dropout=0.1",
        f"trainer.max_steps={max_steps}",
        "trainer.val_check_interval=40",
        "trainer.log_every_n_steps=1",
        f"callbacks.last_checkpoint.every_n_train_steps={INTERVAL}",
        # every logged step reaches the file at once, so the test sees how far training got
        "+logger.csv.flush_logs_every_n_steps=1",
        "test=false",
        f"hydra.run.dir={run_dir}",
    ]


def start(root: Path, args: list[str], fresh: bool = False) -> subprocess.Popen:
    """`python train.py args...` in the background; fresh: a plain interpreter, not forked
    (kill -9 shows what the kernel leaves of a whole interpreter, so those runs start cold)."""
    popen = subprocess.Popen if fresh else forkserver.popen
    return popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=root,
        env={**os.environ, "BIGMODEL_ROOT": str(root), **ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def last_logged_step(run_dir: Path) -> int:
    """The newest step with a train/loss row in metrics.csv (-1 while there is none)."""
    try:
        with open(run_dir / "csv" / "metrics.csv") as f:
            steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    except (OSError, csv.Error, KeyError, ValueError):
        return -1
    return max(steps, default=-1)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}:\n{proc.stderr.read()}")
        if (seen := last_logged_step(run_dir)) >= step:
            return seen
        time.sleep(0.02)
    raise AssertionError(f"step {step} was not reached in {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    run_cli("train.py", *command(root, root / "run"), cwd=root, env=ENV)
    return root / "run"


@pytest.mark.slow  # CI runs it after the fast suite
def test_sigkill_at_random_points_and_during_a_save_then_the_same_command(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    args = command(tmp_path, run_dir)
    rng = random.Random(int(os.environ.get("FAULT_SEED", "0")) or None)
    targets = sorted(rng.sample(range(8, 100), 3))
    for target in targets:  # kill -9 once training has logged `target` steps
        proc = start(tmp_path, args, fresh=True)
        seen = wait_for_step(proc, run_dir, target)
        proc.kill()
        proc.wait()
        saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
        # row `seen` is logged after its optimizer step: seen + 1 steps were done
        lost = seen + 1 - saved["global_step"]
        print(
            f"SIGKILL after step {seen + 1}: last.ckpt at step {saved['global_step']}, {lost} lost"
        )
        assert 0 <= lost <= INTERVAL, (target, seen, saved["global_step"])

    # once more, now during a write of last.ckpt: kill -9 as soon as its temporary file appears
    proc = start(tmp_path, args, fresh=True)
    ckpt_dir = run_dir / "checkpoints"
    deadline, partial = time.monotonic() + 120, []
    while not partial and proc.poll() is None and time.monotonic() < deadline:
        partial = [f for f in os.listdir(ckpt_dir) if f.startswith(".last.ckpt.")]
    assert partial, "no checkpoint write was caught"
    proc.kill()
    proc.wait()
    # the previous last.ckpt is whole; the cut-off write is a separate file, removed next time
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] > 0

    proc = run_cli("train.py", *args, cwd=tmp_path, env=ENV)  # the same command, to the end
    assert "resume=auto: continuing from" in proc.stdout + proc.stderr
    assert not [f for f in os.listdir(ckpt_dir) if f.endswith(".tmp")]
    assert_same_end(uninterrupted, run_dir, since=0)  # every logged row, before and after


@pytest.mark.parametrize(
    ("sig", "status"),
    [
        # CI runs these after the fast suite (-m slow)
        pytest.param(signal.SIGTERM, 143, marks=pytest.mark.slow),
        pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),
        pytest.param(signal.SIGUSR1, 138, marks=pytest.mark.slow),
    ],
)
def test_a_stop_signal_saves_exits_non_zero_and_the_same_command_continues(
    tmp_path, uninterrupted, sig, status
):
    run_dir = tmp_path / "run"
    args = command(tmp_path, run_dir)
    proc = start(tmp_path, args)
    seen = wait_for_step(proc, run_dir, 30)
    proc.send_signal(sig)
    time.sleep(0.005)
    proc.send_signal(sig)  # a second one, likely during the save: it must not tear the file
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == status, stderr[-3000:]
    assert "Traceback" not in stderr

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    # saved at the step it stopped at, not at the last cadence write
    assert seen + 1 <= ckpt["global_step"] < 120
    state = {"sigterm": True, "step": ckpt["global_step"], "signal": sig.name}
    assert state in ckpt["callbacks"].values()

    run_cli("train.py", *args, cwd=tmp_path, env=ENV)
    assert_same_end(uninterrupted, run_dir, since=0)


@pytest.mark.slow  # CI runs it after the fast suite
def test_a_failed_checkpoint_write_stops_the_run_with_one_line_and_keeps_the_previous(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("train.py", *command(tmp_path, run_dir, max_steps=10), cwd=tmp_path, env=ENV)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    size = len(before)

    def small_files() -> None:  # the kernel refuses writes past half a checkpoint (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    # a plain interpreter: the file-size limit is set between fork and exec (preexec_fn)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *command(tmp_path, run_dir, max_steps=20)],
        cwd=tmp_path,
        env={**os.environ, "BIGMODEL_ROOT": str(tmp_path), **ENV},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_files,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not write the checkpoint" in errors[0], proc.stderr
    assert "File too large" in errors[0] and "the previous one is kept" in errors[0]
    assert ckpt.read_bytes() == before  # untouched, and still loadable
    assert torch.load(ckpt, weights_only=True)["global_step"] == 10
    assert not [f for f in os.listdir(ckpt.parent) if f.endswith(".tmp")]


@pytest.mark.slow  # CI runs it after the fast suite
def test_a_signal_during_validation_stops_the_run_after_the_validation(tmp_path):
    def args(run_dir: Path) -> list[str]:
        return [
            *command(tmp_path, run_dir, max_steps=40),
            "trainer.val_check_interval=20",
            "data.path=null",  # the embedded corpus, all of its validation split: 91 batches,
            "data.max_eval_windows=null",  # long enough for the signal to land among them
        ]

    run_cli("train.py", *args(tmp_path / "full"), cwd=tmp_path, env=ENV)
    run_dir = tmp_path / "run"
    proc = start(tmp_path, args(run_dir))
    wait_for_step(proc, run_dir, 19)  # row 19 is written as the validation at step 20 starts
    time.sleep(0.03)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    # it stopped once the validation was done, before the next step
    assert ckpt["global_step"] == 20
    val = ckpt["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["current"]
    assert val["completed"] == val["ready"] == 91
    run_cli("train.py", *args(run_dir), cwd=tmp_path, env=ENV)
    assert_same_end(tmp_path / "full", run_dir, since=0, metrics=("train/loss", "val/loss"))


CSV_WRITER = """
import resource, signal, sys
from bigmodel.loggers import ContinuingCSVLogger

root, first, count, extra, limit = sys.argv[1], *map(int, sys.argv[2:6])
writer = ContinuingCSVLogger(save_dir=root, name="csv", version="").experiment
if limit:  # the kernel stops the process (SIGXFSZ) when a write passes `limit` bytes
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; the default kills
for step in range(first, first + count):
    metrics = {"train/loss": 1.0 / (step + 1), **({"val/loss": 0.5} if extra else {})}
    writer.log_metrics(metrics, step)
writer.save()
"""


def test_metrics_csv_keeps_every_row_when_a_rewrite_is_killed(tmp_path):
    """metrics.csv is rewritten on resume and when a new metric widens its header; a process
    killed by the kernel in the middle of that rewrite must leave every row it had."""

    def write(first: int, count: int, extra: int = 0, limit: int = 0) -> int:
        args = [str(tmp_path), str(first), str(count), str(extra), str(limit)]
        cmd = [sys.executable, "-c", CSV_WRITER, *args]
        return forkserver.run(cmd, cwd=ROOT, capture_output=True).returncode

    def steps() -> list[int]:
        with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
            return [int(r["step"]) for r in csv.DictReader(f)]

    assert write(0, 2000) == 0
    size = (tmp_path / "csv" / "metrics.csv").stat().st_size
    # resumed at step 2000, logging a new metric; killed half-way through the rewrite
    assert write(2000, 1, extra=1, limit=size // 2) == -signal.SIGXFSZ
    assert steps() == list(range(2000))
    # a row cut short by a kill during an append is dropped, not read as a wrong step
    with open(tmp_path / "csv" / "metrics.csv", "a") as f:
        f.write("20")  # step 2000's row, cut after two digits
    assert write(2000, 5, extra=1) == 0
    assert steps() == list(range(2005))
    assert not list((tmp_path / "csv").glob("*.tmp"))  # the cut-off rewrite's file is gone
