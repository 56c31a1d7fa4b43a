"""Optimizer and schedule settings changed on resume: applied, restarted or refused, never dropped.

Lightning restores a checkpoint's optimizer and scheduler state over the ones a resumed run
builds from its config: resumed with `optimizer.lr=0.01`, a run said lr=0.01 and trained at the
checkpoint's lr; resumed with another optimizer class, it handed that class the old one's state
and failed at the first step (`KeyError: 'momentum'`). `ResumeChanges` edits the loaded
checkpoint before Lightning restores it from it:

- **The same optimizer class**: each hyper-parameter whose value this run gives differently
  (lr, weight_decay, betas, momentum, eps, ...) replaces the checkpoint's in every parameter
  group (weight decay stays off for the groups that never decay); moments and step counts are
  kept. A new lr moves the schedule with it: every lr the optimizer and scheduler hold (base
  lrs included) is scaled by new / old, so warmup and decay go on from the same step at the
  new scale. One log line lists what changed, with the checkpoint's values.
- **Another optimizer class** (`optimizer=sgd` after adamw): its state (moments, step counts)
  starts afresh, with one warning line; the weights, the step count, the position in the
  schedule (at the new lr) and the data position are restored as ever.
- **The schedule**: settings of the same scheduler class (warmup_steps, min_lr_ratio, gamma,
  patience, ...) are applied as the optimizer's are; another scheduler class starts afresh
  from its first step, and `scheduler=none` trains at the optimizer's lr from there on, each
  with one warning line.
- The update kernels (foreach, fused) follow this run's strategy and precision, silently.

Under a strategy that restores the optimizer itself (DeepSpeed), a changed optimizer setting is
refused with one line.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from bigmodel.errors import UserError

log = logging.getLogger("bigmodel")

# parameter-group keys that say how to compute, not what: this machine's choice
MACHINE_KEYS = frozenset({"foreach", "fused", "capturable", "differentiable"})
# the scheduler's own keys in `scheduler.scheduler`, or ones the runner derives
_SCHEDULER_FIXED = frozenset({"total_steps", "on_resume", "last_epoch", "verbose"})


def _plain(value: Any) -> Any:
    """A value comparable across a checkpoint and a config: tensors as floats, lists as tuples."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else tuple(value.flatten().tolist())
    if isinstance(value, Sequence) and not isinstance(value, str):  # ListConfig too
        return tuple(_plain(v) for v in value)
    return value


def _show(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, tuple):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _set_lr(group: dict[str, Any], lr: float) -> None:
    """Set a group's lr, in place where it is a tensor (fused and capturable optimizers)."""
    if isinstance(group.get("lr"), torch.Tensor):
        group["lr"] = group["lr"].clone().fill_(lr)
    else:
        group["lr"] = lr


def _section(config: dict | None, *keys: str) -> dict[str, Any]:
    node: Any = config or {}
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


