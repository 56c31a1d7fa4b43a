"""The fork server (tests/forkserver.py) is faithful: a command forked from it behaves as the same
command in a plain `python` process, in status, output, files, threads and signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import forkserver
from tests.conftest import ROOT, TINY_LM, logged, run_dirs
from tests.test_faults import command, wait_for_step

THREADS = """
import os, sys, torch
x = torch.randn(512, 512)
for _ in range(20):
    x = torch.tanh(x @ x)  # a parallel op: the pool starts its threads
print(torch.get_num_threads(), len(os.listdir("/proc/self/task")))
"""

ECHO = """
import sys
data = sys.stdin.read()
print("out:", data.upper(), end="")
print("err:", len(data), file=sys.stderr)
sys.exit(int(data.split()[-1]))
"""


def both(argv: list[str], cwd_root: Path, env: dict | None = None, **kwargs):
    """Run argv through the fork server and as a plain subprocess, each in a folder of its own."""
    results = {}
    for how in ("forked", "plain"):
        cwd = cwd_root / how
        cwd.mkdir(exist_ok=True)
        full_env = {**os.environ, "BIGMODEL_ROOT": str(cwd), **(env or {})}
        run = forkserver.run if how == "forked" else subprocess.run
        argv_here = [a.replace("{cwd}", str(cwd)) for a in argv]
        results[how] = run(
            argv_here, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300, **kwargs
        )
    return results["forked"], results["plain"]


def normal(text: str, cwd: Path) -> list[str]:
    """Output lines with what differs between any two runs made the same: the run's folder,
    dates and times, figures with a decimal point (durations, it/s), and the progress bar's
    lines (its column widths follow the it/s figure)."""
    text = text.replace(str(cwd), "CWD")
    text = re.sub(r"\d{4}-\d{2}-\d{2}[_ ]\d{2}[-:]\d{2}[-:]\d{2}([,_.]\d+)?", "TIME", text)
    text = re.sub(r"\d+\.\d+(e[-+]?\d+)?", "F", text)
    bar = re.compile(r"^(Epoch \d|Testing|Validation|Predicting|\s{20,}\S)")
    return [line.rstrip() for line in text.splitlines() if not bar.match(line)]


def files(root: Path) -> list[str]:
    """Every file under root, by its path with run-folder timestamps made the same."""
    paths = (str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return sorted(re.sub(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+", "TIME", p) for p in paths)


def test_the_server_forks_from_one_thread_and_children_take_their_threads(tmp_path):
    """No thread pool is forked (a forked OpenMP pool hangs), and a child runs parallel torch
    ops with the threads its OMP_NUM_THREADS asks for, as a fresh interpreter does."""
    server = forkserver.server()
    assert len(os.listdir(f"/proc/{server.proc.pid}/task")) == 1
    (tmp_path / "threads.py").write_text(THREADS)
    for n in ("1", "2"):
        forked, plain = both(
            [sys.executable, str(tmp_path / "threads.py")], tmp_path, {"OMP_NUM_THREADS": n}
        )
        assert forked.returncode == plain.returncode == 0, forked.stderr + plain.stderr
        # torch's threads are the same; the process may hold more (the BLAS pools of libraries
        # the server preloads, which train.py loads too)
        threads, tasks = map(int, forked.stdout.split())
        assert threads == int(plain.stdout.split()[0]) == int(n) and tasks >= int(n)
    # without the variable: torch's own default, the machine's cores
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    forked = forkserver.run([sys.executable, str(tmp_path / "threads.py")], env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    plain = subprocess.run([sys.executable, str(tmp_path / "threads.py")], env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert forked.stdout.split()[0] == plain.stdout.split()[0]


def test_a_child_trains_with_two_threads(tmp_path):
    forked, plain = both(
        [sys.executable, str(ROOT / "train.py"), *TINY_LM, "test=false"],
        tmp_path,
        {"OMP_NUM_THREADS": "2"},
    )
    assert forked.returncode == plain.returncode == 0, forked.stderr[-3000:]
    # the same arithmetic in both: two threads give the same losses as two threads
    forked_run, plain_run = run_dirs(tmp_path / "forked"), run_dirs(tmp_path / "plain")
    assert logged(forked_run[0], "train/loss") == logged(plain_run[0], "train/loss")


def test_stdin_stdout_stderr_and_status_are_the_commands_own(tmp_path):
    (tmp_path / "echo.py").write_text(ECHO)
    forked, plain = both([sys.executable, str(tmp_path / "echo.py")], tmp_path, input="a b 7")
    assert (forked.returncode, forked.stdout, forked.stderr) == (7, "out: A B 7", "err: 5\n")
    assert (plain.returncode, plain.stdout, plain.stderr) == (7, "out: A B 7", "err: 5\n")


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("train", [*TINY_LM, "logger=csv"]),
        (
            "sweep",
            [
                "-m",
                "optimizer=adam,sgd",
                *TINY_LM,
                "trainer.max_steps=2",
                "trainer.val_check_interval=2",
                "test=false",
            ],
        ),  # fmt: skip
        ("bad key", ["trainer.max_step=3"]),
        ("traceback", ["trainer.max_step=3"]),  # HYDRA_FULL_ERROR=1: Hydra's whole traceback
        ("missing data", ["data.path={cwd}/nowhere.txt", *TINY_LM]),
    ],
)
def test_a_command_through_the_server_is_the_command_in_a_plain_process(tmp_path, name, args):
    """Exit status, every line of stdout and stderr (times aside), the files written, and the
    arithmetic (losses bit for bit)."""
    env = {"HYDRA_FULL_ERROR": "1"} if name == "traceback" else {}
    forked, plain = both([sys.executable, str(ROOT / "train.py"), *args], tmp_path, env)
    assert forked.returncode == plain.returncode, (forked.stderr[-2000:], plain.stderr[-2000:])
    f_cwd, p_cwd = tmp_path / "forked", tmp_path / "plain"
    assert normal(forked.stdout, f_cwd) == normal(plain.stdout, p_cwd)
    assert normal(forked.stderr, f_cwd) == normal(plain.stderr, p_cwd)
    assert files(f_cwd) == files(p_cwd)
    if name == "traceback":
        assert "Traceback (most recent call last)" in forked.stderr
    if name in ("train", "sweep"):
        kind = "multiruns" if name == "sweep" else "runs"
        f_runs = sorted(p for p in (f_cwd / "logs" / "train" / kind).rglob("metrics.csv"))
        p_runs = sorted(p for p in (p_cwd / "logs" / "train" / kind).rglob("metrics.csv"))
        assert len(f_runs) == len(p_runs) == (2 if name == "sweep" else 1)
        for f, p in zip(f_runs, p_runs, strict=True):
            assert logged(f.parent.parent, "train/loss") == logged(p.parent.parent, "train/loss")


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_run_is_answered_as_by_a_plain_process(tmp_path, sig, status):
    """The run saves where it stopped and exits with the signal's status, forked or not."""
    results = {}
    for how in ("forked", "plain"):
        root = tmp_path / how
        root.mkdir()
        run_dir = root / "run"
        argv = [sys.executable, str(ROOT / "train.py"), *command(root, run_dir, max_steps=400)]
        env = {**os.environ, "BIGMODEL_ROOT": str(root), "OMP_NUM_THREADS": "1"}
        popen = forkserver.popen if how == "forked" else subprocess.Popen
        proc = popen(argv, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True)  # fmt: skip
        assert isinstance(proc, forkserver.ForkedPopen) == (how == "forked")
        seen = wait_for_step(proc, run_dir, 10)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
        import torch

        step = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        assert seen + 1 <= step < 400
        results[how] = (proc.returncode, normal(stderr, root)[-1:], "Traceback" in stderr)
    assert results["forked"] == results["plain"]
    assert results["forked"][0] == status and not results["forked"][2]


