"""Credentials out of everything a run prints, logs or saves (configs, overrides, trackers)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

_SECRET_NAME = re.compile(
    r"(^|[_.-])(api_?key|access_?token|token|secret(_access)?(_?key)?|password|passwd|"
    r"credentials?|private_?key)$",
    re.IGNORECASE,
)
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/\s:@]*:)(?P<pw>[^@\s/]+)(?=@)", re.I)
REDACTED = "***"


def secret_values() -> list[str]:
    """Values of environment variables that hold credentials (WANDB_API_KEY, HF_TOKEN, ...)."""
    return [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 8]


def redact(value: Any, secrets: Sequence[str] | None = None) -> Any:
    """A copy of plain config data with credentials replaced by `***`.

    Keys that name a credential (api_key, token, password, ...), passwords in URLs, and any
    credential from the environment found inside a string are masked.
    """
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, dict):
        return {
            k: REDACTED
            if isinstance(k, str) and _SECRET_NAME.search(k) and v not in (None, "")
            else redact(v, secrets)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, secrets) for v in value)
    if isinstance(value, str):
        value = _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, value)
        for s in secrets:
            value = value.replace(s, REDACTED)
    return value


def redact_override(override: str, secrets: Sequence[str] | None = None) -> str:
    """`+service.api_key=abc` -> `+service.api_key=***`; a credential inside any value too."""
    key, sep, value = override.partition("=")
    if sep and value and _SECRET_NAME.search(key.lstrip("+~")):
        return f"{key}={REDACTED}"
    return redact(override, secrets)
