"""Train a byte-level BPE: `python -m bigmodel.train_tokenizer source=... vocab_size=N out=DIR`.

    python -m bigmodel.train_tokenizer source=corpus/ vocab_size=8192 out=tok
    python -m bigmodel.prepare_data source=corpus/ out=shards tokenizer=tok

Keys (key=value):
  source        a text/jsonl/parquet file, a folder of them or a glob (as prepare_data reads)
  vocab_size    the vocabulary, <|endoftext|> and the 256 bytes included
  out           the folder to write tokenizer.json into (data.tokenizer=DIR reads it)
  held_out      the fraction of each document kept out of training to measure compression
                (default 0.02)
  compare       another tokenizer folder to measure on the same held-out text (optional)
  text_column   the field holding text in jsonl/parquet rows (default: text)

HF `tokenizers` trains on the text as it streams past (parts of files, never the whole corpus
in memory) on all cores. At the end it reports bytes per token on the held-out text, for the
new tokenizer, the char tokenizer of the training text, and `compare`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from bigmodel.data.sources.parts import documents, plan_parts, resolve_sources
from bigmodel.errors import UserError, reports_user_errors
from bigmodel.prepare_data import parse_args, positive

KEYS = {
    "source": None,
    "vocab_size": None,
    "out": None,
    "held_out": "0.02",
    "compare": "",
    "text_column": "text",
}
EOS = "<|endoftext|>"
HELD_CAP = 20 * 2**20  # characters of held-out text kept for the report


def split_held_out(text: str, fraction: float) -> tuple[str, str]:
    """(training part, held-out tail) of a document; the tail starts after a newline."""
    cut = int(len(text) * (1 - fraction))
    nl = text.find("\n", cut)
    cut = nl + 1 if 0 <= nl < len(text) - 1 else cut
    return text[:cut], text[cut:]


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv, KEYS, __doc__.split("\n\n")[1])
    for k in ("vocab_size", "out"):
        if k not in args:
            raise UserError(f"{k}= is required; usage: {__doc__.splitlines()[0]}")
    vocab_size = positive(args, "vocab_size")
    if vocab_size < 258:
        raise UserError(f"vocab_size={vocab_size} must be at least 258 (256 bytes, {EOS}, a merge)")
    fraction = float(args["held_out"])
    if not 0 <= fraction < 1:
        raise UserError(f"held_out={fraction} must be in [0, 1)")
    files = resolve_sources(args["source"])
    parts = plan_parts(files, 4 * 2**20)
    held: list[str] = []
    held_chars = 0
    seen_chars: set[str] = set()

    def stream() -> Iterator[str]:
        nonlocal held_chars
        for p in parts:
            for text in documents(p, args["text_column"])[0]:
                train, tail = split_held_out(text, fraction) if fraction else (text, "")
                if tail and held_chars < HELD_CAP:
                    held.append(tail)
                    held_chars += len(tail)
                seen_chars.update(train)
                yield from train.splitlines(keepends=True)

    from bigmodel.data.tokenizers import BPETokenizer

    tok = BPETokenizer.train(stream(), vocab_size=vocab_size, special_tokens=[EOS])
    if not seen_chars:
        raise UserError(f"source={args['source']} holds no text")
    out = Path(args["out"]).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tok.tok.save(str(out / "tokenizer.json"))
    print(f"wrote {out / 'tokenizer.json'}: byte-level BPE, vocabulary {tok.vocab_size}")
    text = "".join(held)
    if not text:
        return
    nbytes = len(text.encode("utf-8"))
    rows = [("this BPE", len(tok.encode(text)))]
    # the char tokenizer of the training text: one token a character
    rows.append(("char", len(text)))
    if args["compare"]:
        other = BPETokenizer.from_folder(args["compare"])
        rows.append((f"compare={args['compare']}", len(other.encode(text))))
    print(f"compression on {nbytes} held-out bytes ({fraction:.0%} of each document):")
    for name, n in rows:
        print(f"  {name:<24} {n:>10} tokens  {nbytes / max(n, 1):.2f} bytes/token")


if __name__ == "__main__":
    main()