def test_python_c_and_python_m_are_served_as_python_runs_them(tmp_path):
    """sys.argv, sys.path[0], __name__ and a traceback from `-c` code and a `-m` module."""
    code = "import sys; print(sys.argv, repr(sys.path[0]), __name__); 1 / int(sys.argv[1])"
    module = code.replace("; 1 /", "\nif __name__ == '__main__':\n    1 /")
    for how in ("forked", "plain"):  # a module in the folder each command runs from
        (tmp_path / how).mkdir()
        (tmp_path / how / "mod_here.py").write_text(module)
    for argv in ([sys.executable, "-c", code, "0"], [sys.executable, "-m", "mod_here", "0"]):
        assert forkserver.servable(argv, None, {})
        forked, plain = both(argv, tmp_path)
        f_cwd, p_cwd = tmp_path / "forked", tmp_path / "plain"
        assert forked.returncode == plain.returncode == 1
        assert normal(forked.stdout, f_cwd) == normal(plain.stdout, p_cwd)
        assert normal(forked.stderr, f_cwd) == normal(plain.stderr, p_cwd)
        assert "ZeroDivisionError" in forked.stderr


def test_what_the_server_cannot_reproduce_runs_in_a_plain_process(tmp_path):
    """Interpreter flags and start-up variables need a fresh interpreter: popen falls back."""
    script = tmp_path / "s.py"
    script.write_text("import sys; print(sys.flags.optimize)")
    cases = [
        ([sys.executable, "-O", str(script)], {}, "1"),
        ([sys.executable, str(script)], {"PYTHONOPTIMIZE": "1"}, "1"),
        ([sys.executable, str(script)], {}, "0"),
    ]
    for argv, extra, printed in cases:
        proc = forkserver.popen(argv, env={**os.environ, **extra}, stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
        out, _ = proc.communicate(timeout=120)
        assert out.strip() == printed
        assert isinstance(proc, forkserver.ForkedPopen) == (
            argv[1:2] == [str(script)] and not extra
        )


def test_a_timeout_kills_the_forked_process(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import time\nprint('up', flush=True)\ntime.sleep(60)\n")
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):  # as subprocess.run: killed, then raised
        forkserver.run([sys.executable, str(script)], capture_output=True, timeout=3)
    assert time.monotonic() - start < 30
    proc = forkserver.popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "up\n"
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.5)
    assert proc.poll() is None and Path(f"/proc/{proc.pid}").exists()
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not Path(f"/proc/{proc.pid}").exists()
