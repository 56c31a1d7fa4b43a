"""A fork server for the CLI tests: the imports are paid once, each command is still a process.

A CLI test runs `python train.py ...` and looks at what a user's shell would see: the exit
status, stdout and stderr, the files written, the process's answer to a signal. A fresh Python
spends 5-9 s importing torch, Lightning, torchmetrics and Hydra before a tiny run trains for a
fraction of a second, so most of the suite's time went to start-up.

Here one server process per test worker imports those modules once and then forks a fresh child
for each command. The child takes the command's argv, working directory, environment and its own
stdin/stdout/stderr (the test's pipes, passed over a Unix socket), runs the script as `__main__`,
shuts down as the interpreter would (non-daemon threads, atexit, flushed streams) and exits with
the script's status. The test holds a `subprocess.Popen` (`ForkedPopen`) whose pid is the child's:
`communicate`, `wait`, `poll`, `send_signal`, `kill` and timeouts behave as for a plain process.

Faithfulness (each checked in tests/test_forkserver.py against a plain subprocess):
- the server never runs a parallel torch op, so no OpenMP pool is forked; the child sets torch's
  thread count from its own `OMP_NUM_THREADS` as a fresh interpreter would;
- signal dispositions are Python's start-up ones; `random` is reseeded by Python at fork, numpy's
  global generator here;
- a traceback shows the script's frames only; an uncaught KeyboardInterrupt ends the child by
  SIGINT, as CPython does;
- `python script.py`, `python -m module` and `python -c code` are served; a command the server
  cannot reproduce runs as a plain subprocess instead: other interpreter flags (`-X`, `-W`
  ...), `PYTHON*` variables that act at interpreter start (PYTHONPATH: the server's modules
  are already imported), `pass_fds`, `preexec_fn`, another user or group, another executable.

Tests that need a truly fresh interpreter call `subprocess` themselves and say why.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from collections.abc import Sequence

# Variables that CPython reads once at start-up: a command that sets them differently from the
# server's own environment runs as a plain subprocess. (PYTHONUNBUFFERED is applied in the child.)
STARTUP_VARS = (
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONWARNINGS",
    "PYTHONHASHSEED",
    "PYTHONIOENCODING",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONSAFEPATH",
    "PYTHONUTF8",
    "PYTHONDEVMODE",
    "PYTHONFAULTHANDLER",
    "PYTHONTRACEMALLOC",
    "PYTHONOPTIMIZE",
    "PYTHONINSPECT",
    "PYTHONNODEBUGRANGES",
    "PYTHONPYCACHEPREFIX",
    "PYTHONMALLOC",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "MALLOC_CONF",
)
SERVER_FILE = __file__
# What the server imports before it forks: everything an entry point loads before it trains.
PRELOAD = ("torch", "lightning", "torchmetrics", "hydra", "omegaconf", "bigmodel.run")


# ------------------------------------------------------------------------------------ server
def serve(sock_path: str, lifeline: int, default_threads: int) -> None:
    """Accept commands on `sock_path` until the test worker that started us goes away."""
    import select

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(64)
    # children of the server (one waiter per command) are reaped by the kernel
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([listener, lifeline], [], [])
        if lifeline in ready:  # the test worker closed its end: it is gone
            return
        conn, _ = listener.accept()
        if os.fork() == 0:  # the waiter: forks the command's process, reports pid and status
            listener.close()
            os.close(lifeline)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                wait_for_command(conn, default_threads)
            finally:
                os._exit(0)
        conn.close()


def wait_for_command(conn: socket.socket, default_threads: int) -> None:
    msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    request = json.loads(msg)
    pid = os.fork()
    if pid == 0:
        conn.close()
        run_command(request, fds, default_threads)  # never returns
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    conn.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")


def run_command(request: dict, fds: list[int], default_threads: int) -> None:
    """In the forked child: become `python <argv...>` and exit with its status."""
    code = 1
    try:
        if request["new_session"]:
            os.setsid()
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
        for fd in set(fds):
            if fd > 2:
                os.close(fd)
        # Python's start-up dispositions (the server changed SIGCHLD only)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        setup_streams()
        setup_threads(default_threads)
        code = run_main(request["argv"])
    except BaseException:  # a failure of the runner itself, not of the command
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def setup_streams() -> None:
    """stdout is line-buffered on a terminal, block-buffered elsewhere, as at start-up."""
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdout.reconfigure(line_buffering=os.isatty(1), write_through=unbuffered)
    sys.stderr.reconfigure(line_buffering=True, write_through=unbuffered)


def setup_threads(default_threads: int) -> None:
    """torch's intra-op threads as a fresh process would take them from its environment."""
    import torch

    wanted = os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS")
    try:
        n = int(wanted) if wanted else default_threads
    except ValueError:
        n = default_threads
    torch.set_num_threads(max(n, 1))
    # numpy's BLAS pool, which the server started with one thread
    blas = next(
        (os.environ[v] for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS") if v in os.environ),
        None,
    )
    blas_threads = int(blas) if blas and blas.isdigit() else os.cpu_count() or 1
    if blas_threads != 1:
        from threadpoolctl import threadpool_limits

        threadpool_limits(blas_threads, user_api="blas")
    if "numpy" in sys.modules:  # its global generator is seeded from the OS in a fresh process
        sys.modules["numpy"].random.seed()


def run_main(argv: list[str]) -> int:
    """Run `argv[1:]` (a script, `-m module` or `-c code`) as `__main__`; the exit status
    CPython gives."""
    kind = argv[1]
    if kind == "-m":
        module, sys.argv = argv[2], ["-m", *argv[3:]]
        sys.path[0] = os.getcwd()
        entry = None
    elif kind == "-c":
        source, sys.argv = argv[2], ["-c", *argv[3:]]
        sys.path[0] = ""
        entry = "<string>"
    else:
        script = os.path.abspath(kind)
        sys.argv = argv[1:]
        sys.path[0] = os.path.dirname(script)
        entry = script
    # a `__main__` of the command's own (the server's stays as it is)
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = main
    try:
        try:
            if entry is None:
                runpy._run_module_as_main(module, alter_argv=True)  # what `python -m` calls
            elif entry == "<string>":
                exec(compile(source, "<string>", "exec"), main.__dict__)
            else:
                runpy.run_path(entry, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = exit_status(e)
        except KeyboardInterrupt as e:
            print_traceback(e, entry)
            shutdown()
            # CPython ends by SIGINT after an uncaught KeyboardInterrupt (status -2 to a parent)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            return 130
        except BaseException as e:
            print_traceback(e, entry)
            code = 1
        shutdown()
        return code
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()


def exit_status(e: SystemExit) -> int:
    """What `sys.exit(x)` makes the status: None 0, an int itself, anything else printed, 1."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    print(e.code, file=sys.stderr)
    return 1


def print_traceback(e: BaseException, entry: str | None) -> None:
    """The traceback a plain run prints: frames from the script on (runpy's and ours cut)."""
    tb = e.__traceback__
    if entry is not None:  # a script or -c: its frames only
        while tb is not None and tb.tb_frame.f_code.co_filename != entry:
            tb = tb.tb_next
    else:  # -m: from runpy's _run_module_as_main on, as `python -m` shows it
        while tb is not None and tb.tb_frame.f_code.co_filename == SERVER_FILE:
            tb = tb.tb_next
    tb = tb or e.__traceback__
    sys.excepthook(type(e), e.with_traceback(tb), tb)


def shutdown() -> None:
    """The end of Py_FinalizeEx: join non-daemon threads, run atexit, flush."""
    try:
        threading._shutdown()  # type: ignore[attr-defined]
    except Exception:
        traceback.print_exc()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def main_server(argv: Sequence[str]) -> None:
    sock_path, lifeline = argv[0], int(argv[1])
    os.set_inheritable(lifeline, False)
    # torch's default thread count, as a fresh interpreter without OMP_NUM_THREADS computes it
    # (asked of one, while this one imports)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    ask = subprocess.Popen(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    import importlib
    import logging

    # The entry points import these inside the Hydra task, after Hydra has configured logging;
    # Lightning adds a handler of its own when imported before that. Import them as they are.
    stand_in = logging.NullHandler()
    logging.getLogger().addHandler(stand_in)
    for name in PRELOAD:
        importlib.import_module(name)
    logging.getLogger().removeHandler(stand_in)
    default_threads = int(ask.communicate()[0])
    # a forked thread pool hangs the child: nothing may have started one here
    threads = os.listdir("/proc/self/task")
    if len(threads) != 1:
        raise RuntimeError(f"the fork server has {len(threads)} threads after its imports")
    serve(sock_path, lifeline, default_threads)


# ------------------------------------------------------------------------------------ client
class Server:
    """The server of this test worker, started at first use and gone when the worker exits."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="bm-fork-")
        self.path = os.path.join(self.dir, "sock")
        read, self.lifeline = os.pipe()
        # one thread for the pools that start at import (OpenBLAS): the server must not fork
        # threads; each child sets its pools from its own environment
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, self.path, str(read)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            pass_fds=(read,),
            text=True,
        )
        os.close(read)
        os.set_inheritable(self.lifeline, False)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the fork server did not start (exit {self.proc.wait()})")
        self.env = dict(os.environ)

    def connect(self) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        return conn


_server: Server | None = None
_server_pid: int | None = None


def server() -> Server:
    global _server, _server_pid
    if _server is None or _server_pid != os.getpid() or _server.proc.poll() is not None:
        _server, _server_pid = Server(), os.getpid()
    return _server


def servable(args: Sequence[str], env: dict | None, kwargs: dict) -> bool:
    """Whether the fork server reproduces `args` exactly (else a plain subprocess runs it)."""
    if isinstance(args, (str, bytes)) or len(args) < 2 or kwargs.get("shell"):
        return False
    if os.fspath(args[0]) != sys.executable:
        return False
    first = os.fspath(args[1])
    if first in ("-m", "-c"):
        if len(args) < 3:
            return False
    elif first.startswith("-") or not first.endswith(".py"):
        return False
    for key in ("preexec_fn", "pass_fds", "user", "group", "extra_groups", "umask"):
        if kwargs.get(key) not in (None, (), -1, False):
            return False
    if kwargs.get("process_group") not in (None, -1, 0):
        return False
    if kwargs.get("close_fds") is False:
        return False
    env = os.environ if env is None else env
    base = server().env
    return all(env.get(v) == base.get(v) for v in STARTUP_VARS)


class ForkedPopen(subprocess.Popen):
    """`subprocess.Popen` for `[sys.executable, script, ...]`, whose process the server forks."""

    def _execute_child(  # noqa: PLR0913 - the signature subprocess.Popen calls
        self,
        args,
        executable,
        preexec_fn,
        close_fds,
        pass_fds,
        cwd,
        env,
        startupinfo,
        creationflags,
        shell,
        p2cread,
        p2cwrite,
        c2pread,
        c2pwrite,
        errread,
        errwrite,
        restore_signals,
        *rest,
    ) -> None:
        start_new_session = rest[4] if len(rest) > 4 else False  # gid, gids, uid, umask, ...
        ours = [p2cread, c2pwrite, errwrite]
        fds = [fd if fd != -1 else i for i, fd in enumerate(ours)]
        request = {
            "argv": [os.fspath(a) for a in args],
            "cwd": os.fspath(cwd) if cwd is not None else os.getcwd(),
            "env": {os.fsdecode(k): os.fsdecode(v) for k, v in (env or os.environ).items()},
            "new_session": bool(start_new_session),
        }
        self._conn = server().connect()
        try:
            socket.send_fds(self._conn, [json.dumps(request).encode()], fds)
        finally:  # the child's ends of the pipes belong to the child now
            self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)
        self._buffer = b""
        self.pid = self._read_message(None)["pid"]

    def _read_message(self, timeout: float | None) -> dict | None:
        """The next line the waiter sends, or None if none came within `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
            self._conn.settimeout(remaining)
            try:
                chunk = self._conn.recv(4096)
            except (TimeoutError, BlockingIOError):
                return None
            if not chunk:
                raise RuntimeError("the fork server's waiter went away before the command ended")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _internal_poll(self, _deadstate=None, **_):
        if self.returncode is None:
            msg = self._read_message(0)
            if msg is not None:
                self._finish(msg)
        return self.returncode

    def _wait(self, timeout):
        if self.returncode is not None:
            return self.returncode
        msg = self._read_message(timeout)
        if msg is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        self._finish(msg)
        return self.returncode

    def _finish(self, msg: dict) -> None:
        self.returncode = msg["returncode"]
        self._conn.close()


def popen(args: Sequence, **kwargs) -> subprocess.Popen:
    """`subprocess.Popen(args, **kwargs)`, forked from the server when it can be reproduced."""
    if servable(args, kwargs.get("env"), kwargs):
        return ForkedPopen(args, **kwargs)
    return subprocess.Popen(args, **kwargs)


def run(
    args: Sequence,
    *,
    input: str | bytes | None = None,
    timeout: float | None = None,
    check: bool = False,
    capture_output: bool = False,
    **kwargs,
) -> subprocess.CompletedProcess:
    """`subprocess.run` through `popen`."""
    if capture_output:
        kwargs["stdout"] = subprocess.PIPE
        kwargs["stderr"] = subprocess.PIPE
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with popen(args, **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            exc.stdout, exc.stderr = proc.communicate()
            raise
        except BaseException:
            proc.kill()
            raise
        code = proc.poll()
    if check and code:
        raise subprocess.CalledProcessError(code, proc.args, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(proc.args, code, stdout, stderr)


if __name__ == "__main__":
    main_server(sys.argv[1:])
