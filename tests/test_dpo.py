"""Preference tuning (`experiment=dpo`, `data=preference`): the losses against the papers'
formulas written out directly, DPO's ln 2 at the first step, its frozen reference across a
resume, the reference-free variants and bad preference rows, through the CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from bigmodel.tasks.preference import dpo_loss, orpo_loss, simpo_loss
from tests.chat_fixtures import write_chat_model, write_chat_rows, write_preference_rows
from tests.conftest import run_cli, run_dirs
from tests.test_resume import EVERY_STEP, assert_same_end, resume

pytest.importorskip("transformers")

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


# fixed log-probabilities of 4 pairs: policy and reference, summed over each reply's tokens
POLICY_C = [-12.5, -30.25, -7.0, -18.0]
POLICY_R = [-14.0, -29.0, -9.5, -18.0]
REF_C = [-13.0, -29.5, -7.25, -17.0]
REF_R = [-13.5, -29.75, -9.0, -19.5]
N_C = [5, 12, 3, 9]
N_R = [6, 11, 4, 7]


def test_dpo_loss_is_the_papers_formula():
    """Rafailov et al. (2023), eq. 7: -log sigma(beta log(pi_c/ref_c) - beta log(pi_r/ref_r))."""
    beta = 0.1
    want = [
        -log_sigmoid(beta * (pc - rc) - beta * (pr - rr))
        for pc, pr, rc, rr in zip(POLICY_C, POLICY_R, REF_C, REF_R, strict=True)
    ]
    t = torch.tensor
    loss, reward_c, reward_r = dpo_loss(
        t(POLICY_C, dtype=torch.float64),
        t(POLICY_R, dtype=torch.float64),
        t(REF_C, dtype=torch.float64),
        t(REF_R, dtype=torch.float64),
        beta,
    )
    assert float(loss) == pytest.approx(sum(want) / 4, rel=1e-14)
    assert reward_c.tolist() == pytest.approx(
        [beta * (p - r) for p, r in zip(POLICY_C, REF_C, strict=True)]
    )
    assert reward_r.tolist() == pytest.approx(
        [beta * (p - r) for p, r in zip(POLICY_R, REF_R, strict=True)]
    )
    # the policy equal to its reference: ln 2, whatever the log-probabilities
    same = t(POLICY_C, dtype=torch.float32)
    assert float(dpo_loss(same, same - 3, same, same - 3, beta)[0]) == float(
        torch.tensor(math.log(2), dtype=torch.float32)
    )


def test_simpo_loss_is_the_papers_formula():
    """Meng et al. (2024), eq. 6: -log sigma(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x)
    - gamma)."""
    beta, gamma = 2.0, 0.5
    want = [
        -log_sigmoid(beta / nc * pc - beta / nr * pr - gamma)
        for pc, pr, nc, nr in zip(POLICY_C, POLICY_R, N_C, N_R, strict=True)
    ]
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    loss, _, _ = simpo_loss(t(POLICY_C), t(POLICY_R), t(N_C), t(N_R), beta, gamma)
    assert float(loss) == pytest.approx(sum(want) / 4, rel=1e-14)


def test_orpo_loss_is_the_papers_formula():
    """Hong et al. (2024), eqs. 6-7: L_SFT + lambda L_OR, L_OR = -log sigma(log(odds_w /
    odds_l)), odds(y|x) = P / (1 - P), P the mean per-token likelihood exp(log P / |y|); L_SFT the
    chosen replies' negative log-likelihood per token."""
    lam = 0.1
    odds = lambda lp, n: math.exp(lp / n) / (1 - math.exp(lp / n))  # noqa: E731
    ratio = [
        -log_sigmoid(math.log(odds(pc, nc) / odds(pr, nr)))
        for pc, pr, nc, nr in zip(POLICY_C, POLICY_R, N_C, N_R, strict=True)
    ]
    nll = -sum(POLICY_C) / sum(N_C)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    loss, _, _ = orpo_loss(t(POLICY_C), t(POLICY_R), t(N_C), t(N_R), lam)
    assert float(loss) == pytest.approx(nll + lam * sum(ratio) / 4, rel=1e-13)


