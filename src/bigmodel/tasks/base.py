"""What every task shares: optimizer / scheduler wiring and the plain-data checkpoint record."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn as nn

from bigmodel.batches import batch_size
from bigmodel.errors import UserError
from bigmodel.optim import param_groups

log = logging.getLogger("bigmodel")


class Task(L.LightningModule):
    """A LightningModule around a plain `net`.

    Args:
        net: the torch module that maps inputs to outputs; the task owns loss and metrics. What
            each task needs of it is written in bigmodel.tasks.protocols.
        optimizer: a partial optimizer (`_partial_: true` in its config) awaiting parameters.
        scheduler: Lightning's lr-scheduler dict whose `scheduler` entry is a partial awaiting the
            optimizer, e.g. {"scheduler": partial(WarmupCosineLR, ...), "interval": "step"}.
        compile: compile the net (not the LightningModule) with torch.compile.
    """

    # what the task learns: it takes the data modules whose `learning` is the same
    learning: ClassVar[str] = ""
    # the loss classes the `loss` group may give it; none: it takes no `loss=`
    losses: ClassVar[tuple[type[nn.Module], ...]] = ()

    def __init__(
        self,
        net: nn.Module,
        optimizer: functools.partial | None = None,
        scheduler: dict | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_config = dict(scheduler) if scheduler else None
        self.compile_net = compile
        # The resolved run config as plain data, set by the runner; written into checkpoints so
        # eval.py and generate.py can rebuild the exact net, data pipeline and tokenizer.
        self.run_config: dict | None = None
        # the split the test stage scores: eval.py data.split=val logs val/... , not test/...
        self.test_split = "test"
        self._batch_flops: int | None = None
        self._flops_per_sample: dict[tuple, int | None] = {}

    def setup(self, stage: str) -> None:
        if self.compile_net and not getattr(self.net, "_compiled", False):
            # Compile the net, not the LightningModule: compiling `self.log` calls breaks Lightning.
            self.net.compile()
            self.net._compiled = True

    def configure_model(self) -> None:
        """strategy=fsdp2: shard the net's blocks with `fully_shard` over the data-parallel mesh."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from bigmodel.distributed import fully_shard_net

        # bf16-mixed under FSDP2 is FSDP's own policy: bf16 compute, fp32 gradient reduction
        mp = None
        if str(self.trainer.precision) == "bf16-mixed":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        fully_shard_net(self.net, self.device_mesh["data_parallel"], mp)

    def _plain_strategy(self) -> bool:
        """Whether each process holds whole parameters (one device, DDP; no trainer: yes), not
        shards of them (FSDP, DeepSpeed)."""
        from lightning.pytorch.strategies import (
            DDPStrategy,
            DeepSpeedStrategy,
            SingleDeviceStrategy,
        )

        if self._trainer is None:
            return True
        strategy = self._trainer.strategy
        return isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(
            strategy, DeepSpeedStrategy
        )

    def _optimizer_kernels(self, factory: functools.partial) -> dict[str, bool]:
        """The fastest update kernels torch has for this optimizer and these parameters.

        Adam and AdamW: one fused kernel for all parameters (on a CPU 12 % faster a step than
        the multi-tensor foreach kernels for the baby GPT, bench/levers.py), where parameters
        are plain tensors on one device or DDP replicas, in a precision without autocast;
        sharded ones (FSDP, DeepSpeed) and mixed precision keep the foreach kernels. Others:
        foreach, which torch uses on CUDA anyway, not on a CPU.
        """
        plain = self._trainer is not None and self._plain_strategy()
        # a fused step unscales gradients itself, so Lightning's mixed precision cannot clip
        # them before it: mixed precision keeps foreach
        plain = plain and "mixed" not in str(self.trainer.precision)
        optimizer_class = getattr(factory, "func", factory)
        if plain and optimizer_class in (torch.optim.Adam, torch.optim.AdamW):
            return {"fused": True}
        return {"foreach": True} if _accepts(factory, "foreach") else {}

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("no optimizer configured: choose one with optimizer=<name>")
        factory = self.optimizer_factory
        weight_decay = factory.keywords.get("weight_decay", 0.0)
        extra = {}
        asked = {k for k in ("foreach", "fused") if factory.keywords.get(k) is not None}
        if not asked:
            extra = self._optimizer_kernels(factory)
        precision = str(self.trainer.precision) if self._trainer is not None else ""
        clip = self.trainer.gradient_clip_val if self._trainer is not None else None
        if factory.keywords.get("fused") and "mixed" in precision and clip:
            # Lightning clips before the step, which a fused step (it unscales) does not allow
            raise UserError(
                f"optimizer.fused=true does not work with precision={precision} and gradient "
                f"clipping (trainer.gradient_clip_val={clip}): Lightning clips before the "
                "optimizer step and a fused step unscales the gradients itself; drop "
                "+optimizer.fused (bigmodel picks foreach kernels here), or set "
                "trainer.gradient_clip_val=null"
            )
        optimizer_class = getattr(factory, "func", factory)
        if getattr(optimizer_class, "needs_whole_matrices", False) and not self._plain_strategy():
            raise UserError(
                f"{optimizer_class.__name__} updates whole weight matrices, which "
                f"{type(self.trainer.strategy).__name__} shards across processes: train with "
                "strategy=ddp, or choose optimizer=adamw"
            )
        # an optimizer may say which parameters take which update (Muon: hidden matrices)
        groups_for = getattr(optimizer_class, "groups_for", None) or param_groups
        optimizer = factory(groups_for(self, weight_decay), **extra)
        if self._trainer is None or self.trainer.is_global_zero:  # once, not once per rank
            log.info(
                f"optimizer: {type(optimizer).__name__} (lr={optimizer.defaults.get('lr')}, "
                f"weight_decay={weight_decay})"
            )
        if not self.scheduler_config or self.scheduler_config.get("scheduler") is None:
            return optimizer
        sched = dict(self.scheduler_config)
        factory = sched["scheduler"]
        if (
            isinstance(factory, functools.partial)
            and factory.keywords.get("total_steps", 0) is None
        ):
            factory = functools.partial(
                factory, total_steps=self.trainer.estimated_stepping_batches
            )
        sched["scheduler"] = factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": sched}

    # ---------------------------------------------------------------------------------- FLOPs
    @property
    def flops_per_batch(self) -> int | None:
        """FLOPs of the batch in flight, read by Lightning's ThroughputMonitor (FLOPs/s, MFU).

        Training: forward + backward, 3 x the forward FLOPs (a backward pass costs about twice
        its forward); validation and test: the forward FLOPs of `eval_flops`. None where they are
        not known: the monitor then logs no FLOPs/s rather than a wrong figure.
        """
        return self._batch_flops

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        forward = self.forward_flops(batch)
        self._batch_flops = None if forward is None else 3 * forward

    def on_validation_batch_start(
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_flops = self.eval_flops(batch)

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_flops = self.eval_flops(batch)

    def forward_flops(self, batch: Any) -> int | None:
        """FLOPs of the net's forward pass on `batch` (None: not known).

        By default measured with torch's FlopCounterMode: the first batch of each input shape runs
        once more through the net (eval mode, no grad, random state untouched), and the count per
        sample is scaled by the batch size from then on. Tasks whose nets have a closed form
        (GPT's `flops_per_token`) override this.
        """
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else None
        if not isinstance(x, torch.Tensor) or x.ndim == 0 or len(x) == 0:
            return None
        key = (tuple(x.shape[1:]), x.dtype)
        if key not in self._flops_per_sample:
            total = self._count_forward_flops(x)
            self._flops_per_sample[key] = None if total is None else total // len(x)
        per_sample = self._flops_per_sample[key]
        return None if per_sample is None else per_sample * len(x)

    def eval_flops(self, batch: Any) -> int | None:
        """FLOPs of a validation / test batch: one forward pass unless a task does more."""
        return self.forward_flops(batch)

    @torch.no_grad()
    def _count_forward_flops(self, x: torch.Tensor) -> int | None:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        trainer = self._trainer
        precision = trainer.precision_plugin if trainer is not None else None
        modes = {m: m.training for m in self.net.modules()}
        counter = FlopCounterMode(display=False)
        try:
            with contextlib.ExitStack() as stack:
                # no random number drawn here changes what training draws next
                stack.enter_context(
                    torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else [])
                )
                if precision is not None:
                    x = precision.convert_input(x)
                    stack.enter_context(precision.forward_context())
                if getattr(self.net, "_compiled", False):  # count the eager ops, compile nothing
                    stack.enter_context(torch.compiler.set_stance("force_eager"))
                # the math kernel: FlopCounterMode counts no fused attention kernel on CPU
                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
                stack.enter_context(counter)
                self.net.eval()
                self.net(x)
        except Exception as e:  # a net the counter cannot follow: no FLOPs figure, no failure
            log.info(f"FLOPs not counted ({type(e).__name__}: {e}); no FLOPs/s are logged")
            return None
        finally:
            for module, training in modes.items():
                module.train(training)
        return counter.get_total_flops()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["bigmodel"] = {"config": self.run_config, "task": type(self).__name__}

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's `log`, with a test-stage metric named after the split it scores."""
        if self.test_split != "test" and name.startswith("test/"):
            name = f"{self.test_split}/{name.removeprefix('test/')}"
        super().log(name, value, *args, **kwargs)

    def log_metric(self, name: str, value: torch.Tensor | float, batch: Any, **kwargs) -> None:
        on_step = self.training
        self.log(
            name,
            value,
            on_step=on_step,
            on_epoch=not on_step,
            batch_size=batch_size(batch),
            sync_dist=not on_step,
            **kwargs,
        )


def _accepts(factory: functools.partial, name: str) -> bool:
    try:
        return name in inspect.signature(factory.func).parameters
    except (TypeError, ValueError):
        return False
