"""Bad input ends a command with one line on stderr, exit status 2, and no harm to earlier runs.

The matrix below is the contract: every case is a command a user may type, with the words its
one line must hold. The README's "Bad input" table is generated from it (`python -m
tests.test_bad_input` prints the table) and a test checks that the two agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_LM, run_cli, run_dirs


@dataclass(frozen=True)
class Case:
    kind: str  # key, option, type, value, file, checkpoint, data
    script: str  # train.py, eval.py, generate.py
    args: tuple[str, ...]  # {ckpt}: the earlier run's last.ckpt, {run}: its folder, {files}
    says: str  # part of the one `error:` line (same placeholders)
    quick: bool  # in the fast suite; the others run in CI's slow tier (each loads torch)

    @property
    def id(self) -> str:
        return f"{self.script.removesuffix('.py')}:{' '.join(self.args)}"


def case(kind: str, script: str, args: str, says: str, quick: bool = False) -> Case:
    return Case(kind, script, tuple(args.split("  ")), says, quick)  # two spaces between args


CK = "ckpt_path={ckpt}"
SWEEP = "-m  hparams_search=gpt_optuna  hydra.sweeper.n_trials=0  hydra.sweeper.study_name=s"
# a sweep's trials sample no text (hparams_search configs switch the text sample off)
SWEEP_LM = [a for a in TINY_LM if not a.startswith("callbacks.text_sample.")]
# fmt: off
CASES = [
    # a key that does not exist: the nearest one that does
    case("key", "train.py", "trainer.max_step=10", "trainer has no key max_step; did you mean trainer.max_steps?", quick=True),
    case("key", "train.py", "+trainer.max_step=10", "Trainer takes no argument max_step; did you mean trainer.max_steps?", quick=True),
    case("key", "train.py", "model.net.n_layr=2", "model.net has no key n_layr; did you mean model.net.n_layer?", quick=True),
    case("key", "train.py", "+model.net.n_layr=2", "GPT takes no argument n_layr; did you mean model.net.n_layer?", quick=True),
    case("key", "train.py", "modle=gpt", "the config has no key modle; did you mean model?", quick=True),
    case("key", "train.py", "data.bath_size=4", "data has no key bath_size; did you mean data.batch_size?", quick=True),
    case("key", "train.py", "optimizer.lrr=0.1", "optimizer has no key lrr; did you mean optimizer.lr?", quick=True),
    case("key", "train.py", "hydra.run.dirr=out", "hydra.run has no key dirr; did you mean hydra.run.dir?", quick=True),
    case("key", "train.py", "trainer.detect_anomaly=true", "Trainer takes it: add it with +trainer.detect_anomaly=true", quick=True),
    case("key", "train.py", "+callbacks.model_checkpoint.montor=x", "ModelCheckpoint takes no argument montor; did you mean callbacks.model_checkpoint.monitor?", quick=True),
    case("key", "train.py", "extras.colour=1", "extras has no key colour (extras has: ignore_warnings, print_config; +extras.colour=1 adds a new key)", quick=True),
    case("key", "eval.py", f"{CK}  data.bach_size=4", "data has no key bach_size; did you mean data.batch_size?", quick=True),
    case("key", "generate.py", f"{CK}  max_new_token=5", "the config has no key max_new_token; did you mean max_new_tokens?", quick=True),
    case("key", "generate.py", f"{CK}  beam_size=2", "beam_size: not an option of this model ({ckpt} is a LanguageModel); it takes prompt,", quick=True),
    case("key", "train.py", f"{SWEEP}  trainer.max_step=5", "trainer has no key max_step; did you mean trainer.max_steps?", quick=True),
    # an option a config group does not have: the ones it has
    case("option", "train.py", "model=nope", "model=nope is not an option; choose one of: audio_cnn, cnn, gpt, gpt2_124m", quick=True),
    case("option", "train.py", "optimizer=adamm", "optimizer=adamm is not an option; choose one of: adagrad, adam, adamw", quick=True),
    case("option", "train.py", "experiment=baby", "experiment=baby is not an option; choose one of: baby_gpt, char_speedrun, digits_cnn", quick=True),
    case("option", "train.py", "-m  hparams_search=gpt", "hparams_search=gpt is not an option; choose one of: char_speedrun_optuna, digits_optuna, gpt_optuna", quick=True),
    case("option", "eval.py", f"{CK}  trainer=tpu", "trainer=tpu is not an option; choose one of: cpu, ddp", quick=True),
    # a value of the wrong type
    case("type", "train.py", "data.batch_size=twelve", "data.batch_size='twelve' must be int; fix the value of data.batch_size", quick=True),
    case("type", "train.py", "optimizer.lr=abc", "optimizer.lr='abc' must be int or float; fix the value of optimizer.lr"),
    case("type", "train.py", "model.net.dropout=high", "model.net.dropout='high' must be int or float"),
    case("type", "train.py", "trainer.max_steps=ten", "trainer.max_steps='ten' must be int"),
    case("type", "generate.py", f"{CK}  max_new_tokens=1.5", "max_new_tokens=1.5 must be int; fix the value of max_new_tokens"),
    case("type", "generate.py", f"{CK}  temperature=abc", "temperature='abc' must be int or float; fix the value of temperature"),
    # a value out of range, or one the override grammar cannot read
    case("value", "train.py", "data.batch_size=0", "data.batch_size must be a positive integer, got 0", quick=True),
    case("value", "train.py", "data.batch_size=-4", "data.batch_size must be a positive integer, got -4"),
    case("value", "train.py", "trainer.val_check_interval=100000  trainer.check_val_every_n_epoch=1", "trainer.val_check_interval=100000 is more than the 1634 training batches of an epoch"),
    case("value", "train.py", "model.net.n_head=3", "n_embd (32) must be divisible by n_head (3)"),
    case("value", "train.py", "data.block_size=64", "data.block_size=64 is longer than the model's context model.net.block_size=32"),
    case("value", "train.py", "data.splits=[0.9,0.1]", "data.splits=[0.9, 0.1] must be 3 fractions >= 0 summing to 1"),
    case("value", "train.py", "data.tokenizer=wordpiece", "data.tokenizer=wordpiece is not one of: char, bpe"),
    case("value", "train.py", "global_batch_size=7", "global_batch_size=7 is not a positive multiple of data.batch_size"),
    case("value", "train.py", "precision=17", "precision=17 is not one of transformer-engine, transformer-engine-float16, 16-true, 16-mixed"),
    case("value", "train.py", "trainer.devices=0", "trainer: `Trainer(devices=0)` value is not a valid input"),
    case("value", "train.py", "optimizer=adamw  +optimizer.fused=true  precision=bf16-mixed", "optimizer.fused=true does not work with precision=bf16-mixed and gradient clipping"),
    case("value", "train.py", "resume=sometimes", "resume=sometimes is not one of auto, never"),
    case("value", "train.py", "extras.print_config=loud", "extras.print_config=loud is not one of short, full, none"),
    case("value", "train.py", "trainer.max_steps=(", "cannot read the override trainer.max_steps=(: quote a value", quick=True),
    case("value", "train.py", "experiment=finetune_gpt2", "model.init_from, data.path must be given (experiment=finetune_gpt2 needs them); add model.init_from=... data.path=... to the command", quick=True),
    case("value", "train.py", "model.net.n_layer  2", "model.net.n_layer has no value: the '=' is missing; write model.net.n_layer=2", quick=True),
    case("value", "train.py", "model.net.n_layer=1,2", "model.net.n_layer=1,2: a comma makes a list or a sweep", quick=True),
    case("value", "generate.py", f"{CK}  top_k=-5", "top_k=-5 must be >= 1; top_k=null samples from all tokens"),
    case("value", "generate.py", f"{CK}  max_new_tokens=-1", "max_new_tokens=-1 must be >= 0"),
    case("value", "eval.py", f"{CK}  data.split=validation", "data.split=validation is not one of train, val, test"),
    case("value", "train.py", f"{SWEEP}  hydra.sweeper.direction=up", "hydra.sweeper.direction=up is not valid; use minimize or maximize"),
    case("value", "train.py", f"{SWEEP}  data.batch_size=4", "study s in sqlite:///{files}/logs/train/multiruns/s/optuna.db was started with"),
    # a file that is missing or is not what the key needs
    case("file", "train.py", "data.path=/does/not/exist", "data.path=/does/not/exist does not exist", quick=True),
    case("file", "train.py", "data.path={files}/empty.txt", "data.path={files}/empty.txt holds no text"),
    case("file", "train.py", "data.path={files}/short.txt", "fewer than one block"),
    case("file", "train.py", "data.path={files}/corpus.bin", "data.path: {files}/corpus.bin holds a NUL byte at offset 7, so it is a binary file, not text"),
    case("file", "train.py", "data.path={files}/latin1.txt", "data.path: {files}/latin1.txt is not UTF-8 text (byte b'\\xe9' at offset 3)"),
    case("file", "train.py", "data.path={files}/nodata", "data.path={files}/nodata is a folder with no .txt/.md/.parquet/.json files"),
    case("file", "eval.py", f"{CK}  data.path=/moved/away.txt", "data.path=/moved/away.txt does not exist"),
    case("file", "generate.py", f"{CK}  prompt_file={{files}}/none.txt", "prompt_file={files}/none.txt does not exist"),
    case("file", "generate.py", f"{CK}  prompt_file={{files}}/corpus.bin", "prompt_file: {files}/corpus.bin holds a NUL byte"),
    # a checkpoint that is missing, not a checkpoint, or of another model
    case("checkpoint", "train.py", "ckpt_path=/nope.ckpt", "ckpt_path=/nope.ckpt does not exist"),
    case("checkpoint", "eval.py", "ckpt_path=/nope.ckpt", "ckpt_path=/nope.ckpt does not exist"),
    case("checkpoint", "generate.py", "ckpt_path=/nope.ckpt", "ckpt_path=/nope.ckpt does not exist"),
    case("checkpoint", "eval.py", "ckpt_path={run}", "ckpt_path={run} is a folder, not a checkpoint file"),
    case("checkpoint", "eval.py", "ckpt_path={files}/text.ckpt", "ckpt_path={files}/text.ckpt is not a checkpoint", quick=True),
    case("checkpoint", "generate.py", "ckpt_path={files}/cut.ckpt", "ckpt_path={files}/cut.ckpt is truncated or corrupt"),
    case("checkpoint", "train.py", "ckpt_path={files}/plain.ckpt", "ckpt_path={files}/plain.ckpt holds no model state_dict"),
    case("checkpoint", "generate.py", "ckpt_path={files}/weights.ckpt", "{files}/weights.ckpt carries no bigmodel run config"),
    case("checkpoint", "eval.py", "ckpt_path=last  paths.log_dir={files}/nologs", "ckpt_path=last found no checkpoint"),
    case("checkpoint", "train.py", f"{CK}  model.net.n_embd=64", "does not fit this model (shape of net.wte.weight)"),
    case("checkpoint", "train.py", f"{CK}  model.net.n_layer=2", "does not fit this model (8 weights it lacks, such as net.blocks.1.ln_1.weight)", quick=True),
    # data that does not fit the checkpoint or the model
    case("data", "train.py", f"{CK}  data=regression  model=mlp  loss=mse", "was trained on bigmodel.data.TextDataModule data, but this run loads"),
    case("data", "train.py", f"{CK}  data.splits=[0.8,0.1,0.1]", "the checkpoint's training set had 13079 items an epoch and this one has 11626"),
    case("data", "generate.py", f"{CK}  prompt=日本語", "character '日' is not in the character vocabulary of this model", quick=True),
    case("data", "train.py", "data.block_size=100000  model.net.block_size=100000", "fewer than one block (100001)"),
    # a task, data, net and loss that do not fit together: refused before anything is built
    case("data", "train.py", "experiment=regression  loss=cross_entropy", "loss=cross_entropy (CrossEntropyLoss) does not fit regression (a Regressor takes MSELoss, L1Loss, HuberLoss, SmoothL1Loss): use loss=huber or loss=l1 or loss=mse", quick=True),
    case("data", "train.py", "experiment=digits_cnn  loss=mse", "loss=mse (MSELoss) does not fit classification (a Classifier takes CrossEntropyLoss, MultiMarginLoss): use loss=cross_entropy or loss=hinge", quick=True),
    case("data", "train.py", "experiment=translation  loss=hinge", "loss=hinge (MultiMarginLoss) does not fit translation (a Seq2Seq takes CrossEntropyLoss): use loss=cross_entropy"),
    case("data", "train.py", "loss=mse", "loss=mse: a LanguageModel is trained with its own loss and takes none; leave loss=mse out", quick=True),
    case("data", "train.py", "data=digits", "data=digits is image classification, and model=speedrun is a LanguageModel for language modelling: use model=cnn or model=vit", quick=True),
    case("data", "train.py", "data=chat", "data=chat is chat conversations (loss on assistant turns), and model=speedrun is a LanguageModel for language modelling: use experiment=sft", quick=True),
    case("data", "train.py", "data=translation", "data=translation is parallel sentences for translation, and model=speedrun is a LanguageModel for language modelling: use model=seq2seq"),
    case("data", "train.py", "model=cnn", "data=text is language-modelling text, and model=cnn is a Classifier for classification: use model=gpt", quick=True),
    case("data", "train.py", "data=spoken_digits  model=cnn", "model=cnn needs model.net.in_channels, which data=spoken_digits (audio classification) does not give (it gives num_classes, sample_rate): use model=audio_cnn", quick=True),
    case("data", "train.py", "model.net.vocab_size=50", "model.net.vocab_size=50 is smaller than the data's vocab_size=104; leave model.net.vocab_size out (it follows the data) or set it to 104 or more", quick=True),
    case("data", "train.py", "experiment=digits_cnn  model.net.num_classes=5", "model.net.num_classes=5 is smaller than the data's num_classes=10"),
    case("data", "train.py", "experiment=digits_cnn  model.net.in_channels=3", "model.net.in_channels=3 does not match the data's in_channels=1; leave model.net.in_channels out"),
]
# fmt: on


def test_the_matrix_is_large_and_covers_every_kind_and_script():
    assert len(CASES) >= 40
    assert {c.kind for c in CASES} == {
        "key",
        "option",
        "type",
        "value",
        "file",
        "checkpoint",
        "data",
    }
    assert {c.script for c in CASES} == {"train.py", "eval.py", "generate.py"}
    assert sum("-m" in c.args for c in CASES) >= 3
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """A finished run and a started study, whose files no failing command below may touch, and
    the bad files the cases point at."""
    root = tmp_path_factory.mktemp("bad")
    run_cli("train.py", *TINY_LM, "test=false", cwd=root)
    (run,) = run_dirs(root)
    # a study with no trials yet (it exits 2: nothing to report), started with data.batch_size=8
    run_cli("train.py", *SWEEP.split("  "), *SWEEP_LM, "data.batch_size=8", cwd=root, check=False)
    assert (root / "logs" / "train" / "multiruns" / "s" / "optuna.db").is_file()
    files = root
    (files / "empty.txt").write_text("")
    (files / "short.txt").write_text("Only a few words.")
    (files / "corpus.bin").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    (files / "latin1.txt").write_bytes(("caf\u00e9 au lait, " * 200).encode("latin-1"))
    (files / "nodata").mkdir()
    (files / "nodata" / "image.png").write_bytes(b"\x89PNG")
    (files / "text.ckpt").write_text("this is not a checkpoint\n" * 100)
    last = run / "checkpoints" / "last.ckpt"
    (files / "cut.ckpt").write_bytes(last.read_bytes()[:4096])
    import torch

    torch.save({"epoch": 3}, files / "plain.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, files / "weights.ckpt")
    return {"root": root, "run": run, "ckpt": last, "files": files}


def snapshot(root: Path) -> dict[Path, int]:
    """Every file of the earlier runs and studies, with its modification time."""
    logs = root / "logs"
    return {p: p.stat().st_mtime_ns for p in logs.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "c", [pytest.param(c, id=c.id, marks=[] if c.quick else [pytest.mark.slow]) for c in CASES]
)
def test_bad_input(earlier, c: Case):
    fill = {k: str(v) for k, v in earlier.items()}
    args = [a.format(**fill) for a in c.args]
    if c.script == "train.py" and not any(
        a.startswith(("model=", "data=", "experiment=")) for a in args
    ):
        # shortened like every CLI test; a case's own value wins (later overrides win in Hydra)
        flags = [a for a in args if a.startswith("-")]  # -m goes before the overrides
        shorter = SWEEP_LM if flags else TINY_LM
        args = [*flags, *shorter, *(a for a in args if a not in flags)]
    before = snapshot(earlier["root"])
    proc = run_cli(c.script, *args, cwd=earlier["root"], check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert c.says.format(**fill) in lines[0], lines[0]
    assert "Traceback" not in proc.stdout and "weights_only" not in lines[0]
    after = snapshot(earlier["root"])
    assert {p: t for p, t in after.items() if p in before} == before  # nothing earlier touched
    for new in {p.parent for p in set(after) - set(before) if p.parent.parent.name == "runs"}:
        assert (new / "error.txt").read_text().strip() in lines[0]  # a failed run says so


# --------------------------------------------------------------------------------- README
README_START = "<!-- bad-input matrix: generated by python -m tests.test_bad_input -->"
README_END = "<!-- end of the bad-input matrix -->"


def readme_table() -> str:
    def show(text: str) -> str:
        text = text.replace("{ckpt}", "RUN/checkpoints/last.ckpt").replace("{run}", "RUN")
        text = text.replace("{files}/", "").replace("|", "\\|")
        return text

    rows = ["| kind | command | the line on stderr holds |", "|---|---|---|"]
    for c in CASES:
        command = f"`python {c.script} {show(' '.join(c.args))}`"
        rows.append(f"| {c.kind} | {command} | {show(c.says)} |")
    return "\n".join(rows)


def test_the_readme_lists_every_case():
    text = (ROOT / "README.md").read_text()
    block = re.search(re.escape(README_START) + r"\n(.*?)\n" + re.escape(README_END), text, re.S)
    assert block, f"README.md has no {README_START} block"
    assert block.group(1).strip() == readme_table(), "run: python -m tests.test_bad_input"


if __name__ == "__main__":
    print(readme_table())


def test_a_deeper_checkpoint_than_the_model_is_refused_in_one_line(tmp_path):
    """Weights the model has no place for (a 2-layer checkpoint, a 1-layer model): one line,
    not a state-dict traceback."""
    deep = [a for a in TINY_LM if not a.startswith("model.net.n_layer")] + ["model.net.n_layer=2"]
    run_cli("train.py", *deep, "trainer.max_steps=2", "test=false", cwd=tmp_path)
    (run,) = run_dirs(tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    proc = run_cli("train.py", *TINY_LM, f"ckpt_path={ckpt}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: {ckpt} does not fit this model (8 weights this model has no place for, such as "
        "net.blocks.1.ln_1.weight); resume with the model config it was trained with"
    ]