class ResumeChanges(L.Callback):
    """Apply this run's optimizer and scheduler settings to a restored state (module docstring).

    The runner adds it to every training (it has no settings and saves no state).
    """

    def __init__(self) -> None:
        self._checkpoint: dict[str, Any] | None = None
        self._applied = False
        self._recompute_lr = False

    # Lightning loads the checkpoint (on_load_checkpoint) before the optimizers exist and
    # restores their state after on_fit_start; strategies that set up first (FSDP, DeepSpeed)
    # build them before loading. The edit is made at whichever of the two hooks comes second.
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == "fit":
            self._checkpoint = checkpoint
            self._apply(trainer, pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # restored by now: a changed lambda schedule (warmup, floor) sets this step's lr itself
        if not self._recompute_lr:
            return
        self._recompute_lr = False
        for config in trainer.lr_scheduler_configs:
            sched = config.scheduler
            if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                lrs = [
                    b * f(sched.last_epoch)
                    for b, f in zip(sched.base_lrs, sched.lr_lambdas, strict=True)
                ]
                for group, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
                    _set_lr(group, lr)
                sched._last_lr = lrs

    # ---------------------------------------------------------------------------------- edit
    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ckpt = self._checkpoint
        if ckpt is None or self._applied or not trainer.optimizers:
            return
        self._applied = True
        saved_cfg = _section(ckpt.get("bigmodel"), "config")
        ours_cfg = getattr(pl_module, "run_config", None) or {}
        changes: list[str] = []
        warnings: list[str] = []
        if not trainer.strategy.lightning_restore_optimizer:
            self._refuse(saved_cfg, ours_cfg)
            return
        saved_states = ckpt.get("optimizer_states") or []
        rescaled: dict[int, list[tuple[float, float]]] = {}  # optimizer -> (new base, new lr)
        for i, (opt, saved) in enumerate(zip(trainer.optimizers, saved_states, strict=False)):
            fresh = opt.state_dict()
            groups, saved_groups = fresh["param_groups"], saved.get("param_groups") or []
            if len(groups) != len(saved_groups):
                continue  # not this run's model: Lightning and torch say what does not fit
            old_lr = _section(saved_cfg, "optimizer").get("lr")
            new_lr = _section(ours_cfg, "optimizer").get("lr")
            old_class = _section(saved_cfg, "optimizer").get("_target_")
            new_class = _section(ours_cfg, "optimizer").get("_target_")
            if old_class and new_class:
                same_class = old_class == new_class
            else:  # a checkpoint without its config: the classes' hyper-parameters tell
                same_class = set(groups[0]) - MACHINE_KEYS == set(saved_groups[0]) - MACHINE_KEYS
            # per group: the base lr a schedule scales (initial_lr, where a scheduler set one),
            # before and now, and this run's lr at the point the schedule had reached
            bases = []
            for group, old in zip(groups, saved_groups, strict=True):
                old_base = float(old.get("initial_lr", old_lr if old_lr is not None else old["lr"]))
                new_base = float(group.get("initial_lr", group["lr"]))
                fraction = float(old["lr"]) / old_base if old_base else 1.0
                bases.append((old_base, new_base, new_base * fraction))
            lrs = [(new_base, lr) for _, new_base, lr in bases]
            lr_changed = any(not math.isclose(o, n, rel_tol=1e-9) for o, n, _ in bases)
            if not same_class:
                # a fresh state of this run's class, at the schedule's point, at this run's lr
                for group, (_, lr) in zip(groups, lrs, strict=True):
                    _set_lr(group, lr)
                saved_states[i] = fresh
                rescaled[i] = lrs
                warnings.append(
                    f"optimizer: {_name(new_class) or type(opt).__name__} differs from the "
                    f"checkpoint's {_name(old_class) or 'optimizer'}: its state (moments, step "
                    "counts) starts afresh; the weights, step, schedule and data position are "
                    "restored"
                )
                continue
            for key in groups[0]:
                if key in ("params", "param_names", "lr", "initial_lr"):
                    continue
                shown = False
                for group, old in zip(groups, saved_groups, strict=True):
                    if key in MACHINE_KEYS or key not in old:
                        old[key] = group[key]  # this machine's, or one the checkpoint predates
                    elif _plain(old[key]) != _plain(group[key]):
                        if not shown:
                            changes.append(
                                f"optimizer.{key}={_show(group[key])} (checkpoint: "
                                f"{_show(old[key])})"
                            )
                            shown = True
                        old[key] = group[key]
            if lr_changed:
                for old, (base, lr) in zip(saved_groups, lrs, strict=True):
                    _set_lr(old, lr)
                    if "initial_lr" in old:
                        old["initial_lr"] = base
                rescaled[i] = lrs
                changes.append(
                    f"optimizer.lr={_show(new_lr if new_lr is not None else lrs[0][0])} "
                    f"(checkpoint: {_show(old_lr if old_lr is not None else '?')}; the schedule "
                    f"follows it: lr {_show(lrs[0][1])} at this step)"
                )
        self._edit_schedulers(trainer, ckpt, saved_cfg, ours_cfg, rescaled, changes, warnings)
        if trainer.is_global_zero:
            for line in warnings:
                log.warning(line)
            if changes:
                log.info(
                    "resuming with settings changed since the checkpoint, applied to its "
                    f"restored state: {', '.join(changes)}"
                )

    def _edit_schedulers(
        self,
        trainer: L.Trainer,
        ckpt: dict[str, Any],
        saved_cfg: dict[str, Any],
        ours_cfg: dict[str, Any],
        rescaled: dict[int, list[tuple[float, float]]],
        changes: list[str],
        warnings: list[str],
    ) -> None:
        saved_states = ckpt.get("lr_schedulers") or []
        old = _section(saved_cfg, "scheduler", "scheduler")
        ours = _section(ours_cfg, "scheduler", "scheduler")
        if saved_states and not trainer.lr_scheduler_configs:
            # scheduler=none now: the lr is the optimizer's own from here, not the schedule's
            for opt, opt_state in zip(trainer.optimizers, ckpt["optimizer_states"], strict=False):
                for group, live in zip(opt_state["param_groups"], opt.param_groups, strict=True):
                    _set_lr(group, float(live["lr"]))
            warnings.append(
                f"scheduler: none, where the checkpoint had {_name(old.get('_target_')) or 'one'}"
                ": the lr is the optimizer's own from here on"
            )
            return
        for i, (config, state) in enumerate(
            zip(trainer.lr_scheduler_configs, saved_states, strict=False)
        ):
            sched = config.scheduler
            if old.get("_target_") and ours.get("_target_") and old["_target_"] != ours["_target_"]:
                saved_states[i] = sched.state_dict()  # this run's schedule, from its start
                opt_index = trainer.optimizers.index(sched.optimizer)
                opt_state = ckpt["optimizer_states"][opt_index]
                for group, live in zip(
                    opt_state["param_groups"], sched.optimizer.param_groups, strict=True
                ):
                    _set_lr(group, float(live["lr"]))
                    if "initial_lr" in live:
                        group["initial_lr"] = live["initial_lr"]
                warnings.append(
                    f"scheduler: {_name(ours['_target_'])} differs from the checkpoint's "
                    f"{_name(old['_target_'])}: the schedule starts afresh from its first step"
                )
                continue
            lrs = rescaled.get(trainer.optimizers.index(sched.optimizer))
            if lrs is not None:
                if "base_lrs" in state:
                    state["base_lrs"] = [base for base, _ in lrs]
                if "_last_lr" in state:
                    state["_last_lr"] = [lr for _, lr in lrs]
                self._recompute_lr = True
            for key, value in ours.items():
                if key.startswith("_") or key in _SCHEDULER_FIXED or key not in state:
                    continue
                if key in old and _plain(old[key]) != _plain(value):
                    applied = getattr(sched, key, value)  # as the scheduler took it
                    changes.append(
                        f"scheduler.scheduler.{key}={_show(applied)} (checkpoint: "
                        f"{_show(state[key])})"
                    )
                    state[key] = applied
                    self._recompute_lr = True

    @staticmethod
    def _refuse(saved_cfg: dict[str, Any], ours_cfg: dict[str, Any]) -> None:
        old, ours = _section(saved_cfg, "optimizer"), _section(ours_cfg, "optimizer")
        changed = [
            f"optimizer.{k}={_show(old[k])}"
            for k in sorted(set(old) & set(ours))
            if k not in MACHINE_KEYS and k != "_partial_" and _plain(old[k]) != _plain(ours[k])
        ]
        if changed:
            raise UserError(
                "this strategy restores the optimizer from the checkpoint itself, so changed "
                "optimizer settings would not be applied; resume with the checkpoint's "
                f"{', '.join(changed)}"
            )


def _name(target: str | None) -> str:
    return (target or "").rpartition(".")[2]
