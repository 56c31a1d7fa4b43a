"""Optimizer parameter groups and learning-rate schedules shared by every task."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from bigmodel.errors import UserError

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
    at `total_steps`, constant after. Stepped once per optimizer step."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        if total_steps is None or total_steps <= 0:
            raise UserError(
                f"the cosine schedule needs a positive total_steps, got {total_steps}; set "
                "trainer.max_steps or scheduler.scheduler.total_steps"
            )
        if warmup_steps < 0:
            raise UserError(f"scheduler warmup_steps must be >= 0, got {warmup_steps}")
        if warmup_steps >= total_steps:
            # Short debug runs: keep the schedule's shape rather than refusing to start.
            short = total_steps // 10
            warnings.warn(
                f"warmup_steps={warmup_steps} >= total_steps={total_steps}: warming up for {short}",
                stacklevel=2,
            )
            warmup_steps = short
        self.total_steps, self.warmup_steps, self.min_lr_ratio = (
            total_steps,
            warmup_steps,
            min_lr_ratio,
        )
        super().__init__(optimizer, self.factor, last_epoch=last_epoch)

    def factor(self, step: int) -> float:
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
        self.__dict__.update(state_dict)
