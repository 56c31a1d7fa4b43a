"""train.py, eval.py and generate.py as a user runs them: subprocesses on real files."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

import pytest
import torch

from tests import forkserver
from tests.conftest import CONFIGS, ROOT, TINY_LM, run_cli, run_dirs


@pytest.fixture(scope="module")
def lm(trained, tmp_path_factory):
    """The session's tiny LM run (conftest `trained`), and a folder of this module's own to
    run eval and generate from."""
    run = trained("lm")
    root = tmp_path_factory.mktemp("cli")
    # `ckpt_path=last` looks for the newest run under the folder it is run from
    (root / "logs" / "train" / "runs").mkdir(parents=True)
    (root / "logs" / "train" / "runs" / run.name).symlink_to(run)
    return root, run, trained.proc("lm")


def test_run_directory_holds_everything(lm):
    root, run, proc = lm
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6}", run.name)
    for rel in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "train.log",
        "tokenizer.json",
        "metrics.json",
        "csv/metrics.csv",
        "checkpoints/last.ckpt",
        "samples.txt",
    ):
        assert (run / rel).is_file(), rel
    best = list((run / "checkpoints").glob("best_step*.ckpt"))
    assert len(best) == 1
    with open(run / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = set().union(*rows)
    assert {"train/loss", "val/loss", "val/ppl", "test/loss", "test/ppl"} <= keys
    assert any(k.startswith("train/") and "per_sec" in k for k in keys)  # throughput
    assert "--- sample at step" in proc.stdout
    # piped output carries no colour codes (a terminal gets colour; NO_COLOR=1 turns it off)
    assert "\x1b[" not in proc.stdout + proc.stderr


def test_checkpoints_are_plain_data(lm):
    _, run, _ = lm
    for ckpt in (run / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert state["bigmodel"]["config"]["model"]["net"]["n_embd"] == 32
        assert state["TextDataModule"]["tokenizer"]["type"] == "char"
        assert "optimizer_states" in state and "lr_schedulers" in state


def test_eval_reproduces_test_metrics(lm):
    root, run, _ = lm
    best = next((run / "checkpoints").glob("best_step*.ckpt"))
    proc = run_cli("eval.py", f"ckpt_path={best}", cwd=root)
    got = dict(re.findall(r"^(test/\w+): ([\d.]+)$", proc.stdout, re.M))
    import json

    want = json.loads((run / "metrics.json").read_text())
    assert float(got["test/loss"]) == pytest.approx(want["test/loss"], rel=1e-4)
    assert float(got["test/ppl"]) == pytest.approx(want["test/ppl"], rel=1e-4)
    (eval_run,) = run_dirs(root, "eval")
    assert (eval_run / "metrics.json").is_file()
    # another split of the same data
    proc = run_cli("eval.py", f"ckpt_path={best}", "data.split=val", cwd=root)
    # named after the split it scored: the summary lines, Lightning's table, metrics.csv
    assert re.search(r"^val/ppl: [\d.]+$", proc.stdout, re.M)
    assert re.search(r"│\s+val/ppl\s+│", proc.stdout)
    assert "test/" not in proc.stdout
    second = run_dirs(root, "eval")[-1]
    header = (second / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "val/loss" in header and "test/" not in header, header


def test_generate_prints_a_reproducible_sample(lm):
    root, run, _ = lm
    args = [
        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        "prompt=The",
        "max_new_tokens=40",
        "temperature=0.8",
        "top_k=50",
    ]
    a = run_cli("generate.py", *args, cwd=root).stdout
    b = run_cli("generate.py", *args, cwd=root).stdout
    assert a.startswith("The") and a == b
    assert len(a.strip()) >= 40


def test_generate_takes_prompts_as_typed_from_a_file_or_stdin(lm):
    """No Hydra quoting: commas, brackets and quotes as the shell passes them."""
    root, run, _ = lm
    prompt = "Hello, world (it's [a] test)"
    (root / "prompt.txt").write_text(prompt)
    ckpt = f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    greedy = [ckpt, "max_new_tokens=8", "temperature=0"]
    typed = run_cli("generate.py", *greedy, f"prompt={prompt}", cwd=root).stdout
    assert typed.startswith(prompt) and len(typed.rstrip("\n")) == len(prompt) + 8  # char tokens
    from_file = run_cli("generate.py", *greedy, f"prompt_file={root / 'prompt.txt'}", cwd=root)
    from_stdin = run_cli("generate.py", *greedy, "prompt=-", cwd=root, stdin=prompt)
    assert from_file.stdout == from_stdin.stdout == typed
    assert not list(root.glob("*.log")) and not (root / "logs" / "generate").exists()


def test_a_run_starts_with_its_directory_overrides_and_options(lm):
    """The short summary by default; the whole tree behind extras.print_config=full."""
    root, run, proc = lm
    head = proc.stdout.splitlines()[:4]
    assert head[0] == f"train: run directory logs/train/runs/{run.name}"
    assert head[1] == f"  overrides  {' '.join(TINY_LM)}"
    assert head[2].startswith("  options    data=text optimizer=muon scheduler=wsd model=speedrun")
    assert head[3].startswith(f"  config     logs/train/runs/{run.name}/.hydra/config.yaml")
    assert "CONFIG" not in proc.stdout
    # a plain interpreter: --cfg job answers without loading torch, which a fork would hide
    full = run_cli("train.py", "extras.print_config=full", "--cfg", "job", cwd=root, fresh=True)
    assert "n_embd" in full.stdout  # --cfg job answers as before, without a run


def test_resume_takes_the_data_of_the_checkpoint(tmp_path):
    """`ckpt_path=last` after a run on data.path=my.txt continues on my.txt, and says so."""
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "and",
        "the",
        "dog",
        "ran",
        "to",
        "it",
        "while",
        "we",
        "read",
        ".",
    ]
    import random

    rng = random.Random(0)
    (tmp_path / "my.txt").write_text(" ".join(rng.choice(words) for _ in range(8000)))
    run_cli("train.py", *TINY_LM, "data.path=my.txt", "trainer.max_steps=6", cwd=tmp_path)
    proc = run_cli("train.py", *TINY_LM, "ckpt_path=last", cwd=tmp_path)
    assert f"on its own data: data.path={tmp_path / 'my.txt'}" in proc.stdout
    resumed = run_dirs(tmp_path)[-1]
    state = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 12
    assert state["bigmodel"]["config"]["data"]["path"] == str(tmp_path / "my.txt")


def test_resume_continues_exactly(tmp_path):
    """Stopping at step 6 and resuming gives the weights of an uninterrupted 12-step run."""
    args = [
        *TINY_LM,
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.model_checkpoint.monitor=step",
        "callbacks.model_checkpoint.mode=max",
        "test=false",
    ]
    run_cli("train.py", *args, cwd=tmp_path)
    (full,) = run_dirs(tmp_path)
    at6 = next((full / "checkpoints").glob("best_step000006*.ckpt"))
    run_cli("train.py", *args, f"ckpt_path={at6}", cwd=tmp_path)
    resumed = [d for d in run_dirs(tmp_path) if d != full][0]
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=0, atol=1e-6, msg=k)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]


def test_ckpt_path_last_finds_the_newest_run(lm, tmp_path):
    root, run, _ = lm
    proc = run_cli("eval.py", "ckpt_path=last", cwd=root)
    assert "test/loss" in proc.stdout
    found = root / "logs" / "train" / "runs" / run.name / "checkpoints" / "last.ckpt"
    assert f"ckpt_path=last: {found}" in proc.stderr  # says which


def test_eval_finds_the_corpus_from_anywhere_and_takes_a_moved_one(tmp_path):
    """Data paths are stored absolute; `data.path=` on eval.py points at a moved corpus."""
    from pydoc_data.topics import topics

    text = "".join(topics.values())[:40_000]
    (tmp_path / "corpus.txt").write_text(text)
    run_cli("train.py", *TINY_LM, "data.path=corpus.txt", "test=false", cwd=tmp_path)
    (run,) = run_dirs(tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert "test/loss" in run_cli("eval.py", f"ckpt_path={ckpt}", cwd=elsewhere).stdout
    (tmp_path / "corpus.txt").rename(elsewhere / "moved.txt")
    proc = run_cli("eval.py", f"ckpt_path={ckpt}", "data.path=moved.txt", cwd=elsewhere)
    assert "test/loss" in proc.stdout


def test_model_and_optimizer_from_the_command_line(tmp_path):
    run_cli("train.py", "model=gpt", "optimizer=adam", *TINY_LM, "test=false", cwd=tmp_path)
    # the class the task built (the default AdamW would also match a plain "Adam" substring)
    built = re.findall(r"optimizer: (\w+) \(", (run_dirs(tmp_path)[0] / "train.log").read_text())
    assert built == ["Adam"], built


@pytest.mark.parametrize("ask", [["--help"], ["--cfg", "job"]])
def test_help_and_cfg_job_answer_without_importing_torch(tmp_path, ask):
    """A plain interpreter (what it imports is the point): -X importtime lists every import."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "train.py"), *ask],
        cwd=tmp_path,
        env={**os.environ, "BIGMODEL_ROOT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "hydra" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "lightning")}


def test_help_lists_the_groups(tmp_path):
    # a plain interpreter: --help answers without loading torch, which a fork would hide
    out = run_cli("train.py", "--help", cwd=tmp_path, fresh=True).stdout
    for group in (
        "model",
        "data",
        "optimizer",
        "scheduler",
        "trainer",
        "logger",
        "callbacks",
        "debug",
        "experiment",
        "strategy",
    ):
        assert re.search(rf"^{group}: ", out, re.M), group
    assert "wandb_sweep" not in out  # W&B sweep specs are not a Hydra group
    # each group's options, exactly as on disk (--help asks Hydra once per group:
    # bigmodel.cli.list_each_group_once)
    listed = dict(re.findall(r"^([\w/]+): (.*)$", out.split("== Config ==")[0], re.M))
    on_disk = {}
    for path in CONFIGS.rglob("*.yaml"):
        group = path.parent.relative_to(CONFIGS).as_posix()
        if group != "." and group.split("/")[0] != "hydra":
            on_disk.setdefault(group, []).append(path.stem)
    assert {g: ", ".join(sorted(o)) for g, o in on_disk.items()} == listed


def test_trainer_arguments_need_no_plus(tmp_path):
    """The Trainer arguments a user reaches for are keys of `trainer`, and reach the Trainer."""
    from bigmodel.run import build_trainer
    from tests.conftest import compose_config

    cfg = compose_config(
        "train",
        [
            "trainer.max_time=00:00:10:00",
            "trainer.limit_train_batches=5",
            "trainer.limit_test_batches=3",
            "trainer.enable_checkpointing=false",
            "trainer.deterministic=true",
            "trainer.profiler=simple",
            "callbacks=none",
        ],
        tmp_path,
    )
    trainer = build_trainer(cfg, logger=False)
    assert trainer.limit_train_batches == 5 and trainer.limit_test_batches == 3
    assert trainer.checkpoint_callback is None
    assert type(trainer.profiler).__name__ == "SimpleProfiler"
    timer = next(c for c in trainer.callbacks if type(c).__name__ == "Timer")
    assert timer._duration == 600


def test_config_printout_shows_values_the_data_fills(tmp_path, capsys):
    """`num_classes: ${model.net.num_classes}` is printed as pending, not resolved into an error."""
    from bigmodel.utils import FILLED_AT_RUN_TIME, print_config
    from tests.conftest import compose_config

    cfg = compose_config("train", ["experiment=digits_cnn"], tmp_path)
    print_config(cfg)
    out = capsys.readouterr().out
    assert out.count(FILLED_AT_RUN_TIME) == 3  # model.num_classes, net.num_classes, in_channels
    assert "widths" in out and "AdamW" in out


def test_a_run_shorter_than_one_validation_ends_well(tmp_path):
    """No validation, so no val/loss to return: a plain run exits 0 (train && eval), and says
    nothing of it (only a sweep ranks runs by optimized_metric)."""
    proc = run_cli("train.py", *TINY_LM, "trainer.max_steps=3", cwd=tmp_path)
    assert "optimized_metric" not in proc.stdout + proc.stderr
    (run,) = run_dirs(tmp_path)
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_two_runs_in_the_same_second_get_two_directories(tmp_path):
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        "train=false",
        "test=false",
        "logger=csv",
    ]
    env = {**os.environ, "BIGMODEL_ROOT": str(tmp_path)}
    procs = [
        forkserver.popen(
            args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(run_dirs(tmp_path)) == 2


def test_multirun_gives_one_directory_per_job(tmp_path):
    run_cli(
        "train.py",
        "-m",
        "optimizer=adam,sgd",
        *TINY_LM,
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "test=false",
        cwd=tmp_path,
    )
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1"]
    assert all((sweep / j / "checkpoints" / "last.ckpt").is_file() for j in jobs)


@pytest.mark.parametrize("debug", ["fdr", "limit"])
def test_debug_presets(debug, tmp_path):
    run_cli("train.py", f"debug={debug}", *TINY_LM[:5], cwd=tmp_path)
    (run,) = run_dirs(tmp_path, "debug")
    assert (run / "metrics.json").is_file()
    assert not list(run.rglob("*.ckpt"))  # debug runs write no checkpoints


def test_tensorboard_logger_writes_events(tmp_path):
    run_cli("train.py", "logger=tensorboard", *TINY_LM, "test=false", cwd=tmp_path)
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_a_run_that_never_validated_says_it_tests_the_final_weights(tmp_path):
    """No validation, no best checkpoint: the test stage scores the last weights and says so."""
    proc = run_cli("train.py", *TINY_LM, "trainer.max_steps=5", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert "no validation saved a best checkpoint: testing the final weights" in out
    assert "testing the best checkpoint" not in out
    assert "test/loss" in (run_dirs(tmp_path)[0] / "metrics.json").read_text()
