"""serve.py as a real server: a subprocess on a free loopback port, real HTTP requests (urllib):
good ones against the net run here, every kind of bad one (one 4xx each, the server stays up),
concurrent ones batched together, and a clean stop on SIGTERM."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import forkserver
from tests.conftest import ROOT
from tests.test_export import export, net_from_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python serve.py ...` on a free port, up once GET /health answers 200."""

    def __init__(self, *args: str, cwd: Path, startup: float = 120) -> None:
        self.port, self.cwd = free_port(), cwd
        self.log = open(cwd / f"serve_{self.port}.log", "w")  # noqa: SIM115 (closed in stop)
        env = {**os.environ, "BIGMODEL_ROOT": str(cwd), "OMP_NUM_THREADS": "1"}
        # a plain interpreter: the server runs its own worker processes and event loop
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "serve.py"), f"port={self.port}", *args],
            cwd=cwd,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the workers can be found after
        )
        deadline = time.monotonic() + startup
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve.py exited {self.proc.returncode}:\n{self.output()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.kill()
        raise AssertionError(f"serve.py did not become healthy:\n{self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.cwd / f"serve_{self.port}.log").read_text()[-4000:]

    def get(self, path: str) -> tuple[int, bytes]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return r.status, r.read()

    def post(self, body, path: str = "/predict") -> tuple[int, dict | str]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()

    def stop(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """Whatever of its process group is left (nothing, after a clean stop)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def digits(trained, tmp_path_factory):
    """The digits CNN served from its checkpoint, batching on, and its test images and labels."""
    from bigmodel.checkpoints import restore

    ckpt = next((trained("cnn") / "checkpoints").glob("best_*.ckpt"))
    cwd = tmp_path_factory.mktemp("serve_digits")
    _, dm, _ = restore(str(ckpt))
    dm.setup("test")
    images, labels = dm.data["test"]
    net, _, state = net_from_checkpoint(ckpt)
    mean = torch.tensor(state["ImageDataModule"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(state["ImageDataModule"]["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        probs = torch.softmax(net((images.float() / 255 - mean) / std), -1).numpy()
    server = Server(f"ckpt_path={ckpt}", "max_batch_size=8", "batch_timeout=0.05", cwd=cwd)
    yield server, images[:, 0].numpy(), probs
    if server.proc.poll() is None:
        server.kill()


def test_image_requests_match_the_net(digits):
    server, images, probs = digits
    for i in range(3):
        status, body = server.post({"image": b64(png_bytes(images[i]))})
        assert status == 200, body
        assert body["label"] == str(int(probs[i].argmax()))
        got = np.array([body["probs"][str(k)] for k in range(10)])
        assert np.abs(got - probs[i]).max() < 1e-5


BAD_IMAGE_REQUESTS = [
    ("malformed JSON", b'{"image": ', 400, "not valid JSON"),
    ("not a JSON object", b"[1, 2]", 400, "must be a JSON object"),
    ("missing key", {}, 422, 'needs the key "image"'),
    ("wrong key", {"picture": "aGk="}, 422, "needs the key \"image\" (got 'picture')"),
    ("unknown extra key", {"image": "aGk=", "size": 8}, 422, "unknown key 'size'"),
    ("wrong type", {"image": 3}, 422, "must be a base64 string, got number"),
    ("not base64", {"image": "@@not base64@@"}, 422, "not valid base64"),
    (
        "bytes that are not an image",
        {"image": b64(b"hello, not a png")},
        422,
        "not a readable image",
    ),
]


@pytest.mark.parametrize(
    "name,body,status,message", BAD_IMAGE_REQUESTS, ids=[c[0] for c in BAD_IMAGE_REQUESTS]
)
def test_bad_requests_get_one_4xx_and_the_server_stays_up(digits, name, body, status, message):
    server, images, probs = digits
    got, answer = server.post(body)
    assert got == status, (name, got, answer)
    assert message in answer["error"], answer
    ok, answer = server.post({"image": b64(png_bytes(images[0]))})
    assert ok == 200 and answer["label"] == str(int(probs[0].argmax()))


def test_concurrent_requests_are_answered_one_by_one(digits):
    """32 requests at once, every fourth one bad: batched together, each gets its own answer."""
    server, images, probs = digits
    bodies = [
        {"image": b64(b"GIF89a broken")} if i % 4 == 3 else {"image": b64(png_bytes(images[i]))}
        for i in range(32)
    ]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(server.post, bodies))
    for i, (status, body) in enumerate(answers):
        if i % 4 == 3:
            assert status == 422 and "not a readable image" in body["error"]
        else:
            assert status == 200, body
            assert body["label"] == str(int(probs[i].argmax()))


def test_sigterm_stops_the_server_and_its_workers(digits):
    server = digits[0]
    assert server.get("/health")[0] == 200
    rc = server.stop()
    assert rc == 0, server.output()
    out = server.output()
    assert "Traceback" not in out, out
    # the workers (and multiprocessing's resource tracker) follow it out within seconds
    deadline = time.monotonic() + 15
    while server.group_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not server.group_alive(), "worker processes outlived the server"
    with pytest.raises(OSError):
        server.get("/health")


@pytest.mark.slow  # ~25 s: its own server, from an ONNX export
def test_language_model_server(trained, tmp_path):
    """The char GPT from an exported ONNX folder: greedy text as the net's own, streaming, and the
    prompt checks (context length, max_new_tokens limit, types, unknown characters)."""
    from bigmodel.data.tokenizers import tokenizer_from_dict

    ckpt = trained("gpt") / "checkpoints" / "last.ckpt"
    export(ckpt, tmp_path / "gpt", "format=onnx")
    net, cfg, state = net_from_checkpoint(ckpt)
    tok = tokenizer_from_dict(state["TextDataModule"]["tokenizer"])
    prompt = "The "
    with torch.no_grad():
        ids = net.generate(torch.tensor([tok.encode(prompt)]), 20, temperature=0)
    reference = tok.decode(ids[0].tolist())
    server = Server("model_dir=gpt", "stream=true", "max_new_tokens_limit=64", cwd=tmp_path)
    try:
        status, body = server.post({"prompt": prompt, "max_new_tokens": 20, "temperature": 0})
        assert status == 200 and body == {"text": reference}
        status, streamed = server.post(
            {"prompt": prompt, "max_new_tokens": 20, "temperature": 0}, path="/stream"
        )
        assert status == 200 and prompt + streamed == reference
        sampled = server.post({"prompt": prompt, "max_new_tokens": 10, "top_k": 5, "seed": 1})
        assert sampled[0] == 200 and len(sampled[1]["text"]) == len(prompt) + 10
        block = cfg["model"]["net"]["block_size"]
        bad = [
            ({"prompt": "e" * (block + 1)}, f"this model's context is {block} tokens"),
            ({"prompt": "The", "max_new_tokens": 65}, "over this server's limit of 64"),
            ({"prompt": "The", "max_new_tokens": -1}, "out of range"),
            ({"prompt": "The", "max_new_tokens": "ten"}, "must be an integer"),
            ({"prompt": "The", "temperature": "hot"}, '"temperature" must be a number'),
            ({"prompt": 42}, '"prompt" must be a string'),
            ({"prompt": "日本"}, "not in the character vocabulary"),
            ({"text": "The"}, 'needs the key "prompt"'),
        ]
        for request, message in bad:
            status, body = server.post(request)
            assert status == 422 and message in body["error"], (request, status, body)
            status, body = server.post(request, path="/stream")
            assert status == 422 and message in body["error"], (request, status, body)
        assert server.post({"prompt": prompt, "max_new_tokens": 20, "temperature": 0}) == (
            200,
            {"text": reference},
        )
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_regression_audio_and_translation_servers(trained, tmp_path):
    import soundfile as sf

    net, _, _ = net_from_checkpoint(trained("mlp") / "checkpoints" / "last.ckpt")
    x = [0.5] * 10
    server = Server(f"ckpt_path={trained('mlp') / 'checkpoints' / 'last.ckpt'}", cwd=tmp_path)
    try:
        status, body = server.post({"x": x})
        with torch.no_grad():
            ref = net(torch.tensor([x])).numpy()[0]
        assert status == 200 and np.abs(np.array(body["y"]) - ref).max() < 1e-5
        status, body = server.post({"x": [1.0, 2.0]})
        assert status == 422 and "must hold 10 numbers" in body["error"]
        status, body = server.post({"x": ["a"] * 10})
        assert status == 422 and "array of numbers" in body["error"]
    finally:
        assert server.stop() == 0

    ckpt = trained("audio") / "checkpoints" / "last.ckpt"
    server = Server(f"ckpt_path={ckpt}", "max_batch_size=1", cwd=tmp_path)
    try:
        buf = io.BytesIO()
        sf.write(buf, 0.1 * np.sin(np.arange(16000) / 5.0), 16000, format="WAV")
        status, body = server.post({"audio": b64(buf.getvalue())})
        assert status == 200 and set(body) == {"label", "probs"}
        status, body = server.post({"audio": b64(png_bytes(np.zeros((8, 8), np.uint8)))})
        assert status == 422 and "not a readable audio clip" in body["error"]
    finally:
        assert server.stop() == 0

    ckpt = trained("seq2seq") / "checkpoints" / "last.ckpt"
    server = Server(f"ckpt_path={ckpt}", "beam_size=1", cwd=tmp_path)
    try:
        status, body = server.post({"text": "She buys a red apple."})
        assert status == 200 and isinstance(body["translation"], str) and body["translation"]
        status, body = server.post({"text": ["a", "b"]})
        assert status == 422 and '"text" must be a string' in body["error"]
    finally:
        assert server.stop() == 0


@pytest.mark.slow  # trains, exports and serves: about 40 s
def test_deploy_notebook_executes(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("BIGMODEL_ROOT", str(tmp_path))  # logs go here, not into the repository
    nb = nbformat.read(ROOT / "notebooks" / "deploy.ipynb", as_version=4)
    NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "health 200" in text and "of 20 right" in text
    assert "(422, {'error':" in text and "not a readable image" in text
    assert "server exit status 0" in text
    cards = [o for o in outputs if "text/markdown" in o.get("data", {})]
    assert cards and "ONNX parity" in cards[0]["data"]["text/markdown"]
    assert list((tmp_path / "logs" / "notebook" / "runs").glob("*/exported/model.int8.onnx"))


def readme_section(name: str) -> list[tuple[str, str]]:
    """The fenced code blocks of README section `## name`: (language, text)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(f"## {name}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    blocks, i = [], start
    while i < end:
        if lines[i].startswith("```"):
            lang, j = lines[i][3:].strip(), i + 1
            while not lines[j].startswith("```"):
                j += 1
            blocks.append((lang, "\n".join(lines[i + 1 : j])))
            i = j
        i += 1
    return blocks


@pytest.mark.slow  # trains two models, exports, predicts and serves each: about a minute
def test_readme_deploying_commands_run(tmp_path):
    """Every command of README "Deploying a model" as written (train.py with the README's quick
    check, debug=smoke), the client block against the server its block starts."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from tests.conftest import run_cli

    d = load_digits()
    for i in range(20):  # DIR: PNG digits in class folders
        path = tmp_path / "digits" / str(d.target[i]) / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(d.images[i] * 255 / 16).astype(np.uint8)).save(path)
    (tmp_path / "digit.png").write_bytes((tmp_path / "digits" / "0" / "0.png").read_bytes())
    (tmp_path / "prompts.txt").write_text("The \nIt was\n")
    blocks = readme_section("Deploying a model")
    client = next(text for lang, text in blocks if lang == "python")
    ran = []
    for lang, text in blocks:
        if lang != "bash":
            continue
        for line in text.splitlines():
            argv = line.split()
            script, args = argv[1], [a.replace("=DIR", "=digits") for a in argv[2:]]
            if script == "train.py":
                args.append("debug=smoke")
            if script != "serve.py":
                run_cli(script, *args, cwd=tmp_path)
                ran.append(script)
                continue
            server = Server(*(a for a in args if not a.startswith("port=")), cwd=tmp_path)
            try:
                if "digits" in line:
                    code = client.replace("8000", str(server.port))
                    proc = forkserver.run(
                        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
                    )
                    assert proc.returncode == 0, proc.stderr
                    assert proc.stdout.startswith("{'label': '")
                else:
                    status, body = server.post({"prompt": "The ", "max_new_tokens": 5})
                    assert status == 200 and len(body["text"]) == 4 + 5
                    status, text = server.post({"prompt": "The ", "max_new_tokens": 5}, "/stream")
                    assert status == 200 and len(text) == 5
            finally:
                assert server.stop() == 0
            ran.append(script)
    assert ran == ["train.py", "export.py", "predict.py", "serve.py"] * 2
    assert (tmp_path / "preds.csv").is_file() and (tmp_path / "generations.jsonl").is_file()


def test_prompt_checks_of_the_server():
    """The checks the server runs on a language model's request, in process (the slow
    test_language_model_server sends each of them to a running server too)."""
    from bigmodel.data.tokenizers import CharTokenizer
    from bigmodel.deploy.requests import Limits, RequestError, check

    tok = CharTokenizer("Tabcdeh ")
    kw = {"kind": "lm", "tokenizer": tok, "block_size": 8, "limits": Limits(max_new_tokens=64)}
    assert check({"prompt": "The"}, **kw) == {
        "prompt": "The",
        "max_new_tokens": Limits().default_new_tokens,
        "temperature": 0.8,
        "top_k": 50,
        "seed": None,
    }
    assert check({"prompt": "", "top_k": None, "seed": 3}, **kw)["top_k"] is None
    bad = [
        ({"prompt": "abcdeabcd"}, "is 9 tokens long and this model's context is 8 tokens"),
        ({"prompt": "The", "max_new_tokens": 65}, "over this server's limit of 64"),
        ({"prompt": "The", "max_new_tokens": True}, "must be an integer"),
        ({"prompt": "The", "top_k": 0}, '"top_k"=0 is out of range'),
        ({"prompt": "The", "temperature": -1}, '"temperature" must be a number >= 0'),
        ({"prompt": "Thz"}, "not in the character vocabulary"),
        ({"prompt": ["The"]}, '"prompt" must be a string, got array'),
        ({"prompt": "The", "n": 2}, "unknown key 'n'"),
    ]
    for request, message in bad:
        with pytest.raises(RequestError, match=None) as e:
            check(request, **kw)
        assert e.value.status == 422 and message in e.value.message, (request, e.value.message)


@pytest.mark.slow  # two servers (batching on and off): about 30 s
def test_serving_benchmark_runs(trained, tmp_path):
    """bench/serve.py with a handful of requests: it starts, drives and stops the servers and
    prints its table (the figures themselves belong to a quiet machine)."""
    ckpt = trained("cnn") / "checkpoints" / "last.ckpt"
    # a plain interpreter: the benchmark starts and stops servers of its own
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "serve.py"),
            f"--digits={ckpt}",
            "--engines",
            "onnx",
            "--concurrency",
            "1",
            "4",
            "--requests=8",
            "--seconds=10",
            "--warmup=1",
            f"--json={tmp_path / 'rows.json'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["batching"], r["concurrency"]) for r in rows] == [
        ("on", 1),
        ("on", 4),
        ("off", 1),
        ("off", 4),
    ]
    assert all(r["n"] == 8 and 0 < r["p50_ms"] <= r["p99_ms"] and r["req_s"] > 0 for r in rows)
    assert (
        "| model | engine | batching | concurrency | p50 ms | p99 ms | requests/s |" in proc.stdout
    )
