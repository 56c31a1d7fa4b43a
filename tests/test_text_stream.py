"""Token shards: python -m bigmodel.prepare_data writes them (litdata), train.py data=text_stream
streams them from a folder or from a real S3-compatible server (moto's, started here on
loopback), resumes bitwise, and refuses bad shards in one line before training.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch

from tests import forkserver
from tests.conftest import ROOT, TINY_LM, run_cli, run_dirs
from tests.test_faults import wait_for_step
from tests.test_resume import EVERY_STEP, assert_same_end, load, resume

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TEXT = "\n".join(topics[k] for k in sorted(topics))
# the tiny GPT; the streamed data has no max_eval_windows (its validation set is small here)
TINY = [a for a in TINY_LM if not a.startswith("data.max_eval_windows")]
# small parts and shards, so a tiny corpus still has several of each to shuffle and split
SMALL = ["part_mb=0.0005", "chunk_tokens=400"]


def corpus(root: Path, chars: int = 6000, files: int = 3) -> Path:
    folder = root / "corpus"
    folder.mkdir(exist_ok=True)
    step = chars // files
    for i in range(files):
        (folder / f"part{i}.txt").write_text(TEXT[i * step : (i + 1) * step])
    return folder


def prepare(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = forkserver.run(
        [sys.executable, "-m", "bigmodel.prepare_data", *args],
        cwd=root,
        env={**os.environ, "BIGMODEL_ROOT": str(root), **ONE_THREAD},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def stream_args(path: str, steps: int = 12) -> list[str]:
    return [
        *TINY,
        "data=text_stream",
        f"data.path={path}",
        "data.val_fraction=0.2",
        "model.net.dropout=0.1",
        f"trainer.max_steps={steps}",
        "trainer.log_every_n_steps=1",
        "test=false",
    ]


def shard_bytes(folder: Path) -> list[bytes]:
    index = json.loads((folder / "index.json").read_text())
    return [(folder / c["filename"]).read_bytes() for c in index["chunks"]]


# ------------------------------------------------------------------------- prepare and train
def test_prepare_writes_litdata_shards_of_the_corpus_in_order_with_a_manifest(tmp_path):
    src = corpus(tmp_path)
    proc = prepare(tmp_path, f"source={src}", "out=shards", "workers=2", *SMALL)
    assert "wrote shards: 6000 tokens" in proc.stdout  # a char a token
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["type"] == "char"
    assert [Path(s["path"]).name for s in manifest["sources"]] == [f"part{i}.txt" for i in range(3)]
    for s in manifest["sources"]:
        stat = Path(s["path"]).stat()
        assert (s["size"], s["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert len(index["chunks"]) > 4 and sum(c["dim"] for c in index["chunks"]) == 6000
    # the token ids are the char tokenizer's, in the corpus's order: litdata gives each worker
    # a contiguous run of parts, and the index lists the chunks round by round, worker by worker
    from bigmodel.data.tokenizers import tokenizer_from_dict

    tok = tokenizer_from_dict(manifest["tokenizer"])
    import numpy as np

    items = [c["chunk_size"] for c in index["chunks"]]
    chunks = shard_bytes(tmp_path / "shards")  # litdata's chunk: item count, offsets, the ids
    ids = np.concatenate(
        [
            np.frombuffer(b, np.uint16, offset=(2 + n) * 4)
            for b, n in zip(chunks, items, strict=True)
        ]
    )
    assert tok.decode(ids.tolist()) == "".join((src / f"part{i}.txt").read_text() for i in range(3))
    # again: nothing to do
    again = prepare(tmp_path, f"source={src}", "out=shards", "workers=2", *SMALL)
    assert "already prepared" in again.stdout

    # training from them: the S3 test below, and the README's commands


def test_jsonl_and_parquet_rows_are_documents_joined_with_the_end_of_text_token(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "rows"
    src.mkdir()
    docs = [TEXT[i * 300 : i * 300 + 100 + 37 * i] for i in range(6)]
    (src / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:3]))
    pq.write_table(pa.table({"text": docs[3:], "id": [3, 4, 5]}), src / "b.parquet")
    tok = train_tokenizer(tmp_path, corpus(tmp_path))
    prepare(tmp_path, f"source={src}", "out=shards", f"tokenizer={tok}", "workers=1")
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    chunks = shard_bytes(tmp_path / "shards")
    ids = np.concatenate(
        [
            np.frombuffer(b, np.uint16, offset=(2 + c["chunk_size"]) * 4)
            for b, c in zip(chunks, index["chunks"], strict=True)
        ]
    ).tolist()
    eos = manifest["eos_id"]
    assert eos is not None and ids.count(eos) == 6 and ids[-1] == eos
    from bigmodel.data.tokenizers import tokenizer_from_dict

    bpe = tokenizer_from_dict(manifest["tokenizer"])
    got, doc = [], []
    for i in ids:
        if i == eos:
            got.append(bpe.decode(doc))
            doc = []
        else:
            doc.append(i)
    assert sorted(got) == sorted(docs)  # every row, whole, each ended by the token


def test_best_fit_packing_starts_every_window_at_a_document_and_reports_the_waste(tmp_path):
    import numpy as np

    src = corpus(tmp_path, chars=20_000, files=2)
    tok = train_tokenizer(tmp_path, src)
    args = [f"source={src}", f"tokenizer={tok}", "workers=2", "part_mb=0.004", "chunk_tokens=300"]
    proc = prepare(tmp_path, *args, "out=packed", "pack=bos", "window=33")
    manifest = json.loads((tmp_path / "packed" / "manifest.json").read_text())
    packing, eos = manifest["packing"], manifest["eos_id"]
    assert manifest["window"] == 33 and 0 < packing["dropped"] < packing["tokens"]
    share = f"{packing['dropped'] / packing['tokens']:.1%} wasted"
    assert f"{packing['dropped']} of {packing['tokens']} tokens cropped" in proc.stdout
    assert share in proc.stdout
    index = json.loads((tmp_path / "packed" / "index.json").read_text())
    windows = []
    for b, c in zip(shard_bytes(tmp_path / "packed"), index["chunks"], strict=True):
        ids = np.frombuffer(b, np.uint16, offset=(2 + c["chunk_size"]) * 4)
        assert len(ids) % 33 == 0  # whole windows only: litdata's cut falls on their starts
        windows += list(ids.reshape(-1, 33))
    assert all(w[0] == eos for w in windows)  # every window starts a document
    # every token kept is the token of a paragraph, in order, after its start
    bpe = __import__("bigmodel.data.tokenizers", fromlist=["x"]).tokenizer_from_dict(
        manifest["tokenizer"]
    )
    text = "".join(f.read_text() for f in sorted(src.iterdir()))
    for w in windows[:50]:
        starts = [i for i, t in enumerate(w) if t == eos] + [len(w)]
        for a, b in zip(starts, starts[1:], strict=False):
            assert bpe.decode([int(i) for i in w[a + 1 : b]]) in text
    assert len(windows) * 33 == manifest["tokens"] == packing["tokens"] - packing["dropped"]
    # a model of another block size is refused; the right one trains
    err = one_error(
        run_cli(
            "train.py",
            *stream_args("packed"),
            "model.net.block_size=16",
            cwd=tmp_path,
            env=ONE_THREAD,
            check=False,
        )
    )
    assert "packed into windows of 33 tokens" in err and "model.net.block_size=32" in err
    run_cli("train.py", *stream_args("packed", steps=2), cwd=tmp_path, env=ONE_THREAD)


def test_a_changed_source_or_another_tokenizer_is_refused_by_prepare(tmp_path):
    src = corpus(tmp_path)
    prepare(tmp_path, f"source={src}", "out=shards", "workers=1", *SMALL)
    (src / "part1.txt").write_text(TEXT[:2500])
    err = one_error(prepare(tmp_path, f"source={src}", "out=shards", *SMALL, check=False))
    assert "was prepared from other sources" in err and "part1.txt: size" in err
    # another tokenizer into a folder prepared with the char one
    tok = train_tokenizer(tmp_path, src)
    (src / "part1.txt").write_text(TEXT[:2000])
    prepare(tmp_path, f"source={src}", "out=chars", "workers=1", *SMALL)
    err = one_error(
        prepare(tmp_path, f"source={src}", "out=chars", f"tokenizer={tok}", *SMALL, check=False)
    )
    assert "chars was prepared with another tokenizer than" in err


def train_tokenizer(root: Path, src: Path, vocab_size: int = 300, out: str = "tok") -> Path:
    proc = forkserver.run(
        [
            sys.executable,
            "-m",
            "bigmodel.train_tokenizer",
            f"source={src}",
            f"vocab_size={vocab_size}",
            f"out={out}",
        ],
        cwd=root,
        env={**os.environ, **ONE_THREAD},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / out


@pytest.mark.slow  # three preparations, two of them killed
def test_prepare_killed_mid_way_continues_to_the_same_shards(tmp_path):
    src = corpus(tmp_path, chars=60_000)
    args = [f"source={src}", "workers=2", "part_mb=0.0005", "chunk_tokens=400"]
    prepare(tmp_path, *args, "out=whole")
    env = {**os.environ, "BIGMODEL_ROOT": str(tmp_path), **ONE_THREAD}
    cmd = [sys.executable, "-m", "bigmodel.prepare_data", *args, "out=killed"]
    manifest = tmp_path / "killed" / "manifest.json"
    for _ in range(2):  # kill -9 the whole process group once a round or two are in
        proc = subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                done = json.loads(manifest.read_text())["rounds_done"]
            except (OSError, ValueError, KeyError):
                done = []
            if len(done) >= 2 or proc.poll() is not None:
                break
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    state = json.loads(manifest.read_text())
    assert not state["complete"], "the kill came after the end: nothing was resumed"
    kept = {f: f.stat().st_mtime_ns for f in (tmp_path / "killed").glob("chunk-*.bin")}
    kept = {f: t for f, t in kept.items() if int(f.name[6:11]) in state["rounds_done"]}
    assert kept, "no whole round before the kill"
    again = prepare(tmp_path, *args, "out=killed")
    assert "continuing" in again.stdout
    # the rounds done before the kill are not done again
    assert {f: f.stat().st_mtime_ns for f in kept} == kept
    assert shard_bytes(tmp_path / "killed") == shard_bytes(tmp_path / "whole")
    assert not (tmp_path / "killed" / ".staging").exists()


# ---------------------------------------------------------------------------- exact resume
@pytest.mark.slow  # three trainings each
@pytest.mark.parametrize(
    "extra",
    [[], ["data.num_workers=2"], ["trainer=ddp_cpu"]],
    ids=["one-process", "two-loader-workers", "ddp-two-ranks"],
)
def test_streamed_training_resumes_bitwise_mid_epoch_and_at_the_epoch_boundary(tmp_path, extra):
    prepare(tmp_path, f"source={corpus(tmp_path)}", "out=shards", "workers=2", *SMALL)
    args = [*stream_args("shards", steps=30), "trainer.val_check_interval=10", EVERY_STEP, *extra]
    run_cli("train.py", *args, cwd=tmp_path, env=ONE_THREAD)
    (full,) = run_dirs(tmp_path)
    end = load(full / "checkpoints" / "last.ckpt")
    assert end["epoch"] >= 1, "the run must cross an epoch boundary"
    per_epoch = end["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
    per_epoch //= end["epoch"] + 1
    for since in (5, per_epoch):
        resumed = resume(tmp_path, args, full / "steps" / f"{since}.ckpt", env=ONE_THREAD)
        assert_same_end(full, resumed, since, metrics=("train/loss", "val/loss"))


# ------------------------------------------------------------------------ an S3 server here
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-log",
    "AWS_DEFAULT_REGION": "us-east-1",
    "DISABLE_S5CMD": "1",
}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3-compatible server on a loopback port, in a process of its own."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    else:
        server.kill()
        raise AssertionError(f"moto did not start:\n{log.read_text()}")
    yield env
    server.terminate()
    server.wait(timeout=30)


def upload(env: dict, folder: Path, bucket: str, prefix: str) -> str:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    client.create_bucket(Bucket=bucket)
    for f in sorted(folder.iterdir()):
        client.upload_file(str(f), bucket, f"{prefix}/{f.name}")
    return f"s3://{bucket}/{prefix}"


def test_training_streams_from_an_s3_server_and_bad_shards_are_refused_before_training(
    tmp_path, s3
):
    prepare(tmp_path, f"source={corpus(tmp_path)}", "out=shards", "workers=2", *SMALL)
    url = upload(s3, tmp_path / "shards", "corpus", "v1/shards")
    env = {**ONE_THREAD, **s3}
    args = [*stream_args(url, steps=4), "trainer.val_check_interval=2"]
    proc = run_cli("train.py", *args, cwd=tmp_path, env=env)
    assert "val/loss=" in proc.stdout + proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]  # litdata's PyPI check included
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr
    (run,) = run_dirs(tmp_path)
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    for f in run.rglob("*"):
        if f.is_file() and f.suffix in (".yaml", ".log", ".txt", ".csv", ".json"):
            assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in f.read_text(errors="replace"), f

    # a shard missing from the bucket, and one cut short: named, before training
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    names = [c["filename"] for c in index["chunks"]]
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in (tmp_path / "shards").iterdir():
        if f.name != names[2]:
            (partial / f.name).write_bytes(f.read_bytes())
    (partial / names[3]).write_bytes((partial / names[3]).read_bytes()[:-10])
    bad = upload(s3, partial, "broken", "shards")
    err = one_error(run_cli("train.py", *stream_args(bad), cwd=tmp_path, env=env, check=False))
    assert f"shard {names[2]}" in err and "is missing" in err
    # the unreachable bucket: a port nobody listens on, refused in seconds
    unreachable = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    start = time.monotonic()
    err = one_error(
        run_cli("train.py", *stream_args(url), cwd=tmp_path, env=unreachable, check=False)
    )
    assert "cannot connect to http://127.0.0.1:" in err and time.monotonic() - start < 60
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in err
    err = one_error(
        run_cli(
            "train.py", *stream_args("s3://no-such-bucket/x"), cwd=tmp_path, env=env, check=False
        )
    )
    assert "the bucket does not exist" in err


@pytest.mark.slow  # two trainings and three killed ones, each from a fresh interpreter
def test_sigkill_while_streaming_from_s3_then_the_same_command_ends_bitwise(tmp_path, s3):
    prepare(tmp_path, f"source={corpus(tmp_path)}", "out=shards", "workers=2", *SMALL)
    url = upload(s3, tmp_path / "shards", "killed", "shards")
    env = {**ONE_THREAD, **s3}

    def args(run_dir: Path) -> list[str]:
        return [
            *stream_args(url, steps=60),
            "trainer.val_check_interval=20",
            "callbacks.last_checkpoint.every_n_train_steps=5",
            "+logger.csv.flush_logs_every_n_steps=1",
            f"hydra.run.dir={run_dir}",
        ]

    run_cli("train.py", *args(tmp_path / "full"), cwd=tmp_path, env=env)
    run_dir = tmp_path / "run"
    rng = random.Random(int(os.environ.get("FAULT_SEED", "0")) or None)
    for target in sorted(rng.sample(range(6, 50), 2)):
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args(run_dir)],
            cwd=tmp_path,
            env={**os.environ, "BIGMODEL_ROOT": str(tmp_path), **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        seen = wait_for_step(proc, run_dir, target)
        proc.kill()
        proc.wait()
        saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
        print(f"SIGKILL after step {seen + 1}: last.ckpt at step {saved['global_step']}")
    proc = run_cli("train.py", *args(run_dir), cwd=tmp_path, env=env)
    assert "resume=auto: continuing from" in proc.stdout + proc.stderr
    assert_same_end(tmp_path / "full", run_dir, since=0, metrics=("train/loss", "val/loss"))


# ------------------------------------------------------------------------------- bad input
def test_bad_shards_and_small_corpora_are_refused_in_one_line_before_training(tmp_path):
    src = corpus(tmp_path)
    prepare(tmp_path, f"source={src}", "out=shards", "workers=1", *SMALL)
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    names = [c["filename"] for c in index["chunks"]]

    def refused(path: str, *extra: str) -> str:
        args = [*stream_args(path), *extra]
        return one_error(run_cli("train.py", *args, cwd=tmp_path, env=ONE_THREAD, check=False))

    import shutil

    shutil.copytree(tmp_path / "shards", tmp_path / "missing")
    (tmp_path / "missing" / names[1]).unlink()
    err = refused("missing")
    assert f"shard {names[1]} listed in " in err and "/missing/index.json is missing" in err
    shutil.copytree(tmp_path / "shards", tmp_path / "corrupt")
    with open(tmp_path / "corrupt" / names[0], "r+b") as f:
        f.write(b"\xff\xff\xff\x7f")  # the header, overwritten
    assert f"/corrupt/{names[0]} has a corrupt header" in refused("corrupt")
    assert "not a shard folder" in refused("corpus")
    assert "does not exist" in refused("nowhere")
    # a corpus smaller than one window of block_size + 1 tokens
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "a.txt").write_text(TEXT[:30])
    prepare(tmp_path, f"source={tiny}", "out=tiny_shards", "workers=1")
    err = refused("tiny_shards")
    assert "has 0 windows of block_size + 1 = 33 tokens" in err
    # shards from another tokenizer than the run's: data.tokenizer, and a checkpoint's
    tok = train_tokenizer(tmp_path, src)
    err = refused("shards", f"data.tokenizer={tok}")
    assert "were tokenized with another tokenizer than data.tokenizer=" in err
    # a run on shards of one BPE, resumed on shards of another of the same size
    other_src = tmp_path / "other"
    other_src.mkdir()
    (other_src / "b.txt").write_text(TEXT[-8000:])
    other = train_tokenizer(tmp_path, other_src, out="tok2")
    prepare(tmp_path, f"source={src}", "out=bpe_a", f"tokenizer={tok}", *SMALL)
    prepare(tmp_path, f"source={src}", "out=bpe_b", f"tokenizer={other}", *SMALL)
    run_cli("train.py", *stream_args("bpe_a", steps=2), cwd=tmp_path, env=ONE_THREAD)
    first = run_dirs(tmp_path)[-1]  # the newest: the refused runs made folders too
    err = refused("bpe_b", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    assert "the checkpoint's tokenizer differs from the one built from this data" in err
