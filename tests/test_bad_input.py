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


def fails(root, *args, script="train.py"):
    proc = run_cli(script, *args, cwd=root, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr


def test_unknown_option_lists_the_valid_ones(earlier_run):
    err = fails(earlier_run[0], "model=nope")
    assert "Could not find 'model/nope'" in err and "gpt2_124m" in err


def test_missing_data_path(earlier_run):
    err = fails(earlier_run[0], *TINY_LM, "data.path=/does/not/exist")
    assert "error: data.path=/does/not/exist does not exist" in err


def test_corpus_shorter_than_one_block(earlier_run):
    root = earlier_run[0]
    (root / "short.txt").write_text("Only a few words.")
    err = fails(root, *TINY_LM, f"data.path={root / 'short.txt'}")
    assert "fewer than one block" in err and "block_size" in err


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
        assert "is not a readable checkpoint" in err


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
