"""Epoch-stepped schedulers in runs that count steps act, or say why they cannot."""

from __future__ import annotations

import csv

from torch import nn, optim
from torch.optim.lr_scheduler import ReduceLROnPlateau

from tests.conftest import TINY_LM, run_cli, run_dirs

# the tiny LM without the default schedule's own key
LM = [a for a in TINY_LM if not a.startswith("scheduler.")]


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
