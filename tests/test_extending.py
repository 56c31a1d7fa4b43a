"""docs/extending.md's walk-throughs, followed as written: a new model and a new dataset, then a
new decoder family of Hugging Face checkpoints.

The project is copied to a temporary folder; every code block of a walk-through whose first line
names a file (`# src/bigmodel/nets/resmlp.py`) is written to that file, every `diff` block (its
first line names the file; ` ` lines are context, `-` lines go, `+` lines come) is applied to it,
and the walk-through's commands run in the copy, as a newcomer would run them after the edits.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, logged, run_dirs
from tests.test_pretrained import write_text

PAGE = ROOT / "docs" / "extending.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
FILE_LINE = re.compile(r"# ((?:src|configs|tests)/\S+\.(?:py|yaml)|\w+\.py)$")
FILE_NAME = re.compile(r"`((?:src|configs)/\S+\.(?:py|yaml))`")
# the walk-throughs, by the page's `##` sections
MODEL_AND_DATA = ("A model family", "A dataset")
DECODER = ("A decoder family",)


def section(names: tuple[str, ...]) -> str:
    """The page's `## name` sections, one after the other."""
    text, out = PAGE.read_text(), []
    for name in names:
        start = text.index(f"\n## {name}\n")
        end = text.find("\n## ", start + 1)
        out.append(text[start : end if end != -1 else None])
    return "".join(out)


def walkthrough(
    names: tuple[str, ...] = MODEL_AND_DATA,
) -> tuple[dict[str, str], dict[str, str], list[list[str]]]:
    """The files the walk-through adds (path -> text), the edits it makes (path -> diff) and its
    commands, in order."""
    files, edits, commands, text, prose_from = {}, {}, [], section(names), 0
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
        elif lang == "diff":
            edits[named.group(1)] = body.split("\n", 1)[1]
        elif named:
            files[named.group(1)] = body
    return files, edits, commands


def apply_diff(text: str, diff: str) -> str:
    """`text` with the hunk made: its context and `-` lines, found once, become its context and
    `+` lines."""
    lines = diff.splitlines()
    old = "".join(line[1:] + "\n" for line in lines if line[:1] in " -")
    new = "".join(line[1:] + "\n" for line in lines if line[:1] in " +")
    assert text.count(old) == 1, f"the diff's lines are not in the file once:\n{old}"
    return text.replace(old, new)


def copy_project(dst: Path, tests: bool = False) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "configs", *(["tests"] if tests else [])):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    for script in ("train.py", "eval.py", "generate.py", "export.py", "pyproject.toml"):
        shutil.copy(ROOT / script, dst / script)


def follow(project: Path, names: tuple[str, ...]) -> list[list[str]]:
    """Write the walk-through's files and make its edits in `project`; its commands."""
    files, edits, commands = walkthrough(names)
    for path, text in files.items():
        (project / path).write_text(text)
    for path, diff in edits.items():
        (project / path).write_text(apply_diff((project / path).read_text(), diff))
    return commands


def test_the_page_names_the_files_and_commands():
    files, edits, commands = walkthrough()
    assert not edits
    assert set(files) == {
        "src/bigmodel/nets/resmlp.py",
        "configs/model/resmlp.yaml",
        "src/bigmodel/data/blobs.py",
        "configs/data/blobs.yaml",
    }
    assert [c[:2] for c in commands] == [["python", "train.py"], ["python", "eval.py"]]
    for path in files:  # the walkthrough adds files, it edits none
        assert not (ROOT / path).exists(), path


def test_a_new_model_and_dataset_train_as_the_page_says(tmp_path):
    project = tmp_path / "project"
    copy_project(project)
    commands = follow(project, MODEL_AND_DATA)
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


# ------------------------------------------------------------------------ a decoder family
# the files of the project the decoder walk-through touches; tiny_seed_oss.py is the user's own
FAMILY_FILES = {
    "src/bigmodel/pretrained/hf_seed_oss.py",
    "src/bigmodel/pretrained/hf.py",
    "configs/model/seed_oss_36b.yaml",
    "tests/test_hf_families.py",
}


