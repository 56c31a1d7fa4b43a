"""Shared fixtures: hermetic caches, Hydra composition, and the CLI as a process of its own.

`run_cli` and `popen_cli` run a command as its own process, forked from a server that has the
imports done (tests/forkserver.py); a test that needs a fresh interpreter uses `subprocess` and
says why.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from tests import forkserver

# One thread per process: pytest-xdist runs a worker per core and the CLI tests start their own
# processes; two threads each would oversubscribe the cores (tiny nets get several times slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# A tiny, fast language-model run: every CLI test starts from these overrides. They shorten the
# run (sizes, steps) and never switch off what users get: config printing, the progress bar and
# model summary, callbacks and warnings all stay on.
TINY_LM = [
    "model.net.n_layer=1",
    "model.net.n_head=2",
    "model.net.n_embd=32",
    "model.net.block_size=32",
    "data.batch_size=8",
    "data.max_eval_windows=16",
    "trainer.max_steps=12",
    "trainer.val_check_interval=6",
    "scheduler.scheduler.warmup_steps=2",
    "callbacks.text_sample.max_new_tokens=20",
    "callbacks.throughput.window_size=4",
]


ONE_THREAD = {"OMP_NUM_THREADS": "1"}

# One training run per model family, trained once per test session (per test worker) by the
# `trained` fixture and shared by the tests that only read a run: eval, generate, export,
# predict, serve. A few steps each: those tests need trained weights, not good ones.
FAMILIES = {
    "lm": TINY_LM,  # the tiny GPT every CLI test starts from, with the user's defaults
    "cnn": ["experiment=digits_cnn", "trainer.max_epochs=3", "model.net.widths=[16,32]"],
    "vit": [
        "experiment=digits_vit",
        "trainer.max_epochs=1",
        "model.net.n_layer=1",
        "model.net.n_embd=32",
        "model.net.pool=mean",
    ],
    "audio": [
        "experiment=spoken_digits",
        "data.clips_per_class=10",
        "data.num_speakers=4",
        "trainer.max_epochs=1",
        "model.net.widths=[8,16]",
    ],
    "mlp": ["experiment=regression", "trainer.max_epochs=3"],
    # GPT-2's shape and AdamW (model=gpt), which the GPT-2 exports and imports start from
    "gpt": [
        "model=gpt",
        *TINY_LM,
        "trainer.max_steps=60",
        "optimizer.lr=0.01",
        "trainer.val_check_interval=30",
    ],
    "seq2seq": [
        "experiment=translation",
        "data.num_train=300",
        "data.num_val=20",
        "data.num_test=20",
        "data.vocab_size=300",
        "model.net.n_embd=32",
        "model.net.n_head=2",
        "model.net.n_enc_layer=1",
        "model.net.n_dec_layer=1",
        "model.test_beam_size=1",
        "data.batch_size=32",
        "optimizer.lr=0.005",
        "trainer.max_steps=150",
        "trainer.val_check_interval=150",
        "scheduler.scheduler.warmup_steps=10",
    ],
}


class Trained:
    """family -> the directory of its training run (`python train.py *FAMILIES[family]`), and
    `.proc(family)`, what that run printed. Tests read these runs and never write into them."""

    def __init__(self, root: Path) -> None:
        self.root, self.runs, self.procs = root, {}, {}

    def __call__(self, family: str) -> Path:
        if family not in self.runs:
            cwd = self.root / family
            cwd.mkdir()
            env = None if family == "lm" else ONE_THREAD
            self.procs[family] = run_cli("train.py", *FAMILIES[family], cwd=cwd, env=env)
            (self.runs[family],) = run_dirs(cwd)
        return self.runs[family]

    def proc(self, family: str) -> subprocess.CompletedProcess:
        self(family)
        return self.procs[family]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    return Trained(tmp_path_factory.mktemp("trained"))


@pytest.fixture(autouse=True, scope="session")
def hermetic_env(tmp_path_factory):
    """Point every cache that tools write to the home folder at a temporary one."""
    cache = tmp_path_factory.mktemp("cache")
    for var in (
        "TORCHINDUCTOR_CACHE_DIR",
        "TORCH_EXTENSIONS_DIR",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "MPLCONFIGDIR",
    ):
        os.environ.setdefault(var, str(cache / var.lower()))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    yield


def compose_config(
    name: str, overrides: list[str], tmp_path: Path, hydra: bool = False
) -> DictConfig:
    """Compose a config the way the CLI does, with run paths inside tmp_path.

    hydra=True also composes the `hydra` node (sweeper, launcher, run dirs).
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose(name, overrides=overrides, return_hydra_config=hydra)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.cache_dir = str(tmp_path / ".cache")
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


def run_cli(
    script: str,
    *args: str,
    cwd: Path,
    timeout: float = 300,
    env: dict | None = None,
    check: bool = True,
    stdin: str | None = None,
    fresh: bool = False,
) -> subprocess.CompletedProcess:
    """Run `python <script> args...` from the repository, with logs and caches under cwd.

    The process is forked from the fork server; fresh=True starts a plain interpreter instead
    (for what happens at start-up: imports, the first run on a new machine).
    """
    full_env = {**os.environ, "BIGMODEL_ROOT": str(cwd), **(env or {})}
    run = subprocess.run if fresh else forkserver.run
    proc = run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
            f"\n--- stderr\n{proc.stderr[-5000:]}"
        )
    return proc


def popen_cli(script: str, *args: str, cwd: Path, env: dict | None = None, **kwargs):
    """`subprocess.Popen` of `python <script> args...` (forked; see run_cli)."""
    full_env = {**os.environ, "BIGMODEL_ROOT": str(cwd), **(env or {})}
    return forkserver.popen(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, env=full_env, **kwargs
    )


def logged(run: Path, key: str) -> list[float]:
    """The values of `key` (train/loss, val/loss, ...) a run logged, in order (csv/metrics.csv)."""
    with open(run / "csv" / "metrics.csv") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


def run_dirs(root: Path, task_name: str = "train") -> list[Path]:
    return sorted((root / "logs" / task_name / "runs").iterdir())


# Tests that start plain interpreters (seconds of imports each) run first, so that the worker
# that takes them is not the last to finish while the other has run out of tests.
COLD_FIRST = (
    "tests/test_readme.py::test_readme_block_runs_as_written[L7-",  # the quickstart as typed
    "tests/test_extending.py::",  # PYTHONPATH names a copy of the package
    "tests/test_forkserver.py::",  # each command twice, once in a plain interpreter
    "tests/test_notebook.py::",  # a Jupyter kernel
)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(COLD_FIRST))  # stable: else as is
