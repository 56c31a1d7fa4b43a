"""Parallel text from files: `{split}.{lang}[.gz]` line-aligned pairs, or HF parquet/json files."""

from __future__ import annotations

import gzip
from pathlib import Path

from bigmodel.data.base import SPLITS
from bigmodel.errors import UserError

# Names the split files of HF datasets copies use, per split of ours.
HF_SPLIT_NAMES = {
    "train": ("train",),
    "val": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}
HF_SUFFIXES = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}


def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f]


def read_parallel_files(root: str, src: str, tgt: str) -> dict[str, list[tuple[str, str]]]:
    """{split: [(source, target), ...]} from `{split}.{lang}` or `{split}.{lang}.gz` under root."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise UserError(
            f"data.root={root} is not a folder; point it at the folder holding "
            f"train.{src}, train.{tgt}, val.{src}, ... (plain or .gz)"
        )
    out = {}
    for split in SPLITS:
        files = []
        for lang in (src, tgt):
            names = (f"{split}.{lang}", f"{split}.{lang}.gz")
            found = [base / n for n in names if (base / n).is_file()]
            if not found:
                raise UserError(
                    f"{base} has no {split}.{lang} (or {split}.{lang}.gz); parallel data needs "
                    f"{{train,val,test}}.{{{src},{tgt}}} files, one sentence a line"
                )
            files.append(found[0])
        src_lines, tgt_lines = (_read_lines(f) for f in files)
        if len(src_lines) != len(tgt_lines):
            raise UserError(
                f"{files[0]} has {len(src_lines)} lines but {files[1]} has {len(tgt_lines)}; "
                "parallel files must be line-aligned (line i of one translates line i of the other)"
            )
        out[split] = list(zip(src_lines, tgt_lines, strict=True))
    return out


def _hf_files(base: Path) -> dict[str, list[Path]]:
    files = sorted(p for p in base.rglob("*") if p.is_file() and p.suffix in HF_SUFFIXES)
    out: dict[str, list[Path]] = {}
    for split, names in HF_SPLIT_NAMES.items():
        out[split] = [p for p in files if any(p.name.startswith(n) for n in names)]
    return out


def read_hf_translation(root: str, src: str, tgt: str, column: str = "translation"):
    """{split: [(source, target), ...]} from HF parquet/json files of `{lang: text}` dicts.

    root is a folder holding `train*`, `validation*` (or `val*`, `dev*`) and `test*` files, as the
    WMT copies on the HF hub lay them out (`de-en/train-00000-of-00003.parquet`).
    """
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the install
        raise UserError("data.source=hf needs HF datasets: pip install -e '.[hf]'") from e
    base = Path(root).expanduser()
    if not base.is_dir():
        raise UserError(
            f"data.root={root} is not a folder; point it at the folder of "
            "train*/validation*/test* parquet or json files"
        )
    found = _hf_files(base)
    out = {}
    for split, files in found.items():
        if not files:
            raise UserError(
                f"{base} has no {split} files (looked for names starting with "
                f"{', '.join(HF_SPLIT_NAMES[split])} ending in .parquet/.json/.jsonl)"
            )
        fmt = HF_SUFFIXES[files[0].suffix]
        ds = datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train")
        if column not in ds.column_names:
            raise UserError(
                f"{files[0]} has no column {column!r} (columns: {ds.column_names}); "
                "set data.translation_column to the column of {lang: text} dicts"
            )
        rows = ds[column]
        for lang in (src, tgt):
            if rows and lang not in rows[0]:
                raise UserError(
                    f"{files[0]} translates {sorted(rows[0])}, not {lang!r}; set "
                    f"data.src and data.tgt to two of {sorted(rows[0])}"
                )
        out[split] = [(r[src], r[tgt]) for r in rows]
    return out