def rows(run: Path) -> list[dict]:
    with open(run / "csv" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def dpo_args(tmp_path: Path, *extra: str) -> list[str]:
    folder = write_chat_model(tmp_path / "model", "llama")
    data = write_preference_rows(tmp_path / "prefs.jsonl", n=40)
    return [
        "experiment=dpo",
        f"model.init_from={folder}",
        f"data.path={data}",
        "optimizer.lr=1e-3",
        "trainer.max_steps=8",
        "trainer.val_check_interval=4",
        "trainer.check_val_every_n_epoch=null",
        "trainer.log_every_n_steps=1",
        "callbacks.throughput.window_size=2",
        "test=false",
        *extra,
    ]


def test_dpo_starts_at_ln_2_exactly_and_moves_the_chosen_replies_up(tmp_path):
    """The first step's policy is its reference: loss ln 2 in float32, rewards 0."""
    run_cli("train.py", *dpo_args(tmp_path), cwd=tmp_path, env=ONE_THREAD)
    (run,) = run_dirs(tmp_path)
    first = rows(run)[0]
    assert int(first["step"]) == 0
    assert float(first["train/loss"]) == float(torch.tensor(math.log(2), dtype=torch.float32))
    for key in ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy"):
        assert float(first[f"train/{key}"]) == 0.0, key
    assert float(first["train/logps_chosen"]) < 0 and float(first["train/logps_rejected"]) < 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val/rewards_margin"] > 0  # the chosen replies gained on the rejected


def test_dpo_resumes_bitwise_against_its_starting_weights(tmp_path):
    """A run resumed mid-way keeps the starting weights as its reference (not the checkpoint's
    weights), so it ends bit for bit where the uninterrupted run does."""
    args = dpo_args(tmp_path, EVERY_STEP)
    run_cli("train.py", *args, cwd=tmp_path, env=ONE_THREAD)
    (full,) = run_dirs(tmp_path)
    resumed = resume(tmp_path, args, full / "steps" / "5.ckpt", env=ONE_THREAD)
    assert_same_end(full, resumed, 5, metrics=("train/loss", "val/loss", "train/rewards_margin"))


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_losses_train_without_a_reference(tmp_path, loss_type):
    args = dpo_args(tmp_path, f"model.loss_type={loss_type}", "trainer.max_steps=4")
    if loss_type == "simpo":
        args.append("model.beta=2.0")
    run_cli("train.py", *args, cwd=tmp_path, env=ONE_THREAD)
    (run,) = run_dirs(tmp_path)
    logged = rows(run)
    losses = [float(r["train/loss"]) for r in logged]
    assert all(math.isfinite(v) for v in losses) and losses[0] != pytest.approx(math.log(2))
    # SimPO's and ORPO's rewards are the policy's own length-normalised log-probabilities
    assert float(logged[0]["train/rewards_chosen"]) < 0


def test_bad_preference_rows_are_counted_and_chosen_equal_to_rejected_is_refused(tmp_path):
    args = dpo_args(tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=2")
    data = tmp_path / "prefs.jsonl"
    bad = [
        {"prompt": "Reverse the word stone.", "chosen": "enots", "rejected": "enots"},
        {"prompt": "Say hi.", "chosen": [{"role": "user", "content": "hi"}], "rejected": "no"},
        {"chosen": "a", "rejected": "b"},
        {"messages": [{"role": "narrator", "content": "x"}], "chosen": "a", "rejected": "b"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in bad) + data.read_text())
    proc = run_cli("train.py", *args, "data.splits=[0.8,0.1,0.1]", cwd=tmp_path, env=ONE_THREAD)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    (warning,) = [line for line in out.splitlines() if "train split: of" in line]
    assert "of 35 preference pairs, 4 skipped" in warning
    assert "1 chosen equals rejected (first: prefs.jsonl line 1)" in warning
    assert "1 malformed reply (first: prefs.jsonl line 2: chosen holds a turn" in warning
    assert "1 unknown layout (first: prefs.jsonl line 3" in warning
    assert "1 unknown role (first: prefs.jsonl line 4: role 'narrator')" in warning


def test_dpo_from_an_sft_checkpoint_keeps_its_template_and_eval_scores_against_the_reference(
    tmp_path,
):
    """Pre-trained folder -> SFT checkpoint -> DPO from that checkpoint (its tokenizer and chat
    template come with it) -> eval.py, which scores against the reference the checkpoint carries:
    the figures of the run's own test of the same checkpoint."""
    folder = write_chat_model(tmp_path / "model", "llama")
    chat = write_chat_rows(tmp_path / "chat.jsonl", n=20)
    short = ["trainer.max_steps=2", "trainer.val_check_interval=2", "test=false"]
    run_cli(
        "train.py",
        "experiment=sft",
        f"model.init_from={folder}",
        f"data.path={chat}",
        *short,
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    (sft,) = run_dirs(tmp_path)
    args = dpo_args(tmp_path, "trainer.max_steps=4")
    args = [a for a in args if not a.startswith(("model.init_from", "test="))]
    proc = run_cli(
        "train.py",
        *args,
        f"model.init_from={sft / 'checkpoints' / 'last.ckpt'}",
        "callbacks.model_checkpoint.monitor=step",  # the best checkpoint is the last
        "callbacks.model_checkpoint.mode=max",
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    assert "chat template: the tokenizer's own" in proc.stdout + proc.stderr
    dpo = sorted(set(run_dirs(tmp_path)) - {sft})[0]
    trained = json.loads((dpo / "metrics.json").read_text())
    assert trained["test/rewards_margin"] != 0  # measured against the starting weights
    run_cli("eval.py", f"ckpt_path={dpo / 'checkpoints' / 'last.ckpt'}", cwd=tmp_path)
    (evaluated,) = run_dirs(tmp_path, "eval")
    scores = json.loads((evaluated / "metrics.json").read_text())
    for key in ("test/loss", "test/rewards_margin", "test/rewards_accuracy"):
        assert scores[key] == pytest.approx(trained[key], rel=1e-6), key
