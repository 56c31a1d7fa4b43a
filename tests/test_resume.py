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


# ------------------------------------------------------------------- settings changed on resume
def lm_24(root: Path) -> list[str]:
    """The tiny GPT with AdamW and warmup-cosine (model=gpt) for 24 steps, a checkpoint at every
    step, the lr logged at every step."""
    return [
        "model=gpt",
        *TINY_LM,
        f"data.path={corpus(root)}",
        "trainer.max_steps=24",
        "trainer.log_every_n_steps=1",
        "test=false",
        EVERY_STEP,
    ]


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory) -> Path:
    """One uninterrupted AdamW run (lr 0.001) that the resumes below start from at step 12."""
    root = tmp_path_factory.mktemp("adamw")
    run_cli("train.py", *lm_24(root), cwd=root, env=ONE_THREAD)
    (run,) = run_dirs(root)
    return run


def root_of(run: Path) -> Path:
    return run.parents[3]  # <root>/logs/train/runs/<run>


def log_lines(run: Path, text: str) -> list[str]:
    return [line for line in (run / "train.log").read_text().splitlines() if text in line]


def test_a_new_lr_on_resume_is_the_lr_the_optimizer_applies_and_logs(adamw_run):
    root = root_of(adamw_run)
    changed = ["optimizer.lr=0.01", "optimizer.weight_decay=0.0"]
    resumed = resume(root, [*lm_24(root), *changed], adamw_run / "steps" / "12.ckpt", ONE_THREAD)

    # the schedule goes on from step 12 at ten times the lr: warmup and cosine scaled
    full, new = rows(adamw_run, "lr-AdamW/pg1"), rows(resumed, "lr-AdamW/pg1")
    assert sorted(new) == list(range(12, 24))
    for step, lr in new.items():
        assert float(lr) == pytest.approx(10 * float(full[step]), rel=1e-6), step
    # the same weights and the same batch at step 12: the same loss, then a different course
    loss_full, loss_new = rows(adamw_run, "train/loss"), rows(resumed, "train/loss")
    assert loss_new[12] == loss_full[12]
    assert loss_new[13] != loss_full[13]

    end, end_full = (
        load(resumed / "checkpoints" / "last.ckpt"),
        load(adamw_run / "checkpoints" / "last.ckpt"),
    )
    state, state_full = end["optimizer_states"][0], end_full["optimizer_states"][0]
    # what the optimizer itself holds: the new lr and decay, and its moments kept (24 steps)
    assert [g["initial_lr"] for g in state["param_groups"]] == [0.01, 0.01]
    assert float(state["param_groups"][0]["lr"]) == pytest.approx(
        10 * float(state_full["param_groups"][0]["lr"]), rel=1e-6
    )
    assert [g["weight_decay"] for g in state["param_groups"]] == [0.0, 0.0]
    assert end["lr_schedulers"][0]["base_lrs"] == [0.01, 0.01]
    assert float(state["state"][0]["step"]) == 24

    (line,) = log_lines(resumed, "settings changed since the checkpoint")
    assert "optimizer.lr=0.01 (checkpoint: 0.001" in line
    assert "optimizer.weight_decay=0 (checkpoint: 0.1)" in line


def test_another_optimizer_on_resume_starts_its_state_afresh_with_one_warning(adamw_run):
    root = root_of(adamw_run)
    resumed = resume(root, [*lm_24(root), "optimizer=sgd"], adamw_run / "steps" / "12.ckpt")

    (warning,) = log_lines(resumed, "differs from the checkpoint's")
    assert (
        "[WARNING]" in warning and "optimizer: SGD differs from the checkpoint's AdamW" in warning
    )
    assert "starts afresh" in warning
    # weights, step and data position restored: the same loss at step 12, to step 24
    assert rows(resumed, "train/loss")[12] == rows(adamw_run, "train/loss")[12]
    end = load(resumed / "checkpoints" / "last.ckpt")
    assert end["global_step"] == 24
    assert all("momentum" in g for g in end["optimizer_states"][0]["param_groups"])
    # the schedule's position kept, at SGD's lr (0.01 = 10 x AdamW's 0.001)
    full, new = rows(adamw_run, "lr-AdamW/pg1"), rows(resumed, "lr-SGD/pg1")
    assert sorted(new) == list(range(12, 24))
    for step, lr in new.items():
        assert float(lr) == pytest.approx(10 * float(full[step]), rel=1e-6), step


