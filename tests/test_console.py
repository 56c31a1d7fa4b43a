"""What a run prints: no line or warning of our own making, each log line once, no wrong figure.

One tiny language-model run on a pseudo-terminal (what a user at a terminal sees, rendered as
the screen shows it) answers most questions; a digits and a translation run check the FLOPs
the throughput monitor gets, a `debug=fdr` run the debug preset.
"""

from __future__ import annotations

import csv
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import hydra
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests import forkserver
from tests.conftest import ROOT, TINY_LM, compose_config, popen_cli, run_cli, run_dirs

COLUMNS = 100


def run_on_terminal(script: str, *args: str, cwd: Path, timeout: float = 300) -> str:
    """Run `python <script> args...` with a pseudo-terminal as stdout and stderr; its output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, COLUMNS, 0, 0))
    env = {**os.environ, "BIGMODEL_ROOT": str(cwd)}
    env.pop("COLUMNS", None)
    proc = forkserver.popen(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:  # done, and a helper process keeps the tty open
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            proc.kill()
            raise AssertionError(f"{script} {' '.join(args)} ran past {timeout} s")
        proc.wait(timeout=60)
    finally:
        os.close(master)
    out = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{screen(out)[-80:]}"
    return out


def screen(raw: str) -> list[str]:
    """The lines a terminal shows for `raw`: carriage returns, cursor-up and erase-line applied
    (what rich's live display uses to redraw itself), colours dropped."""
    lines, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", raw):
        if token == "\r":
            col = 0
        elif token == "\n":
            row += 1
            if row == len(lines):
                lines.append("")
        elif token.startswith("\x1b["):
            if token.endswith("A"):
                row = max(0, row - int(token[2:-1] or 1))
            elif token == "\x1b[2K":
                lines[row] = ""
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token) :]
            col += len(token)
    return [line.rstrip() for line in lines]


def flat(lines: list[str]) -> str:
    """The screen as one line: phrases that rich wrapped at the terminal's width read whole."""
    return re.sub(r"\s+", " ", " ".join(lines))


# ----------------------------------------------------------------------------- one LM run
@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> tuple[list[str], Path]:
    """A tiny LM run at a terminal, W&B (offline) on, warmup longer than the run."""
    root = tmp_path_factory.mktemp("console")
    raw = run_on_terminal(
        "train.py",
        *TINY_LM,
        "scheduler.scheduler.warmup_steps=50",
        "logger=[csv,wandb]",
        cwd=root,
    )
    (run,) = run_dirs(root)
    return screen(raw), run


def test_lightning_lines_print_once_through_hydras_logging(lm_run):
    lines, run = lm_run
    text = flat(lines)
    # Lightning's own handler (`INFO: ...`) is gone; Hydra's prints each line, and logs it
    assert not [line for line in lines if line.startswith("INFO: ")]
    assert text.count("`Trainer.fit` stopped: `max_steps=12` reached.") == 1
    assert "[lightning.pytorch.utilities.rank_zero][INFO] - GPU available: False" in text
    log = (run / "train.log").read_text()
    assert "`Trainer.fit` stopped" in log and "GPU available" in log


def test_no_lines_of_our_own_making(lm_run):
    text = flat(lm_run[0])
    for phrase in (
        "Skipping setting a default `ModelSummary` callback",  # trainer.enable_model_summary
        "💡 Tip",
        "TPU available",
        "LeafSpec",  # Lightning's use of a deprecated torch API
        "anonymous setting has no effect",  # W&B, from Lightning's anonymous=None
        "UserWarning",
        "flops_per_batch",
    ):
        assert phrase not in text, phrase
    # the summary callback still prints the summary, without the FLOPs it did not count
    assert "Trainable params: " in text and "Total params: " in text
    assert "FLOPs" not in text


def test_progress_bar_counts_steps_and_leaves_one_last_line(lm_run):
    lines = lm_run[0]
    assert "Epoch 0/-2" not in flat(lines)
    # the finished bar, once: a log line printed while it ran left no stale copy of it behind
    bars = [line for line in lines if line.startswith("Epoch 0 · step 12/12 ")]
    assert len(bars) == 1, "\n".join(line for line in lines if line.startswith("Epoch"))
    # redrawn at most 10 times a second, the bar still ends on the last step's loss
    (shown,) = re.findall(r"^\s+train/loss: ([0-9.]+)$", "\n".join(lines), re.M)
    (logged,) = re.findall(r"metrics: .*train/loss=([0-9.]+)", flat(lines))
    assert shown == logged


