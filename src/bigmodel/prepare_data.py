"""Tokenize a corpus into token shards: `python -m bigmodel.prepare_data source=... out=SHARDS`.

    python -m bigmodel.prepare_data source=corpus/ out=shards                 # char vocabulary
    python -m bigmodel.prepare_data source='wiki/*.parquet' out=shards tokenizer=tok workers=8

Keys (key=value):
  source        a text/jsonl/parquet file, a folder of them (recursively) or a glob
  out           the shard folder to write (local; upload it to s3:// with any S3 tool)
  tokenizer     char (the corpus's characters, one pass over it first) or the folder of a
                tokenizer.json (python -m bigmodel.train_tokenizer, or a pretrained model's)
  workers       tokenizing processes (default: the number of CPUs)
  text_column   the field holding text in jsonl/parquet rows (default: text)
  eos           auto | true | false: end every document with the tokenizer's end-of-text token
                (auto: where it has one: <|endoftext|>, </s> or <eos>); a text file is one
                document, a jsonl line or a parquet row is one
  part_mb       MB of text a worker tokenizes at a time (default: 4, or less for a small
                corpus, so that it is cut into at least 64 parts)
  chunk_tokens  tokens per shard file, about (default: 2097152, or a part's worth for a small
                corpus, so that it has shards to shuffle and to hold out for validation)
  pack          none | bos: best-fit pack documents (paragraphs of text files) into windows of
                `window` tokens (the model's block_size + 1) that each start with the end-of-text
                token and a document; cropped tokens are dropped and their share reported

The work is cut into parts (byte ranges of text ending at a newline, parquet row groups) and
done in rounds of a few parts per worker; each round is one `litdata.optimize` call, whose
chunks join the folder's `index.json` when the round is whole. Killed, the same command
continues after the last whole round. `manifest.json` records the tokenizer, the source files
(sizes and modification times) and the plan, so a changed source or another tokenizer is
refused rather than mixed in.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel.data.encode import Tokenize, charset, find_eos, pack_window
from bigmodel.data.shards import FORMAT, INDEX, MANIFEST, litdata
from bigmodel.data.sources.parts import describe, documents, plan_parts, resolve_sources
from bigmodel.errors import UserError, reports_user_errors

KEYS = {
    "source": None,
    "out": None,
    "tokenizer": "char",
    "workers": None,
    "text_column": "text",
    "eos": "auto",
    "part_mb": "auto",
    "chunk_tokens": "auto",
    "pack": "none",
    "window": "",
}
PARTS_PER_WORKER = 4  # parts a worker takes per round: a kill loses at most one round


def parse_args(argv: list[str], keys: dict[str, str | None], usage: str) -> dict[str, str]:
    """key=value arguments: unknown keys and missing required ones are refused in one line."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage.strip())
        sys.exit(0)
    args: dict[str, str] = {}
    for a in argv:
        if "=" not in a:
            raise UserError(f"{a!r} is not key=value; the keys are: {', '.join(keys)}")
        k, v = a.split("=", 1)
        if k not in keys:
            raise UserError(f"unknown key {k!r}; the keys are: {', '.join(keys)}")
        args[k] = v
    for k, default in keys.items():
        if k not in args:
            if default is None and k in ("source", "out"):
                raise UserError(f"{k}= is required; usage: {usage.strip().splitlines()[0]}")
            if default is not None:
                args[k] = default
    return args


def positive(args: dict[str, str], key: str, kind: type = int) -> Any:
    try:
        v = kind(args[key])
    except ValueError:
        raise UserError(f"{key}={args[key]} is not a {kind.__name__}") from None
    if v <= 0:
        raise UserError(f"{key}={args[key]} must be > 0")
    return v


# ------------------------------------------------------------------------------ the folder
def write_json(path: Path, data: dict) -> None:
    """Atomically: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


@contextlib.contextmanager
def quiet_fds(log: Path):
    """litdata's workers print to stdout/stderr: their lines go to a log file, ours stay."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def run_round(out: Path, r: int, parts_idx: list[int], fn: Tokenize, workers: int, chunk: int):
    """One litdata.optimize call into out/.staging/round-R; its chunks are committed after."""
    ld = litdata()
    stage = out / ".staging" / f"round-{r:05d}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    # litdata's scratch folders: per round, on the shards' disk, never shared with other runs
    os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] = str(out / ".staging" / "cache")
    os.environ["DATA_OPTIMIZER_DATA_CACHE_FOLDER"] = str(out / ".staging" / "data")
    with quiet_fds(out / ".staging" / "litdata.log"):
        try:
            ld.optimize(
                fn=fn,
                inputs=parts_idx,
                output_dir=str(stage / "shards"),
                chunk_size=chunk,
                item_loader=ld.TokensLoader(),
                num_workers=min(workers, len(parts_idx)),
                reorder_files=False,
                start_method="fork",
                mode="overwrite",
            )
            failed = None
        except BaseException as e:  # a worker's failure surfaces here (or as an exit)
            failed = e
    err = Path(fn.error_file)
    if err.exists():
        raise UserError(err.read_text().strip())
    if failed is not None or not (stage / "shards" / INDEX).is_file():
        log = out / ".staging" / "litdata.log"
        raise SystemExit(f"error: litdata.optimize failed in round {r} (see {log}): {failed}")