def test_the_decoder_walkthrough_names_its_files_edits_and_count():
    from bigmodel.pretrained import hf

    files, edits, commands = walkthrough(DECODER)
    assert set(files) | set(edits) == FAMILY_FILES | {"tiny_seed_oss.py"}
    assert set(edits) == {"src/bigmodel/pretrained/hf.py", "tests/test_hf_families.py"}
    for path in files:  # new files, and a family the project does not have yet
        assert not (ROOT / path).exists(), path
    assert "seed_oss" not in hf.FAMILIES
    for path, diff in edits.items():  # each edit applies to the file as it is
        apply_diff((ROOT / path).read_text(), diff)
    assert [c[:2] for c in commands] == [
        ["python", "tiny_seed_oss.py"],
        ["python", "train.py"],
        ["python", "export.py"],
    ]
    assert "experiment=finetune" in commands[1] and "data.path=FILE" in commands[1]
    # the count the page states is the count of the walk-through
    stated = re.search(
        r"\*\*Files a new family touches\*\*, counted on this walk-through: \*\*(\d+)\*\*",
        PAGE.read_text(),
    )
    assert stated and int(stated.group(1)) == len(FAMILY_FILES)


@pytest.mark.slow  # ~60 s: a model built, fine-tuned and exported, and the parity test, each cold
def test_a_new_decoder_family_fine_tunes_and_exports_as_the_page_says(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch
    import yaml

    project = tmp_path / "project"
    copy_project(project, tests=True)
    commands = follow(project, DECODER)
    text = write_text(project / "corpus.txt", 20_000)
    env = {
        **os.environ,
        "PYTHONPATH": f"{project / 'src'}:{project}",
        "BIGMODEL_ROOT": str(project),
    }

    def run(*argv: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, *argv], cwd=project, env=env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stderr[-4000:]}"
        return proc

    for cmd in commands:
        run(*[a.replace("=FILE", f"={text}") for a in cmd[1:]])
    # fine-tuned from the folder, as its family and with its sizes
    (run_dir,) = run_dirs(project)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    net = ckpt["bigmodel"]["config"]["model"]["net"]
    assert (net["family"], net["n_embd"], net["head_dim"]) == ("seed_oss", 64, 16)
    # exported as a folder transformers loads as the same class, with other weights
    source = transformers.AutoModelForCausalLM.from_pretrained(project / "tiny-seed-oss")
    back = transformers.AutoModelForCausalLM.from_pretrained(project / "seed-oss-hf")
    assert type(back).__name__ == type(source).__name__ == "SeedOssForCausalLM"
    idx = torch.randint(
        0, source.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        assert (back.eval()(idx).logits - source.eval()(idx).logits).abs().max() > 1e-4
    # the preset is what the adapter makes of Seed-OSS-36B's config.json
    shape = dict(
        hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=80,
        num_key_value_heads=8, head_dim=128, rope_theta=1e7, attention_dropout=0.0,
        residual_dropout=0.0,
    )  # fmt: skip
    read = run(
        "-c",
        "import json, sys, transformers; from bigmodel.pretrained import hf_seed_oss;"
        "c = transformers.SeedOssConfig(**json.loads(sys.argv[1])).to_dict();"
        "print(json.dumps(hf_seed_oss.FAMILY.net_config(c, 'config.json')))",
        json.dumps(shape),
    )
    theirs = json.loads(read.stdout.strip().splitlines()[-1])
    preset = yaml.safe_load((project / "configs/model/seed_oss_36b.yaml").read_text())["net"]
    for key, value in preset.items():
        if key not in ("block_size", "family"):  # the context is the preset's choice
            assert theirs[key] == value, key
    # the case added to CASES passes the parity test: logits both ways, greedy decoding
    proc = run(
        "-m", "pytest", "tests/test_hf_families.py", "-k", "parity and seed_oss", "-q", "-n", "0",
        "-p", "no:cacheprovider",
    )  # fmt: skip
    assert "1 passed" in proc.stdout, proc.stdout[-3000:]