def test_a_bf16_mixed_run_prints_no_lightning_warning(tmp_path):
    proc = run_cli("train.py", *TINY_LM, "precision=bf16-mixed", "test=false", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert "Total params: " in out
    assert "is not supported by the model summary" not in out
    assert "UserWarning" not in out


def test_warmup_longer_than_the_run_is_one_bigmodel_line(lm_run):
    text = flat(lm_run[0])
    line = (
        "[bigmodel][WARNING] - scheduler warmup_steps=50 >= total_steps=12: warming up for 1 "
        "steps (a tenth of the run) instead"
    )
    assert text.count(line) == 1
    assert "hydra/_internal" not in text


# ------------------------------------------------------------------------------- FLOPs
@pytest.mark.slow  # CI's slow tier
def test_image_and_translation_runs_give_the_throughput_monitor_flops(tmp_path):
    """No `flops_per_batch` warning; FLOPs/s logged for training."""
    runs = {
        "digits_cnn": ["trainer.max_steps=6", "data.batch_size=16"],
        "translation": ["trainer.max_steps=6", "data.batch_size=16", "test=false"],
    }
    for experiment, overrides in runs.items():
        root = tmp_path / experiment
        root.mkdir()
        proc = run_cli(
            "train.py",
            f"experiment={experiment}",
            *overrides,
            "trainer.log_every_n_steps=2",
            "callbacks.throughput.window_size=2",
            cwd=root,
        )
        out = proc.stdout + proc.stderr
        assert "flops_per_batch" not in out, out[-3000:]
        assert "INFO: " not in proc.stderr  # Lightning's lines once, on Hydra's stdout
        (run,) = run_dirs(root)
        with open(run / "csv" / "metrics.csv") as f:
            flops = [
                float(r["train/device/flops_per_sec"])
                for r in csv.DictReader(f)
                if r.get("train/device/flops_per_sec")
            ]
        assert flops and all(f > 0 for f in flops), experiment


def _first_batch(experiment: str, tmp_path: Path):
    cfg = compose_config("train", [f"experiment={experiment}"], tmp_path)
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    from bigmodel.run import build_task

    task = build_task(cfg, dm)
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    return task, batch


def _counted(fn) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
        fn()
    return counter.get_total_flops()


def test_flops_per_batch_are_right(tmp_path):
    """Training batches: 3 x the forward FLOPs torch counts; evaluation: 1 x (none where the
    evaluation also decodes); the measurement changes neither the random state nor the modes."""
    task, batch = _first_batch("digits_cnn", tmp_path / "cnn")
    task.train()
    rng = torch.get_rng_state()
    task.on_train_batch_start(batch, 0)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(m.training for m in task.net.modules())
    forward = _counted(lambda: task.net.eval()(batch[0]))
    assert forward > 0 and task.flops_per_batch == 3 * forward
    task.on_validation_batch_start(batch, 0)
    assert task.flops_per_batch == forward
    # a smaller last batch: the count per sample, scaled
    task.on_validation_batch_start((batch[0][:5], batch[1][:5]), 0)
    assert task.flops_per_batch == forward // len(batch[0]) * 5

    task, batch = _first_batch("translation", tmp_path / "mt")
    task.on_train_batch_start(batch, 0)
    forward = _counted(lambda: task.net.eval()(batch["src"], batch["tgt"][:, :-1]))
    assert task.flops_per_batch == 3 * forward  # the closed form agrees with torch's count
    task.on_validation_batch_start(batch, 0)
    assert task.flops_per_batch is None

    cfg = compose_config("train", TINY_LM, tmp_path / "lm")
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    from bigmodel.run import build_task

    task = build_task(cfg, dm)
    batch = next(iter(dm.train_dataloader()))
    task.on_train_batch_start(batch, 0)
    train = task.flops_per_batch
    task.on_validation_batch_start(batch, 0)
    assert train == task.net.flops_per_token(batch[0].shape[1]) * batch[0].numel()
    assert task.flops_per_batch * 3 == train  # validation is forward only


# ------------------------------------------------------------------------------- debug
def test_debug_fdr_writes_no_checkpoint_and_logs_lightning_at_debug(tmp_path):
    proc = run_cli("train.py", "debug=fdr", *TINY_LM, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("*.ckpt"))
    assert "fsspec" not in out
    # the preset's Lightning debug lines reach the console, without the hook-by-hook trace
    assert "[lightning.pytorch.trainer.trainer][DEBUG]" in out
    assert "[lightning.pytorch.trainer.call]" not in out


def test_last_checkpoint_writes_nothing_under_fast_dev_run(tmp_path, monkeypatch):
    """As Lightning's ModelCheckpoint: `trainer.fast_dev_run` (with or without debug=fdr) saves
    no last.ckpt, from any of LastCheckpoint's triggers."""
    from types import SimpleNamespace

    from bigmodel.callbacks.last import LastCheckpoint

    cb = LastCheckpoint(dirpath=tmp_path)
    saved = []
    monkeypatch.setattr(cb, "_save_last_checkpoint", lambda *a: saved.append(a))
    monkeypatch.setattr(cb, "_monitor_candidates", lambda trainer: {})
    trainer = SimpleNamespace(sanity_checking=False, state=SimpleNamespace(fn="fit"))
    for fast_dev_run in (1, True, 0):
        trainer.fast_dev_run = fast_dev_run
        cb.save_now(trainer)
    assert len(saved) == 1  # fast_dev_run=0 only


# ------------------------------------------------------------------- warnings that said nothing
def smoke_args(*extra: str) -> list[str]:
    """TINY_LM as a user's smoke run: a scheduler's own warmup (warmup_cosine's 100 steps), a
    few steps."""
    return [a for a in TINY_LM if not a.startswith("scheduler.")] + [
        "scheduler=warmup_cosine",
        *extra,
    ]


def test_a_piped_smoke_run_prints_no_warning_and_no_colour_code(tmp_path):
    # W&B not silenced (the suite silences it): its closing lines go to a pipe here
    proc = run_cli(
        "train.py",
        *smoke_args("trainer.max_steps=5", "test=false", "logger=[csv,wandb]"),
        cwd=tmp_path,
        env={"WANDB_SILENT": "false", "WANDB_MODE": "offline"},
    )
    out = proc.stdout + proc.stderr
    # a run too short for a tenth of it to be a step: no warmup, said without a warning
    assert "scheduler warmup_steps=100 >= total_steps=5: no warmup in a run this short" in out
    assert "[WARNING]" not in out and "Warning" not in out, out[-3000:]
    # W&B's closing lines, through its Python side: no colour codes in a pipe
    assert "wandb: You can sync this run to the cloud by running:" in out
    assert "\x1b" not in out, [line for line in out.splitlines() if "\x1b" in line]


def test_a_run_stopped_and_continued_prints_no_lightning_warning(tmp_path):
    args = smoke_args(
        "trainer.max_steps=400",
        "trainer.val_check_interval=200",
        "test=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    proc = popen_cli(
        "train.py", *args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "run" / "csv" / "metrics.csv"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count("\n") > 2:  # training has begun
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    # the stop saves a whole checkpoint, saying so to Lightning: no "weights_only was not set"
    assert "weights_only" not in stdout + stderr
    again = run_cli("train.py", *args[:-3], "trainer.max_steps=4", *args[-2:], cwd=tmp_path)
    out = again.stdout + again.stderr
    assert "resume=auto: continuing from" in out
    # the run directory is continued on purpose: no "Checkpoint directory ... is not empty"
    assert "Checkpoint directory" not in out and "Warning" not in out, out[-3000:]


def test_bpe_text_is_printed_with_its_control_characters_escaped(tmp_path):
    prompt = "\x1b[31mred\rX"  # ESC and CR: a terminal would colour and overwrite
    proc = run_cli(
        "train.py",
        *TINY_LM,
        "data.tokenizer=bpe",
        "data.vocab_size=300",
        "trainer.max_steps=6",
        "test=false",
        f"callbacks.text_sample.prompt='{prompt}'",
        cwd=tmp_path,
    )
    escaped = "\\x1b[31mred\\rX"
    assert f"--- sample at step 6 ---\n{escaped}" in proc.stdout
    (run,) = run_dirs(tmp_path)
    gen = run_cli(
        "generate.py",
        f"ckpt_path={run}/checkpoints/last.ckpt",
        f"prompt={prompt}",
        "max_new_tokens=40",
        "num_samples=4",
        cwd=tmp_path,
    )
    assert gen.stdout.count(escaped) == 4
    # nothing sampled reaches the terminal raw either: no C0 control but newline
    (sample,) = re.findall(r"--- sample at step 6 ---\n(.*?)\n---\n", proc.stdout, re.S)
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", sample + gen.stdout)
