"""What serve.py accepts: the JSON body of each kind of model, checked field by field.

`check(payload, ...)` returns the request's fields with defaults filled in, or raises
`RequestError(status, message)` naming the problem: 400 for a body that is not a JSON object,
422 for a missing, unknown or mistyped key, a value out of range, a prompt longer than the
model's context or `max_new_tokens` over the server's limit. Bytes that are not an image or an
audio clip are found when they are decoded (bigmodel.deploy.inputs) and answered 422 too.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any

# the key each kind needs, and the keys it also takes
REQUIRED = {
    "image": "image",
    "audio": "audio",
    "regression": "x",
    "lm": "prompt",
    "seq2seq": "text",
}
OPTIONAL = {"lm": ("max_new_tokens", "temperature", "top_k", "seed")}


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Limits:
    """Server-side limits and defaults of a request (configs/serve.yaml)."""

    max_new_tokens: int = 256
    """The most tokens one request may ask for."""
    default_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int | None = 50


def parse_json(body: bytes) -> dict:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(payload, dict):
        raise RequestError(
            400, f"the request body must be a JSON object, got a {type(payload).__name__}"
        )
    return payload


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(v), "null" if v is None else "number"
    )


def _int(payload: dict, key: str, low: int, high: int | None = None) -> int:
    v = payload[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(422, f'"{key}" must be an integer, got {_type_name(v)} {v!r}')
    if v < low or (high is not None and v > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise RequestError(422, f'"{key}"={v} is out of range: it must be {bound}')
    return v


def _b64(value: Any, key: str) -> bytes:
    if not isinstance(value, str):
        raise RequestError(422, f'"{key}" must be a base64 string, got {_type_name(value)}')
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, f'"{key}" is not valid base64') from None
    if not data:
        raise RequestError(422, f'"{key}" is empty')
    return data


def check(
    payload: dict, kind: str, tokenizer=None, block_size: int = 0, limits: Limits | None = None
) -> dict:
    """The request's fields, checked and completed (see the module docstring)."""
    return check_counted(payload, kind, tokenizer, block_size, limits)[0]


def check_counted(
    payload: dict, kind: str, tokenizer=None, block_size: int = 0, limits: Limits | None = None
) -> tuple[dict, int]:
    """`check`, and the tokens a language-model request holds while in flight (its prompt's,
    counted once here, plus its max_new_tokens; 0 for other kinds): serve.py bounds their sum."""
    limits = limits or Limits()
    need = REQUIRED[kind]
    allowed = {need, *OPTIONAL.get(kind, ())}
    unknown = sorted(set(payload) - allowed)
    if need not in payload:
        extra = f" (got {', '.join(map(repr, unknown))})" if unknown else ""
        raise RequestError(422, f'this {kind} model needs the key "{need}"{extra}')
    if unknown:
        raise RequestError(
            422,
            f"unknown key {', '.join(map(repr, unknown))}; this {kind} model takes "
            + ", ".join(f'"{k}"' for k in sorted(allowed)),
        )
    value = payload[need]
    if kind in ("image", "audio"):
        return {kind: _b64(value, need)}, 0
    if kind == "regression":
        if not isinstance(value, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise RequestError(422, '"x" must be an array of numbers')
        if not all(math.isfinite(v) for v in value):
            raise RequestError(422, '"x" holds a NaN or infinite value')
        return {"x": value}, 0
    if not isinstance(value, str):
        raise RequestError(422, f'"{need}" must be a string, got {_type_name(value)}')
    if kind == "seq2seq":
        if not value.strip():
            raise RequestError(422, '"text" is empty')
        return {"text": value}, 0
    return _check_prompt(payload, value, tokenizer, block_size, limits)


def _check_prompt(
    payload: dict, prompt: str, tokenizer, block_size: int, limits: Limits
) -> tuple[dict, int]:
    out: dict[str, Any] = {"prompt": prompt}
    out["max_new_tokens"] = limits.default_new_tokens
    if "max_new_tokens" in payload:
        out["max_new_tokens"] = _int(payload, "max_new_tokens", 0)
        if out["max_new_tokens"] > limits.max_new_tokens:
            raise RequestError(
                422,
                f'"max_new_tokens"={out["max_new_tokens"]} is over this server\'s limit of '
                f"{limits.max_new_tokens}; ask for fewer tokens",
            )
    t = payload.get("temperature", limits.temperature)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0 or not math.isfinite(t):
        raise RequestError(422, f'"temperature" must be a number >= 0 (0: greedy), got {t!r}')
    out["temperature"] = float(t)
    out["top_k"] = limits.top_k
    if payload.get("top_k") is not None:
        out["top_k"] = _int(payload, "top_k", 1)
    elif "top_k" in payload:
        out["top_k"] = None  # null: sample from every token
    out["seed"] = _int(payload, "seed", 0) if payload.get("seed") is not None else None
    n = 0
    if tokenizer is not None:
        from bigmodel.errors import UserError
        from bigmodel.tasks.language_model import encode_prompt

        try:
            n = len(encode_prompt(tokenizer, prompt)) if prompt else 1
        except UserError as e:
            raise RequestError(422, str(e)) from None
        if n > block_size:
            raise RequestError(
                422,
                f'"prompt" is {n} tokens long and this model\'s context is {block_size} tokens; '
                f"shorten it to at most {block_size} tokens",
            )
    return out, n + out["max_new_tokens"]
