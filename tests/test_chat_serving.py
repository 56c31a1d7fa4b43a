"""chat.py and serve.py's OpenAI API (/v1) on a small chat model fine-tuned here (experiment=sft
on generated instructions, long enough that its answers end with the end-of-turn token).

The reference answer is independent of both: transformers renders and tokenizes the conversation
(`apply_chat_template`), the net as training left it runs whole over the sequence each step (no
key/value cache), greedy, until `<|im_end|>`. chat.py runs as a user runs it (a pipe, and a
pseudo-terminal); the server is a real serve.py on loopback, driven by the official `openai`
client, raw HTTP and curl.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import pty
import re
import select
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests import forkserver
from tests.chat_fixtures import write_chat_model, write_chat_rows
from tests.conftest import ROOT, run_cli, run_dirs
from tests.test_export import net_from_checkpoint

transformers = pytest.importorskip("transformers")

QUESTIONS = ["What is 2 plus 3?", "Reverse the word apple.", "What is 7 plus 11?"]
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Reverse the word river."},
    {"role": "assistant", "content": "revir"},
    {"role": "user", "content": "What is 4 plus 9?"},
]
MAX_NEW = 24


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> dict:
    """A random Llama with ChatML, fine-tuned for 60 steps on generated instructions."""
    root = tmp_path_factory.mktemp("chat_serving")
    folder = write_chat_model(root / "model")
    data = write_chat_rows(root / "chat.jsonl", n=40)
    run_cli(
        "train.py",
        "experiment=sft",
        f"model.init_from={folder}",
        f"data.path={data}",
        "trainer.max_steps=60",
        "trainer.val_check_interval=60",
        "optimizer.lr=1e-2",
        "scheduler.scheduler.warmup_steps=5",
        "test=false",
        "callbacks.throughput.window_size=2",
        cwd=root,
        env={"OMP_NUM_THREADS": "1"},
    )
    (run,) = run_dirs(root)
    return {"root": root, "folder": folder, "ckpt": run / "checkpoints" / "last.ckpt"}


def reference(sft: dict, messages: list[dict], max_new: int = MAX_NEW) -> tuple[str, str]:
    """transformers' rendering and tokens, our net run whole each step, greedy -> (answer, why
    it ended)."""
    tok = transformers.AutoTokenizer.from_pretrained(sft["folder"])
    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    net, _, _ = net_from_checkpoint(sft["ckpt"])
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(net(torch.tensor([ids + new]))[0, -1].argmax())
            if nxt == end:
                return tok.decode(new, skip_special_tokens=True), "stop"
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True), "length"


def chat_pipe(sft: dict, stdin: str, *args: str, check: bool = True):
    return run_cli(
        "chat.py",
        f"ckpt_path={sft['ckpt']}",
        "temperature=0",
        f"max_new_tokens={MAX_NEW}",
        *args,
        cwd=sft["root"],
        stdin=stdin,
        check=check,
    )


# ----------------------------------------------------------------------------------- chat.py
def test_chat_through_a_pipe_answers_as_the_reference(sft):
    stops = 0
    for q in QUESTIONS:
        want, why = reference(sft, [{"role": "user", "content": q}])
        proc = chat_pipe(sft, q + "\n")
        assert proc.stdout == want + "\n", (q, proc.stdout, want)
        stops += why == "stop"
    assert stops >= 2  # the fine-tuned model ends its answers itself
    # JSON messages: a system turn and an earlier exchange
    want, _ = reference(sft, CONVERSATION)
    assert chat_pipe(sft, json.dumps(CONVERSATION)).stdout == want + "\n"
    # system= adds the system turn to a plain-text question
    want, _ = reference(sft, CONVERSATION[:1] + [{"role": "user", "content": QUESTIONS[0]}])
    assert chat_pipe(sft, QUESTIONS[0], "system=Answer briefly.").stdout == want + "\n"
    # a stop string ends the answer where it starts
    full, _ = reference(sft, [{"role": "user", "content": QUESTIONS[1]}])
    assert len(full) >= 2
    proc = chat_pipe(sft, QUESTIONS[1], f"stop=[{full[1]!r}]".replace("'", '"'))
    assert proc.stdout == full[: full.index(full[1])] + "\n"


BAD_STDIN = [
    ("", "standard input is empty"),
    ("[{]", "starts like JSON but does not parse"),
    ('[{"role": "bot", "content": "hi"}]', "messages[0] has role 'bot'"),
    ('[{"role": "user", "content": 3}]', "messages[0].content must be a string"),
    ('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]', "ends with"),
    ('{"msgs": []}', 'needs "messages"'),
]


@pytest.mark.parametrize("stdin,message", BAD_STDIN, ids=[m for _, m in BAD_STDIN])
def test_bad_conversations_get_one_line_and_exit_2(sft, stdin, message):
    proc = chat_pipe(sft, stdin, check=False)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert proc.stdout == ""


BAD_SETTINGS = [
    ("stop=5", "stop=5 must be a list of non-empty strings"),
    ("top_p=2", "top_p=2 must be in (0, 1]"),
    ("template=alpaca", "template=alpaca is not a named template; they are chatml, plain"),
    ("temperatur=0", "the config has no key temperatur; did you mean temperature?"),
]


@pytest.mark.parametrize("setting,message", BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_bad_settings_get_one_line_and_exit_2(sft, setting, message):
    proc = chat_pipe(sft, "Hi\n", setting, check=False)
    assert proc.returncode == 2, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert message in line, proc.stderr


def test_a_model_without_a_chat_template_is_refused_naming_template(trained, tmp_path):
    ckpt = trained("lm") / "checkpoints" / "last.ckpt"
    proc = run_cli("chat.py", f"ckpt_path={ckpt}", cwd=tmp_path, stdin="Hi\n", check=False)
    assert proc.returncode == 2
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "has no chat template" in line and "template=chatml" in line, proc.stderr
    # named, it chats (the plain template's characters are in the char vocabulary)
    proc = run_cli(
        "chat.py", f"ckpt_path={ckpt}", "template=plain", "max_new_tokens=5", cwd=tmp_path,
        stdin="The\n",
    )  # fmt: skip
    assert proc.stdout.endswith("\n") and len(proc.stdout) <= 6


def read_until(fd: int, pattern: str, proc, timeout: float = 120) -> str:
    """What the terminal shows from now until `pattern` (a regular expression) appears."""
    out, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                out += os.read(fd, 65536)
            except OSError:
                break
            text = out.decode("utf-8", "replace")
            if re.search(pattern, text):
                return text
        elif proc.poll() is not None:
            break
    raise AssertionError(f"no {pattern!r} on the terminal; it showed:\n{out.decode()[-2000:]}")


def answer_shown(shown: str, question: str) -> str:
    """The lines between the echo of the question typed and the next prompt."""
    lines = shown.replace("\r", "").split("\n")
    start = next(i for i, line in enumerate(lines) if line.endswith(question))
    assert lines[-1] == "> ", lines
    return "\n".join(lines[start + 1 : -1])


def at_a_terminal(cwd: Path, *args: str):
    """`python chat.py args...` with a pseudo-terminal as stdin, stdout and stderr -> (the
    process, the terminal's other end)."""
    master, slave = pty.openpty()
    env = {**os.environ, "BIGMODEL_ROOT": str(cwd), "TERM": "dumb"}
    proc = forkserver.popen(
        [sys.executable, str(ROOT / "chat.py"), *args],
        cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
    )  # fmt: skip
    os.close(slave)
    fcntl.fcntl(master, fcntl.F_SETFL, fcntl.fcntl(master, fcntl.F_GETFL) | os.O_NONBLOCK)
    return proc, master


def test_chat_at_a_terminal_streams_resets_and_exits(sft):
    """A pseudo-terminal as stdin, stdout and stderr: two turns, /reset, an unknown command,
    /exit. The first answer is the reference's; the second turn sees the first."""
    proc, master = at_a_terminal(
        sft["root"], f"ckpt_path={sft['ckpt']}", "temperature=0", f"max_new_tokens={MAX_NEW}"
    )
    try:
        shown = read_until(master, r"/exit.*\n.*> ", proc)
        assert "/reset starts over" in shown
        q1 = QUESTIONS[0]
        os.write(master, (q1 + "\n").encode())
        shown = read_until(master, r"\n> $", proc)
        want, _ = reference(sft, [{"role": "user", "content": q1}])
        assert answer_shown(shown, q1) == want
        os.write(master, (QUESTIONS[1] + "\n").encode())
        shown = read_until(master, r"\n> $", proc)
        history = [{"role": "user", "content": q1}, {"role": "assistant", "content": want}]
        want2, _ = reference(sft, [*history, {"role": "user", "content": QUESTIONS[1]}])
        assert answer_shown(shown, QUESTIONS[1]) == want2
        os.write(master, b"/reset\n")
        assert "(a new conversation)" in read_until(master, r"\n> $", proc)
        os.write(master, b"/hello\n")
        assert "unknown command /hello" in read_until(master, r"\n> $", proc)
        os.write(master, b"/exit\n")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_an_exported_folder_chats_as_its_checkpoint(sft, tmp_path):
    """export.py format=safetensors carries the chat template; model_dir= answers the same."""
    out = tmp_path / "exported"
    run_cli("export.py", f"ckpt_path={sft['ckpt']}", "format=safetensors", f"out={out}",
            cwd=tmp_path)  # fmt: skip
    assert json.loads((out / "config.json").read_text())["chat_template"]["source"]
    want, _ = reference(sft, CONVERSATION)
    proc = run_cli(
        "chat.py", f"model_dir={out}", "temperature=0", f"max_new_tokens={MAX_NEW}",
        cwd=tmp_path, stdin=json.dumps({"messages": CONVERSATION}),
    )  # fmt: skip
    assert proc.stdout == want + "\n"


# ------------------------------------------------------------------------------ the server
# serve.py's three worker processes take ~30 s to start on 2 cores: the slow tier
@pytest.fixture(scope="module")
def server(sft):
    from tests.test_serve import Server

    s = Server(
        f"ckpt_path={sft['ckpt']}", "model_name=tiny-chat", "max_batch_size=4",
        "batch_timeout=0.05", "max_new_tokens_limit=64", cwd=sft["root"],
    )  # fmt: skip
    yield s
    if s.proc.poll() is None:
        s.kill()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none")


def ask(client, messages, **kw):
    kw.setdefault("max_tokens", MAX_NEW)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny-chat", messages=messages, **kw)


@pytest.mark.slow
def test_openai_client_chat_equals_chat_py_and_the_reference(sft, client):
    assert [m.id for m in client.models.list()] == ["tiny-chat"]
    for messages in ([{"role": "user", "content": QUESTIONS[0]}], CONVERSATION):
        want, why = reference(sft, messages)
        r = ask(client, messages)
        assert r.choices[0].message.content == want
        assert r.choices[0].finish_reason == why
        assert r.object == "chat.completion" and r.usage.total_tokens == (
            r.usage.prompt_tokens + r.usage.completion_tokens
        )
        # what chat.py prints for the same conversation
        assert chat_pipe(sft, json.dumps(messages)).stdout == want + "\n"
        # streamed: the same text in pieces, the reason in the last chunk
        chunks = list(ask(client, messages, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason == why
        assert len([c for c in chunks if c.choices[0].delta.content]) >= 2


@pytest.mark.slow
def test_max_tokens_stop_temperature_and_seed(sft, client):
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    full, _ = reference(sft, messages)
    r = ask(client, messages, max_tokens=1)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 1
    assert full.startswith(r.choices[0].message.content)
    r = ask(client, messages, stop=[full[1]])
    assert r.choices[0].message.content == full[: full.index(full[1])]
    assert r.choices[0].finish_reason == "stop"
    chunks = list(ask(client, messages, stop=full[1:3], stream=True))
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks) == full[: full.index(full[1:3])]
    )
    hot = [
        ask(client, messages, temperature=1.5, seed=s, max_tokens=8).choices[0].message.content
        for s in (1, 1, 2, 3, 4)
    ]
    assert hot[0] == hot[1] and len(set(hot)) > 1  # a seed repeats; seeds differ


@pytest.mark.slow
def test_completions_and_the_predict_route(sft, client, server):
    r = client.completions.create(
        model="tiny-chat", prompt="The river", max_tokens=6, temperature=0
    )
    text = r.choices[0].text
    assert r.object == "text_completion" and r.usage.prompt_tokens > 0
    streamed = client.completions.create(
        model="tiny-chat", prompt="The river", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text
    # /predict (the same greedy decoding, without stopping at the end-of-turn token) stays
    status, body = server.post({"prompt": "The river", "max_new_tokens": 6, "temperature": 0})
    assert status == 200 and body["text"].startswith("The river" + text)


@pytest.mark.slow
def test_concurrent_clients_each_get_their_own_answer(sft, client):
    """Twelve requests at once (chat and completions, streamed and not): batched together, each
    answer is the one it gets alone."""
    jobs = [(q, stream) for q in QUESTIONS for stream in (False, True)] * 2
    alone = {q: ask(client, [{"role": "user", "content": q}]).choices[0].message.content
             for q in QUESTIONS}  # fmt: skip

    def one(job):
        q, stream = job
        r = ask(client, [{"role": "user", "content": q}], stream=stream)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in r)
        return r.choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(one, jobs))
    assert answers == [alone[q] for q, _ in jobs]


