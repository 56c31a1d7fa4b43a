"""Classification of images and audio clips: inputs -> (B, num_classes) logits.

Metrics (torchmetrics): `*/acc` (top-1), `*/acc_top5` (more than 5 classes), macro `*/precision`,
`*/recall`, `*/f1`; a confusion matrix at the end of testing, written to the run directory as PNG
and CSV and sent to the loggers that take images.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from bigmodel.media import log_figure
from bigmodel.tasks.base import Task
from bigmodel.tasks.protocols import ClassifierNet

log = logging.getLogger("bigmodel")


def classification_metrics(num_classes: int) -> MetricCollection:
    metrics = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "precision": MulticlassPrecision(num_classes, average="macro"),
        "recall": MulticlassRecall(num_classes, average="macro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    # No compute groups: torchmetrics forms them from equal states after the first update, and a
    # first batch where top-1 and top-5 agree would wrongly merge the two accuracies.
    return MetricCollection(metrics, compute_groups=False)


class Classifier(Task):
    """Trains `net` with `loss` (cross-entropy by default; `loss=hinge` for a multi-class margin
    loss) on (inputs, labels) batches.

    Args:
        num_classes: the number of classes (the config takes it from `model.net.num_classes`).
        loss: a module mapping (logits (B, K), labels (B,)) to a scalar.
    """

    learning = "classification"
    losses = (nn.CrossEntropyLoss, nn.MultiMarginLoss)

    def __init__(
        self,
        net: ClassifierNet,
        num_classes: int,
        optimizer: functools.partial | None = None,
        scheduler: dict | None = None,
        compile: bool = False,
        loss: nn.Module | None = None,
    ) -> None:
        super().__init__(net, optimizer, scheduler, compile)
        self.num_classes = num_classes
        self.loss_fn = loss if loss is not None else nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = classification_metrics(num_classes).clone(prefix="val/")
        self.test_metrics = classification_metrics(num_classes).clone(prefix="test/")
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self.confusion: torch.Tensor | None = None  # (K, K) counts of the last test, rows = truth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch  # (B, ...), (B,)
        logits = self.net(x)  # (B, K)
        return self.loss_fn(logits.float(), y), logits, y

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, logits, y = self._step(batch)
        self.train_acc(logits, y)
        self.log_metric("train/loss", loss, batch, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, logits, y = self._step(batch)
        self.val_metrics.update(logits, y)
        self.log_metric("val/loss", loss, batch, prog_bar=True)
        self.log_dict(self.val_metrics, on_epoch=True, prog_bar=False)

    def test_step(self, batch, batch_idx: int) -> None:
        loss, logits, y = self._step(batch)
        self.test_metrics.update(logits, y)
        self.test_confusion.update(logits, y)
        self.log_metric("test/loss", loss, batch)
        self.log_dict(self.test_metrics, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        self.confusion = self.test_confusion.compute().cpu()  # synced across ranks
        self.test_confusion.reset()
        self._save_confusion(self.confusion)

    @rank_zero_only
    def _save_confusion(self, cm: torch.Tensor) -> None:
        trainer = self._trainer
        if trainer is None or trainer.sanity_checking:
            return
        names = getattr(trainer.datamodule, "classes", None) or [str(i) for i in range(len(cm))]
        out = Path(trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = [",".join(["true\\pred", *names])]
        rows += [",".join([names[i], *(str(int(v)) for v in cm[i])]) for i in range(len(cm))]
        (out / "confusion_matrix.csv").write_text("\n".join(rows) + "\n")
        fig = confusion_figure(cm, names)
        png = out / "confusion_matrix.png"
        fig.savefig(png, dpi=100, bbox_inches="tight")
        log.info(f"confusion matrix: {png}")
        log_figure(trainer.loggers, "test/confusion_matrix", fig, png, trainer.global_step)
        import matplotlib.pyplot as plt

        plt.close(fig)


def confusion_figure(cm: torch.Tensor, names: list[str]):
    """The confusion matrix as a matplotlib figure: counts, rows = true, columns = predicted."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    k = len(names)
    size = min(4 + 0.4 * k, 20)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm.numpy(), cmap="Blues")
    ax.set_xticks(range(k), names, rotation=90 if k > 10 else 0)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:  # counts stay readable up to about 30 classes
        top = cm.max().item() or 1
        for i in range(k):
            for j in range(k):
                v = int(cm[i, j])
                ax.text(
                    j,
                    i,
                    str(v),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if v > top / 2 else "black",
                )
    acc = cm.diag().sum().item() / max(1, cm.sum().item())
    ax.set_title(f"confusion matrix (accuracy {acc:.2%})")
    fig.tight_layout()
    return fig
