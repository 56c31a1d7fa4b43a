"""One run folder, one training at a time; a folder run again keeps the record of its first run.

`RunFolder` is a Hydra callback (configs/train.yaml, `hydra.callbacks.run_folder`). It acts
before Hydra writes anything into the run directory, so a refused command leaves the folder as
it was:

- **The lock.** `<run dir>/.run.lock` names the process that trains in the folder (pid, host,
  process start time, command). A second training started into the same folder (the same
  `hydra.run.dir` twice) ends with one line naming the folder and the fix, exit status 2. The
  lock is removed when its run ends, however it ends: a return, an exception, bad input, Ctrl-C,
  SIGTERM (Lightning's stop, bigmodel.callbacks.sigterm) all go through the interpreter's exit.
  A lock whose process no longer lives (kill -9, a crash, the pid since reused by another
  program, an earlier run of the same SLURM job before it was requeued) is taken over with one
  warning line. A lock of another host (a shared file system) cannot be checked by its pid:
  the training that holds it touches it every `HEARTBEAT_S` seconds, and one untouched for
  `STALE_S` is taken over the same way. Only the process that launched the run
  takes it: the other ranks of `strategy=ddp` re-run the command in the same folder
  (bigmodel.launcher), and each job of a multirun has a folder of its own.
- **The record.** A folder that already holds a run (its `.hydra/overrides.yaml` exists: the
  same command run again, which `resume=auto` continues) keeps `.hydra/config.yaml`,
  `hydra.yaml` and `overrides.yaml` as its first run wrote them; each later run's own are
  written beside them as `.hydra/config.resume-N.yaml`, `hydra.resume-N.yaml` and
  `overrides.resume-N.yaml` (N = 1, 2, ...). A resume into a new folder (`ckpt_path=...`) is a
  run like any other there: its `overrides.yaml` is its own command, which names the checkpoint
  and so the folder of the run it continues.

It imports no torch or Lightning: Hydra builds it before the run's imports.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bigmodel.errors import UserError, fail

log = logging.getLogger("bigmodel")

LOCK_NAME = ".run.lock"
# the .hydra files a folder's first run keeps; later runs write <stem>.resume-N.yaml
RECORD_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
# a lock file still empty this long after it was made was left by a process killed while
# writing it; a younger one is being written by a run starting now
_EMPTY_LOCK_GRACE_S = 10.0
# the holder of a lock touches it this often; a lock of another host untouched this long is stale
HEARTBEAT_S = 30.0
STALE_S = 600.0


def launches_run() -> bool:
    """Whether this process launched the run, not a rank > 0 of a distributed one.

    Lightning starts the other ranks of `strategy=ddp` with LOCAL_RANK set; torchrun and SLURM
    name every process's rank (RANK, SLURM_PROCID).
    """
    return all(
        os.environ.get(var, "0") in ("", "0") for var in ("LOCAL_RANK", "RANK", "SLURM_PROCID")
    )


# ------------------------------------------------------------------------------------- lock
def _process_start(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, where /proc tells."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: count from after it
    fields = stat.rpartition(")")[2].split()
    try:
        return fields[0], int(fields[19])  # fields 3 (state) and 22 (starttime)
    except (IndexError, ValueError):
        return None


def _owner_record() -> dict[str, Any]:
    start = _process_start(os.getpid())
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start": start[1] if start else None,
        "since": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
    }


def _alive(owner: dict[str, Any], path: Path | None = None) -> bool:
    """Whether the process a lock names still runs (on another host: whether it touched the
    lock at `path` within STALE_S)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and owner.get("slurm_job") == job and owner.get("pid") != os.getpid():
        return False  # an earlier run of this SLURM job (requeued): SLURM runs one at a time
    if owner.get("host") != socket.gethostname():  # its pid means nothing here: its heartbeat
        try:
            return path is None or time.time() - path.stat().st_mtime < STALE_S
        except OSError:
            return False
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    now = _process_start(pid)
    if now is not None:
        state, start = now
        if state == "Z":  # killed, not yet reaped by its parent
            return False
        if owner.get("start") is not None and start != owner["start"]:
            return False  # the pid was reused by a later process
    return True