def raw(server, method: str, path: str, body: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, r.getheader("Content-Type"), r.read()


BAD_REQUESTS = [
    ("not JSON", b'{"messages": ', 400, "not valid JSON"),
    ("an array", b"[1]", 400, "must be a JSON object, got array"),
    ("no messages", {"model": "tiny-chat"}, 400, '"messages" must be a non-empty list'),
    ("unknown role", {"messages": [{"role": "bot", "content": "x"}]}, 400, "role 'bot'"),
    ("last turn not the user's", {"messages": [{"role": "assistant", "content": "x"}]}, 400,
     "ends with the user's"),
    ("image content", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "not text"),
    ("max_tokens over the limit", {"messages": [{"role": "user", "content": "x"}],
     "max_tokens": 65}, 400, "over this server's limit of 64"),
    ("max_tokens a string", {"messages": [{"role": "user", "content": "x"}],
     "max_tokens": "ten"}, 400, '"max_tokens" must be an integer'),
    ("temperature out of range", {"messages": [{"role": "user", "content": "x"}],
     "temperature": 5}, 400, '"temperature"=5 is out of range'),
    ("n = 2", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "out of range"),
    ("stop not strings", {"messages": [{"role": "user", "content": "x"}], "stop": [1]}, 400,
     '"stop" must be'),
    ("an unknown key", {"messages": [{"role": "user", "content": "x"}], "tools": []}, 400,
     "unknown or unsupported key 'tools'"),
    ("penalties", {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1}, 400,
     '"presence_penalty" is not supported'),
    ("another model", {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404,
     "'gpt-4o' is not served here; this server serves 'tiny-chat'"),
    ("a prompt over the context", {"messages": [{"role": "user", "content": "word " * 200}]},
     400, "this model's context is 128 tokens"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name,body,status,message", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
@pytest.mark.slow
def test_malformed_requests_get_one_4xx_and_the_server_stays_up(
    sft, server, client, name, body, status, message
):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, ctype, answer = raw(server, "POST", "/v1/chat/completions", data)
    assert got == status, (got, answer)
    assert ctype == "application/json"
    error = json.loads(answer)["error"]
    assert message in error["message"] and error["type"].endswith("_error"), error
    want, _ = reference(sft, [{"role": "user", "content": QUESTIONS[0]}])
    assert (
        ask(client, [{"role": "user", "content": QUESTIONS[0]}]).choices[0].message.content == want
    )


@pytest.mark.slow
def test_the_openai_client_raises_the_servers_message(client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        ask(client, [{"role": "bot", "content": "x"}])
    assert "role 'bot'" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert "not served here" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-chat", prompt=["a", "b"], max_tokens=2)
    assert '"prompt" must be a string' in e.value.body["message"]


@pytest.mark.slow
def test_server_sent_events_over_raw_http_and_curl(server):
    body = json.dumps(
        {"messages": [{"role": "user", "content": QUESTIONS[0]}], "stream": True,
         "temperature": 0, "max_tokens": 8, "stream_options": {"include_usage": True}}
    )  # fmt: skip
    status, ctype, data = raw(server, "POST", "/v1/chat/completions", body.encode())
    assert status == 200 and ctype.startswith("text/event-stream")
    events = [e for e in data.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed here")
    proc = subprocess.run(
        ["curl", "-sN", f"http://127.0.0.1:{server.port}/v1/chat/completions",
         "-H", "Content-Type: application/json", "-d", body],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    curl_events = [e for e in proc.stdout.split("\n\n") if e]
    assert curl_events[-1] == "data: [DONE]"

    def text(events):
        return "".join(
            c["choices"][0]["delta"].get("content") or ""
            for c in (json.loads(e[6:]) for e in events[:-1])
            if c["choices"]
        )

    assert text(curl_events) == text(events) and text(events)


@pytest.mark.slow
def test_sigterm_stops_the_openai_server(server):
    assert server.stop() == 0, server.output()
    assert "Traceback" not in server.output()


@pytest.mark.slow  # a server of its own: about 30 s
def test_readme_chat_and_openai_commands_run_as_written(sft):
    """The chat.py and serve.py lines of README "Post-training" as written (ckpt_path=last: the
    fine-tuned run), then README "Deploying a model"'s openai client and curl against that
    server."""
    from tests.test_serve import Server, readme_section

    lines = [
        line.split("#")[0].strip()
        for _, text in readme_section("Post-training: chat fine-tuning and preferences")
        for line in text.splitlines()
        if "chat.py" in line or "serve.py" in line
    ]
    assert len(lines) == 3, lines
    root, server = sft["root"], None
    try:
        for line in lines:
            feed, _, command = line.rpartition("|")
            argv = shlex.split(command)
            assert argv[0] == "python", line
            if feed:  # echo "..." | python chat.py ...
                text = shlex.split(feed)[1]
                proc = run_cli(argv[1], *argv[2:], cwd=root, stdin=text + "\n")
                assert proc.stdout.strip(), line
            elif argv[1] == "chat.py":  # at a terminal: it greets, then /exit ends it
                proc, master = at_a_terminal(root, *argv[2:])
                try:
                    read_until(master, r"/exit.*\n.*> ", proc)
                    os.write(master, b"/exit\n")
                    assert proc.wait(60) == 0
                finally:
                    if proc.poll() is None:
                        proc.kill()
                    os.close(master)
            else:
                server = Server(*(a for a in argv[2:] if not a.startswith("port=")), cwd=root)
        assert server is not None
        blocks = readme_section("Deploying a model")
        client = [text for lang, text in blocks if lang == "python" and "OpenAI(" in text]
        proc = forkserver.run(
            [sys.executable, "-c", client[0].replace("8000", str(server.port))],
            cwd=root, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        first, second = proc.stdout.splitlines()[:2]
        assert first.endswith((" stop", " length")) and second.strip(), proc.stdout
        (curl,) = [text for lang, text in blocks if lang == "sh" and "curl" in text]
        if shutil.which("curl") is None:
            pytest.skip("curl is not installed here")
        proc = subprocess.run(
            curl.replace("8000", str(server.port)), shell=True, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0 and proc.stdout.rstrip().endswith("data: [DONE]"), proc
    finally:
        if server is not None:
            assert server.stop() == 0
