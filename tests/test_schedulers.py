"""Epoch-stepped schedulers in runs that count steps act, or say why they cannot."""

from __future__ import annotations

import csv
import math
import re

from torch import nn, optim
from torch.optim.lr_scheduler import ReduceLROnPlateau

from tests.conftest import TINY_LM, run_cli, run_dirs

# the tiny GPT with AdamW and warmup-cosine (model=gpt), without the schedule's own key
LM = ["model=gpt", *(a for a in TINY_LM if not a.startswith("scheduler."))]


def dedup(values: list[float]) -> list[float]:
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def test_plateau_steps_after_each_validation_as_torch_would(tmp_path):
    """The default LM run ends inside its first epoch: ReduceLROnPlateau is stepped by each
    validation's val/loss, and the lr it logs is the one torch's own scheduler gives for those
    losses."""
    proc = run_cli(
        "train.py", *LM, "scheduler=plateau", "scheduler.scheduler.patience=0",
        "optimizer.lr=0.05", "trainer.max_steps=36", "trainer.log_every_n_steps=1",
        "test=false", cwd=tmp_path,
    )  # fmt: skip
    assert "ReduceLROnPlateau steps after each validation (every 6 steps)" in proc.stdout
    with open(run_dirs(tmp_path)[0] / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["lr-AdamW/pg1"]) for r in rows if r.get("lr-AdamW/pg1")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 6
    # the reference: torch's scheduler fed the same validation losses
    opt = optim.SGD(nn.Linear(1, 1).parameters(), lr=0.05)
    ref = ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=0)
    lrs = [0.05]
    for v in val:
        ref.step(v)
        lrs.append(opt.param_groups[0]["lr"])
    assert len(dedup(lrs)) > 1, (val, lrs)  # the test is only worth something if it acted
    assert dedup(logged) in (dedup(lrs), dedup(lrs[:-1])), (logged, lrs)


def test_a_step_scheduler_that_cannot_act_before_the_run_ends_says_so(tmp_path):
    proc = run_cli("train.py", *LM, "scheduler=step", "test=false", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert "scheduler: StepLR acts every 10 epochs" in out
    assert "it would never change the lr; step it by steps with scheduler.interval=step" in out
    # and it is quiet where it does act: by steps
    proc = run_cli(
        "train.py", *LM, "scheduler=step", "scheduler.interval=step",
        "scheduler.scheduler.step_size=4", "test=false", cwd=tmp_path,
    )  # fmt: skip
    assert "would never change the lr" not in proc.stdout + proc.stderr


def logged_lrs(run) -> dict[int, float]:
    """step -> the learning rate csv/metrics.csv logged for it (the first parameter group)."""
    with open(run / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr-AdamW/pg1")]
    return {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in rows}


def warmup_cosine(step: int, base: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """The schedule the run announces, written from its definition: linear warmup to the base
    lr over `warmup` steps, then a half cosine down to floor x base at `total`."""
    if step < warmup:
        return base * (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_what_a_run_says_of_its_schedule_is_what_it_logs(tmp_path):
    """The optimizer line's lr, a warmup cut short and a schedule re-planned on resume, each
    read from the console as a user reads it, are the learning rates csv/metrics.csv logs."""
    run_dir = tmp_path / "run"
    common = [*LM, "trainer.log_every_n_steps=1", "test=false", f"hydra.run.dir={run_dir}"]
    first = run_cli(
        "train.py",
        *common,
        "scheduler.scheduler.warmup_steps=50",
        "trainer.max_steps=20",
        cwd=tmp_path,
    )
    said = first.stdout + first.stderr
    base = float(re.search(r"optimizer: AdamW \(lr=([\d.e-]+)", said)[1])
    warmup = int(re.search(r"warming up for (\d+) steps \(a tenth of the run\) instead", said)[1])
    assert (base, warmup) == (0.001, 2)
    lrs = logged_lrs(run_dir)
    assert sorted(lrs) == list(range(20))
    for step, lr in lrs.items():
        assert math.isclose(lr, warmup_cosine(step, base, warmup, 20), rel_tol=1e-6), step

    # the same command, 30 steps: resumed from step 20, the cosine re-planned to 30
    second = run_cli(
        "train.py",
        *common,
        "scheduler.scheduler.warmup_steps=50",
        "trainer.max_steps=30",
        cwd=tmp_path,
    )
    said = second.stdout + second.stderr
    m = re.search(r"re-planned to (\d+) steps \(lr ([\d.e-]+) now", said)
    assert m, said[-2000:]
    lrs = logged_lrs(run_dir)
    assert math.isclose(lrs[20], float(m[2]), rel_tol=1e-3)  # "now" is the next step's lr
    for step in range(20, 30):
        assert math.isclose(lrs[step], warmup_cosine(step, base, warmup, int(m[1])), rel_tol=1e-6)