def test_a_changed_schedule_setting_on_resume_is_applied_from_the_step_it_resumes_at(adamw_run):
    from bigmodel.optim import WarmupCosineLR

    root = root_of(adamw_run)
    changed = "scheduler.scheduler.min_lr_ratio=0.5"
    resumed = resume(root, [*lm_24(root), changed], adamw_run / "steps" / "12.ckpt", ONE_THREAD)

    # the lr of each step is that of a schedule planned with the new floor from the start
    plan = WarmupCosineLR(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.001),
        total_steps=24,
        warmup_steps=2,
        min_lr_ratio=0.5,
    )
    new = rows(resumed, "lr-AdamW/pg1")
    assert sorted(new) == list(range(12, 24))
    for step, lr in new.items():
        assert float(lr) == pytest.approx(0.001 * plan.factor(step), rel=1e-6), step
    (line,) = log_lines(resumed, "settings changed since the checkpoint")
    assert "scheduler.scheduler.min_lr_ratio=0.5 (checkpoint: 0.1)" in line


@pytest.mark.parametrize("schedule", ["none", "step"])
def test_another_schedule_on_resume_starts_afresh_with_one_warning(adamw_run, schedule):
    root = root_of(adamw_run)
    ckpt = adamw_run / "steps" / "12.ckpt"
    args = [a for a in lm_24(root) if not a.startswith("scheduler.")]  # warmup_steps: its own
    resumed = resume(root, [*args, f"scheduler={schedule}"], ckpt, ONE_THREAD)

    (warning,) = log_lines(resumed, "where the checkpoint had" if schedule == "none" else "differs")
    assert "[WARNING]" in warning and "WarmupCosineLR" in warning
    # no schedule, or StepLR before its first step (10 epochs): optimizer.lr at every step
    new = rows(resumed, "lr-AdamW/pg1")
    assert sorted(new) == list(range(12, 24))
    assert {float(lr) for lr in new.values()} == {0.001}
    assert rows(resumed, "train/loss")[12] == rows(adamw_run, "train/loss")[12]


def test_a_run_resumed_in_its_own_folder_keeps_its_overrides_and_records_each_resume(tmp_path):
    run = tmp_path / "run"
    args = [
        "model=gpt",  # AdamW at lr 0.001
        *TINY_LM,
        f"data.path={corpus(tmp_path)}",
        "test=false",
        f"hydra.run.dir={run}",
    ]
    run_cli("train.py", *args, "trainer.max_steps=6", cwd=tmp_path, env=ONE_THREAD)
    record = run / ".hydra"
    first = {name: (record / name).read_text() for name in ("overrides.yaml", "config.yaml")}

    # the same folder again (resume=auto continues it), with a lower lr, then once more
    again = run_cli("train.py", *args, "trainer.max_steps=9", "optimizer.lr=0.0005", cwd=tmp_path)
    assert ".hydra/config.resume-1.yaml (extras.print_config=full" in again.stdout  # its own
    run_cli("train.py", *args, "trainer.max_steps=12", cwd=tmp_path)

    assert {name: (record / name).read_text() for name in first} == first
    resume_1 = (record / "overrides.resume-1.yaml").read_text()
    assert "trainer.max_steps=9" in resume_1 and "optimizer.lr=0.0005" in resume_1
    assert "lr: 0.0005" in (record / "config.resume-1.yaml").read_text()
    assert "trainer.max_steps=12" in (record / "overrides.resume-2.yaml").read_text()
    assert "lr: 0.001" in first["config.yaml"]
    # the third command left the lr alone: the run went on at the lr the second one gave
    end = load(run / "checkpoints" / "last.ckpt")
    assert end["global_step"] == 12
    groups = end["optimizer_states"][0]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [0.0005, 0.0005]
    (taken,) = log_lines(run, "with its own optimizer and schedule")
    assert "optimizer.lr=0.0005" in taken


