"""Bad input ends a run with one clear line, exit status 2, and no harm to earlier runs."""

from __future__ import annotations

import pytest

from tests.conftest import CONFIGS, TINY_LM, run_cli, run_dirs


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """A finished run whose files must survive every failing command below untouched."""
    root = tmp_path_factory.mktemp("bad")
    run_cli("train.py", *TINY_LM, "test=false", cwd=root)
    (run,) = run_dirs(root)
    snapshot = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    yield root, run
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == snapshot


def fails(root, *args, script="train.py", status: int | None = 2):
    """Run a command that must fail: exit `status` (None: any non-zero), no traceback."""
    proc = run_cli(script, *args, cwd=root, check=False)
    assert proc.returncode != 0 if status is None else proc.returncode == status, proc.returncode
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr


def test_unknown_option_lists_the_valid_ones(earlier_run):
    err = fails(earlier_run[0], "model=nope", status=None)  # Hydra's own error: exit 1
    assert "Could not find 'model/nope'" in err and "gpt2_124m" in err


def test_missing_data_path(earlier_run):
    root, run = earlier_run
    before = set(run_dirs(root))
    err = fails(root, *TINY_LM, "data.path=/does/not/exist")
    assert "error: data.path=/does/not/exist does not exist" in err
    (failed,) = set(run_dirs(root)) - before  # the run folder says it failed, and why
    assert "data.path=/does/not/exist does not exist" in (failed / "error.txt").read_text()


def test_corpus_shorter_than_one_block(earlier_run):
    root = earlier_run[0]
    (root / "short.txt").write_text("Only a few words.")
    err = fails(root, *TINY_LM, f"data.path={root / 'short.txt'}")
    assert "fewer than one block" in err and "block_size" in err


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8, "holds a NUL byte at offset 7"),
        (
            ("caf\u00e9 au lait, " * 200).encode("latin-1"),
            "is not UTF-8 text (byte b'\\xe9' at offset 3)",
        ),
    ],
    ids=["binary", "latin1"],
)
def test_a_corpus_that_is_not_utf8_text_is_refused_naming_the_byte(earlier_run, content, said):
    root = earlier_run[0]
    (root / "corpus.bin").write_bytes(content)
    err = fails(root, *TINY_LM, f"data.path={root / 'corpus.bin'}")
    assert f"{root / 'corpus.bin'} {said}" in err, err[-1000:]


@pytest.mark.parametrize("size", ["0", "-4"])
def test_non_positive_batch_size(earlier_run, size):
    err = fails(earlier_run[0], *TINY_LM, f"data.batch_size={size}")
    assert f"data.batch_size must be a positive integer, got {size}" in err


def test_wrong_type(earlier_run):
    err = fails(earlier_run[0], *TINY_LM, "data.batch_size=twelve")
    assert "batch_size" in err


def test_missing_and_corrupt_checkpoints(earlier_run):
    root, _ = earlier_run
    for script in ("train.py", "eval.py", "generate.py"):
        err = fails(
            root, *(TINY_LM if script == "train.py" else []), "ckpt_path=/nope.ckpt", script=script
        )
        assert "ckpt_path=/nope.ckpt does not exist" in err
    (root / "corrupt.ckpt").write_bytes(b"this is not a checkpoint" * 100)
    for script in ("eval.py", "generate.py"):
        err = fails(root, f"ckpt_path={root / 'corrupt.ckpt'}", script=script)
        assert "corrupt.ckpt is not a checkpoint" in err
        # torch's advice to load with weights_only=False would run an untrusted file's code
        assert "weights_only" not in err


def test_a_folder_or_a_truncated_file_as_checkpoint(earlier_run):
    root, run = earlier_run
    err = fails(root, f"ckpt_path={run}", script="eval.py")
    assert f"ckpt_path={run} is a folder, not a checkpoint file" in err
    cut = root / "cut.ckpt"
    cut.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes()[:4096])
    err = fails(root, f"ckpt_path={cut}", script="generate.py")
    assert "cut.ckpt is truncated or corrupt" in err and "weights_only" not in err


def test_wrong_type_of_an_optimizer_value(earlier_run):
    """The optimizer is a partial target whose lr is `float | Tensor`: still checked."""
    err = fails(earlier_run[0], *TINY_LM, "optimizer.lr=abc")
    assert "error: optimizer.lr='abc' must be int or float" in err


@pytest.mark.parametrize("arg", ["max_new_tokens=1.5", "temperature=abc"])
def test_wrong_type_of_a_generate_value(earlier_run, arg):
    root, run = earlier_run
    ckpt = run / "checkpoints" / "last.ckpt"
    err = fails(root, f"ckpt_path={ckpt}", arg, script="generate.py")
    key = arg.split("=")[0]
    assert f"error: {key}=" in err and f"fix the value of {key}" in err


def test_checkpoint_of_another_model(earlier_run):
    root, run = earlier_run
    ckpt = run / "checkpoints" / "last.ckpt"
    args = [a for a in TINY_LM if not a.startswith("model.net.n_embd")]
    err = fails(root, *args, "model.net.n_embd=64", f"ckpt_path={ckpt}")
    assert "does not fit this model" in err
    if (CONFIGS / "model" / "mlp.yaml").exists() and (
        CONFIGS / "data" / "regression.yaml"
    ).exists():
        err = fails(
            root,
            "model=mlp",
            "data=regression",
            "loss=mse",
            f"ckpt_path={ckpt}",
        )
        assert "resume with the same model" in err or "choose the model" in err


def test_wrong_type_in_a_net_config(earlier_run):
    err = fails(earlier_run[0], *TINY_LM, "model.net.dropout=high")
    assert "model.net.dropout='high' must be int or float" in err
