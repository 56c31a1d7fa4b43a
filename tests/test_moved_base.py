"""A LoRA checkpoint holds its adapters only: its frozen base is read again from
`model.init_from`. When the base moves, every command that reads the checkpoint takes
`model.init_from=NEW_DIR` and gives the same numbers; without it, one line says how."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import run_cli, run_dirs
from tests.test_lora import LORA
from tests.test_pretrained import SHORT, write_gpt2, write_text

pytest.importorskip("transformers")

GREEDY = ["prompt=The", "max_new_tokens=12", "temperature=0"]


def figures(stdout: str) -> list[str]:
    """eval.py's metric lines (`test/loss: 5.67`), without the run's own header."""
    return [line for line in stdout.splitlines() if line.startswith("test/")]


def one_line_error(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.slow  # a fine-tuning run and a dozen commands on its checkpoint
def test_a_lora_checkpoint_follows_its_moved_base(tmp_path):
    base = write_gpt2(tmp_path / "gpt2")
    text = write_text(tmp_path / "corpus.txt")
    train = ["experiment=finetune_gpt2", f"data.path={text}", *SHORT, *LORA]
    run_cli("train.py", *train, f"model.init_from={base}", cwd=tmp_path)
    (run,) = run_dirs(tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    before = {
        "eval": figures(run_cli("eval.py", f"ckpt_path={ckpt}", cwd=tmp_path).stdout),
        "generate": run_cli("generate.py", f"ckpt_path={ckpt}", *GREEDY, cwd=tmp_path).stdout,
    }
    (metrics,) = (tmp_path / "logs" / "eval").glob("runs/*/metrics.json")
    test_loss = json.loads(metrics.read_text())["test/loss"]

    moved = tmp_path / "models" / "gpt2-moved"
    moved.parent.mkdir()
    shutil.move(base, moved)
    # without the new place: one line that names the key to give
    for script, args in (("eval.py", []), ("generate.py", GREEDY)):
        line = one_line_error(
            run_cli(script, f"ckpt_path={ckpt}", *args, cwd=tmp_path, check=False)
        )
        assert f"{base}" in line and "model.init_from=DIR" in line, line

    # with it: the same figures and the same text
    new = f"model.init_from={moved}"
    evaluated = run_cli("eval.py", f"ckpt_path={ckpt}", new, cwd=tmp_path)
    assert figures(evaluated.stdout) == before["eval"] and before["eval"]
    assert f"base model is read from {moved}" in evaluated.stderr + evaluated.stdout
    assert (
        run_cli("generate.py", f"ckpt_path={ckpt}", new, *GREEDY, cwd=tmp_path).stdout
        == (before["generate"])
    )
    (tmp_path / "prompts.txt").write_text("The\n")
    run_cli(
        "predict.py",
        f"ckpt_path={ckpt}",
        new,
        "input=prompts.txt",
        "output=g.jsonl",
        "max_new_tokens=12",
        "temperature=0",
        cwd=tmp_path,
    )
    (row,) = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert row["text"] == before["generate"].rstrip("\n")
    run_cli(
        "export.py", f"ckpt_path={ckpt}", new, "format=safetensors", "out=exported", cwd=tmp_path
    )
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    assert test_loss > 0

    # resuming: the adapters go on training on the moved base
    resumed = run_cli(
        "train.py",
        *train,
        f"model.init_from={moved}",
        f"ckpt_path={ckpt}",
        "trainer.max_steps=9",
        cwd=tmp_path,
    )
    assert "Traceback" not in resumed.stderr
    assert str(base) not in (run_dirs(tmp_path)[-1] / ".hydra" / "config.yaml").read_text()

    # a checkpoint trained from scratch has no base to move; a place that does not exist is
    # refused; an exported folder holds merged weights and takes none
    line = one_line_error(
        run_cli(
            "eval.py",
            f"ckpt_path={ckpt}",
            f"model.init_from={tmp_path / 'nope'}",
            cwd=tmp_path,
            check=False,
        )
    )
    assert "does not exist; give the folder (or .ckpt) that the base model" in line
    line = one_line_error(
        run_cli(
            "predict.py",
            "model_dir=exported",
            new,
            "input=prompts.txt",
            "output=h.jsonl",
            cwd=tmp_path,
            check=False,
        )
    )
    assert "an exported folder holds its weights merged: leave model.init_from out" in line


def test_a_checkpoint_without_a_base_refuses_one(tmp_path, trained):
    """A model trained from scratch was not started from pretrained weights: a base given for
    it is a mistake, said in one line (not silently ignored)."""
    ckpt = trained("lm") / "checkpoints" / "last.ckpt"
    line = one_line_error(
        run_cli(
            "eval.py", f"ckpt_path={ckpt}", f"model.init_from={tmp_path}", cwd=tmp_path, check=False
        )
    )
    assert "was not trained from a pretrained model (its model.init_from is unset)" in line
