"""The loss guard: a NaN or spiking loss stops the run or drops the update, before the weights move.

The NaN is real: the GPT (model=gpt) with AdamW at lr=1e4 (weight decay 0.1 multiplies every
weight by about -1e3 a step) overflows float32 within a few steps, and the first non-finite
training loss comes from weights that are still finite. The unit tests use a one-weight
regression on rows the test chooses, and two DDP ranks on CPU that see different bad rows.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from bigmodel.callbacks.loss_guard import LossGuard
from bigmodel.errors import UserError
from tests.conftest import ROOT, TINY_LM, logged, run_cli, run_dirs

DIVERGE = ["model=gpt", "optimizer.lr=1e4", "trainer.gradient_clip_val=null"]


def checkpoints(run: Path) -> dict[str, dict]:
    return {
        p.name: torch.load(p, map_location="cpu", weights_only=True)
        for p in sorted((run / "checkpoints").glob("*.ckpt"))
    }


def all_finite(ckpt: dict) -> bool:
    return all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )


def test_stop_names_the_step_and_the_last_good_checkpoint(tmp_path):
    # a validation every 2 steps leaves a checkpoint before the loss turns NaN (step 3)
    proc = run_cli(
        "train.py", *TINY_LM, *DIVERGE, "trainer.val_check_interval=2", cwd=tmp_path, check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    m = re.fullmatch(
        r"error: loss guard: non-finite training loss (nan|inf|-inf) at step (\d+); .*"
        r"last good checkpoint: (\S+); fix: lower the learning rate .*on_nonfinite=skip",
        errors[0],
    )
    assert m, errors[0]
    step, named = int(m[2]), Path(m[3])
    (run,) = run_dirs(tmp_path)
    saved = checkpoints(run)
    assert named.parent == run / "checkpoints" and named.name in saved, (named, list(saved))
    # nothing was saved after the stop, and no saved weights are non-finite
    assert saved and all(c["global_step"] < step and all_finite(c) for c in saved.values())
    assert saved[named.name]["global_step"] == max(c["global_step"] for c in saved.values())
    assert (run / "error.txt").read_text().startswith("loss guard: non-finite training loss")
    assert not (run / "metrics.json").exists()  # the run did not go on to test


@pytest.mark.slow  # CI runs it after the fast suite
def test_skip_drops_the_bad_updates_and_the_run_finishes(tmp_path):
    run_cli(
        "train.py",
        *TINY_LM,
        *DIVERGE,
        "callbacks.loss_guard.on_nonfinite=skip",
        "trainer.log_every_n_steps=1",
        cwd=tmp_path,
    )
    (run,) = run_dirs(tmp_path)
    losses, skipped = logged(run, "train/loss"), logged(run, "train/skipped_batches")
    assert any(not math.isfinite(x) for x in losses), losses  # the NaN was real
    assert skipped[-1] > 0 and skipped == sorted(skipped), skipped
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all_finite(ckpt)
    assert ckpt["callbacks"]["LossGuard"]["skipped_batches"] == skipped[-1]


# ------------------------------------------------------------------------------ unit level
class Line(L.LightningModule):
    """y = w x + b by SGD over rows (x, y), one row a batch; records the weights at each step."""

    def __init__(self, rows: list[tuple[float, float]]) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)
        torch.nn.init.zeros_(self.lin.weight)
        torch.nn.init.zeros_(self.lin.bias)
        self.data = TensorDataset(
            torch.tensor([[x] for x, _ in rows]), torch.tensor([[y] for _, y in rows])
        )
        self.weights: list[tuple[float, float]] = []

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=1)

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == len(self.weights):  # the first micro-batch of a step
            self.weights.append((self.lin.weight.item(), self.lin.bias.item()))
        x, y = batch
        return torch.nn.functional.mse_loss(self.lin(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(
    module: Line, guard: LossGuard, root: Path, max_steps: int, ckpt_path=None, **kwargs
) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        gradient_clip_val=1.0,
        **kwargs,
    )
    trainer.fit(module, ckpt_path=ckpt_path, weights_only=True)
    return trainer


ROWS = [(1.0, 1.0)] * 20
ROWS[3] = (1.0, 50.0)  # a spike before the warmup ends: judged as ordinary
ROWS[12] = (1.0, 50.0)  # a spike: loss ~2400 against a mean of about 1
ROWS[16] = (float("nan"), 1.0)  # a non-finite loss


def test_spikes_and_nans_are_dropped_before_the_step(tmp_path):
    module = Line(ROWS)
    guard = LossGuard(on_nonfinite="skip", spike_rtol=3.0, spike_window=5, spike_warmup=10)
    trainer = fit(module, guard, tmp_path, max_steps=20)
    w = module.weights
    # the updates of steps 12 and 16 were never made; every other one was (the early spike too)
    assert [s for s in range(len(w) - 1) if w[s + 1] == w[s]] == [12, 16], w
    assert guard.skipped_batches == 2
    assert trainer.callback_metrics["train/skipped_batches"] == 2
    assert len(guard.window) == 5 and all(0 <= x < 10 for x in guard.window), guard.window
    assert all(torch.isfinite(p).all() for p in module.parameters())

    # one bad micro-batch drops the whole update: with 2 to a step, rows 12 and 16 cost 2 each
    module = Line(ROWS)
    guard = LossGuard(on_nonfinite="skip", spike_rtol=3.0, spike_window=5, spike_warmup=3)
    fit(module, guard, tmp_path, max_steps=10, accumulate_grad_batches=2)
    w = module.weights
    assert [s for s in range(len(w) - 1) if w[s + 1] == w[s]] == [6, 8], w
    assert guard.skipped_batches == 4
    # the window holds the losses the task computed (1.0 from the zero weights), not Lightning's
    # loss / accumulate_grad_batches
    guard = LossGuard(spike_rtol=3.0)
    fit(Line(ROWS), guard, tmp_path, max_steps=1, accumulate_grad_batches=2)
    assert list(guard.window) == [1.0, 1.0]

    with pytest.raises(UserError, match=r"loss spike 2[0-9.e+]+ .* at step 12; .*on_spike=skip"):
        fit(Line(ROWS), LossGuard(spike_rtol=3.0, spike_window=5, on_spike="stop"), tmp_path, 20)


def test_resume_restores_the_counter_and_the_window(tmp_path):
    def guard() -> LossGuard:
        return LossGuard(on_nonfinite="skip", spike_rtol=3.0, spike_window=20, spike_warmup=2)

    rows = ROWS[:10]  # one epoch is 10 steps: the resumed run starts the second at its first row
    straight, first, resumed = guard(), guard(), guard()
    fit(Line(rows), straight, tmp_path / "a", max_steps=20)
    fit(Line(rows), first, tmp_path / "b", max_steps=10).save_checkpoint(tmp_path / "b.ckpt")
    fit(Line(rows), resumed, tmp_path / "b", max_steps=20, ckpt_path=tmp_path / "b.ckpt")
    assert straight.skipped_batches == 2  # row 3 of each epoch: a spike after step 2
    assert resumed.skipped_batches == 2
    assert len(straight.window) == 18  # the 18 steps not skipped, across the resume
    assert list(resumed.window) == pytest.approx(list(straight.window))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"on_nonfinite": "ignore"}, "on_nonfinite='ignore' must be one of stop, skip"),
        ({"spike_rtol": 0.5}, "spike_rtol=0.5 must be above 1"),
        ({"spike_window": 0}, "spike_window=0 must be an integer >= 1"),
    ],
)
def test_bad_settings_are_a_config_error(kwargs, message):
    with pytest.raises(UserError, match=re.escape(f"callbacks.loss_guard.{message}")):
        LossGuard(**kwargs)


class SaveRankState(L.Callback):
    """When the run stops, each rank writes its weights at every step, its skip count and its
    error to `<root>/rank<N>.pt`."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        guard = next(c for c in trainer.callbacks if isinstance(c, LossGuard))
        state = {
            "weights": pl_module.weights,
            "skipped": guard.skipped_batches,
            "error": str(exception),
        }
        path = Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.pt"
        torch.save(state, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)  # whole, when the test sees it


