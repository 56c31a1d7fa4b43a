"""The classification task: metrics against scikit-learn, the confusion matrix, the losses, and
short CLI runs of the image experiments."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn as nn
from sklearn import metrics as skm

from bigmodel.data import ImageDataModule
from bigmodel.nets import CNN, ViT
from bigmodel.tasks import Classifier
from bigmodel.tasks.classification import classification_metrics
from tests.conftest import logged, run_cli, run_dirs

# Tiny nets run fastest on one thread, and the test machines are shared by parallel jobs.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def test_metrics_equal_sklearn_on_fixed_predictions():
    g = torch.Generator().manual_seed(0)
    k, n = 7, 300
    y = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g)
    logits[torch.arange(n), y] += 1.0  # better than chance, not perfect
    logits[:, 3] -= 10.0  # class 3 never predicted: zero precision, as sklearn counts it
    logits[:20] = torch.nn.functional.one_hot(y[:20], k) * 100.0  # a first batch all correct
    m = classification_metrics(k)
    for i in range(0, n, 20):  # accumulated over batches, as in an epoch
        m.update(logits[i : i + 20], y[i : i + 20])
    got = {name: float(v) for name, v in m.compute().items()}
    pred, yt = logits.argmax(1).numpy(), y.numpy()
    assert got["acc"] == pytest.approx(skm.accuracy_score(yt, pred), abs=1e-6)
    for name, fn in (
        ("precision", skm.precision_score),
        ("recall", skm.recall_score),
        ("f1", skm.f1_score),
    ):
        assert got[name] == pytest.approx(fn(yt, pred, average="macro", zero_division=0), abs=1e-6)
    top5 = skm.top_k_accuracy_score(yt, logits.numpy(), k=5, labels=list(range(k)))
    assert got["acc_top5"] == pytest.approx(top5, abs=1e-6)
    assert "acc_top5" not in classification_metrics(5)  # only where there are more than 5 classes


class Frozen(nn.Module):
    """A fixed linear map of the flattened image: known predictions, no training needed."""

    def __init__(self, in_features: int, k: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_features, k)
        torch.manual_seed(1)
        nn.init.normal_(self.lin.weight)

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_confusion_matrix_png_and_counts_match_sklearn(tmp_path):
    dm = ImageDataModule(source="digits", batch_size=50, random_crop_padding=0)
    dm.setup("fit")
    net = Frozen(64, 10)
    task = Classifier(net, num_classes=10)
    trainer = L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
    )
    (res,) = trainer.test(task, datamodule=dm)
    x, y = dm.data["test"]
    with torch.no_grad():
        xb, _ = dm.on_after_batch_transfer((x, y), 0)
        pred = net(xb).argmax(1)
    want = skm.confusion_matrix(y.numpy(), pred.numpy(), labels=list(range(10)))
    assert np.array_equal(task.confusion.numpy(), want)
    yt, yp = y.numpy(), pred.numpy()
    assert res["test/acc"] == pytest.approx(skm.accuracy_score(yt, yp), abs=1e-6)
    for name, fn in (
        ("precision", skm.precision_score),
        ("recall", skm.recall_score),
        ("f1", skm.f1_score),
    ):
        want_m = fn(yt, yp, average="macro", zero_division=0)
        assert res[f"test/{name}"] == pytest.approx(want_m, abs=1e-6), name
    png = tmp_path / "confusion_matrix.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (tmp_path / "confusion_matrix.csv").read_text().splitlines()
    assert rows[0].split(",")[1:] == dm.classes
    assert [int(v) for v in rows[1].split(",")[1:]] == want[0].tolist()


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(label_smoothing=0.1), nn.MultiMarginLoss()])
def test_losses_train_a_net(loss):
    torch.manual_seed(0)
    dm = ImageDataModule(source="digits", batch_size=64)
    dm.setup("fit")
    task = Classifier(CNN(10, 1, widths=[8, 16]), num_classes=10, loss=loss)
    opt = torch.optim.Adam(task.parameters(), lr=1e-2)
    x, y = dm.data["train"]
    xb, _ = dm.on_after_batch_transfer((x[:256], y[:256]), 0)
    first = None
    for _ in range(40):
        out = task.loss_fn(task(xb), y[:256])
        first = first if first is not None else out.item()
        opt.zero_grad()
        out.backward()
        opt.step()
    assert out.item() < 0.6 * first
    assert (task(xb).argmax(1) == y[:256]).float().mean() > 0.8


def test_vit_pooling_and_shapes():
    for pool in ("cls", "mean"):
        net = ViT(
            num_classes=4,
            in_channels=3,
            image_size=16,
            patch_size=4,
            n_layer=2,
            n_head=2,
            n_embd=32,
            pool=pool,
        )
        assert net(torch.randn(5, 3, 16, 16)).shape == (5, 4)
    with pytest.raises(ValueError, match="patch_size"):
        ViT(num_classes=4, in_channels=1, image_size=10, patch_size=4)
    ckpt = ViT(
        num_classes=3,
        in_channels=1,
        image_size=8,
        patch_size=2,
        n_layer=2,
        n_head=2,
        n_embd=16,
        activation_checkpointing=True,
    )
    ckpt.train()
    ckpt(torch.randn(2, 1, 8, 8)).sum().backward()
    assert ckpt.patch_embed.weight.grad is not None


def _check_run(root, metrics_needed):
    (run,) = run_dirs(root)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics_needed <= set(metrics)
    assert (run / "confusion_matrix.png").is_file()
    for ckpt in (run / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert state["ImageDataModule"]["classes"] == [str(i) for i in range(10)]
    return run, metrics


NEEDED = {
    "test/acc",
    "test/acc_top5",
    "test/precision",
    "test/recall",
    "test/f1",
    "val/acc",
    "val/f1",
    "train/loss",
}


def test_cli_digits_cnn_and_eval(tmp_path):
    run_cli(
        "train.py",
        "experiment=digits_cnn",
        "trainer.max_epochs=2",
        "model.net.widths=[16,32]",
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    run, metrics = _check_run(tmp_path, NEEDED)
    # two short epochs already learn something: 0.30 to 0.37 over seeds; chance is 0.1
    assert metrics["test/acc"] > 0.25
    best = next((run / "checkpoints").glob("best_epoch*.ckpt"))
    proc = run_cli("eval.py", f"ckpt_path={best}", cwd=tmp_path)
    assert f"test/acc: {metrics['test/acc']:.6g}" in proc.stdout


def test_cli_digits_vit_with_hinge_loss(tmp_path):
    # a one-layer ViT at a higher learning rate: 15 short epochs (255 steps) learn the digits
    run_cli(
        "train.py",
        "experiment=digits_vit",
        "loss=hinge",
        "trainer.max_epochs=15",
        "model.net.n_layer=1",
        "model.net.n_embd=32",
        "model.net.pool=mean",
        "optimizer.lr=0.01",
        "scheduler.scheduler.warmup_steps=2",
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    run, metrics = _check_run(tmp_path, NEEDED)
    losses = logged(run, "train/loss")
    # the multi-class hinge loss starts near 0.9 (every margin violated) and falls to about 0.2
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert metrics["test/acc"] > 0.1 + 0.2  # chance is 1 in 10; this run reaches about 0.5


def test_cli_rejects_a_patch_size_that_does_not_divide(tmp_path):
    proc = run_cli(
        "train.py",
        "experiment=digits_vit",
        "model.net.patch_size=3",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert "patch_size" in proc.stderr and "Traceback" not in proc.stderr
