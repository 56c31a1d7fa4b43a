"""One run folder, one training at a time (bigmodel.run_folder), for real: two trainings into
the same `hydra.run.dir`, a training killed with SIGKILL, one stopped by Ctrl-C, one ending on
bad input, a DDP run whose second rank re-runs the command in the folder, and a finished run
run again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_LM, popen_cli, run_cli

LOCK = ".run.lock"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def lm(run: Path, max_steps: int, *more: str, test: bool = False) -> list[str]:
    return [
        *TINY_LM,
        f"trainer.max_steps={max_steps}",
        f"test={str(test).lower()}",
        # every logged step reaches the file at once, so the test sees that training runs
        "+logger.csv.flush_logs_every_n_steps=1",
        "trainer.log_every_n_steps=1",
        f"hydra.run.dir={run}",
        *more,
    ]


def start(root: Path, args: list[str]) -> subprocess.Popen:
    return popen_cli(
        "train.py",
        *args,
        cwd=root,
        env=ONE_THREAD,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until_training(proc: subprocess.Popen, run: Path, timeout: float = 120) -> None:
    """Until the run has logged a training step (its lock was taken before that)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{proc.stderr.read()[-3000:]}")
        csv = run / "csv" / "metrics.csv"
        if csv.is_file() and "train/loss" in csv.read_text() and csv.read_text().count("\n") > 1:
            return
        time.sleep(0.05)
    raise AssertionError(f"no training step was logged in {timeout} s")


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def test_a_second_training_into_a_busy_folder_is_refused_with_one_line(tmp_path):
    run = tmp_path / "run"
    first = start(tmp_path, lm(run, 100_000))
    try:
        wait_until_training(first, run)
        record = (run / ".hydra" / "overrides.yaml").read_bytes()
        second = run_cli("train.py", *lm(run, 6), cwd=tmp_path, env=ONE_THREAD, check=False)
        assert second.returncode == 2, output(second)[-3000:]
        (line,) = second.stderr.strip().splitlines()
        assert line.startswith(f"error: {run} is in use by another training (pid {first.pid} ")
        assert "hydra.run.dir" in line
        # nothing of the first run's folder was touched, and it goes on
        assert (run / ".hydra" / "overrides.yaml").read_bytes() == record
        assert not (run / "error.txt").exists()
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C: the run saves, exits 130 and lets go
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr[-3000:]
    assert not (run / LOCK).exists()
    # the folder is free again: the same command continues the stopped run
    again = run_cli("train.py", *lm(run, 6), cwd=tmp_path, env=ONE_THREAD)
    assert "in use" not in output(again)
    assert not (run / LOCK).exists()


def test_the_lock_of_a_killed_training_is_taken_over_with_one_warning(tmp_path):
    run = tmp_path / "run"
    killed = start(tmp_path, lm(run, 100_000))
    wait_until_training(killed, run)
    killed.kill()  # SIGKILL: no exit code of its own runs, the lock stays
    killed.wait()
    assert json.loads((run / LOCK).read_text())["pid"] == killed.pid

    proc = run_cli("train.py", *lm(run, 6), cwd=tmp_path, env=ONE_THREAD)
    (warning,) = [line for line in output(proc).splitlines() if "taking over the lock" in line]
    assert str(run) in warning and f"pid {killed.pid}" in warning
    assert not (run / LOCK).exists()


def write_lock(run: Path, pid: int, start: int | None) -> None:
    import socket

    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK).write_text(
        json.dumps({"pid": pid, "host": socket.gethostname(), "start": start, "since": "then"})
    )


