"""Helpers for running one config on many devices: batch arithmetic and FSDP wrapping.

The strategies themselves are Lightning's (configs/strategy/*.yaml); this module holds only what
those configs, the tasks and the runner need around them. Importing it changes nothing (the DDP
launcher under Hydra is bigmodel.launcher's).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch.nn as nn

from bigmodel.errors import UserError


# ------------------------------------------------------------------------------ batch sizes
def derive_accumulation(global_batch_size: int, batch_size: int, devices: int, nodes: int) -> int:
    """Gradient accumulation steps so that batch_size x devices x nodes x steps = global_batch_size.

    `batch_size` is per device (what one process's DataLoader yields).
    """
    per_step = batch_size * devices * nodes
    if global_batch_size <= 0 or global_batch_size % per_step:
        raise UserError(
            f"global_batch_size={global_batch_size} is not a positive multiple of data.batch_size "
            f"x devices x nodes = {batch_size} x {devices} x {nodes} = {per_step}; set "
            f"global_batch_size to a multiple of {per_step}, or change data.batch_size"
        )
    return global_batch_size // per_step


# ------------------------------------------------------------------------------------ FSDP
def module_classes(paths: list[str], enabled: bool = True) -> set[type[nn.Module]] | None:
    """The classes named by dotted paths, as FSDP's auto-wrap / checkpointing policies take them.

    Returns None when `enabled` is false (the policy is off). A path whose module is missing is
    skipped, so one list can name the blocks of every net the project has.
    """
    if not enabled:
        return None
    out: set[type[nn.Module]] = set()
    for path in paths:
        module_name, _, cls_name = path.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        cls = getattr(module, cls_name, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise UserError(f"{path} is not an nn.Module class; list transformer block classes")
        out.add(cls)
    if not out:
        raise UserError(f"none of {list(paths)} could be imported; list transformer block classes")
    return out


class NetBlocks:
    """An FSDP auto-wrap (or activation-checkpointing) policy that takes the units from the net:
    every module of a `blocks` list (bigmodel.tasks.protocols), whatever its class, so that a
    new model family needs no class list in configs/strategy/fsdp.yaml.

    torch calls it on each module, a parent (recurse=True) before its children: a module with a
    `blocks` list has them noted there, and each is then wrapped (recurse=False).
    """

    def __init__(self) -> None:
        self.blocks: set[int] = set()

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
        if recurse:
            blocks = getattr(module, "blocks", None)
            if isinstance(blocks, nn.ModuleList):
                self.blocks.update(id(b) for b in blocks)
            return True  # look inside every module
        return id(module) in self.blocks


def net_blocks(enabled: bool = True) -> NetBlocks | None:
    """`NetBlocks()`, or None when `enabled` is false (the policy is off)."""
    return NetBlocks() if enabled else None


def fully_shard_net(net: nn.Module, mesh: Any, mp_policy: Any | None = None) -> nn.Module:
    """FSDP2: shard each block of `net.blocks` (one all-gather per block), then the rest of the net.

    Nets without a `blocks` list are sharded as one unit. Idempotent: a net already sharded is
    left as it is (Lightning may call configure_model more than once).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(net, FSDPModule):
        return net
    kwargs = {"mesh": mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in getattr(net, "blocks", []):
        fully_shard(block, **kwargs)
    fully_shard(net, **kwargs)
    return net


def fsdp2_strategy(save_distributed_checkpoint: bool = False, **kwargs: Any):
    """Lightning's ModelParallelStrategy with every device of every node in one FSDP2 shard group.

    ModelParallelStrategy's `auto` sizes mean data parallel over nodes x tensor parallel within a
    node; pure FSDP2 wants data parallel over all devices and no tensor parallelism.
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    class FSDP2Strategy(ModelParallelStrategy):
        def setup_environment(self) -> None:
            self._data_parallel_size = self.num_nodes * self.num_processes
            super().setup_environment()

    return FSDP2Strategy(
        data_parallel_size="auto",
        tensor_parallel_size=1,
        save_distributed_checkpoint=save_distributed_checkpoint,
        **kwargs,
    )
