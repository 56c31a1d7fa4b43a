"""Optimizer parameter groups and learning-rate schedules shared by every task."""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
import torch.nn as nn

from bigmodel.errors import UserError

log = logging.getLogger("bigmodel")

# What a resumed WarmupCosineLR does when the run's total steps differ from the checkpoint's.
ON_RESUME = ("replan", "saved")

# Modules whose parameters never get weight decay: decaying norms, biases and embeddings only
# shrinks them towards zero without regularising anything useful.
_NO_DECAY_MODULES = (
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._BatchNorm,
)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters: decayed (weight matrices, conv kernels) and not decayed.

    A parameter is decayed when it has 2+ dimensions, belongs to no embedding or norm layer, and
    is not named by the `no_weight_decay()` of a module holding it (the timm convention: a net
    returns the names of embeddings it keeps as raw parameters, such as position tables and class
    tokens). A tied parameter (GPT's embedding = output head) counts as an embedding.
    """
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, _NO_DECAY_MODULES):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
        declared = getattr(module, "no_weight_decay", None)
        if callable(declared):
            no_decay_ids.update(id(_declared_parameter(module, name)) for name in declared())
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and id(p) not in no_decay_ids else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _declared_parameter(module: nn.Module, name: str) -> nn.Parameter:
    # A misspelt name would silently decay the embedding it meant to protect: refuse it.
    try:
        return module.get_parameter(name)
    except AttributeError:
        raise ValueError(
            f"{type(module).__name__}.no_weight_decay() names {name!r}, which is not one of its "
            "parameters"
        ) from None


class WarmupCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """Linear warmup from 0 over `warmup_steps`, then cosine decay to `min_lr_ratio` x the base lr
    at `total_steps`, constant after. Stepped once per optimizer step.

    on_resume: what a resumed run does when its `total_steps` (Task.configure_optimizers derives
    it from trainer.max_steps / max_epochs) differs from the checkpoint's. "replan" (default, as
    nanoGPT's get_lr does when max_iters grows): keep the saved step counter and warmup and
    stretch or shrink the cosine to the new total; past a shorter total the lr sits at the
    floor. "saved": continue exactly the schedule the checkpoint planned (extra steps at the
    floor). Equal totals resume the saved schedule bit for bit either way.
    """

    shape = "cosine"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        last_epoch: int = -1,
        on_resume: str = "replan",
    ) -> None:
        if total_steps is None or total_steps <= 0:
            raise UserError(
                f"the {self.shape} schedule needs a positive total_steps, got {total_steps}; set "
                "trainer.max_steps or scheduler.scheduler.total_steps"
            )
        if warmup_steps < 0:
            raise UserError(f"scheduler warmup_steps must be >= 0, got {warmup_steps}")
        if on_resume not in ON_RESUME:
            raise UserError(
                f"scheduler.scheduler.on_resume={on_resume!r} is not one of {', '.join(ON_RESUME)}"
                f": replan re-plans the {self.shape} to a resumed run's new total steps, saved "
                "keeps the checkpoint's plan"
            )
        if warmup_steps >= total_steps:
            # Short debug runs: keep the schedule's shape rather than refusing to start. A run
            # under 10 steps (a smoke run) has no warmup: said in passing, not warned about.
            short = total_steps // 10
            head = f"scheduler warmup_steps={warmup_steps} >= total_steps={total_steps}"
            if short:
                _log_once(
                    f"{head}: warming up for {short} steps (a tenth of the run) instead",
                    logging.WARNING,
                )
            else:
                _log_once(f"{head}: no warmup in a run this short")
            warmup_steps = short
        self.total_steps, self.warmup_steps, self.min_lr_ratio = (
            total_steps,
            warmup_steps,
            min_lr_ratio,
        )
        self.on_resume = on_resume
        super().__init__(optimizer, self.factor, last_epoch=last_epoch)

    def factor(self, step: int) -> float:
        if step >= self.total_steps:
            # the floor; also where a re-planned, shorter total falls inside the saved warmup
            return self.min_lr_ratio
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(
            1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        )
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )

    def state_dict(self) -> dict:
        # LambdaLR would try to save the bound method; our factor is fully described by fields.
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        state.pop("on_resume", None)  # the resuming run's choice, not the checkpoint's
        new_total, on_resume = self.total_steps, self.on_resume
        saved_total = state.get("total_steps", new_total)
        self.__dict__.update(state)
        if saved_total == new_total:
            return  # the saved schedule, bit for bit
        step = self.last_epoch
        head = (
            f"resuming at step {step} with {new_total} total steps "
            f"(the checkpoint planned {saved_total})"
        )
        if on_resume == "saved":
            self.total_steps = saved_total
            if new_total > saved_total:
                what = (
                    f"on_resume=saved keeps the saved plan, so the last "
                    f"{new_total - max(step, saved_total)} steps train at the floor lr "
                    f"(min_lr_ratio={self.min_lr_ratio} x lr)"
                )
            else:
                what = (
                    f"on_resume=saved keeps the saved plan, so training stops at step "
                    f"{new_total}, before the {self.shape} reaches its floor at step {saved_total}"
                )
            _log_once(f"{head}: {what}; scheduler.scheduler.on_resume=replan re-plans it")
            return
        before = self.factor(step)
        self.total_steps = new_total
        after = self.factor(step)
        # The optimizer was restored first, holding the saved plan's lr for this step: replace it.
        lrs = [base_lr * after for base_lr in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = lrs
        if step >= new_total:
            what = (
                f"the {self.shape} schedule is re-planned to {new_total} steps, which this run is "
                f"already past: the lr stays at the floor (min_lr_ratio={self.min_lr_ratio} x lr)"
            )
        else:
            what = f"the {self.shape} schedule is re-planned to {new_total} steps"
        _log_once(
            f"{head}: {what} (lr {self.base_lrs[0] * after:.4g} now, "
            f"{self.base_lrs[0] * before:.4g} under the saved plan); "
            "scheduler.scheduler.on_resume=saved keeps the saved plan"
        )


class WarmupStableDecayLR(WarmupCosineLR):
    """Warmup-stable-decay ("trapezoidal", MiniCPM; the modded-nanogpt speedrun's): linear
    warmup over `warmup_steps`, the base lr held, then a linear decay over the last
    `decay_fraction` of `total_steps` to `min_lr_ratio` x the base lr. Holding the lr high for
    most of the run and cooling it at the end reaches a lower loss than a cosine of the same
    length; the decay can also start from any saved stable-phase checkpoint. Resuming with
    another total re-plans (or keeps) the schedule as WarmupCosineLR does.
    """

    shape = "warmup-stable-decay"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        decay_fraction: float = 0.3,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
        on_resume: str = "replan",
    ) -> None:
        if not 0 < decay_fraction <= 1:
            raise UserError(
                f"scheduler.scheduler.decay_fraction={decay_fraction} must be in (0, 1]: the "
                "share of the run spent cooling the lr down"
            )
        self.decay_fraction = decay_fraction
        super().__init__(optimizer, total_steps, warmup_steps, min_lr_ratio, last_epoch, on_resume)

    def factor(self, step: int) -> float:
        if step >= self.total_steps:
            return self.min_lr_ratio
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        decay_steps = max(1, round(self.decay_fraction * self.total_steps))
        start = max(self.warmup_steps, self.total_steps - decay_steps)
        if step < start:
            return 1.0
        # from 1 at `start` to min_lr_ratio at total_steps (the step after the last one)
        progress = (step - start) / max(1, self.total_steps - start)
        return 1.0 - (1.0 - self.min_lr_ratio) * progress


def _log_once(message: str, level: int = logging.INFO) -> None:
    """Log on the first process only: every DDP / FSDP rank builds its own scheduler."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        log.log(level, message)
