"""The regression example: metrics against scikit-learn, the seeded data, the CLI run."""

from __future__ import annotations

import json

import hydra
import pytest
import torch
from sklearn import metrics as skm

from bigmodel.data import RegressionDataModule
from bigmodel.errors import UserError
from bigmodel.run import build_task
from bigmodel.tasks.regression import regression_metrics
from tests.conftest import compose_config, run_cli, run_dirs


def test_metrics_equal_sklearn_on_fixed_predictions():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(200, 3, generator=g) * torch.tensor([1.0, 5.0, 0.2])
    pred = y + 0.3 * torch.randn(200, 3, generator=g)
    m = regression_metrics()
    for chunk in range(4):  # accumulated over batches, as in an epoch
        m.update(pred[chunk * 50 : (chunk + 1) * 50], y[chunk * 50 : (chunk + 1) * 50])
    got = {k: float(v) for k, v in m.compute().items()}
    yt, yp = y.numpy(), pred.numpy()
    assert got["mse"] == pytest.approx(skm.mean_squared_error(yt, yp), rel=1e-5)
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(yt, yp), rel=1e-5)
    assert got["r2"] == pytest.approx(skm.r2_score(yt, yp), rel=1e-5)


def test_data_is_seeded_and_split():
    a, b, c = (RegressionDataModule(seed=s) for s in (1, 1, 2))
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.data["train"][0], b.data["train"][0])
    assert torch.equal(a.data["test"][1], b.data["test"][1])
    assert not torch.equal(a.data["train"][0], c.data["train"][0])
    assert [len(a.data[s][0]) for s in ("train", "val", "test")] == [2800, 400, 800]
    assert a.data["train"][1].shape == (2800, 10) and a.net_kwargs == {
        "in_features": 10,
        "out_features": 10,
    }
    assert a.noise_floor == pytest.approx(0.01)
    with pytest.raises(UserError, match="val_fraction"):
        RegressionDataModule(n_samples=10, val_fraction=0.01)


def test_cli_regression_reproduces_the_introductory_example(tmp_path):
    run_cli(
        "train.py",
        "experiment=regression",
        "trainer.max_epochs=3",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    (run,) = run_dirs(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"test/mse", "test/mae", "test/r2", "val/mse", "val/r2", "train/loss"} <= set(metrics)
    assert metrics["test/mse"] < 1.0  # below the variance of the standardised targets
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    shapes = {k: tuple(v.shape) for k, v in state["state_dict"].items()}
    assert shapes == {
        "net.layers.0.weight": (20, 10),
        "net.layers.0.bias": (20,),
        "net.layers.2.weight": (10, 20),
        "net.layers.2.bias": (10,),
    }
    cfg = state["bigmodel"]["config"]
    assert cfg["optimizer"]["_target_"] == "torch.optim.Adam" and cfg["optimizer"]["lr"] == 0.01
    assert cfg["loss"]["_target_"] == "torch.nn.MSELoss"


@pytest.mark.parametrize("loss,cls", [("l1", torch.nn.L1Loss), ("huber", torch.nn.HuberLoss)])
def test_other_losses_reach_the_task(tmp_path, loss, cls):
    cfg = compose_config("train", ["experiment=regression", f"loss={loss}"], tmp_path)
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    task = build_task(cfg, dm)
    assert isinstance(task.loss_fn, cls)
    x, y = dm.data["train"]
    assert task.training_step((x[:8], y[:8]), 0).ndim == 0
