"""The README's "Extending" walkthrough, followed as written: a new model and a new dataset.

The project is copied to a temporary folder; every code block of the section whose first line
names a file (`# src/bigmodel/nets/resmlp.py`) is written to that file, and the section's commands
run in the copy, as a newcomer would run them after adding the files.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, logged, run_dirs

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
FILE_LINE = re.compile(r"# ((?:src|configs)/\S+\.(?:py|yaml))$")
FILE_NAME = re.compile(r"`((?:src|configs)/\S+\.(?:py|yaml))`")


def section(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {name}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def walkthrough() -> tuple[dict[str, str], list[list[str]]]:
    """The files the section adds (path -> text) and its commands, in order."""
    files, commands, text, prose_from = {}, [], section("Extending"), 0
    for m in FENCE.finditer(text):
        lang, body = m.groups()
        # the file is named by the block's first line, or (configs, whose first line is the
        # command that uses them) by the text just before the block
        named = FILE_LINE.match(body.splitlines()[0]) or FILE_NAME.search(
            text[prose_from : m.start()]
        )
        prose_from = m.end()
        if lang == "bash":
            commands += [shlex.split(line) for line in body.splitlines() if line.strip()]
        elif named:
            files[named.group(1)] = body
    return files, commands


def copy_project(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "configs"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    for script in ("train.py", "eval.py", "generate.py"):
        shutil.copy(ROOT / script, dst / script)


def test_readme_names_the_files_and_commands():
    files, commands = walkthrough()
    assert set(files) == {
        "src/bigmodel/nets/resmlp.py",
        "configs/model/resmlp.yaml",
        "src/bigmodel/data/blobs.py",
        "configs/data/blobs.yaml",
    }
    assert [c[:2] for c in commands] == [["python", "train.py"], ["python", "eval.py"]]
    for path in files:  # the walkthrough adds files, it edits none
        assert not (ROOT / path).exists(), path


def test_a_new_model_and_dataset_train_as_the_readme_says(tmp_path):
    files, commands = walkthrough()
    project = tmp_path / "project"
    copy_project(project)
    for path, text in files.items():
        (project / path).write_text(text)
    # the copy's package comes first, as if the files had been added to the clone
    env = {**os.environ, "PYTHONPATH": str(project / "src"), "BIGMODEL_ROOT": str(project)}
    outputs = []
    for cmd in commands:
        # a plain interpreter: PYTHONPATH puts the copy's package first, which a fork would hide
        proc = subprocess.run(
            [sys.executable, *cmd[1:]], cwd=project, env=env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, f"{shlex.join(cmd)}\n{proc.stderr[-4000:]}"
        outputs.append(proc)
    (run,) = run_dirs(project)
    losses = logged(run, "train/loss")
    assert losses[-1] < 0.5 * losses[0], losses  # it learned
    assert logged(run, "val/acc")[-1] > 0.9  # the blobs are well apart: nearly all right
    # the net was the new one, from the new module, and eval scored it on the new data
    assert "bigmodel.nets.resmlp.ResMLP" in (run / ".hydra" / "config.yaml").read_text()
    acc = re.search(r"test/acc\W+([0-9.]+)", outputs[1].stdout + outputs[1].stderr)
    assert acc and float(acc.group(1)) > 0.9, outputs[1].stdout[-2000:]
