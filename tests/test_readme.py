"""The README is the contract: every command in its code blocks runs, as written.

Each fenced code block of README.md and of the pages under docs/ it links to is one test. Its
`python train.py | eval.py | generate.py` and `python -m bigmodel...` commands (also after `srun`
or inside `&&` chains, and `torchrun ... train.py`) run in order, in one fresh folder per block,
as subprocesses of the user's CLI, with only the quick-check suffix the README documents (QUICK
below). Placeholders are filled the way a user fills them: `<run>` and `ckpt_path=...` with the
newest run of the block (a fixture run when the block has trained none), `DIR` with a data folder
of the layout the command's `data=` option reads, `FILE` and `my_corpus.txt` with a text file,
`...` with the overrides of the command before.
A command added to the README is tested without touching this file.

Commands that need what this machine lacks are listed in NEEDS by a piece of their text, with the
reason; of those, the composition still runs (`--cfg job` for train.py).
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import shlex
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests import forkserver
from tests.conftest import ROOT, run_cli
from tests.test_audio import tone, write_wav_folder
from tests.test_image import write_image_folder

README = ROOT / "README.md"
# the README, then the pages it links to (the layout, the extending walk-throughs)
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

# The quick-check suffix the README documents ("Quick checks"), by script.
QUICK = {
    "train.py": ["debug=smoke"],
    "train.py -m hparams_search": ["debug=smoke", "hydra.sweeper.n_trials=2"],
    "train.py trainer.max_steps=N": ["trainer.max_steps=4"],
    "eval.py": ["trainer.limit_test_batches=2"],
}

# Commands this machine cannot run, by a piece of their text, and why. Their composition runs.
NEEDS = {
    # the first entry a command contains gives its reason: the most specific come first
    "srun python train.py": "a SLURM allocation (2 nodes x 8 GPUs)",
    "torchrun --nnodes=2": "two machines joined by torchrun, 8 GPUs each",
    "torchrun --nproc_per_node=8": "8 GPUs (torchrun starts one process per GPU)",
    "trainer.devices=8": "8 GPUs on one node",
    "trainer=gpu": "a CUDA GPU",
    "python -m bigmodel.convert": (
        "a DeepSpeed ZeRO checkpoint folder, which Lightning writes only on CUDA devices "
        "(tests/test_deepspeed.py::test_zero_stages_train_on_cpu, -m slow, run by CI, builds one "
        "on CPU with DeepSpeed itself and converts it)"
    ),
    "last.consolidated.ckpt": "the output of bigmodel.convert above",
}

# Values for the shell variables of the cluster recipes, for their composition check.
SHELL_VARS = {"$NODE_RANK": "0", "$FIRST_NODE": "127.0.0.1", "${SLURM_JOB_ID}": "4242"}

_SCRIPT = re.compile(r"^(train|eval|generate)\.py$")


@dataclass
class Command:
    line: int  # README line where the command starts
    text: str  # as written (continuations joined)
    argv: list[str]  # from the script on: ["train.py", "model=gpt", ...] or ["-m", "bigmodel.x"]
    needs: str | None = None
    page: str = "README.md"  # the page, from the repository root


@dataclass
class Block:
    line: int
    heading: str
    commands: list[Command] = field(default_factory=list)
    page: Path = README

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        where = "" if self.page == README else f"{self.page.stem}-"
        return f"{where}L{self.line}-{slug}"


def _command_argv(tokens: list[str]) -> list[str] | None:
    """The part of a shell command that runs bigmodel, or None."""
    if tokens[:1] == ["srun"]:
        tokens = tokens[1:]
    if tokens[:1] == ["torchrun"]:
        for i, t in enumerate(tokens):
            if _SCRIPT.match(t):
                return tokens[i:]
        return None
    if tokens[:1] != ["python"] or len(tokens) < 2:
        return None
    if _SCRIPT.match(tokens[1]):
        return tokens[1:]
    if tokens[1] == "-m" and len(tokens) > 2 and tokens[2].startswith("bigmodel"):
        return tokens[1:]
    return None


def _page_name(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else str(page)


def readme_blocks(text: str | None = None, page: Path = README) -> list[Block]:
    """Every fenced code block of the README (or of `page`) that holds at least one bigmodel
    command."""
    lines = (page.read_text() if text is None else text).splitlines()
    blocks, heading, i = [], "top", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            heading = line.lstrip("# ").strip()
        if line.lstrip().startswith("```"):
            block = Block(i + 1, heading, page=page)
            i += 1
            while i < len(lines) and not lines[i].lstrip().startswith("```"):
                start, logical = i, lines[i]
                while logical.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    logical = logical.rstrip()[:-1] + " " + lines[i].strip()
                i += 1
                try:
                    tokens = shlex.split(logical, comments=True)
                except ValueError:
                    continue
                # a && b && c: each part on its own
                parts, cur = [], []
                for t in tokens:
                    if t == "&&":
                        parts.append(cur)
                        cur = []
                    else:
                        cur.append(t)
                parts.append(cur)
                for part in parts:
                    argv = _command_argv(part)
                    if argv is None:
                        continue
                    text_ = logical.split("#")[0].strip() if "#" in logical else logical.strip()
                    needs = next((why for key, why in NEEDS.items() if key in logical), None)
                    block.commands.append(Command(start + 1, text_, argv, needs, _page_name(page)))
            if block.commands:
                blocks.append(block)
        i += 1
    return blocks


# README sections that a test of their own follows (their commands need the files they add)
OWN_TESTS = {
    # a GPT-2 folder that transformers writes: tests/test_pretrained.py builds one
    "Starting from pretrained weights": "tests/test_pretrained.py",
    # chat models and conversation files that transformers writes: tests/test_chat.py
    "Post-training: chat fine-tuning and preferences": "tests/test_chat.py",
    # export.py, predict.py and a running serve.py with its client: tests/test_serve.py
    "Deploying a model": "tests/test_serve.py",
}
# docs pages that a test of their own follows, whole
OWN_PAGES = {
    # the walk-throughs add files to a copy of the project, then run their commands there
    "extending.md": "tests/test_extending.py",
}


def _outside_own_tests(blocks: list[Block]) -> list[Block]:
    lines = README.read_text().splitlines()
    starts = [i + 1 for i, line in enumerate(lines) if line.startswith("## ")]
    spans = []
    for name in OWN_TESTS:
        start = lines.index(f"## {name}") + 1
        spans.append((start, min([s for s in starts if s > start] + [len(lines) + 1])))
    return [
        b
        for b in blocks
        if b.page.name not in OWN_PAGES
        and not (b.page == README and any(a <= b.line < z for a, z in spans))
    ]


def all_blocks() -> list[Block]:
    """The blocks of the README, then of each docs page."""
    return [b for page in PAGES for b in readme_blocks(page=page)]


BLOCKS = _outside_own_tests(all_blocks())


# ------------------------------------------------------------------------------- fixtures
def write_text(path: Path) -> Path:
    """A small English text (CPython's own docs), as a user's corpus file."""
    from pydoc_data.topics import topics

    path.write_text("".join(topics.values())[:60_000], encoding="utf-8")
    return path


def write_mnist(root: Path) -> Path:
    """The four MNIST IDX files (28 x 28 uint8 images, labels 0-9)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 200), ("t10k", 60)):
        labels = np.arange(n) % 10
        imgs = rng.integers(0, 40, (n, 28, 28))
        for k, lab in enumerate(labels):  # class c lights up row band c: learnable
            imgs[k, 2 * lab : 2 * lab + 4] = 220
        for kind, arr in (("images-idx3", imgs), ("labels-idx1", labels)):
            header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(
                f">{arr.ndim}I", *arr.shape
            )
            with gzip.open(root / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + arr.astype(np.uint8).tobytes())
    return root


