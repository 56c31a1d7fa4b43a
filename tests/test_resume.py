"""Exact resume, the test of record: a run resumed from a checkpoint written at any point ends
bitwise equal to the uninterrupted run (every tensor of the weights and the optimizer state),
at the same global step, epoch and learning rate, having logged the same metrics.

Checkpoints at every step come from one more ModelCheckpoint on the command line (a callback a
user could add); everything else is the user's default run, shortened.
"""

from __future__ import annotations

import csv
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch

from tests.conftest import TINY_LM, run_cli, run_dirs

# keep a checkpoint after every optimizer step, named by the step: <run>/steps/<step>.ckpt
EVERY_STEP = (
    "+callbacks.every_step={_target_:lightning.pytorch.callbacks.ModelCheckpoint,"
    "dirpath:${paths.output_dir}/steps,filename:'{step}',auto_insert_metric_name:false,"
    "every_n_train_steps:1,save_top_k:-1,enable_version_counter:false}"
)
# and one at the end of every validation (the best-checkpoint callback keeping them all)
EVERY_VALIDATION = [
    "callbacks.model_checkpoint.save_top_k=-1",
    "callbacks.model_checkpoint.monitor=step",
    "callbacks.model_checkpoint.mode=max",
]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def corpus(root: Path) -> Path:
    """3000 characters: 2700 for training, 84 windows of 32, 10 batches of 8 an epoch."""
    text = "\n".join(topics[k] for k in sorted(topics))[:3000]
    (root / "corpus.txt").write_text(text)
    return root / "corpus.txt"


def gpt(root: Path) -> list[str]:
    return [
        *TINY_LM,
        f"data.path={corpus(root)}",
        "model.net.dropout=0.1",  # the generators matter: dropout draws from them
        "trainer.max_steps=24",  # epochs of 10, 10 and 4 batches
        "trainer.val_check_interval=6",
        "trainer.log_every_n_steps=1",
        "test=false",
        EVERY_STEP,
        *EVERY_VALIDATION,
    ]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def rows(run: Path, key: str) -> dict[int, str]:
    """step -> logged value of `key`, as written (no float rounding in between)."""
    with open(run / "csv" / "metrics.csv") as f:
        return {int(r["step"]): r[key] for r in csv.DictReader(f) if r.get(key)}


def tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree, key=str) for t in tensors(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in tensors(v)]
    return []


def counters(ckpt: dict) -> dict:
    """Lightning's loop state: batch, step and epoch counts (ready, started, processed, done)."""
    return ckpt["loops"]["fit_loop"]


def assert_same_end(full: Path, resumed: Path, since: int, metrics=("train/loss",)) -> None:
    """The resumed run ends where the uninterrupted one does, bit for bit."""
    a, b = load(full / "checkpoints" / "last.ckpt"), load(resumed / "checkpoints" / "last.ckpt")
    assert (a["global_step"], a["epoch"]) == (b["global_step"], b["epoch"])
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), f"{k} differs after resuming at step {since}"
    opt_a, opt_b = tensors(a["optimizer_states"]), tensors(b["optimizer_states"])
    assert len(opt_a) == len(opt_b)
    assert all(torch.equal(x, y) for x, y in zip(opt_a, opt_b, strict=True))
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert counters(a) == counters(b)  # the same batch, step and epoch counters
    for key in metrics:
        want = {s: v for s, v in rows(full, key).items() if s >= since}
        got = {s: v for s, v in rows(resumed, key).items() if s >= since}
        assert got == want, f"{key} logged after resuming at step {since}"


def resume(root: Path, args: list[str], ckpt: Path, env: dict | None = None) -> Path:
    before = set(run_dirs(root))
    run_cli("train.py", *args, f"ckpt_path={ckpt}", cwd=root, env=env)
    (new,) = set(run_dirs(root)) - before
    return new