# -------------------------------------------------------------------- the best checkpoint
def best_record(run: Path, metric: str) -> dict:
    """The best-checkpoint callback's record in the run's last.ckpt."""
    states = load(run / "checkpoints" / "last.ckpt")["callbacks"].values()
    (state,) = [s for s in states if isinstance(s, dict) and s.get("monitor") == metric]
    return state


def validations(runs: list[Path], metric: str) -> dict[int, float]:
    """step -> the value of `metric` each validation of these runs logged."""
    return {s: float(v) for run in runs for s, v in rows(run, metric).items()}


def assert_best_is_right(run: Path, history: list[Path], metric: str, top_k: int) -> None:
    """The record in last.ckpt names files of this run that exist, the best `top_k` of every
    validation so far, no other best file is left, and the test stage tested the best."""
    state = best_record(run, metric)
    scores = sorted(validations(history, metric).values(), reverse=metric == "val/acc")
    folder = run / "checkpoints"
    best = Path(state["best_model_path"])
    assert best.is_file() and best.parent == folder, state
    assert float(state["best_model_score"]) == pytest.approx(scores[0], rel=1e-6)
    kept = {Path(p): float(v) for p, v in state["best_k_models"].items()}
    assert all(p.is_file() and p.parent == folder for p in kept), state
    assert sorted(kept.values(), reverse=metric == "val/acc") == pytest.approx(scores[:top_k])
    assert sorted(folder.glob("best_*.ckpt")) == sorted(kept)
    tested = log_lines(run, "testing the best checkpoint")
    assert tested[-1].endswith(f"testing the best checkpoint {best}")


# (overrides, the metric ranked, the three runs' lengths, what makes the last run validate
# worse than the best before it: a far higher lr)
BY_STEPS = (
    [*TINY_LM, "trainer.val_check_interval=3", "trainer.log_every_n_steps=1"],
    "val/loss",
    ["trainer.max_steps=9", "trainer.max_steps=15", "trainer.max_steps=21"],
    "optimizer.lr=1.0",
)
BY_EPOCHS = (
    ["experiment=digits_cnn", "model.net.widths=[16,32]", "trainer.log_every_n_steps=1"],
    "val/acc",
    ["trainer.max_epochs=2", "trainer.max_epochs=3", "trainer.max_epochs=4"],
    "optimizer.lr=1.0",
)


@pytest.mark.parametrize(
    ("validated", "top_k"),
    [
        pytest.param(BY_STEPS, 1, id="by-steps-top1"),
        pytest.param(BY_STEPS, 2, id="by-steps-top2"),
        pytest.param(BY_EPOCHS, 1, id="by-epochs-top1"),
        pytest.param(BY_EPOCHS, 3, id="by-epochs-top3", marks=pytest.mark.slow),  # CI: later
    ],
)
def test_the_best_checkpoint_is_right_after_every_kind_of_resume(tmp_path, validated, top_k):
    args, metric, lengths, worse = validated
    args = [*args, f"callbacks.model_checkpoint.save_top_k={top_k}"]
    if metric == "val/loss":
        args.append(f"data.path={corpus(tmp_path)}")
    run = tmp_path / "run"
    # a run, then the same command in its folder with more to do (resume=auto continues it)
    run_cli("train.py", *args, lengths[0], f"hydra.run.dir={run}", cwd=tmp_path, env=ONE_THREAD)
    assert_best_is_right(run, [run], metric, top_k)
    run_cli("train.py", *args, lengths[1], f"hydra.run.dir={run}", cwd=tmp_path, env=ONE_THREAD)
    assert_best_is_right(run, [run], metric, top_k)
    # then on from its last.ckpt in a new folder, validating worse: the ranking goes on from
    # the whole history (the best stays the earlier folder's, brought over), and the earlier
    # folder keeps its files
    before = sorted((run / "checkpoints").iterdir())
    ckpt = run / "checkpoints" / "last.ckpt"
    more = [lengths[2], worse, f"ckpt_path={ckpt}"]
    run_cli("train.py", *args, *more, cwd=tmp_path, env=ONE_THREAD)
    (new,) = run_dirs(tmp_path)
    assert_best_is_right(new, [run, new], metric, top_k)
    assert sorted((run / "checkpoints").iterdir()) == before
