"""A corpus cut into parts that worker processes read independently: byte ranges of text and
JSON-lines files that end at a newline, and parquet row groups (prepare_data, train_tokenizer).
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

from bigmodel.errors import UserError

TEXT = {".txt", ".md", ".text"}
JSONL = {".jsonl", ".json"}
PARQUET = {".parquet"}


def resolve_sources(source: str) -> list[Path]:
    """A file, a folder (its text/jsonl/parquet files, recursively) or a glob, sorted."""
    suffixes = TEXT | JSONL | PARQUET
    p = Path(source).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
        if not files:
            raise UserError(f"source={source} is a folder with no .txt/.md/.jsonl/.parquet files")
    else:
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise UserError(f"source={source} does not exist (no file, folder or glob match)")
    odd = [f for f in files if f.suffix not in suffixes]
    if odd:
        raise UserError(f"source: {odd[0]} is not .txt, .md, .jsonl or .parquet")
    return [f.resolve() for f in files]


def describe(files: list[Path]) -> list[dict[str, Any]]:
    return [
        {"path": str(f), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files
    ]


def plan_parts(files: list[Path], part_bytes: int) -> list[list[Any]]:
    """[kind, path, a, b]: text/jsonl bytes [a, b) ending at a newline; parquet row group a."""
    parts: list[list[Any]] = []
    for f in files:
        if f.suffix in PARQUET:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise UserError(f"reading {f} needs pyarrow: pip install -e '.[hf]'") from None
            n = pq.ParquetFile(f).num_row_groups
            parts += [["parquet", str(f), g, g + 1] for g in range(n)]
            continue
        kind = "jsonl" if f.suffix in JSONL else "text"
        size, a = f.stat().st_size, 0
        with open(f, "rb") as fh:
            while a < size:
                b = min(a + part_bytes, size)
                if b < size:  # end the part after the next newline
                    fh.seek(b)
                    while True:
                        block = fh.read(1 << 16)
                        if not block:
                            b = size
                            break
                        nl = block.find(b"\n")
                        if nl >= 0:
                            b += nl + 1
                            break
                        b += len(block)
                parts.append([kind, str(f), a, b])
                a = b
    return parts


def decode(raw: bytes, path: str, offset: int) -> str:
    if b"\x00" in raw:
        at = offset + raw.find(b"\x00")
        raise UserError(f"source: {path} holds a NUL byte at offset {at}: a binary file, not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"source: {path} is not UTF-8 text (byte {raw[e.start : e.start + 1]!r} at offset "
            f"{offset + e.start}); convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None


def documents(part: list[Any], text_column: str) -> tuple[list[str], bool]:
    """The texts of a part, and whether its last one ends a document (a text file's last part)."""
    kind, path, a, b = part
    if kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path).read_row_group(a, columns=None)
        if text_column not in table.column_names:
            raise UserError(
                f"source: {path} has no column {text_column!r} (columns: {table.column_names}); "
                "set text_column="
            )
        return [str(t) for t in table.column(text_column).to_pylist() if t], True
    with open(path, "rb") as fh:
        fh.seek(a)
        text = decode(fh.read(b - a), path, a)
    if kind == "text":
        return [text], b == os.path.getsize(path)
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise UserError(f"source: {path} has a line that is not JSON near byte {a}") from None
        if not isinstance(row, dict) or text_column not in row:
            raise UserError(f"source: {path} line {i + 1} of its part has no {text_column!r} field")
        if row[text_column]:
            rows.append(str(row[text_column]))
    return rows, True
