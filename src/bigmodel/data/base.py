"""`DataModule`: what every data module shares, and the contract a new one meets.

A data module turns a config group (`configs/data/<name>.yaml`) into batches. To add a dataset,
subclass `DataModule` and:

1. take the dataset's settings as typed keyword arguments, one per config key (run.py checks the
   config's keys and types against the signature), and pass `batch_size`, `num_workers`,
   `pin_memory`, `seed` and `split` on to `super().__init__`, which checks them;
2. implement `build()`: read or generate every split once. `setup()` calls it the first time
   only, as run.py sets the data up before building the model and Lightning does so again;
3. implement `dataset(split)`: the Dataset of one split in its fixed order (validation, testing,
   and training unless `train_dataset()` is overridden, such as to draw training windows);
4. implement `net_kwargs`: what the net needs that only the data can tell (`vocab_size`,
   `num_classes`, ...); run.py fills the `???` fields of `model.net` from it. Name its keys in
   `provides`, and say what the batches are for in `learning` (the task's `learning`) and
   `summary`: run.py checks that the model fits the data before either is built;
5. set `self.tokenizer` (anything with `to_dict()`, see tokenizers.py) or `self.classes` (class
   names) in `build()` where the data has them: `state_dict` puts them in checkpoints and
   `load_state_dict` restores the tokenizer; call `check_saved_classes()` in `build()` so that
   a checkpoint is not evaluated on data with other classes. Extend both for more state.

The three loaders are written here once on top of `resumable`: training is seeded, sharded over
the trainer's processes and resumes mid-epoch; validation and testing (`split` names the split
`test_dataloader` reads, the one eval.py scores) run in the dataset's order. Batch transforms
that belong on the training device go in Lightning's `on_after_batch_transfer`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import lightning as L
from torch.utils.data import DataLoader, Dataset

from bigmodel.data.resumable import ResumableLoader, eval_loader, train_loader
from bigmodel.data.tokenizers import tokenizer_from_dict
from bigmodel.errors import UserError

SPLITS = ("train", "val", "test")


class DataModule(L.LightningDataModule, ABC):
    """A LightningDataModule with the settings checks, idempotent setup, loaders and checkpoint
    state every data module shares (see the module docstring for what a subclass provides)."""

    # what the batches are for: a task whose `learning` is the same takes them
    learning: ClassVar[str] = ""
    # the data in a few words, for messages: "image classification"
    summary: ClassVar[str] = ""
    # the keys of `net_kwargs`: the net fields this data fills (a net needing another is refused
    # before anything is built); None: not declared, the net is checked once the data is read
    provides: ClassVar[tuple[str, ...] | None] = None

    # training reads the dataset in an order shuffled per epoch (seeded); False: in order
    train_shuffle: bool = True
    # drop a last, smaller training batch
    train_drop_last: bool = False

    def __init__(
        self,
        *,
        batch_size: int | None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 1337,
        split: str = "test",
    ) -> None:
        super().__init__()
        if batch_size is None or batch_size <= 0:
            raise UserError(f"data.batch_size must be a positive integer, got {batch_size}")
        if num_workers is None or num_workers < 0:
            raise UserError(f"data.num_workers must be an integer >= 0, got {num_workers}")
        if split not in SPLITS:
            raise UserError(f"data.split={split} is not one of {', '.join(SPLITS)}")
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.seed, self.split = seed, split
        self.tokenizer: Any = None  # built from the training split, where the data has one
        self.classes: list[str] = []  # class names, where the data has them
        self._saved_classes: list[str] | None = None  # those of a checkpoint being loaded
        self._built = False

    # ------------------------------------------------------------------------------ contract
    @abstractmethod
    def build(self) -> None:
        """Read or generate every split (and train a tokenizer); called once, by `setup`."""

    @abstractmethod
    def dataset(self, split: str) -> Dataset:
        """The Dataset of `split`, in its fixed order; a UserError when it cannot be read."""

    @property
    @abstractmethod
    def net_kwargs(self) -> dict[str, Any]:
        """What a net needs to know that only the data can tell (after `setup`)."""

    def train_dataset(self) -> Dataset:
        """The Dataset training reads; the training split unless a subclass draws its own."""
        return self.dataset("train")

    # ----------------------------------------------------------------------------- lifecycle
    def setup(self, stage: str | None = None) -> None:
        if self._built:  # idempotent: run.py sets up before building the model, Lightning again
            return
        self.build()
        self._built = True

    # ---------------------------------------------------------------------------- dataloaders
    def loader_kwargs(self) -> dict[str, Any]:
        """The DataLoader settings of all three loaders, from the config."""
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
        }

    def train_dataloader(self) -> ResumableLoader:
        kwargs = self.loader_kwargs()
        if self.train_drop_last:
            kwargs["drop_last"] = True
        return train_loader(
            self, self.train_dataset(), shuffle=self.train_shuffle, seed=self.seed, **kwargs
        )

    def val_dataloader(self) -> DataLoader:
        return eval_loader(self.dataset("val"), **self.loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        return eval_loader(self.dataset(self.split), **self.loader_kwargs())

    # ---------------------------------------------------------------------------- checkpoints
    # the position in the epoch is the training loader's state, kept by Lightning's fit loop
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.tokenizer is not None:
            state["tokenizer"] = self.tokenizer.to_dict()
        if self.classes:
            state["classes"] = list(self.classes)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "tokenizer" in state:
            restored = tokenizer_from_dict(state["tokenizer"])
            if self.tokenizer is not None and self.tokenizer.to_dict() != restored.to_dict():
                raise UserError(
                    "the checkpoint's tokenizer differs from the one built from this data; "
                    "resume with the same data config the checkpoint was trained with"
                )
            self.tokenizer = restored
        self._saved_classes = list(state.get("classes") or []) or None

    def check_saved_classes(self) -> None:
        """Refuse data whose classes differ from those of the checkpoint loaded before setup."""
        if self._saved_classes is not None and self._saved_classes != self.classes:
            raise UserError(
                f"the checkpoint was trained on classes {self._saved_classes}, this data has "
                f"{self.classes}; evaluate on data with the same classes"
            )
