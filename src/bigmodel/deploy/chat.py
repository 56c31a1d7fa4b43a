"""chat.py: talk to a language model in the terminal, with its chat template.

At a terminal: a multi-turn chat. Each turn renders the whole conversation with the model's chat
template (the one it was fine-tuned with, or `template=chatml|plain`), runs it once through the
net into a key/value cache and decodes the answer from there, printed as it comes; the answer
ends at the template's end-of-turn (or eos) token, at a `stop` string, or after `max_new_tokens`.
`/reset` starts over (keeping `system=`), `/exit` or Ctrl-D ends; Ctrl-C stops an answer early.
When the conversation outgrows the context its oldest exchanges are left out, with a note.

Standard input not a terminal: it reads one conversation, JSON messages (`[{"role": ...,
"content": ...}, ...]` or `{"messages": [...]}`) or plain text as one user turn, and prints the
one answer. Greedy answers (`temperature=0`) are those of serve.py's /v1/chat/completions.
"""

from __future__ import annotations

import contextlib
import json
import sys

from omegaconf import DictConfig, OmegaConf

from bigmodel.deploy.assistant import Assistant, BadConversation, check_messages, replies
from bigmodel.errors import UserError, reports_user_errors
from bigmodel.sampling import RowSampling, check_sampling

COMMANDS = "/reset starts over, /exit (or Ctrl-D) ends"


def read_conversation(text: str, system: str | None) -> list[dict]:
    """Standard input -> messages: JSON messages, or the text as one user turn."""
    stripped = text.strip()
    if not stripped:
        raise UserError(
            "standard input is empty; pipe in a message, or JSON messages "
            '[{"role": "user", "content": "..."}]'
        )
    if stripped[0] in "[{":
        try:
            data = json.loads(stripped)
        except ValueError as e:
            raise UserError(
                f"standard input starts like JSON but does not parse ({e}); give JSON messages "
                '[{"role": "user", "content": "..."}] or {"messages": [...]}, or plain text'
            ) from None
        if isinstance(data, dict):
            if "messages" not in data:
                raise UserError(
                    'a JSON object on standard input needs "messages": {"messages": [...]}'
                )
            data = data["messages"]
        try:
            messages = check_messages(data)
        except BadConversation as e:
            raise UserError(f"standard input: {e}") from None
    else:
        messages = [{"role": "user", "content": stripped}]
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


class Session:
    """The model, its template and sampling settings; answers a conversation, streaming."""

    def __init__(self, cfg: DictConfig) -> None:
        import torch

        from bigmodel.deploy.bundle import load_bundle

        check_sampling(cfg.temperature, cfg.top_k, cfg.max_new_tokens)
        if cfg.top_p is not None and not 0 < cfg.top_p <= 1:
            raise UserError(f"top_p={cfg.top_p} must be in (0, 1]; null keeps every token")
        stop = cfg.stop if cfg.stop is not None else []
        if isinstance(stop, str):
            stop = [stop]
        elif OmegaConf.is_list(stop):
            stop = OmegaConf.to_object(stop)
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise UserError(f"stop={stop} must be a list of non-empty strings")
        init_from = OmegaConf.select(cfg, "model.init_from", default=None)
        bundle = load_bundle(
            cfg.get("ckpt_path"), cfg.get("model_dir"), cfg.paths.log_dir, init_from
        )
        if bundle.kind != "lm":
            raise UserError(
                f"chat.py talks to language models; this is a {bundle.kind} model (use "
                "predict.py or serve.py)"
            )
        self.assistant = Assistant.from_bundle(bundle, cfg.get("template"))
        self.device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.net = bundle.net.to(self.device)
        self.cfg, self.stop = cfg, stop
        self.turns = 0

    def answer(self, messages: list[dict], out) -> tuple[str, str]:
        """Stream the answer to `messages` into `out` -> (its text, why it ended)."""
        a, cfg = self.assistant, self.cfg
        ids = a.chat_prompt(messages)
        seed = None if cfg.seed is None else int(cfg.seed) + self.turns
        self.turns += 1
        sampling = RowSampling(
            int(cfg.max_new_tokens), float(cfg.temperature), cfg.top_k, cfg.top_p, seed
        )
        job = a.job(ids, sampling, list(self.stop), chat=True)
        text, reason = [], "length"
        for (step,) in replies(self.net, a.tokenizer, [job], a.block_size):
            if step is None:
                continue
            if step.text:
                text.append(step.text)
                out.write(step.text)
                out.flush()
            reason = step.finish_reason or reason
        return "".join(text), reason

    def fit(self, messages: list[dict]) -> list[dict]:
        """The conversation with its oldest exchanges left out until it fits the context with
        room to answer (the system turn stays)."""
        a = self.assistant
        head = [m for m in messages[:1] if m["role"] == "system"]
        body = messages[len(head) :]
        while True:
            n = len(a.chat_prompt(head + body))
            if n < a.block_size or len(body) <= 1:
                return head + body
            body = body[2:] if len(body) > 2 else body[-1:]  # drop the oldest exchange


def one_shot(session: Session, text: str) -> None:
    messages = read_conversation(text, session.cfg.get("system"))
    try:
        session.answer(messages, sys.stdout)
    except BadConversation as e:
        raise UserError(str(e)) from None
    sys.stdout.write("\n")
    sys.stdout.flush()


def interactive(session: Session) -> None:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    system = session.cfg.get("system")
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    print(
        f"chat template: {session.assistant.template_name}, context "
        f"{session.assistant.block_size} tokens; {COMMANDS}",
        file=sys.stderr,
        flush=True,
    )
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            messages = list(start)
            print("(a new conversation)", file=sys.stderr, flush=True)
            continue
        if command.startswith("/") and " " not in command:
            print(f"unknown command {command}; {COMMANDS}", file=sys.stderr, flush=True)
            continue
        trial = [*messages, {"role": "user", "content": line}]
        try:
            fitted = session.fit(trial)
            if len(fitted) < len(trial):
                print(
                    f"(left out the {len(trial) - len(fitted)} oldest turns to fit the context)",
                    file=sys.stderr,
                    flush=True,
                )
            messages = fitted
            text, reason = session.answer(messages, sys.stdout)
        except BadConversation as e:
            print(f"(not sent: {e})", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:  # Ctrl-C: the answer so far is dropped, with its question
            print("\n(stopped; this exchange is left out)", file=sys.stderr, flush=True)
            messages = messages[:-1]
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if reason == "length":
            print("(cut at max_new_tokens or the context's end)", file=sys.stderr, flush=True)
        messages.append({"role": "assistant", "content": text})


@reports_user_errors
def chat(cfg: DictConfig) -> None:
    session = Session(cfg)
    if sys.stdin.isatty():
        interactive(session)
    else:
        one_shot(session, sys.stdin.read())
