"""Text for language modelling as one string: the embedded corpus, text files, HF data files."""

from __future__ import annotations

import glob
from pathlib import Path

from bigmodel.errors import UserError

TEXT_SUFFIXES = {".txt", ".md", ".text"}
HF_SUFFIXES = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def embedded_corpus() -> str:
    """English prose that ships with every CPython: the help topics of `pydoc_data`."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def resolve_files(path: str) -> list[Path]:
    """A file, a directory (its .txt/.md files and HF data files, recursively) or a glob."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        suffixes = TEXT_SUFFIXES | set(HF_SUFFIXES)
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
        if not files:
            raise UserError(f"data.path={path} is a folder with no .txt/.md/.parquet/.json files")
        return files
    files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    if not files:
        raise UserError(
            f"data.path={path} does not exist (no file, folder or glob match); "
            "point data.path at a text file, a folder of .txt files or a glob like 'corpus/*.txt'"
        )
    return files


def read_text(f: Path, key: str = "data.path") -> str:
    """A UTF-8 text file; a binary file or another encoding is refused, naming the byte.

    key: the config key that named the file, for the message.
    """
    raw = f.read_bytes()
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise UserError(
            f"{key}: {f} holds a NUL byte at offset {nul}, so it is a binary file, not text; "
            f"point {key} at a text file"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{key}: {f} is not UTF-8 text (byte {raw[e.start : e.start + 1]!r} at offset "
            f"{e.start}); convert it, for example: iconv -f latin1 -t utf-8 {f.name} > "
            f"{f.stem}.utf8{f.suffix}"
        ) from None


def read_files(files: list[Path], text_column: str) -> str:
    """Concatenate documents; HF data files (parquet/json/csv) contribute their `text_column`."""
    parts: list[str] = []
    for f in files:
        fmt = HF_SUFFIXES.get(f.suffix)
        if fmt is None:
            parts.append(read_text(f))
            continue
        try:
            import datasets
        except ImportError as e:  # pragma: no cover - depends on the install
            raise UserError(f"reading {f} needs HF datasets: pip install -e '.[hf]'") from e
        ds = datasets.load_dataset(fmt, data_files=str(f), split="train")
        if text_column not in ds.column_names:
            raise UserError(
                f"{f} has no column {text_column!r} (columns: {ds.column_names}); "
                "set data.text_column to the column that holds the text"
            )
        parts.extend(str(t) for t in ds[text_column] if t)
    return "\n\n".join(parts)
