"""Training batches that resume exactly: the epoch's order and the position in it survive a stop.

`DataModule` (base.py) builds every training loader with `train_loader`. Two parts, one job
each:

- `EpochSampler` fixes the order of an epoch by (seed, epoch) alone and shards it over the
  training processes. It subclasses `DistributedSampler`, which Lightning keeps as it is under
  DDP (it replaces only plain samplers), so one process and N run the same code.
- `ResumableLoader` is a DataLoader with `state_dict` / `load_state_dict`. Lightning's fit loop
  saves the state of such loaders in its own loop state (`loops.fit_loop.state_dict.
  combined_loader`) and hands it back on resume, next to its batch counters. The state is the
  position in the epoch counted globally: items of the epoch's order consumed by all processes.

Lightning pre-fetches no batch from a loader whose length it knows, so the batches the loader
has yielded are the batches trained on when a checkpoint is written.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from bigmodel.errors import UserError


class EpochSampler(DistributedSampler):
    """The indices of one epoch, in an order fixed by (seed, epoch), sharded over processes.

    Like `DistributedSampler`, the order is padded (repeating its head) to a multiple of the
    number of processes, and process r takes every item at r, r + world, r + 2 world, ...
    `start` items of the padded order (all processes together) are skipped once: that is how a
    resumed run continues where the stopped one was. The length stays that of a whole epoch, as
    Lightning counts the epoch's batches once and continues its own counter on resume.

    `set_epoch` is passed on to a dataset that has one (text windows are drawn per epoch).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        shuffle: bool,
        seed: int,
        redraw: bool = True,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0
        self.redraw = redraw  # False: the dataset keeps its first epoch's items (overfitting)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0  # a saved position belongs to the epoch it was saved in
        super().set_epoch(epoch)
        if self.redraw and callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(epoch)

    def order(self) -> list[int]:
        """The whole epoch's padded order, before sharding."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        pad = self.total_size - n
        return order + (order * math.ceil(pad / n))[:pad] if pad > 0 else order

    def __iter__(self):
        start, self.start = self.start, 0
        return iter(self.order()[start + self.rank :: self.num_replicas])


class ResumableLoader(DataLoader):
    """A DataLoader over an `EpochSampler` that records how far into the epoch it has got."""

    def __init__(self, dataset: Dataset, sampler: Sampler, **kwargs: Any) -> None:
        if not isinstance(sampler, EpochSampler):
            # Lightning swaps in a SequentialSampler for `trainer.overfit_batches` (the same
            # batches every epoch): an unshuffled EpochSampler gives that order and resumes,
            # and the dataset keeps its items (text windows are otherwise redrawn each epoch)
            sampler = EpochSampler(
                dataset,
                num_replicas=getattr(sampler, "num_replicas", 1),
                rank=getattr(sampler, "rank", 0),
                shuffle=False,
                seed=0,
                redraw=False,
            )
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._epoch, self._start, self._yielded = 0, 0, 0

    def __iter__(self):
        sampler: EpochSampler = self.sampler
        self._epoch, self._start, self._yielded = sampler.epoch, sampler.start, 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler: EpochSampler = self.sampler
        per_batch = self.batch_size or 1  # batch_size=None: every item is a whole batch
        consumed = self._start + self._yielded * per_batch * sampler.num_replicas
        return {
            "epoch": self._epoch,
            "consumed": consumed,
            "world_size": sampler.num_replicas,
            "epoch_items": sampler.total_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: EpochSampler = self.sampler
        if state["world_size"] != sampler.num_replicas:
            raise UserError(
                f"the checkpoint was written by {state['world_size']} training processes and this "
                f"run has {sampler.num_replicas}; resume with the same trainer.devices x "
                "trainer.num_nodes (the position in the epoch and the step count depend on it)"
            )
        if state["epoch_items"] != sampler.total_size:
            raise UserError(
                f"the checkpoint's training set had {state['epoch_items']} items an epoch and this "
                f"one has {sampler.total_size}; resume with the data config it was trained with"
            )
        sampler.epoch, sampler.start = state["epoch"], state["consumed"]


def eval_loader(dataset: Dataset, **kwargs: Any) -> DataLoader:
    """A validation / test loader in the dataset's order, with a generator of its own.

    Starting to iterate a DataLoader draws its workers' base seed from its generator, by default
    the global one. A resumed run skips the validation the stopped run did at its last step, so
    that draw must not come from the generators training uses.
    """
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return DataLoader(dataset, **kwargs)


def train_loader(
    datamodule: Any, dataset: Dataset, *, shuffle: bool, seed: int, **kwargs: Any
) -> ResumableLoader:
    """The training loader of a data module: resumable, sharded over the trainer's processes."""
    trainer = getattr(datamodule, "trainer", None)
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
    # its own generator: the loader draws its workers' base seed when an epoch's iteration
    # starts, and that draw must not move the global generators dropout and augmentation use
    kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
    # the sampler by name: Lightning re-creates the loader with another one for overfit_batches
    return ResumableLoader(dataset, sampler=sampler, **kwargs)
