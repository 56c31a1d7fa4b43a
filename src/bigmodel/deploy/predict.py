"""predict.py: a model (checkpoint or exported folder) over files -> one CSV or JSONL file.

What `input=` is, by kind of model:
- classifiers: an image / audio file, a folder of them (searched recursively, so class
  subfolders work: a file under a folder named after a class gets that class as its `target`
  and the accuracy is printed), or a .txt list of paths (one a line);
- language models: a text file of prompts, one a line -> generations;
- translation models: a text file of sentences, one a line -> translations;
- regressors: rows of numbers (CSV or whitespace separated, a header line allowed).

Blank lines of a line-based input are no input: they are skipped, and the closing line counts
them ("wrote 3 predictions to out.csv; skipped 2 blank lines").

Rows are predicted in batches (`batch_size`) with a progress bar; an unreadable file or row
stops the run (`on_bad_file=error`) or is reported and skipped (`skip`); the output file is
written once, complete, by an atomic rename, and an existing one only with overwrite=true.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from bigmodel.deploy.bundle import load_bundle
from bigmodel.deploy.folder import atomic_write_text
from bigmodel.deploy.inputs import BadInput, decode_row, decoder, media_suffixes
from bigmodel.deploy.runtime import Runner
from bigmodel.errors import UserError, reports_user_errors

log = logging.getLogger("bigmodel")

ON_BAD_FILE = ("error", "skip")
OUTPUT_SUFFIXES = (".csv", ".jsonl")


class BadFiles:
    """on_bad_file: stop on the first unreadable input, or report it and go on."""

    def __init__(self, mode: str) -> None:
        if mode not in ON_BAD_FILE:
            raise UserError(f"on_bad_file={mode} is not one of {', '.join(ON_BAD_FILE)}")
        self.mode, self.skipped = mode, []
        self.blank = 0  # blank lines of line-based inputs: no input, skipped and counted

    def __call__(self, where: str, err: BadInput) -> None:
        if self.mode == "error":
            raise UserError(
                f"{err}; fix or remove it, or pass on_bad_file=skip to go on without it"
            )
        self.skipped.append(where)
        log.warning(f"skipped {where}: {err}")


# ------------------------------------------------------------------------------------ inputs
def nonblank(lines: list[str], bad: BadFiles) -> list[str]:
    """The lines that hold something; the blank ones are counted in `bad.blank`."""
    kept = [line for line in lines if line.strip()]
    bad.blank += len(lines) - len(kept)
    return kept


def media_files(path: Path, kind: str, bad: BadFiles) -> list[Path]:
    """The files `input=` names: one file, a folder (recursively) or a .txt list of paths."""
    suffixes = media_suffixes(kind)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise UserError(f"input={path} holds no {kind} files ({', '.join(sorted(suffixes))})")
        return files
    if path.suffix.lower() in suffixes:
        return [path]
    if path.suffix.lower() in (".txt", ".lst"):
        lines = [line.strip() for line in nonblank(read_lines(path), bad)]
        # relative paths are relative to the list's folder
        return [p if p.is_absolute() else path.parent / p for p in map(Path, lines)]
    raise UserError(
        f"input={path} is not a folder, a {kind} file ({', '.join(sorted(suffixes))}) or a "
        ".txt list of paths"
    )


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"input={path} is not UTF-8 text (byte at offset {e.start})") from None


def target_of(path: Path, classes: list[str]) -> str | None:
    """The class a file's folder names, if any (class subfolders)."""
    return path.parent.name if path.parent.name in classes else None


def batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def progress(total: int, what: str, enabled: bool):
    """A rich progress bar on stderr (standard output stays free for the summary)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress(
        f"predict {what}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        disable=not enabled,
    )
    return bar, bar.add_task(what, total=total)


# ---------------------------------------------------------------------------------- per kind
def predict_media(runner: Runner, files: list[Path], cfg: DictConfig, bad: BadFiles) -> list[dict]:
    bundle, decode = runner.bundle, decoder(runner.kind)
    classes = bundle.classes or [str(i) for i in range(10_000)]
    rows: list[dict] = []
    bar, task = progress(len(files), "files", cfg.progress)
    with bar:
        for chunk in batches(files, cfg.batch_size):
            ok, arrays = [], []
            for f in chunk:
                try:
                    arrays.append(decode(f, bundle.prep))
                    ok.append(f)
                except BadInput as e:
                    bad(str(f), e)
            if arrays:
                probs = runner.classify(np.stack(arrays))  # (B, K)
                for f, p in zip(ok, probs, strict=True):
                    rows.append(
                        {
                            "path": str(f),
                            "label": classes[int(p.argmax())],
                            "target": target_of(f, bundle.classes),
                            "probs": {classes[k]: float(v) for k, v in enumerate(p)},
                        }
                    )
            bar.advance(task, len(chunk))
    known = [r for r in rows if r["target"] is not None]
    if known:
        acc = sum(r["label"] == r["target"] for r in known) / len(known)
        print(f"accuracy {acc:.4f} on {len(known)} files in class folders")
    return rows


def predict_rows(runner: Runner, path: Path, cfg: DictConfig, bad: BadFiles) -> list[dict]:
    lines = read_lines(path)
    xs, index = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            bad.blank += 1
            continue
        values = line.replace(",", " ").split()
        try:
            xs.append(decode_row([float(v) for v in values], runner.prep, f"{path} line {i + 1}"))
            index.append(i + 1)
        except ValueError as e:  # BadInput, or a word: a header line is allowed first
            if not xs and not index and i == 0 and not isinstance(e, BadInput):
                continue
            bad(
                f"{path} line {i + 1}",
                e
                if isinstance(e, BadInput)
                else BadInput(
                    f"{path} line {i + 1} holds something other than numbers: {line[:60]!r}"
                ),
            )
    rows: list[dict] = []
    bar, task = progress(len(xs), "rows", cfg.progress)
    with bar:
        for chunk in batches(list(zip(index, xs, strict=True)), cfg.batch_size):
            y = runner.forward(np.stack([x for _, x in chunk]))
            for (line, x), out in zip(chunk, y.reshape(len(chunk), -1), strict=True):
                rows.append({"line": line, "x": x.tolist(), "y": out.tolist()})
            bar.advance(task, len(chunk))
    return rows


def predict_text(runner: Runner, path: Path, cfg: DictConfig, bad: BadFiles) -> list[dict]:
    texts = nonblank(read_lines(path), bad)
    rows: list[dict] = []
    what = "prompts" if runner.kind == "lm" else "sentences"
    bar, task = progress(len(texts), what, cfg.progress)
    with bar:
        if runner.kind == "lm":
            for i, prompt in enumerate(texts):
                try:
                    text = runner.generate(
                        prompt,
                        cfg.max_new_tokens,
                        cfg.temperature,
                        cfg.top_k,
                        None if cfg.seed is None else cfg.seed + i,
                    )
                    rows.append({"prompt": prompt, "text": text})
                except BadInput as e:
                    bad(f"{path} prompt {i + 1}", e)
                bar.advance(task)
        else:
            beam = cfg.beam_size or runner.bundle.model.get("test_beam_size", 1)
            for chunk in batches(texts, cfg.batch_size):
                for src, hyp in zip(chunk, runner.translate(chunk, beam), strict=True):
                    rows.append({"text": src, "translation": hyp})
                bar.advance(task, len(chunk))
    return rows


# ------------------------------------------------------------------------------------ output
def render(rows: list[dict], suffix: str, kind: str, classes: list[str]) -> str:
    if suffix == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    buf = io.StringIO()
    w = csv.writer(buf)
    if kind in ("image", "audio"):
        w.writerow(["path", "label", "target", *(f"p_{c}" for c in classes)])
        for r in rows:
            w.writerow([r["path"], r["label"], r["target"] or "", *r["probs"].values()])
    elif kind == "regression":
        n = len(rows[0]["y"]) if rows else 0
        w.writerow(["line", *(f"y{i}" for i in range(n))])
        for r in rows:
            w.writerow([r["line"], *r["y"]])
    else:
        keys = ["prompt", "text"] if kind == "lm" else ["text", "translation"]
        w.writerow(keys)
        for r in rows:
            w.writerow([r[k] for k in keys])
    return buf.getvalue()


@reports_user_errors
def predict(cfg: DictConfig) -> list[dict]:
    """Predict every input of `cfg.input` and write `cfg.output`."""
    output = Path(cfg.output)
    if output.suffix not in OUTPUT_SUFFIXES:
        raise UserError(f"output={output} must end in .csv or .jsonl")
    if output.exists() and not cfg.get("overwrite"):
        raise UserError(f"output={output} exists; choose another file or pass overwrite=true")
    if cfg.batch_size is None or cfg.batch_size < 1:
        raise UserError(f"batch_size={cfg.batch_size} must be a positive integer")
    bad = BadFiles(cfg.on_bad_file)
    path = Path(cfg.input)
    if not path.exists():
        raise UserError(f"input={path} does not exist")
    bundle = load_bundle(
        cfg.get("ckpt_path"),
        cfg.get("model_dir"),
        cfg.paths.log_dir,
        OmegaConf.select(cfg, "model.init_from", default=None),
    )
    if bundle.kind == "lm":
        from bigmodel.sampling import check_sampling

        check_sampling(cfg.temperature, cfg.top_k, cfg.max_new_tokens)
    runner = Runner(bundle, cfg.engine, bool(cfg.int8))
    log.info(f"predict: {runner.describe()}, input {path}")
    if bundle.kind in ("image", "audio"):
        rows = predict_media(runner, media_files(path, bundle.kind, bad), cfg, bad)
    elif bundle.kind == "regression":
        rows = predict_rows(runner, path, cfg, bad)
    else:
        if path.is_dir():
            raise UserError(f"input={path} is a folder; pass a text file, one input a line")
        rows = predict_text(runner, path, cfg, bad)
    if not rows:
        raise UserError(f"input={path} gave no predictions (every input was unreadable)")
    atomic_write_text(output, render(rows, output.suffix, bundle.kind, bundle.classes))
    skipped = f"; skipped {len(bad.skipped)} unreadable" if bad.skipped else ""
    if bad.blank:
        skipped += f"; skipped {bad.blank} blank line" + ("" if bad.blank == 1 else "s")
    print(f"wrote {len(rows)} predictions to {output}{skipped}")
    return rows
