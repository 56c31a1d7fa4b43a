"""`debug=` modes do what their configs say, for every kind of model."""

from __future__ import annotations

import pytest

from tests.conftest import logged, run_cli, run_dirs

OVERFIT = {
    "lm": ["model.net.n_layer=1", "model.net.n_embd=64", "model.net.n_head=2",
           "model.net.block_size=64", "data.batch_size=8", "model.net.dropout=0.0",
           "trainer.max_steps=150", "optimizer.lr=0.01"],
    "cnn": ["experiment=digits_cnn", "model.net.widths=[16,32]", "trainer.max_steps=60",
            "optimizer.lr=0.01"],
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(OVERFIT))
def test_debug_overfit_memorises_its_two_batches(tmp_path, family):
    """Lightning re-creates the training loader with a sequential sampler; the same two batches
    come back every epoch (text windows are not redrawn), and the loss goes to ~0."""
    proc = run_cli("train.py", "debug=overfit", *OVERFIT[family], "test=false", cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    (run,) = run_dirs(tmp_path, "debug")
    losses = logged(run, "train/loss")
    assert losses[-1] < 0.1 * losses[0], losses
