"""serve.py's bound on the tokens in flight (`max_concurrent_tokens`): a real server on a loopback
port (tests/test_serve.py's `Server`) and real HTTP clients (http.client, urllib).

A long streamed request holds nearly all of the bound while the others come: the ones that fit
are answered with their right text, on every route, before it ends; the ones that would pass the
bound get 429 at once naming the key; one larger than the bound alone gets 413. After it ends, or
after its client hangs up, its tokens are free again.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import torch

from tests.test_export import net_from_checkpoint
from tests.test_serve import Server

PROMPT = "The "  # 4 tokens of the char GPT
LONG = 3000  # new tokens of the long request: it streams for seconds
BOUND = len(PROMPT) + LONG + 20  # the long request leaves 20 tokens for the others


def request(port: int, path: str, body: dict) -> tuple[int, dict, dict | str, float]:
    """POST `body` -> (status, headers, JSON or text, seconds it took)."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
        headers = {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()
    try:
        out: dict | str = json.loads(raw)
    except ValueError:
        out = raw.decode()
    return r.status, headers, out, time.monotonic() - t0


class Stream:
    """A POST /stream read on a thread: `first` is set when its first text came, `done` at its
    end; `hang_up()` closes the connection at once instead."""

    def __init__(self, port: int, body: dict) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.conn.request("POST", "/stream", json.dumps(body), {"Content-Type": "application/json"})
        self.response = self.conn.getresponse()
        self.first, self.done = threading.Event(), threading.Event()
        self.text, self.ended_at = "", float("inf")
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while piece := self.response.read1(4096):
                self.text += piece.decode()
                self.first.set()
        except (OSError, ValueError, http.client.HTTPException):
            pass  # hung up
        self.ended_at = time.monotonic()
        self.done.set()

    def hang_up(self) -> None:
        self.conn.sock.shutdown(socket.SHUT_RDWR)  # the reader sees the end, then it is closed
        self.thread.join(30)
        self.conn.close()


def greedy(ckpt, n: int) -> str:
    """The char GPT's own greedy continuation of PROMPT, n tokens (within its context)."""
    from bigmodel.data.tokenizers import tokenizer_from_dict

    net, _, state = net_from_checkpoint(ckpt)
    tok = tokenizer_from_dict(state["TextDataModule"]["tokenizer"])
    with torch.no_grad():
        ids = net.generate(torch.tensor([tok.encode(PROMPT)]), n, temperature=0)
    return tok.decode(ids[0].tolist())


@pytest.mark.slow  # its own server (three worker processes) and a stream of seconds: ~40 s
def test_tokens_in_flight_are_bounded_and_the_others_go_on(trained, tmp_path):
    ckpt = trained("gpt") / "checkpoints" / "last.ckpt"
    ten = greedy(ckpt, 10)
    server = Server(
        f"ckpt_path={ckpt}",
        "stream=true",
        f"max_new_tokens_limit={BOUND}",
        f"max_concurrent_tokens={BOUND}",
        cwd=tmp_path,
    )
    port = server.port
    greedy_body = {"prompt": PROMPT, "temperature": 0}
    try:
        long = Stream(port, {**greedy_body, "max_new_tokens": LONG})
        assert long.response.status == 200
        assert long.first.wait(60), "the long request streamed nothing"
        # it holds BOUND - 20 tokens now; these fit in the 20 left, on two other workers
        fits = {
            "/predict": request(port, "/predict", {**greedy_body, "max_new_tokens": 10}),
            "/v1/completions": request(
                port, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "temperature": 0}
            ),
        }
        # these would pass the bound (4 + 30 and 4 + 28 tokens): refused at once
        over = {
            "/predict": request(port, "/predict", {**greedy_body, "max_new_tokens": 30}),
            "/stream": request(port, "/stream", {**greedy_body, "max_new_tokens": 30}),
            "/v1/completions": request(
                port, "/v1/completions", {"prompt": PROMPT, "max_tokens": 28}
            ),
        }
        # larger than the bound alone: never served
        alone = request(port, "/predict", {"prompt": PROMPT, "max_new_tokens": BOUND})
        refused_at = time.monotonic()
        assert not long.done.is_set(), "the long request ended first: make LONG longer"
        assert long.done.wait(120), "the long request did not end"

        status, _, body, _ = fits["/predict"]
        assert (status, body) == (200, {"text": ten}), server.output()
        status, _, body, _ = fits["/v1/completions"]
        assert status == 200 and body["choices"][0]["text"] == ten[len(PROMPT) : len(PROMPT) + 5]
        for route, (status, headers, body, _) in over.items():
            message = body["error"]["message"] if route.startswith("/v1") else body["error"]
            assert status == 429, (route, status, body)
            assert f"max_concurrent_tokens={BOUND}" in message and "retry later" in message
            assert headers.get("retry-after") == "1"
        assert over["/v1/completions"][2]["error"]["type"] == "rate_limit_error"
        status, _, body, _ = alone
        assert status == 413, (status, body)
        assert f"needs {BOUND + len(PROMPT)} tokens" in body["error"]
        assert f"max_concurrent_tokens={BOUND}" in body["error"]
        # the others were answered while the long one still streamed, and it went on whole
        assert refused_at < long.ended_at
        assert len(long.text) == LONG and (PROMPT + long.text).startswith(ten)

        # its tokens are free again: what was refused is served now
        assert request(port, "/predict", {**greedy_body, "max_new_tokens": 30})[0] == 200
        assert request(port, "/v1/completions", {"prompt": PROMPT, "max_tokens": 28})[0] == 200
        # a client that hangs up gives its tokens back too: the whole bound is free after
        gone = Stream(port, {**greedy_body, "max_new_tokens": LONG})
        assert gone.first.wait(60)
        gone.hang_up()
        deadline = time.monotonic() + 60
        while (s := request(port, "/predict", {**greedy_body, "max_new_tokens": 16})[0]) == 429:
            assert time.monotonic() < deadline, "the tokens of a client that hung up stay held"
            time.sleep(0.1)
        assert s == 200
        whole = Stream(port, {**greedy_body, "max_new_tokens": BOUND - len(PROMPT)})
        assert whole.response.status == 200  # accepted: nothing else holds any token
        whole.hang_up()
    finally:
        assert server.stop() == 0, server.output()


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "many"])
def test_a_bad_bound_is_one_line_naming_the_key(trained, tmp_path, value):
    from tests.conftest import run_cli

    ckpt = trained("gpt") / "checkpoints" / "last.ckpt"
    proc = run_cli("serve.py", f"ckpt_path={ckpt}", f"max_concurrent_tokens={value}",
                   cwd=tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"max_concurrent_tokens={value} must be a whole number of tokens >= 1" in proc.stderr
