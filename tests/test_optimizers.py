"""Every optimizer option trains: in a short run each lowers the loss and keeps it finite."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from bigmodel.run import train
from tests.conftest import TINY_LM, compose_config, run_cli, run_dirs

# Learning rates that suit a tiny transformer for 40 steps (the configs' defaults suit longer runs).
LR = {"sgd": 0.5, "momentum": 0.05, "adagrad": 0.05, "rmsprop": 0.003, "adam": 0.01, "adamw": 0.01}


@pytest.mark.parametrize("name", list(LR))
def test_optimizer_trains(name, tmp_path):
    tiny = [o for o in TINY_LM if not o.startswith("scheduler.")]
    overrides = [
        *tiny,
        f"optimizer={name}",
        f"optimizer.lr={LR[name]}",
        "scheduler=none",
        "trainer.max_steps=40",
        "trainer.val_check_interval=40",
        "trainer.log_every_n_steps=1",
        "test=false",
    ]
    cfg = compose_config("train", overrides, tmp_path)
    val_loss = train(cfg)
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 40  # trained every step
    assert val_loss is not None and math.isfinite(val_loss), val_loss
    assert all(math.isfinite(v) for v in losses), losses
    first, last = losses[0], sum(losses[-5:]) / 5
    print(f"{name}: train/loss {first:.3f} -> {last:.3f} (mean of the last 5 of 40 steps)")
    # every option drops by more than 1.2 nats here; one that does not step stays near ln(vocab)
    assert last < first - 0.8, (first, last)


@pytest.mark.parametrize(
    ("overrides", "kernels"),
    [
        (["optimizer=adamw"], {"fused": True}),  # AdamW on one device: fused (bench/levers.py)
        (["optimizer=sgd"], {"foreach": True}),  # others: foreach, not torch's CPU loop
        # clipping under autocast: not fused
        (["optimizer=adamw", "precision=bf16-mixed"], {"foreach": True}),
        # what a user asks for replaces ours
        (["optimizer=adamw", "+optimizer.fused=true"], {"fused": True}),
        (["optimizer=adamw", "+optimizer.foreach=false"], {"foreach": False}),
    ],
)
def test_optimizer_update_kernels(overrides, kernels, tmp_path):
    run_cli("train.py", *TINY_LM, "trainer.max_steps=3", "test=false", *overrides, cwd=tmp_path)
    (run,) = run_dirs(tmp_path)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    for key in ("fused", "foreach"):
        assert bool(group.get(key)) is kernels.get(key, False), (key, group.get(key))