def _read(path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def acquire(run_dir: Path) -> tuple[Path, str | None]:
    """Take `<run_dir>/.run.lock` for this process -> (its path, a warning to log or None).

    Raises UserError when another live training holds it. A stale lock (its process is gone)
    is taken over; the warning says so.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    warning = None
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(path)
            if owner is None:  # empty or torn: being written now, or left by a killed writer
                with contextlib.suppress(OSError):
                    if time.time() - path.stat().st_mtime < _EMPTY_LOCK_GRACE_S:
                        time.sleep(0.2)
                        continue
            elif _alive(owner, path):
                raise UserError(_busy(run_dir, path, owner)) from None
            # stale: move it aside first, so that of two runs taking it over at once one wins
            aside = path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue  # another run took it over first; look again
            with contextlib.suppress(OSError):
                aside.unlink()
            owner = owner or {}
            where = owner.get("host", "?")
            gone = (
                f"on {where}, silent for over {STALE_S:.0f} s"
                if where not in ("?", socket.gethostname())
                else "killed?"
            )
            warning = (
                f"{run_dir}: taking over the lock of an earlier training that no longer runs "
                f"(pid {owner.get('pid', '?')}, started {owner.get('since', '?')}; {gone})"
            )
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(_owner_record(), f)
        return path, warning
    raise UserError(_busy(run_dir, path, _read(path) or {}))


def _busy(run_dir: Path, path: Path, owner: dict[str, Any]) -> str:
    who = (
        f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since {owner.get('since', '?')}"
    )
    return (
        f"{run_dir} is in use by another training ({who}); wait for it to end, or give this "
        "run a folder of its own: leave hydra.run.dir at its default or choose another "
        f"(if that training is gone for good, delete {path})"
    )


def heartbeat(path: Path, every: float = HEARTBEAT_S) -> threading.Event:
    """Touch the lock every `every` seconds from a daemon thread while this process holds it,
    so that a run on another host sharing the folder can tell it is alive. Set the returned
    event to stop."""
    stop = threading.Event()
    pid = os.getpid()

    def beat() -> None:
        while not stop.wait(every):
            if os.getpid() != pid:
                return
            with contextlib.suppress(OSError):
                os.utime(path)

    threading.Thread(target=beat, name="run-folder-lock", daemon=True).start()
    return stop


def release(path: Path) -> None:
    """Remove the lock if this process holds it (a forked child inherits the exit hook)."""
    owner = _read(path)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        with contextlib.suppress(OSError):
            path.unlink()


# ----------------------------------------------------------------------------------- record
def _next_resume_number(hydra_dir: Path) -> int:
    taken = [
        int(n)
        for p in hydra_dir.glob("overrides.resume-*.yaml")
        if (n := p.name.removeprefix("overrides.resume-").removesuffix(".yaml")).isdigit()
    ]
    return max(taken, default=0) + 1


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# the name of this run's composed config in `.hydra/` (a folder run again: config.resume-N.yaml)
_config_name = "config.yaml"


def config_name() -> str:
    """The file of `.hydra/` that holds this run's own composed config."""
    return _config_name


# --------------------------------------------------------------------------------- callback
class RunFolder(Callback):
    """Lock the run folder and keep its first run's record; see the module docstring."""

    def __init__(self) -> None:
        self.lock: Path | None = None
        self.warning: str | None = None
        self.hydra_dir: Path | None = None
        self.kept: dict[str, bytes] = {}
        self.beating: threading.Event | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not launches_run():
            return
        try:
            run_dir = Path(os.path.abspath(str(OmegaConf.select(config, "hydra.run.dir"))))
        except Exception:  # a run.dir that only resolves inside the job: Hydra will say why
            return
        try:
            self.lock, self.warning = acquire(run_dir)
        except UserError as e:
            # Hydra turns a callback's exception into a warning and runs the job anyway: end
            # here, as the entry points end on bad input, but write no error.txt: the folder
            # is the other training's
            fail(str(e))
        atexit.register(release, self.lock)
        self.beating = heartbeat(self.lock)
        subdir = OmegaConf.select(config, "hydra.output_subdir")
        if subdir is not None:
            self.hydra_dir = run_dir / str(subdir)
            if (self.hydra_dir / "overrides.yaml").is_file():
                for name in RECORD_FILES:
                    with contextlib.suppress(OSError):
                        self.kept[name] = (self.hydra_dir / name).read_bytes()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        # logging is configured now: the lines reach the console and the run's log file
        if self.warning:
            log.warning(self.warning)
            self.warning = None
        if not self.kept or self.hydra_dir is None:
            return
        global _config_name
        n = _next_resume_number(self.hydra_dir)
        _config_name = f"config.resume-{n}.yaml"
        for name, original in self.kept.items():
            ours = self.hydra_dir / name
            with contextlib.suppress(FileNotFoundError):
                os.replace(ours, ours.with_name(f"{ours.stem}.resume-{n}{ours.suffix}"))
            _write_atomically(ours, original)
        self.kept = {}
        log.info(
            f"{self.hydra_dir.parent} holds an earlier run: its .hydra/overrides.yaml is kept, "
            f"this run's overrides are in .hydra/overrides.resume-{n}.yaml"
        )

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.beating is not None:
            self.beating.set()
        if self.lock is not None:
            release(self.lock)