def write_cifar10(root: Path) -> Path:
    """cifar-10-batches-py: five training pickles, a test pickle and batches.meta."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {
            b"data": rng.integers(0, 256, (40, 3072)).astype(np.uint8),
            b"labels": [int(v) for v in np.arange(40) % 10],
            b"batch_label": name.encode(),
        }
        (base / name).write_bytes(pickle.dumps(d))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return root


def write_speech_commands(root: Path) -> Path:
    """The Speech Commands v0.02 layout: word folders, validation and testing lists."""
    for w, word in enumerate(("yes", "no", "up")):
        (root / word).mkdir(parents=True, exist_ok=True)
        for spk in range(6):
            sf.write(
                root / word / f"{spk:08x}_nohash_0.wav", tone(300 * (w + 1), 16000, 1.0), 16000
            )
    (root / "_background_noise_").mkdir(exist_ok=True)
    sf.write(root / "_background_noise_" / "white.wav", tone(50, 16000, 2.0), 16000)
    (root / "validation_list.txt").write_text(
        "yes/00000000_nohash_0.wav\nno/00000001_nohash_0.wav\n"
    )
    (root / "testing_list.txt").write_text("up/00000002_nohash_0.wav\nyes/00000003_nohash_0.wav\n")
    return root


def write_parallel(root: Path) -> Path:
    """DIR/{train,val,test}.{de,en}: one sentence per line, aligned."""
    root.mkdir(parents=True, exist_ok=True)
    pairs = [(f"Das Haus {i} ist rot.", f"House {i} is red.") for i in range(300)]
    for split, rows in (("train", pairs[:240]), ("val", pairs[240:270]), ("test", pairs[270:])):
        (root / f"{split}.de").write_text("\n".join(de for de, _ in rows) + "\n")
        (root / f"{split}.en").write_text("\n".join(en for _, en in rows) + "\n")
    return root


# data= option -> a writer of the folder that option reads
DATA_DIRS = {
    "image_folder": lambda d: write_image_folder(d, per_class=12),
    "mnist": write_mnist,
    "cifar10": write_cifar10,
    "audio_folder": lambda d: write_wav_folder(d, per_class=8),
    "speech_commands": write_speech_commands,
    "translation_files": write_parallel,
}


# ------------------------------------------------------------------------------- the runner
def _newest_run(cwd: Path) -> Path | None:
    runs = sorted((cwd / "logs" / "train" / "runs").glob("*/checkpoints/last.ckpt"))
    return runs[-1].parent.parent if runs else None


def _fixture_run(cwd: Path) -> Path:
    """A run for a block that uses `<run>` before training one: the default demo, shortened."""
    run_cli("train.py", *QUICK["train.py"], cwd=cwd)
    return _newest_run(cwd)


def fill(argv: list[str], cwd: Path, previous: list[str] | None) -> list[str]:
    """The command as a user would type it here: placeholders replaced by real paths."""
    out: list[str] = []
    data = next((a.split("=", 1)[1] for a in argv if a.startswith("data=")), None)
    for a in argv:
        if a == "..." and previous is not None and out:  # "the same overrides as above"
            out += previous[1:]  # those written after it come later, so they win
            continue
        for var, value in SHELL_VARS.items():
            a = a.replace(var, value)
        if a == "ckpt_path=last" and _newest_run(cwd) is None:
            _fixture_run(cwd)
        if "<run>" in a or a == "ckpt_path=...":
            run = _newest_run(cwd) or _fixture_run(cwd)
            rel = run.relative_to(cwd)
            a = a.replace("logs/train/runs/<run>", str(rel)).replace("<run>", str(rel))
            if a == "ckpt_path=...":
                a = f"ckpt_path={rel}/checkpoints/last.ckpt"
        if a.endswith("=DIR"):
            if data not in DATA_DIRS:
                raise AssertionError(f"no fixture for DIR with data={data}; add one to DATA_DIRS")
            folder = cwd / f"data_{data}"
            if not folder.exists():
                DATA_DIRS[data](folder)
            a = a[: -len("DIR")] + str(folder)
        if a.endswith(("=FILE", "=my_corpus.txt")):
            name = a.split("=", 1)[1]
            if not (cwd / name).exists():
                write_text(cwd / name)
        if a.endswith(("=ds.json", "=ds_config.json")):
            (cwd / a.split("=", 1)[1]).write_text('{"zero_optimization": {"stage": 2}}')
        out.append(a)
    return out


def quick(argv: list[str]) -> list[str]:
    """The README's quick-check suffix for this command."""
    script = argv[0]
    if script == "train.py" and ("--help" in argv or "--cfg" in argv):
        return []
    if script == "train.py" and "-m" in argv and any(a.startswith("hparams_search=") for a in argv):
        return QUICK["train.py -m hparams_search"]
    suffix = list(QUICK.get(script, []))
    if script == "train.py" and any(a.startswith("trainer.max_steps=") for a in argv):
        suffix += QUICK["train.py trainer.max_steps=N"]  # the command line outranks debug=smoke
    return suffix


