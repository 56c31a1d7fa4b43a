"""Stop the run, or skip the update, on a NaN/inf or spiking training loss: before the step.

The loss of every micro-batch is read in `on_before_backward` and judged in
`on_before_optimizer_step`, after the backward pass and before `optimizer.step()`, so a bad batch
never reaches the weights or the optimizer state. `stop` ends the run with a `UserError` (one line,
exit status 2, naming the step, the loss, the last good checkpoint and the fix); `skip` sets every
gradient to None, which torch optimizers take as "no update" for that parameter, and counts it.

Reused from Lightning, and why not more:
- `lightning.pytorch.callbacks.SpikeDetection` (and `lightning.fabric.utilities.spike`) gave the
  rule: a running mean of the last `window` finite losses, a warmup, a relative tolerance, and
  non-finite or spiking losses kept out of the mean. The class itself is not used: it runs in
  `on_train_batch_end`, after the optimizer step, so the spiking update is already in the
  weights; it can only raise `TrainingSpikeException` (a traceback) and write skip_batches.json
  for a manual re-run, not drop the update; its warmup counts `batch_idx` within an epoch, not
  steps; and its window (a torchmetrics `Running` metric) is not in its `state_dict`, whose
  `load_state_dict` fails (it restores `self.running`, which does not exist). Here the window is
  a list of floats in the callback state, so a resumed run judges exactly as the stopped one.
  Note the tolerance reads differently: `spike_rtol=3.0` flags a loss above 3 x the mean, where
  SpikeDetection's `rtol=2.0` flags one 2 x the mean above it (the same 3 x).
- How SpikeDetection makes ranks agree (`strategy.reduce_boolean_decision`, an all_reduce SUM over
  the strategy): here one `trainer.strategy.reduce` of both flags at once, once per optimizer step
  when the world size is above 1, so every rank stops or skips together and none waits forever.

Losses are the per-micro-batch values the task returned: the 1 / accumulate_grad_batches that
Lightning divides by, and the AMP grad scaler's factor (16-mixed), are taken back out.
`skip` is refused under DeepSpeed, whose engine keeps its own reduced gradients (its fp16 loss
scaler already skips overflowing steps); `stop` works under every strategy.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from typing import Any

import lightning as L
import torch

from bigmodel.errors import UserError

log = logging.getLogger("bigmodel")

_ACTIONS = ("stop", "skip")


class LossGuard(L.Callback):
    """Guard the weights against non-finite and spiking training losses.

    on_nonfinite: `stop` (default) or `skip` when a loss is NaN or infinite.
    spike_rtol: a finite loss above `spike_rtol` x the running mean of the last `spike_window`
        finite losses, from step `spike_warmup` on, is a spike (None: no spike detection).
    on_spike: `skip` (default) or `stop` on a spike.
    With gradient accumulation one bad micro-batch drops the whole update. A skipped update still
    counts as a step (global_step, the learning-rate schedule). `skip` logs the running total
    `train/skipped_batches` (training batches per device whose update was dropped).
    """

    def __init__(
        self,
        on_nonfinite: str = "stop",
        spike_rtol: float | None = None,
        spike_window: int = 20,
        spike_warmup: int = 10,
        on_spike: str = "skip",
    ) -> None:
        for key, value in (("on_nonfinite", on_nonfinite), ("on_spike", on_spike)):
            if value not in _ACTIONS:
                raise UserError(
                    f"callbacks.loss_guard.{key}={value!r} must be one of {', '.join(_ACTIONS)}"
                )
        if spike_rtol is not None and (
            isinstance(spike_rtol, bool) or not isinstance(spike_rtol, (int, float))
        ):
            raise UserError(
                f"callbacks.loss_guard.spike_rtol={spike_rtol!r} must be a number or null"
            )
        if spike_rtol is not None and not spike_rtol > 1:
            raise UserError(
                f"callbacks.loss_guard.spike_rtol={spike_rtol} must be above 1 (3.0: a loss "
                "above 3 x the running mean is a spike), or null to turn spike detection off"
            )
        for key, value, low in (
            ("spike_window", spike_window, 1),
            ("spike_warmup", spike_warmup, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"callbacks.loss_guard.{key}={value!r} must be an integer >= {low}")
        self.on_nonfinite, self.on_spike = on_nonfinite, on_spike
        self.spike_rtol = None if spike_rtol is None else float(spike_rtol)
        self.spike_window, self.spike_warmup = spike_window, spike_warmup
        self.skipped_batches = 0
        self.window: deque[float] = deque(maxlen=spike_window)
        self._pending: list[torch.Tensor] = []  # this update's micro-batch losses, on device

    @property
    def may_skip(self) -> bool:
        return self.on_nonfinite == "skip" or (
            self.spike_rtol is not None and self.on_spike == "skip"
        )

    # ------------------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if stage == "fit" and self.may_skip and isinstance(trainer.strategy, DeepSpeedStrategy):
            keys = ["on_nonfinite"] if self.on_nonfinite == "skip" else []
            keys += ["on_spike"] if self.spike_rtol is not None and self.on_spike == "skip" else []
            fix = " and ".join(f"callbacks.loss_guard.{k}=stop" for k in keys)
            raise UserError(
                "callbacks.loss_guard: skip does not work under DeepSpeed (its engine keeps the "
                f"reduced gradients itself); set {fix}, or use strategy=ddp or fsdp"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = []

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        # kept on the device: read once per optimizer step, not once per micro-batch
        self._pending.append(loss.detach().float().reshape(()))

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        losses = self._losses(trainer, pl_module)
        self._pending = []
        mean = sum(self.window) / len(self.window) if self.window else None
        nonfinite = next((x for x in losses if not math.isfinite(x)), None)
        spike = None
        if (
            self.spike_rtol is not None
            and mean is not None
            and mean > 0  # the rule is a ratio: losses that can be negative are not judged
            and trainer.global_step >= self.spike_warmup
        ):
            spike = next(
                (x for x in losses if math.isfinite(x) and x > self.spike_rtol * mean), None
            )
        any_nonfinite, any_spike = self._agree(trainer, nonfinite is not None, spike is not None)

        if any_nonfinite:
            action, key = self.on_nonfinite, "on_nonfinite"
            what = (
                f"non-finite training loss {nonfinite}"
                if nonfinite is not None
                else "a non-finite training loss on another rank"
            )
        elif any_spike:
            action, key = self.on_spike, "on_spike"
            what = (
                f"training loss spike {spike:.6g} (above {self.spike_rtol:g} x the running mean "
                f"{mean:.6g} of the last {len(self.window)} losses)"
                if spike is not None
                else "a training loss spike on another rank"
            )
        else:
            self.window.extend(losses)
            self._log(pl_module)
            return

        step = trainer.global_step
        if action == "stop":
            clip = trainer.gradient_clip_val
            clipping = (
                f"lower gradient clipping (trainer.gradient_clip_val, now {clip})"
                if clip
                else "set gradient clipping (trainer.gradient_clip_val=1.0)"
            )
            raise UserError(
                f"loss guard: {what} at step {step}; stopped before the optimizer step, so no "
                f"update was made from it; last good checkpoint: {last_checkpoint(trainer)}; "
                f"fix: lower the learning rate (optimizer.lr), {clipping}, or skip such batches "
                f"with callbacks.loss_guard.{key}=skip"
            )
        optimizer.zero_grad(set_to_none=True)  # torch optimizers leave grad-less parameters be
        self.skipped_batches += max(1, len(losses))
        self._log(pl_module)
        if trainer.is_global_zero:
            log.warning(
                f"loss guard: {what} at step {step}; skipped this update "
                f"(callbacks.loss_guard.{key}=skip); batches skipped so far: {self.skipped_batches}"
            )

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_batches": self.skipped_batches, "window": list(self.window)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_batches = int(state_dict.get("skipped_batches", 0))
        self.window = deque(
            (float(x) for x in state_dict.get("window", [])), maxlen=self.spike_window
        )

    # ------------------------------------------------------------------------------ helpers
    def _losses(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[float]:
        """This update's micro-batch losses as the task computed them (one device sync)."""
        if not self._pending:
            return []
        values = torch.stack(self._pending)
        if pl_module.automatic_optimization:  # Lightning divided each by the accumulation
            values = values * trainer.accumulate_grad_batches
        scaler = getattr(trainer.strategy.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():  # 16-mixed scales the loss it passes on
            values = values / scaler.get_scale()
        return values.cpu().tolist()

    @staticmethod
    def _agree(trainer: L.Trainer, nonfinite: bool, spike: bool) -> tuple[bool, bool]:
        """Whether any rank saw a non-finite loss / a spike: the same answer on every rank."""
        if trainer.world_size <= 1:
            return nonfinite, spike
        flags = torch.tensor([float(nonfinite), float(spike)], device=trainer.strategy.root_device)
        flags = trainer.strategy.reduce(flags, reduce_op="sum")
        total_nonfinite, total_spike = flags.tolist()
        return total_nonfinite > 0, total_spike > 0

    def _log(self, pl_module: L.LightningModule) -> None:
        if self.may_skip:
            pl_module.log(
                "train/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False
            )


def last_checkpoint(trainer: L.Trainer) -> str:
    """The newest last or best file of the checkpoint callbacks, or "no checkpoint yet"."""
    paths = [
        getattr(cb, attr, "")
        for cb in trainer.checkpoint_callbacks
        for attr in ("last_model_path", "best_model_path")
    ]
    found = [p for p in paths if p and os.path.isfile(p)]
    return max(found, key=os.path.getmtime) if found else "no checkpoint yet"
