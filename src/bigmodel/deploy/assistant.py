"""Answers of a language model to a conversation: one home for chat.py and serve.py's OpenAI API.

- `Assistant.from_bundle` finds the chat template (a named one, else the one the checkpoint or
  exported folder carries, else the one of the pretrained folder it was trained from) and the
  ids it stops at: the template's end-of-turn marker when it is one token, and the eos token.
- `Assistant.chat_prompt(messages)` renders a conversation with the generation prompt and
  tokenizes it as data=chat does in training (no special tokens beyond the template's own).
- `replies(net, jobs, block_size)` decodes several prompts together from one key/value cache
  (bigmodel.sampling.decode_rows) and yields, step by step, each row's new text: held back while
  it may still turn into a stop string or a half-decoded character, cut at a stop string, and
  ended at a stop id ("stop") or at its token budget ("length").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigmodel.data.chat_template import ROLES, ChatTemplate, TemplateRefused
from bigmodel.errors import UserError
from bigmodel.sampling import RowSampling, decode_rows


class BadConversation(ValueError):
    """A conversation or prompt the model cannot answer; the message says why (one line)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Job:
    """One prompt to answer: its ids, how to sample, and where to stop."""

    ids: list[int]
    sampling: RowSampling
    stop: list[str] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)


@dataclass
class Step:
    """A row's share of one decoding step: new text, and why it ended when it did."""

    text: str
    finish_reason: str | None = None  # "stop" or "length" on the row's last step
    completion_tokens: int = 0


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of a rendered conversation, as data=chat tokenizes it in training: no special tokens
    are added (the template writes the ones it wants); a character the char vocabulary lacks is
    refused (the model cannot read what it never saw)."""
    from bigmodel.data.tokenizers import CharTokenizer

    if isinstance(tokenizer, CharTokenizer):
        try:
            return tokenizer.encode(text, strict=True)
        except UserError as e:
            raise BadConversation(str(e)) from None
    return tokenizer.tok.encode(text, add_special_tokens=False).ids


def token_id(tokenizer, text: str | None) -> int | None:
    """The id of a token written as text, when the vocabulary has it as one token."""
    if not text or not hasattr(tokenizer, "token_to_id"):
        return None
    return tokenizer.token_to_id(text)


def check_messages(messages: Any, param: str = "messages") -> list[dict]:
    """OpenAI chat messages -> [{"role", "content"}], checked: a non-empty list of objects whose
    role is system, user or assistant and whose content is text (a string or text parts), the
    last one the user's."""
    if not isinstance(messages, list) or not messages:
        raise BadConversation(f'"{param}" must be a non-empty list of messages', param)
    out = []
    for i, m in enumerate(messages):
        where = f"{param}[{i}]"
        if not isinstance(m, dict):
            raise BadConversation(
                f"{where} must be an object with a role and content, got {type(m).__name__}", param
            )
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadConversation(
                f"{where} has role {role!r}; the roles are {', '.join(ROLES)}", param
            )
        if isinstance(content, list):  # text parts: [{"type": "text", "text": ...}]
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise BadConversation(
                    f"{where}.content holds a part that is not text; this model reads text only",
                    param,
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadConversation(f"{where}.content must be a string", param)
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise BadConversation(
            f"the last message is the {out[-1]['role']}'s; a conversation to answer ends with "
            "the user's",
            param,
        )
    return out


class Assistant:
    """A language model's tokenizer with its chat template (None: completions only)."""

    def __init__(self, tokenizer, template: ChatTemplate | None, block_size: int) -> None:
        self.tokenizer, self.template, self.block_size = tokenizer, template, block_size
        self.end_of_turn = end_of_turn(template) if template is not None else None
        specials = template.specials if template is not None else {}
        ids = [
            token_id(tokenizer, self.end_of_turn),
            token_id(tokenizer, specials.get("eos_token")),
        ]
        self.stop_ids = sorted({i for i in ids if i is not None})
        # a marker of several tokens (or characters) stops the answer as text
        self.stop_text = (
            [self.end_of_turn]
            if self.end_of_turn and token_id(tokenizer, self.end_of_turn) is None
            else []
        )

    @classmethod
    def from_bundle(cls, bundle, template: str | None = None, required: bool = True) -> Assistant:
        """The bundle's template (see the module docstring); `template=NAME` names one. Without
        one, `required` refuses in one line naming template=, else chat is left off."""
        from bigmodel.data.chat_template import NAMED

        init_from = (bundle.model or {}).get("init_from")
        folder = str(init_from) if init_from and Path(str(init_from)).is_dir() else None
        try:
            resolved = ChatTemplate.resolve(template, folder, bundle.chat_template)
        except UserError as e:
            if template:  # an unknown name
                raise UserError(
                    f"template={template} is not a named template; they are {', '.join(NAMED)}"
                ) from None
            if required:
                raise UserError(
                    "this model has no chat template (it was not trained with data=chat and its "
                    "tokenizer has none); name one: " + " or ".join(f"template={n}" for n in NAMED)
                ) from None
            del e
            resolved = None
        return cls(bundle.tokenizer, resolved, int(bundle.prep["block_size"]))

    @property
    def template_name(self) -> str:
        if self.template is None:
            return "none"
        return self.template.name or "the tokenizer's own"

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """A checked conversation -> the ids of its rendering with the generation prompt."""
        if self.template is None:
            raise BadConversation(
                "this model has no chat template; serve it with template=chatml (or plain), or "
                "use /v1/completions"
            )
        try:
            text = self.template.render(messages, add_generation_prompt=True)
        except TemplateRefused as e:
            raise BadConversation(f"the chat template refused the conversation ({e})") from None
        return encode_text(self.tokenizer, text)

    def completion_prompt(self, prompt: str) -> list[int]:
        """A plain prompt -> ids, as /predict and generate.py encode it ("" starts from the start
        token)."""
        from bigmodel.tasks.language_model import encode_prompt, start_token

        try:
            return (
                encode_prompt(self.tokenizer, prompt) if prompt else [start_token(self.tokenizer)]
            )
        except UserError as e:
            raise BadConversation(str(e), "prompt") from None

    def room(self, ids: list[int], param: str = "messages") -> int:
        """New tokens that fit after `ids` in the context; a prompt that leaves none is refused."""
        if len(ids) >= self.block_size:
            raise BadConversation(
                f"the prompt is {len(ids)} tokens long and this model's context is "
                f"{self.block_size} tokens; shorten it to fewer than {self.block_size} tokens",
                param,
            )
        return self.block_size - len(ids)

    def job(self, ids: list[int], sampling: RowSampling, stop: list[str], chat: bool) -> Job:
        """A prompt's job; a chat answer also stops at the template's end of turn."""
        room = self.room(ids)
        sampling.max_new_tokens = min(sampling.max_new_tokens, room)
        stop_ids = list(self.stop_ids)
        extra = self.stop_text if chat else []
        return Job(ids, sampling, [*stop, *extra], stop_ids)


def end_of_turn(template: ChatTemplate) -> str | None:
    """What the template writes after an assistant's content (`<|im_end|>`, `<|eot_id|>`, a
    newline), found by rendering a short exchange; None when the template does not say."""
    content = "Sure."
    try:
        before = template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
        after = template.render(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": content}]
        )
    except TemplateRefused:
        return None
    if not after.startswith(before + content):
        return None
    suffix = after[len(before) + len(content) :]
    return suffix.strip() or suffix or None


class Reply:
    """One row's text as its ids come: what may be shown, and whether it has ended."""

    def __init__(self, tokenizer, job: Job) -> None:
        self.tokenizer, self.job = tokenizer, job
        self.ids: list[int] = []
        self.shown = 0  # characters of the text already handed out
        self.text = ""
        self.finish_reason: str | None = None

    def add(self, token: int) -> None:
        if token in self.job.stop_ids:
            self.finish_reason = "stop"
            return
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        cuts = [i for s in self.job.stop if (i := self.text.find(s)) >= 0]
        if cuts:
            self.text = self.text[: min(cuts)]
            self.finish_reason = "stop"
        elif len(self.ids) >= self.job.sampling.max_new_tokens:
            self.finish_reason = "length"

    def take(self) -> str:
        """The text that can be shown now: all of it once the reply has ended; before that, less
        any tail that may still become a stop string or is a half-decoded character."""
        end = len(self.text)
        if self.finish_reason is None:
            while end > self.shown and self.text[end - 1] == "\ufffd":
                end -= 1
            for s in self.job.stop:
                for k in range(min(len(s) - 1, end - self.shown), 0, -1):
                    if self.text[end - k : end] == s[:k]:
                        end -= k
                        break
        new = self.text[self.shown : end]
        self.shown = max(self.shown, end)
        return new


def replies(net, tokenizer, jobs: list[Job], block_size: int) -> Iterator[list[Step | None]]:
    """Each step, each job's `Step` (None once it has ended), decoded together from one
    key/value cache; jobs that do not fit the context together are decoded in groups, one group
    after another (the others' entries are None meanwhile)."""
    groups: list[list[int]] = []
    width = steps = 0
    for i, job in enumerate(jobs):
        w, s = max(width, len(job.ids)), max(steps, job.sampling.max_new_tokens)
        if groups and w + s <= block_size:
            groups[-1].append(i)
            width, steps = w, s
        else:
            groups.append([i])
            width, steps = len(job.ids), job.sampling.max_new_tokens
    for group in groups:
        rows = [Reply(tokenizer, jobs[i]) for i in group]

        def finished(k: int, ids: list[int], rows=rows) -> bool:
            rows[k].add(ids[-1])
            return rows[k].finish_reason is not None

        ended = [False] * len(group)
        prompts = [jobs[i].ids for i in group]
        sampling = [jobs[i].sampling for i in group]
        for new in decode_rows(net, prompts, sampling, block_size, finished):
            out: list[Step | None] = [None] * len(jobs)
            for k, (i, row) in enumerate(zip(group, rows, strict=True)):
                if ended[k] or new[k] is None:
                    continue
                out[i] = Step(row.take(), row.finish_reason, len(row.ids))
                ended[k] = row.finish_reason is not None
            yield out
        out = [None] * len(jobs)
        for k, (i, row) in enumerate(zip(group, rows, strict=True)):
            if not ended[k]:  # max_new_tokens=0
                out[i] = Step(row.take(), row.finish_reason or "length", len(row.ids))
        if any(s is not None for s in out):
            yield out
