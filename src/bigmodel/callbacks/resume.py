"""Exact resume: the generators, and the data position, as the stopped run left them."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch

# a large odd multiplier spreads (seed, batch, rank) over the 64-bit seed space
_MIX = 0x9E3779B97F4A7C15


class ExactResume(L.Callback):
    """Two things a resumed run needs beyond Lightning's own restore.

    1. At every batch boundary of training, seed torch (CPU and CUDA), numpy and python's
    `random` from (seed, training batches done, rank).

    Dropout and augmentation draw from these generators, so their state decides the numbers a
    run gets. Saving the live states would need every rank's state in the checkpoint, gathered
    at save time; Lightning also saves from signal handlers (SLURM), where a gather can hang.
    Re-deriving them from what the checkpoint already holds needs neither: the state before
    batch n is a function of n, in the uninterrupted run and in one resumed at n alike.

    Boundaries: the start of training and of each epoch, the end of each training batch, and
    the end of each validation during fit (after the callbacks that sample text). The runner
    puts this callback after the others so that nothing draws from the generators between
    the re-seeding and the checkpoint written at the same boundary.

    2. The training loader's saved position reaches the loader. Lightning hands it over when it
    sets the loader up on resume, but a run that trains by epochs has its loader set up
    earlier, before the restore (a schedule asks for `trainer.estimated_stepping_batches`), and
    Lightning then skips the hand-over (2.6). It is done here, before the first batch is read.

    3. Resumed from the last batch of an epoch, Lightning (2.6) closes that epoch but does not
    count the next one as ready and started, since its restart stage still says mid-epoch. The
    checkpoints that run writes then look like the end of a finished epoch; a run resumed from
    one of them counts an epoch twice (the epoch number, and the sampler's shuffle, run one
    ahead). The two counts are made here, so every checkpoint holds the uninterrupted run's.
    """

    def __init__(self, seed: int | None = None) -> None:
        # no seed configured: draw one, and keep it in checkpoints so a resumed run uses it too
        self.seed = int(seed) if seed is not None else random.SystemRandom().randrange(2**31)
        self.batches = 0

    def reseed(self, trainer: L.Trainer) -> None:
        s = (self.seed * _MIX + self.batches * 1_000_003 + trainer.global_rank) % 2**63
        seed_torch(s)
        np.random.seed(s % 2**32)
        random.seed(s)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        if fit_loop._combined_loader_states_to_load:  # still pending: see 2. above
            fit_loop._load_combined_loader_states()
        epochs = fit_loop.epoch_progress.current
        if fit_loop.restarted_mid_epoch and epochs.started == epochs.processed:  # see 3. above
            fit_loop.epoch_progress.increment_ready()
            fit_loop.epoch_progress.increment_started()
        self.reseed(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.reseed(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.batches += 1
        self.reseed(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.reseed(trainer)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.batches = int(state["seed"]), int(state["batches"])


def seed_torch(s: int) -> None:
    """What `torch.manual_seed(s)` does for the devices in use, at a fraction of its cost.

    Where CUDA is not initialised (a CPU run), `torch.manual_seed` queues the CUDA seeding for
    later and records the Python stack with it, `traceback.format_stack()`, at every call: a
    few milliseconds a batch under Lightning's deep stack, a sixth of a small model's step.
    """
    torch.random.default_generator.manual_seed(s)
    if torch.cuda.is_initialized():  # a GPU run: every device, as torch.manual_seed does
        torch.cuda.manual_seed_all(s)
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(s)
