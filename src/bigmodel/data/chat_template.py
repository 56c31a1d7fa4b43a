"""Chat templates: a conversation rendered to text the way `transformers` renders it, and the
character spans of its assistant turns (the text the loss is taken on).

The template is the tokenizer's own (`chat_template` in tokenizer_config.json, or the
chat_template.jinja file newer transformers versions save beside it), or one named in `NAMED` for
base models that have none (`data.template=chatml`). It runs in jinja2's immutable sandbox with
what transformers gives a template: `messages`, `add_generation_prompt`, the special tokens by
name (`bos_token`, `eos_token`, ...), `raise_exception`, `strftime_now` and a `tojson` filter that
does not escape HTML.

Where the assistant text lies: a template that marks it with `{% generation %}` blocks says so
itself; any other is rendered once per assistant turn i, the conversation up to it with the
generation prompt (A) and up to and including it (B): the turn is the text B adds to A (its
content and the template's end-of-turn marker), provided each rendering is a prefix of the next.
"""

from __future__ import annotations

import json
import re
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bigmodel.errors import UserError

ROLES = ("system", "user", "assistant")

# Templates for base models without one of their own, by name (`data.template=NAME`).
NAMED = {
    # OpenAI's ChatML, as Qwen and SmolLM2 use it
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # plain text, for small vocabularies (a character-level model reads it without new tokens)
    "plain": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
        "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
        "{% else %}{{ 'Assistant: ' + message['content'] + '\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
    ),
}

SPECIAL_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
)


class TemplateRefused(ValueError):
    """The template could not render a conversation (it raised, or its renderings disagree)."""


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def folder_template(folder: str | Path) -> tuple[str | None, dict[str, str]]:
    """The chat template of a Hugging Face tokenizer folder (None: it has none) and its special
    tokens by name."""
    folder = Path(folder)
    config: dict[str, Any] = {}
    path = folder / "tokenizer_config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path} ({e}); replace it with the model's own") from None
    specials = {k: t for k in SPECIAL_KEYS if (t := _token_text(config.get(k))) is not None}
    template = None
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    elif isinstance(config.get("chat_template"), str):
        template = config["chat_template"]
    elif isinstance(config.get("chat_template"), list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in config["chat_template"]}
        template = named.get("default")
    return template, specials


@dataclass
class ChatTemplate:
    """A compiled chat template with the special tokens it is rendered with."""

    source: str
    specials: dict[str, str] = field(default_factory=dict)
    name: str = ""  # a NAMED template's name, or "" for a tokenizer's own

    def __post_init__(self) -> None:
        self._template = compile_template(self.source)
        self.marks_generation = "generation" in _tags(self.source)

    @classmethod
    def resolve(cls, named: str | None, folder: str | None, saved: dict | None) -> ChatTemplate:
        """`data.template=NAME`, else a checkpoint's saved template, else the tokenizer folder's;
        one line naming the fix when there is none."""
        if named:
            if named not in NAMED:
                raise UserError(
                    f"data.template={named} is not a named template; they are "
                    f"{', '.join(NAMED)} (or leave it null for the tokenizer's own)"
                )
            specials = (saved or {}).get("specials") or {}
            if folder:
                specials = folder_template(folder)[1]
            return cls(NAMED[named], specials, named)
        if saved and saved.get("source"):
            return cls(saved["source"], saved.get("specials") or {}, saved.get("name") or "")
        source, specials = folder_template(folder) if folder else (None, {})
        if not source:
            where = f"the tokenizer of {folder}" if folder else "this tokenizer"
            raise UserError(
                f"{where} has no chat template (no chat_template in tokenizer_config.json); "
                f"name one for this base model: data.template={' or data.template='.join(NAMED)}"
            )
        return cls(source, specials, "")

    def to_dict(self) -> dict:
        return {"source": self.source, "specials": dict(self.specials), "name": self.name}

    # ------------------------------------------------------------------------------ rendering
    def _context(self, messages: list[dict], add_generation_prompt: bool) -> dict:
        return {
            **self.specials,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "tools": None,
            "documents": None,
        }

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self._template.render(**self._context(messages, add_generation_prompt))
        except Exception as e:  # the template's raise_exception, or a field it lacks
            raise TemplateRefused(f"{type(e).__name__}: {str(e)[:200]}") from None

    def render_with_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation's text and the (start, end) character spans of its assistant
        turns, the end-of-turn marker the template writes after each one included."""
        if self.marks_generation:
            try:
                return render_tracked(self._template, self._context(messages, False))
            except Exception as e:
                raise TemplateRefused(f"{type(e).__name__}: {str(e)[:200]}") from None
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True) if i else ""
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise TemplateRefused(
                    "the template renders a conversation's first turns differently once more "
                    "follow, so the assistant's text cannot be located"
                )
            if len(upto) > len(before):
                spans.append((len(before), len(upto)))
        return text, spans


# ------------------------------------------------------------------------------- the jinja env
_ENV = None
# while a conversation is rendered with its spans tracked: (pieces yielded so far, spans found)
_TRACKING: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar(
    "chat_template_tracking", default=None
)


def _tags(source: str) -> set[str]:
    return set(re.findall(r"\{%-?\s*(\w+)", source))


def _environment():
    """jinja2's immutable sandbox set up as transformers sets it up for chat templates."""
    global _ENV
    if _ENV is not None:
        return _ENV
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UserError(
            "chat templates need jinja2 (pip install 'jinja2>=3.1.6', or the bigmodel[chat] extra)"
        ) from None

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}`: the assistant text. jinja yields the block's
        output as one piece, after those before it: its span starts where they end."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(
                lineno
            )

        def _mark(self, caller):
            text = caller()
            tracking = _TRACKING.get()
            if tracking is not None:
                pieces, spans = tracking
                start = sum(len(p) for p in pieces)
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    _ENV = env
    return env


def compile_template(source: str):
    import jinja2

    try:
        return _environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"the chat template does not parse as jinja: {e}") from None


def render_tracked(template, context: dict) -> tuple[str, list[tuple[int, int]]]:
    """Render streaming, so that `{% generation %}` blocks know their offsets."""
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    token = _TRACKING.set((pieces, spans))
    try:
        for piece in template.generate(**context):
            pieces.append(piece)
    finally:
        _TRACKING.reset(token)
    return "".join(pieces), spans