def commit_round(out: Path, r: int, done: list[int]) -> dict:
    """Move a finished round's chunks into the folder and list them in its index.json."""
    stage = out / ".staging" / f"round-{r:05d}" / "shards"
    index = json.loads((stage / INDEX).read_text())
    for c in index["chunks"]:
        new = f"chunk-{r:05d}-{c['filename'].removeprefix('chunk-')}"
        if (stage / c["filename"]).exists():
            os.replace(stage / c["filename"], out / new)
        c["filename"] = new
    merged = json.loads((out / INDEX).read_text()) if (out / INDEX).exists() else None
    keep = {f"chunk-{d:05d}-" for d in done}
    chunks = [c for c in (merged or {}).get("chunks", []) if c["filename"][:12] in keep]
    merged = {**index, "chunks": chunks + index["chunks"]}
    write_json(out / INDEX, merged)
    return index


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv, KEYS, __doc__.split("\n\n")[1])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers tokenize
    workers = positive(args, "workers") if "workers" in args else os.cpu_count() or 1
    litdata()  # installed: checked before anything is written
    files = resolve_sources(args["source"])
    corpus_bytes = sum(f.stat().st_size for f in files)
    if args["part_mb"] == "auto":  # small corpora in small parts: shards to shuffle and hold out
        part_bytes = min(4 * 2**20, max(4096, corpus_bytes // 64))
    else:
        part_bytes = int(positive(args, "part_mb", float) * 2**20)
    if args["chunk_tokens"] == "auto":
        chunk = min(2**21, max(4096, part_bytes))
    else:
        chunk = positive(args, "chunk_tokens")
    out = Path(args["out"]).expanduser()
    if str(args["out"]).startswith("s3://"):
        raise UserError("out= is a local folder; upload it afterwards (aws s3 sync out s3://...)")
    sources = describe(files)

    from bigmodel.data.tokenizers import BPETokenizer, CharTokenizer, tokenizer_from_dict

    old = None
    if (out / MANIFEST).is_file():
        old = json.loads((out / MANIFEST).read_text())
        if old.get("sources") != sources:
            raise UserError(
                f"{out} was prepared from other sources ({changes(old, sources)}); "
                "prepare into a new out= folder, or delete it to start over"
            )
    elif out.exists() and any(out.iterdir()):
        raise UserError(
            f"out={out} exists and is not a shard folder (no {MANIFEST}); "
            "give an empty or new folder"
        )

    if args["tokenizer"] == "char":
        tok = None
        if old is not None:
            if old["tokenizer"]["type"] != "char":
                raise UserError(
                    f"{out} was prepared with a {old['tokenizer']['type']} "
                    "tokenizer, not tokenizer=char; use a new out= folder"
                )
            tok = tokenizer_from_dict(old["tokenizer"])
    else:
        tok = BPETokenizer.from_folder(args["tokenizer"])
        if old is not None and old["tokenizer"] != tok.to_dict():
            raise UserError(
                f"{out} was prepared with another tokenizer than "
                f"{args['tokenizer']}; use a new out= folder, or the same tokenizer"
            )

    parts = old["parts"] if old else plan_parts(files, part_bytes)
    if not parts:
        raise UserError(f"source={args['source']} holds no text")
    if tok is None:  # the char vocabulary: the corpus's characters, before any shard is written
        chars: set[str] = set()
        for p in parts:
            for t in documents(p, args["text_column"])[0]:
                chars |= charset(t)
        tok = CharTokenizer("".join(sorted(chars | {CharTokenizer.UNK})), unk=CharTokenizer.UNK)
    eos_id = find_eos(tok, args["eos"]) if old is None else old["eos_id"]
    window = pack_window(args, eos_id)
    if old is not None and old.get("window") != window:
        raise UserError(
            f"{out} was packed for windows of {old.get('window')} tokens, not "
            f"{window}; use a new out= folder"
        )
    dtype = "uint16" if tok.vocab_size <= 2**16 else "uint32"
    rounds_n = max(1, workers * PARTS_PER_WORKER) if old is None else old["round_parts"]
    manifest = old or {
        "format": FORMAT,
        "complete": False,
        "tokenizer": tok.to_dict(),
        "vocab_size": tok.vocab_size,
        "eos_id": eos_id,
        "dtype": dtype,
        "text_column": args["text_column"],
        "sources": sources,
        "parts": parts,
        "round_parts": rounds_n,
        "rounds_done": [],
        "tokens": 0,
        "source_bytes": sum(s["size"] for s in sources),
        "window": window,  # pack=bos: every window of this size starts a document
        "packing": {"tokens": 0, "dropped": 0},
    }
    if manifest["complete"]:
        print(
            f"{out} is already prepared: {manifest['tokens']} tokens in "
            f"{manifest['shards']} shards; nothing to do"
        )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MANIFEST, manifest)

    rounds = [list(range(i, min(i + rounds_n, len(parts)))) for i in range(0, len(parts), rounds_n)]
    done = list(manifest["rounds_done"])
    if done:
        print(f"continuing {out}: {len(done)} of {len(rounds)} rounds were done")
    for stale in out.glob("chunk-*.bin"):  # a cut-off round's moved chunks: written again
        if int(stale.name[6:11]) not in done:
            stale.unlink()
    fn = Tokenize(
        parts,
        manifest["tokenizer"],
        eos_id,
        np.dtype(dtype),
        manifest["text_column"],
        str(out / ".staging" / "error.txt"),
        window,
    )
    part_size = [p[3] - p[2] if p[0] != "parquet" else 0 for p in parts]
    total = sum(part_size) or len(parts)

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(file=os.fdopen(os.dup(2), "w"), stderr=True)
    start = time.monotonic()
    with Progress(
        TextColumn("tokenizing"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[tokens]} tokens"),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        weight = [part_size[i] if total != len(parts) else 1 for i in range(len(parts))]
        task = bar.add_task(
            "",
            total=total,
            tokens=manifest["tokens"],
            completed=sum(weight[i] for r in done for i in rounds[r]),
        )
        for r, idx in enumerate(rounds):
            if r in done:
                continue
            stage = out / ".staging" / f"round-{r:05d}" / "shards"
            if not (stage / INDEX).is_file():
                (out / ".staging").mkdir(parents=True, exist_ok=True)
                run_round(out, r, idx, fn, workers, chunk)
            index = commit_round(out, r, done)
            done.append(r)
            manifest["rounds_done"] = done
            manifest["tokens"] += sum(int(c["dim"]) for c in index["chunks"])
            for i in idx if window else ():
                stats = json.loads((out / ".staging" / "packing" / f"{i}.json").read_text())
                for k in ("tokens", "dropped"):
                    manifest["packing"][k] += stats[k]
            write_json(out / MANIFEST, manifest)
            shutil.rmtree(out / ".staging" / f"round-{r:05d}", ignore_errors=True)
            bar.update(task, advance=sum(weight[i] for i in idx), tokens=manifest["tokens"])
    index = json.loads((out / INDEX).read_text())
    manifest.update(complete=True, shards=len(index["chunks"]))
    write_json(out / MANIFEST, manifest)
    shutil.rmtree(out / ".staging", ignore_errors=True)
    secs = time.monotonic() - start
    mb = manifest["source_bytes"] / 1e6
    print(
        f"wrote {out}: {manifest['tokens']} tokens ({dtype}, vocabulary "
        f"{manifest['vocab_size']}) in {manifest['shards']} shards from {len(files)} files, "
        f"{mb:.1f} MB of text in {secs:.1f} s ({mb / max(secs, 1e-9):.1f} MB/s)"
    )
    if window:
        p = manifest["packing"]
        print(
            f"packed into windows of {window} tokens, each starting a document: "
            f"{p['dropped']} of {p['tokens']} tokens cropped off documents "
            f"({p['dropped'] / max(p['tokens'], 1):.1%} wasted)"
        )


def changes(old: dict, sources: list[dict]) -> str:
    before = {s["path"]: s for s in old.get("sources", [])}
    now = {s["path"]: s for s in sources}
    for p in sorted(set(before) | set(now)):
        if p not in now:
            return f"{p} is gone"
        if p not in before:
            return f"{p} is new"
        if before[p] != now[p]:
            a, b = before[p], now[p]
            what = f"size {a['size']} -> {b['size']}" if a["size"] != b["size"] else "modified"
            return f"{p}: {what}"
    return "the file list differs"


if __name__ == "__main__":
    main()
