"""Token ids of a corpus's parts, as prepare_data's worker processes make them: the char
tokenizer with numpy, a BPE in batches of lines, documents ended (or, packed, started) by the
end-of-text token.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel.data.packing import best_fit
from bigmodel.data.sources.parts import documents
from bigmodel.errors import UserError

EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>")


class CharIds:
    """Character ids as numpy does them: a text's code points looked up in the vocabulary."""

    def __init__(self, chars: str, unk_id: int | None) -> None:
        cps = np.array([ord(c) for c in chars], dtype=np.uint32)
        self.order = np.argsort(cps)
        self.sorted = cps[self.order]
        self.unk_id = unk_id

    def __call__(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        pos = np.searchsorted(self.sorted, cps).clip(0, len(self.sorted) - 1)
        known = self.sorted[pos] == cps
        ids = self.order[pos]
        if not known.all():
            if self.unk_id is None:
                raise UserError("a character outside the vocabulary, and no unknown character")
            ids = np.where(known, ids, self.unk_id)
        return ids


def charset(text: str) -> set[str]:
    return {chr(c) for c in np.unique(np.frombuffer(text.encode("utf-32-le"), np.uint32))}


class Tokenize:
    """litdata's `fn`: part number -> the part's token ids (one item of a shard).

    Runs in litdata's worker processes (forked); the tokenizer is built there once. A bad input
    is written to `error_file` for the main process to report in one line.
    """

    def __init__(
        self, parts, tok_state, eos_id, dtype, text_column, error_file, window=None
    ) -> None:
        self.parts, self.tok_state, self.eos_id = parts, tok_state, eos_id
        self.dtype, self.text_column, self.error_file = dtype, text_column, error_file
        self.window = window  # pack=bos: rows of this many tokens, each a document's start
        self._encode = None

    def encoder(self):
        if self._encode is None:
            from bigmodel.data.tokenizers import tokenizer_from_dict

            tok = tokenizer_from_dict(self.tok_state)
            if self.tok_state["type"] == "char":
                self._encode = CharIds(tok.chars, tok.unk_id)
            else:

                def bpe(text: str) -> np.ndarray:
                    lines = text.splitlines(keepends=True) or [""]
                    ids = [i for e in tok.encode_batch(lines) for i in e]
                    return np.asarray(ids, dtype=np.int64)

                self._encode = bpe
        return self._encode

    def __call__(self, n: int) -> np.ndarray:
        try:
            encode = self.encoder()
            texts, ends = documents(self.parts[n], self.text_column)
            if self.window:  # documents (paragraphs of text files) start with the token
                if self.parts[n][0] == "text":
                    texts = [p for t in texts for p in t.split("\n\n") if p.strip()]
                docs = [np.concatenate([[self.eos_id], encode(t)]) for t in texts]
                rows, dropped = best_fit(docs, self.window)
                stats = Path(self.error_file).parent / "packing" / f"{n}.json"
                stats.parent.mkdir(parents=True, exist_ok=True)
                stats.write_text(json.dumps({"tokens": len(rows) + dropped, "dropped": dropped}))
                return rows.astype(self.dtype)
            eos = [] if self.eos_id is None else [np.array([self.eos_id])]
            out: list[np.ndarray] = []
            for i, t in enumerate(texts):
                if self.eos_id is None and self.parts[n][0] != "text":
                    t += "\n\n"  # rows joined as the in-memory text data joins them
                out.append(encode(t))
                if i < len(texts) - 1 or ends:
                    out += eos
            ids = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
            return ids.astype(self.dtype)
        except Exception as e:
            msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            with contextlib.suppress(OSError), open(self.error_file, "w") as f:
                f.write(msg)
            raise


def find_eos(tok: Any, setting: str) -> int | None:
    if setting not in ("auto", "true", "false"):
        raise UserError(f"eos={setting} is not one of auto, true, false")
    if setting == "false" or not hasattr(tok, "token_to_id"):
        if setting == "true":
            raise UserError("eos=true: the char tokenizer has no end-of-text token; use a BPE")
        return None
    for t in EOS_TOKENS:
        if (i := tok.token_to_id(t)) is not None:
            return i
    if setting == "true":
        raise UserError(f"eos=true: the tokenizer has none of {', '.join(EOS_TOKENS)}")
    return None


def pack_window(args: dict[str, str], eos_id: int | None) -> int | None:
    if args["pack"] not in ("none", "bos"):
        raise UserError(f"pack={args['pack']} is not one of none, bos")
    if args["pack"] == "none":
        return None
    if not args["window"]:
        raise UserError("pack=bos needs window=N: the model's block_size + 1")
    if eos_id is None:
        raise UserError(
            "pack=bos starts documents with the end-of-text token: use a tokenizer "
            "that has one (python -m bigmodel.train_tokenizer) and eos=auto"
        )
    try:
        window = int(args["window"])
    except ValueError:
        raise UserError(f"window={args['window']} is not an integer") from None
    if window < 2:
        raise UserError(f"window={window} must be at least 2")
    return window
