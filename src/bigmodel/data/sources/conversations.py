"""Rows of conversation files: JSONL (or a JSON list) and parquet, read as plain dicts, and each
row turned into OpenAI-style messages (`[{"role": ..., "content": ...}]`).

Row layouts:
- chat: `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`;
- Alpaca: `{"instruction": ..., "input": ... (optional), "output": ...}` (+ optional "system");
- preference: `{"prompt": "..." | "messages": [...], "chosen": ..., "rejected": ...}`, the
  replies a string or a list of assistant messages.

A row that cannot be used raises `BadRow` with the reason, which the data module counts.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from bigmodel.data.chat_template import ROLES
from bigmodel.data.sources.text_files import resolve_files
from bigmodel.errors import UserError

SUFFIXES = (".jsonl", ".json", ".parquet")


class BadRow(ValueError):
    """A row that is skipped; `reason` is the counted kind, the message the first example."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


def read_rows(path: str) -> tuple[list[tuple[str, Any]], Counter]:
    """(where, row) of every row of the file(s) at `path` (a file, a folder or a glob of .jsonl,
    .json or .parquet), and the count of lines that are not JSON."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in SUFFIXES and f.is_file())
        if not files:
            raise UserError(f"data.path={path} is a folder with no .jsonl, .json or .parquet files")
    else:
        files = resolve_files(path)
    rows: list[tuple[str, Any]] = []
    bad: Counter = Counter()
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".parquet":
            rows += [(f"{f.name} row {i + 1}", r) for i, r in enumerate(_parquet(f))]
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {f} ({e}); give a UTF-8 JSONL or parquet file") from None
        stripped = text.lstrip()
        if suffix == ".json" and stripped.startswith("["):
            try:
                data = json.loads(text)
            except ValueError as e:
                raise UserError(f"{f} is not valid JSON ({e})") from None
            rows += [(f"{f.name} item {i + 1}", r) for i, r in enumerate(data)]
            continue
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rows.append((f"{f.name} line {i + 1}", json.loads(line)))
            except ValueError:
                bad[f"{f.name} line {i + 1}"] += 1
    return rows, bad


def _parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(
            f"{path} is parquet, which needs pyarrow (pip install 'bigmodel[hf]')"
        ) from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:
        raise UserError(f"cannot read {path} as parquet ({str(e)[:200]})") from None


def check_messages(messages: Any) -> list[dict]:
    """Plain {role, content} dicts with known roles; BadRow otherwise."""
    if not isinstance(messages, list) or not messages:
        raise BadRow("no messages", "its messages are not a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise BadRow("malformed message", f"a message is not {{role, content}}: {m!r:.80}")
        role = m.get("role")
        if role not in ROLES:
            raise BadRow("unknown role", f"role {role!r}")
        out.append({"role": role, "content": m["content"]})
    return out


def chat_messages(row: Any) -> list[dict]:
    """The messages of a chat or Alpaca row, with at least one assistant turn."""
    if not isinstance(row, dict):
        raise BadRow("not an object", f"{type(row).__name__}, not a JSON object")
    if "messages" in row:
        messages = check_messages(row["messages"])
    elif "instruction" in row and "output" in row:
        prompt = str(row["instruction"])
        if row.get("input"):
            prompt += "\n\n" + str(row["input"])
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": str(row["output"])},
        ]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": str(row["system"])})
    else:
        raise BadRow(
            "unknown layout",
            f"keys {sorted(row)[:6]}: neither messages nor instruction/input/output",
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no assistant turn")
    return messages


def _reply(value: Any, which: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    messages = check_messages(value)
    if any(m["role"] != "assistant" for m in messages):
        raise BadRow("malformed reply", f"{which} holds a turn other than the assistant's")
    return messages


def preference_messages(row: Any) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt messages, chosen reply, rejected reply) of a preference row."""
    if not isinstance(row, dict):
        raise BadRow("not an object", f"{type(row).__name__}, not a JSON object")
    if "chosen" not in row or "rejected" not in row:
        raise BadRow("unknown layout", f"keys {sorted(row)[:6]}: it needs chosen and rejected")
    if "messages" in row:
        prompt = check_messages(row["messages"])
    elif isinstance(row.get("prompt"), str):
        prompt = [{"role": "user", "content": row["prompt"]}]
    elif isinstance(row.get("prompt"), list):
        prompt = check_messages(row["prompt"])
    else:
        raise BadRow("unknown layout", "it needs a prompt (a string) or messages")
    chosen, rejected = _reply(row["chosen"], "chosen"), _reply(row["rejected"], "rejected")
    if chosen == rejected:
        raise BadRow("chosen equals rejected")
    return prompt, chosen, rejected