@pytest.mark.slow  # each test here trains 3 to 5 runs: CI runs them after the fast suite
def test_gpt_resumes_bitwise_mid_epoch_at_the_epoch_boundary_and_around_validation(tmp_path):
    args = gpt(tmp_path)
    run_cli("train.py", *args, cwd=tmp_path, env=ONE_THREAD)
    (full,) = run_dirs(tmp_path)
    end = load(full / "checkpoints" / "last.ckpt")
    assert (end["global_step"], end["epoch"]) == (24, 2)  # 10 + 10 + 4 batches
    after_validation = next((full / "checkpoints").glob("best_step000018_*.ckpt"))
    for ckpt, since in (
        (full / "steps" / "4.ckpt", 4),  # mid-epoch
        (full / "steps" / "10.ckpt", 10),  # the last batch of epoch 0: an epoch boundary
        (full / "steps" / "12.ckpt", 12),  # the batch a validation follows
        (after_validation, 18),  # the end of a validation
    ):
        resumed = resume(tmp_path, args, ckpt, env=ONE_THREAD)
        assert_same_end(full, resumed, since, metrics=("train/loss", "val/loss"))
        if since == 10:
            from_boundary = resumed
    # the checkpoints a resumed run writes resume as well: from epoch 1's last batch, written
    # by the run resumed from epoch 0's, as a run killed twice at epoch ends is
    again = resume(tmp_path, args, from_boundary / "steps" / "20.ckpt", env=ONE_THREAD)
    assert_same_end(full, again, 20, metrics=("train/loss", "val/loss"))


@pytest.mark.slow
def test_digits_cnn_by_epochs_with_augmentation_resumes_bitwise(tmp_path):
    args = [
        "experiment=digits_cnn",  # random crops on every training batch
        "trainer.max_epochs=3",
        "trainer.log_every_n_steps=1",
        "test=false",
        EVERY_STEP,
    ]
    run_cli("train.py", *args, cwd=tmp_path, env=ONE_THREAD)
    (full,) = run_dirs(tmp_path)
    per_epoch = load(full / "checkpoints" / "last.ckpt")["global_step"] // 3
    for since in (per_epoch // 2, per_epoch):  # mid-epoch; the end of the first epoch
        resumed = resume(tmp_path, args, full / "steps" / f"{since}.ckpt", env=ONE_THREAD)
        assert_same_end(full, resumed, since, metrics=("train/loss", "val/acc"))


@pytest.mark.slow
def test_translation_resumes_bitwise(tmp_path):
    from tests.test_translation import TINY_MT

    args = [
        *TINY_MT,
        "data.num_train=600",  # 19 batches an epoch: 40 steps cross two epoch boundaries
        "trainer.max_steps=40",
        "trainer.val_check_interval=10",
        "trainer.log_every_n_steps=1",
        "test=false",
        EVERY_STEP,
    ]
    run_cli("train.py", *args, cwd=tmp_path, env=ONE_THREAD)
    (full,) = run_dirs(tmp_path)
    for since in (7, 19):
        resumed = resume(tmp_path, args, full / "steps" / f"{since}.ckpt", env=ONE_THREAD)
        assert_same_end(full, resumed, since, metrics=("train/loss", "val/bleu"))


@pytest.mark.slow
def test_gpt_under_ddp_on_two_processes_resumes_bitwise(tmp_path):
    """gloo sums the two ranks' gradients in a fixed order: resume is bitwise here too."""
    args = [*gpt(tmp_path), "trainer=ddp_cpu"]  # 5 batches per rank an epoch
    run_cli("train.py", *args, cwd=tmp_path, env=ONE_THREAD, timeout=600)
    (full,) = run_dirs(tmp_path)
    for since in (3, 5):  # mid-epoch; an epoch boundary
        resumed = resume(tmp_path, args, full / "steps" / f"{since}.ckpt", env=ONE_THREAD)
        assert_same_end(full, resumed, since, metrics=("train/loss", "val/loss"))
    # the position in the epoch is counted for two processes: one process refuses it
    proc = run_cli(
        "train.py",
        *gpt(tmp_path),
        f"ckpt_path={full / 'steps' / '3.ckpt'}",
        cwd=tmp_path,
        env=ONE_THREAD,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "written by 2 training processes and this run has 1" in proc.stderr
    assert "Traceback" not in proc.stderr