def test_a_lock_is_judged_by_its_process_a_live_one_refuses_a_reused_pid_does_not(tmp_path):
    from bigmodel.run_folder import _process_start

    # a lock of a process that runs (this test's own): refused, and left as it was
    run = tmp_path / "run"
    write_lock(run, os.getpid(), _process_start(os.getpid())[1])
    before = (run / LOCK).read_text()
    proc = run_cli("train.py", *lm(run, 2), cwd=tmp_path, env=ONE_THREAD, check=False)
    assert proc.returncode == 2, output(proc)[-3000:]
    assert f"in use by another training (pid {os.getpid()} " in proc.stderr
    assert (run / LOCK).read_text() == before
    assert not (run / ".hydra").exists()

    # the same pid, but a process started at another time: the pid was reused, the lock is stale
    write_lock(run, os.getpid(), _process_start(os.getpid())[1] - 1)
    proc = run_cli("train.py", *lm(run, 2), cwd=tmp_path, env=ONE_THREAD)
    assert output(proc).count("taking over the lock") == 1
    assert not (run / LOCK).exists()


def test_a_training_that_ends_on_bad_input_lets_go_of_its_folder(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train.py", *lm(run, 2, "resume=sometimes"), cwd=tmp_path, check=False)
    assert proc.returncode == 2, output(proc)[-3000:]
    assert "resume=sometimes is not one of" in proc.stderr
    assert (run / "error.txt").is_file()  # its own folder: the failure is recorded there
    assert not (run / LOCK).exists()


def test_running_a_finished_run_again_keeps_its_metrics(tmp_path):
    run = tmp_path / "run"
    args = lm(run, 12, test=True)
    run_cli("train.py", *args, cwd=tmp_path, env=ONE_THREAD)
    first = json.loads((run / "metrics.json").read_text())
    assert {"val/loss", "test/loss", "train/loss"} <= set(first)

    # the same command: resume=auto finds the finished run, trains nothing, tests again
    run_cli("train.py", *args, cwd=tmp_path, env=ONE_THREAD)
    again = json.loads((run / "metrics.json").read_text())
    assert set(first) <= set(again)
    assert again["val/loss"] == first["val/loss"]
    assert again["test/loss"] == pytest.approx(first["test/loss"], rel=1e-6)
    assert not (run / LOCK).exists()


@pytest.mark.slow  # two processes over gloo: CI runs it after the fast suite
def test_the_second_rank_of_a_ddp_run_shares_the_folder_without_the_lock(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(
        "train.py", *lm(run, 4, "trainer=ddp_cpu"), cwd=tmp_path, env=ONE_THREAD, timeout=600
    )
    assert "in use by another training" not in output(proc)
    assert "taking over the lock" not in output(proc)
    assert not (run / LOCK).exists()
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_a_lock_of_another_host_is_judged_by_its_heartbeat(tmp_path):
    """On a shared file system a pid of another host means nothing here: a lock its holder
    touched lately refuses the run, one silent for longer than STALE_S is taken over."""
    from bigmodel.run_folder import STALE_S

    run = tmp_path / "run"
    run.mkdir()
    lock = run / LOCK
    lock.write_text(json.dumps({"pid": 1, "host": "node-7", "start": 5, "since": "then"}))
    proc = run_cli("train.py", *lm(run, 2), cwd=tmp_path, env=ONE_THREAD, check=False)
    assert proc.returncode == 2, output(proc)[-3000:]
    assert "in use by another training (pid 1 on node-7, since then)" in proc.stderr

    old = time.time() - STALE_S - 60
    os.utime(lock, (old, old))
    proc = run_cli("train.py", *lm(run, 2), cwd=tmp_path, env=ONE_THREAD)
    (warning,) = [line for line in output(proc).splitlines() if "taking over the lock" in line]
    assert f"(pid 1, started then; on node-7, silent for over {STALE_S:.0f} s)" in warning
    assert not lock.exists()


def test_the_holder_of_a_lock_touches_it(tmp_path):
    from bigmodel.run_folder import heartbeat

    lock = tmp_path / LOCK
    lock.write_text("{}")
    os.utime(lock, (0, 0))
    stop = heartbeat(lock, every=0.05)
    deadline = time.time() + 10
    while lock.stat().st_mtime == 0 and time.time() < deadline:
        time.sleep(0.05)
    stop.set()
    assert lock.stat().st_mtime > time.time() - 60
