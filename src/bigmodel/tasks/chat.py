"""Supervised fine-tuning on conversations: next-token prediction with the loss on the tokens a
label mask keeps (the assistant's), for the batches of `data=chat`."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from bigmodel.tasks.language_model import LanguageModel

IGNORE = -100  # a target the loss and perplexity skip (prompt, system turns, padding)


class ChatModel(LanguageModel):
    """A `LanguageModel` whose targets may be `IGNORE`: `*/loss` and `*/ppl` are the mean over
    the scored tokens of the batch (transformers' convention for `labels`), `*/acc` the share
    of them predicted exactly (greedy); validation and test average over every scored token of
    the split. The net is any `LanguageNet`."""

    learning = "chat fine-tuning"

    def __init__(self, net, optimizer=None, scheduler=None, compile: bool = False) -> None:
        super().__init__(net, optimizer, scheduler, compile)
        self.val_ppl = Perplexity(ignore_index=IGNORE)
        self.test_ppl = Perplexity(ignore_index=IGNORE)
        # means over the scored tokens of the whole split, not over batches
        self.eval_metrics = nn.ModuleDict(
            {
                split: nn.ModuleDict({"loss": MeanMetric(), "acc": MeanMetric()})
                for split in ("val", "test")
            }
        )

    def _loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y, *packed = batch  # (B, T) ids, (B, T) targets with IGNORE where no loss is taken
        # packed windows (data.packing=true) also say which conversation each token is of
        logits = self.net(x, documents=packed[0]) if packed else self.net(x)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)
        return loss, logits, y

    def _eval_step(self, batch, split: str) -> None:
        loss, logits, y = self._loss(batch)
        scored = y != IGNORE
        n = scored.sum()
        metrics = self.eval_metrics[split]
        metrics["loss"].update(loss.detach(), n)
        metrics["acc"].update((logits.argmax(-1)[scored] == y[scored]).float().mean(), n)
        ppl = self.val_ppl if split == "val" else self.test_ppl
        ppl.update(logits.float(), y)
        self.log(f"{split}/loss", metrics["loss"], on_epoch=True, prog_bar=split == "val")
        self.log(f"{split}/acc", metrics["acc"], on_epoch=True)
        self.log(f"{split}/ppl", ppl, on_epoch=True, prog_bar=split == "val")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._loss(batch)
        self.log_metric("train/loss", loss, batch, prog_bar=True)
        return loss