class RankLine(Line):
    """Line with rows of its own on each rank."""

    def __init__(self, rows_per_rank: list[list[tuple[float, float]]]) -> None:
        super().__init__(rows_per_rank[0])
        self.per_rank = [Line(rows).data for rows in rows_per_rank]

    def train_dataloader(self):
        return DataLoader(self.per_rank[self.global_rank], batch_size=1)


def ddp_main(root: str) -> None:
    """Two DDP ranks on CPU: `python -m tests.test_loss_guard ROOT` (Lightning starts rank 1 with
    the same command). A NaN at step 2 on rank 1 only is skipped on both; a spike at step 4 on
    rank 0 only stops both. The gradients are averaged over ranks: a rank deciding alone would
    step with NaN gradients, or wait forever for the other."""
    rows = [[(1.0, 1.0)] * 6 for _ in range(2)]
    rows[1][2], rows[0][4] = (float("nan"), 1.0), (1.0, 50.0)
    guard = LossGuard(on_nonfinite="skip", spike_rtol=3.0, spike_warmup=0, on_spike="stop")
    L.Trainer(
        accelerator="cpu",
        devices=2,
        # a rank left waiting fails in 30 s instead of gloo's 30 minutes
        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=30)),
        use_distributed_sampler=False,
        max_steps=6,
        callbacks=[guard, SaveRankState()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    ).fit(RankLine(rows))


@pytest.mark.slow  # CI runs it after the fast suite
def test_ranks_skip_and_stop_together(tmp_path):
    # a plain interpreter: it starts DDP ranks with a process group of their own
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_loss_guard", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0, proc.stderr[-3000:]
    files = [tmp_path / f"rank{r}.pt" for r in (0, 1)]
    deadline = time.monotonic() + 60  # rank 1 is rank 0's child: it may end a moment later
    while not all(f.exists() for f in files) and time.monotonic() < deadline:
        time.sleep(0.2)
    ranks = [torch.load(f, weights_only=True) for f in files]
    assert re.search(
        r"loss guard: training loss spike \S+ \(above .* at step 4; ", ranks[0]["error"]
    )
    assert "loss guard: a training loss spike on another rank at step 4; " in ranks[1]["error"]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # the same weights at every step
    w = ranks[0]["weights"]
    assert len(w) == 5 and ranks[0]["skipped"] == ranks[1]["skipped"] == 1, ranks
    assert [s for s in range(len(w) - 1) if w[s + 1] == w[s]] == [2], w


if __name__ == "__main__":
    ddp_main(sys.argv[1])