def run_command(
    cmd: Command, cwd: Path, previous: list[str] | None, fresh: bool = False
) -> list[str]:
    """Run one README command; fresh: in a plain interpreter (not forked), as first typed."""
    argv = fill(cmd.argv, cwd, previous)
    where = f"{cmd.page} line {cmd.line}: {cmd.text}"
    if cmd.needs:
        if argv[0] == "-m":  # the module still starts and explains itself
            proc = run_cli_module([argv[1], "--help"], cwd)
            assert proc.returncode == 0, f"{where}\n{proc.stderr[-3000:]}"
        if argv[0] != "train.py":  # the rest of it cannot run here; the reason is in NEEDS
            return argv
        args = [a for a in argv[1:] if a != "-m"]
        proc = run_cli("train.py", *args, "--cfg", "job", cwd=cwd, check=False)
        assert proc.returncode == 0, f"{where}\ndoes not compose:\n{proc.stderr[-3000:]}"
        return argv
    if argv[0] == "-m":
        proc = run_cli_module(argv[1:], cwd)
    else:
        proc = run_cli(
            argv[0], *argv[1:], *quick(argv), cwd=cwd, check=False, timeout=600, fresh=fresh
        )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{where}\nexited {proc.returncode}:\n{output[-5000:]}"
    assert "Traceback (most recent call last)" not in output, f"{where}\n{output[-5000:]}"
    return argv


def run_cli_module(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m <module> args...`, as the README writes it."""
    env = {**os.environ, "BIGMODEL_ROOT": str(cwd)}
    return forkserver.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


# README sections whose blocks run in CI's slow tier (several trainings each; the fast suite
# keeps to 10 minutes on 2 cores); every other block runs in the fast suite
SLOW_SECTIONS = ("translation-sequence-to-sequence-bleu", "optuna-searches-that-survive-failure")


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b, id=b.id, marks=[pytest.mark.slow] if b.id.endswith(SLOW_SECTIONS) else [])
        for b in BLOCKS
    ],
)
def test_readme_block_runs_as_written(block: Block, tmp_path):
    previous = None
    # the quickstart runs in plain interpreters, exactly as typed on a new machine
    fresh = block is BLOCKS[0]
    for cmd in block.commands:
        previous = run_command(cmd, tmp_path, previous, fresh=fresh)


# ------------------------------------------------------------------------------- the parser
def _anchor(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def test_the_contents_list_every_section_and_link_every_docs_page():
    """The README opens with its table of contents: every `##` and `###` heading, in order, with
    its anchor; and every page under docs/ is linked from it and exists."""
    text = README.read_text()
    body = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # headings, not shell comments
    headings = re.findall(r"^(##|###) (.+)$", body, re.M)
    assert headings[0] == ("##", "Contents"), "the README does not open with ## Contents"
    contents = text[text.index("## Contents\n") : text.index("\n## ", text.index("## Contents"))]
    listed = re.findall(r"^( *)- \[(.+?)\]\(#([^)]+)\)", contents, re.M)
    expected = [(" " * 2 * (len(h) - 2), t, _anchor(t)) for h, t in headings[1:]]
    assert listed == expected
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)\)", text))
    assert linked == {_page_name(p) for p in PAGES[1:]}, linked
    for page in linked:
        assert (ROOT / page).is_file(), page
        assert f"[{page}]({page})" in contents, f"the contents do not link {page}"


def test_the_readme_has_commands_and_every_need_is_still_in_it():
    commands = [c for b in BLOCKS for c in b.commands]
    assert len(commands) >= 30, [c.text for c in commands]
    text = README.read_text()
    for key, why in NEEDS.items():  # a stale entry would explain nothing: keep the list honest
        assert any(c.needs == why for c in commands), f"NEEDS {key!r} is no command's reason"
    # the quick-check suffixes are the ones the README documents
    for suffix in QUICK.values():
        assert " ".join(suffix) in text, suffix


def test_every_experiment_is_a_readme_command():
    """So the README test (or the own test of its section, OWN_TESTS) runs every worked example
    through the CLI with its own defaults."""
    written = {
        a.split("=", 1)[1]
        for b in all_blocks()
        for c in b.commands
        for a in c.argv
        if a.startswith("experiment=")
    }
    for path in sorted((ROOT / "configs" / "experiment").glob("*.yaml")):
        assert path.stem in written, f"experiment={path.stem} has no command in the README"


def test_parser_reads_continuations_chains_comments_and_cluster_launchers():
    text = "\n".join(
        [
            "## Demo",
            "```bash",
            "# python train.py commented out",
            "python3 -m venv .venv && . .venv/bin/activate && python train.py   # the demo",
            "python train.py model=gpt \\",
            "    trainer.max_steps=3 'prompt=a b'",
            "srun python train.py trainer=slurm",
            "torchrun --nproc_per_node=8 train.py trainer=ddp",
            "python -m bigmodel.convert x.ckpt",
            "python bench/other.py",
            "```",
        ]
    )
    (block,) = readme_blocks(text)
    assert [c.argv for c in block.commands] == [
        ["train.py"],
        ["train.py", "model=gpt", "trainer.max_steps=3", "prompt=a b"],
        ["train.py", "trainer=slurm"],
        ["train.py", "trainer=ddp"],
        ["-m", "bigmodel.convert", "x.ckpt"],
    ]
    assert [c.line for c in block.commands] == [4, 5, 7, 8, 9]
    needs = [c.needs for c in block.commands]
    assert needs == [
        None,
        None,
        NEEDS["srun python train.py"],
        NEEDS["torchrun --nproc_per_node=8"],
        NEEDS["python -m bigmodel.convert"],
    ]
