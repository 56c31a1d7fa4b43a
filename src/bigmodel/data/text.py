"""Text for language modelling: `TextDataModule`, its token-id cache and window sampling.

The text comes from `sources/text_files.py`: the embedded corpus, a file, a folder or a glob.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from bigmodel.data.base import DataModule
from bigmodel.data.sources.text_files import embedded_corpus, read_files, resolve_files
from bigmodel.data.tokenizers import BPETokenizer, CharTokenizer
from bigmodel.errors import UserError

log = logging.getLogger("bigmodel")


class RandomWindows(Dataset):
    """Window i is a (block_size + 1)-token slice at a random offset fixed by (seed, epoch).

    Returns (x, y) with y shifted by one: the next-token targets.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, num_windows: int, seed: int) -> None:
        self.tokens, self.block_size, self.num_windows, self.seed = (
            tokens,
            block_size,
            num_windows,
            seed,
        )
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        high = len(self.tokens) - self.block_size - 1
        self.offsets = torch.randint(0, high + 1, (self.num_windows,), generator=g)

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        o = int(self.offsets[i])
        chunk = torch.from_numpy(self.tokens[o : o + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


class StridedWindows(Dataset):
    """Deterministic, non-overlapping windows for evaluation: every token scored once.

    max_windows caps the count: the windows kept are spread evenly over the whole split (the
    same ones at every validation), so a capped estimate still sees all of the text's parts.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, max_windows: int | None = None) -> None:
        self.tokens, self.block_size = tokens, block_size
        self.total = (len(tokens) - 1) // block_size  # windows in the split
        self.n = self.total if max_windows is None else min(self.total, max_windows)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        o = (i * self.total // self.n) * self.block_size  # evenly spread; all when uncapped
        chunk = torch.from_numpy(self.tokens[o : o + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


class TextDataModule(DataModule):
    """Language-modelling data: text -> tokenizer -> cached token ids -> (x, y) windows.

    The text is split contiguously into train / val / test by `splits`; the tokenizer is trained
    on the training split only, unless `tokenizer` names the folder of a pretrained one. The char
    vocabulary reserves an unknown character (U+FFFD) for characters the training split lacks:
    those seen only in val / test are encoded as it, counted in a warning, and scored like any
    other token, so val/test perplexity stays finite and covers every character. BPE is
    byte-level and has no unknowns.
    """

    learning = "language modelling"
    summary = "language-modelling text"
    provides = ("vocab_size",)

    # the windows are drawn at random offsets per epoch already: training reads them in order,
    # whole batches only
    train_shuffle = False
    train_drop_last = True

    def __init__(
        self,
        path: str | None = None,
        text_column: str = "text",
        tokenizer: str = "char",
        vocab_size: int = 2048,
        block_size: int = 64,
        batch_size: int = 12,
        splits: tuple[float, float, float] = (0.9, 0.05, 0.05),
        max_eval_windows: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        cache_dir: str | None = None,
        seed: int = 1337,
        split: str = "test",
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
            split=split,
        )
        if block_size is None or block_size <= 0:
            raise UserError(f"the block size must be a positive integer, got {block_size}")
        # a folder: checked when the tokenizer is read (a checkpoint's own copy needs none)
        if tokenizer not in ("char", "bpe") and not (
            os.sep in tokenizer or os.path.isdir(tokenizer)
        ):
            raise UserError(
                f"data.tokenizer={tokenizer} is not one of: char, bpe, or a folder holding a "
                "pretrained tokenizer (tokenizer.json, or vocab.json + merges.txt)"
            )
        if len(splits) != 3 or min(splits) < 0 or splits[0] <= 0 or abs(sum(splits) - 1) > 1e-6:
            raise UserError(f"data.splits={list(splits)} must be 3 fractions >= 0 summing to 1")
        self.path, self.text_column, self.tokenizer_kind = path, text_column, tokenizer
        self.bpe_vocab_size, self.block_size = vocab_size, block_size
        self.splits, self.max_eval_windows = tuple(splits), max_eval_windows
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.tokenizer: CharTokenizer | BPETokenizer | None = None
        self.tokens: dict[str, np.ndarray] = {}

    # ----------------------------------------------------------------------------------- text
    def load_text(self) -> str:
        text = (
            embedded_corpus()
            if self.path is None
            else read_files(resolve_files(self.path), self.text_column)
        )
        if not text.strip():
            raise UserError(f"data.path={self.path} holds no text; give it a non-empty corpus")
        return text

    def split_text(self, text: str) -> dict[str, str]:
        n, a = len(text), self.splits[0]
        b = a + self.splits[1]
        return {
            "train": text[: int(n * a)],
            "val": text[int(n * a) : int(n * b)],
            "test": text[int(n * b) :],
        }

    # ------------------------------------------------------------------------------ lifecycle
    def build(self) -> None:
        text = self.load_text()
        parts = self.split_text(text)
        if self.tokenizer is None:
            if self.tokenizer_kind == "char":
                self.tokenizer = CharTokenizer.train(parts["train"])
            elif self.tokenizer_kind != "bpe":  # a pretrained model's own tokenizer
                self.tokenizer = BPETokenizer.from_folder(self.tokenizer_kind)
            else:
                self.tokenizer = BPETokenizer.train(
                    parts["train"].splitlines(), vocab_size=self.bpe_vocab_size
                )
        tok_json = json.dumps(self.tokenizer.to_dict(), sort_keys=True)
        key = hashlib.sha1(
            text.encode() + tok_json.encode() + repr(self.splits).encode()
        ).hexdigest()[:16]
        for name, part in parts.items():
            self._report_unknown(name, part)
            self.tokens[name] = self._cached_ids(key, name, part)
        need = self.block_size + 1
        for name in ("train", "val"):
            if len(self.tokens[name]) < need:
                raise UserError(
                    f"the {name} split has {len(self.tokens[name])} tokens, fewer than one block "
                    f"({need}); use a larger corpus, a smaller model.net.block_size, or change "
                    f"data.splits={list(self.splits)}"
                )

    def _report_unknown(self, split: str, text: str) -> None:
        """Say how many characters of a split the char vocabulary encodes as unknown."""
        if not isinstance(self.tokenizer, CharTokenizer) or self.tokenizer.unk is None:
            return  # BPE is byte-level; a tokenizer without unk refuses them when encoding
        unknown = sorted(self.tokenizer.unknown(text))
        if unknown:
            n = sum(text.count(c) for c in unknown)
            shown = "".join(unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            log.warning(
                f"the {split} split has {n} characters ({len(unknown)} distinct: {shown!r}) "
                "outside the character vocabulary (built from the training split); they are "
                f"encoded as the unknown character {self.tokenizer.unk!r} and scored as such"
            )

    def _cached_ids(self, key: str, split: str, text: str) -> np.ndarray:
        """Token ids of one split, encoded once and memory-mapped from the cache afterwards."""
        dtype = np.uint16 if self.tokenizer.vocab_size < 2**16 else np.uint32
        if self.cache_dir is None:
            return np.asarray(self.tokenizer.encode(text), dtype=dtype)
        f = self.cache_dir / "tokens" / f"{key}.{split}.bin"
        if not f.exists():
            f.parent.mkdir(parents=True, exist_ok=True)
            ids = np.asarray(self.tokenizer.encode(text), dtype=dtype)
            tmp = f.with_suffix(f".{os.getpid()}.tmp")  # atomic: ranks may race to write it
            ids.tofile(tmp)
            os.replace(tmp, f)
        if f.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(f, dtype=dtype, mode="r")

    @property
    def vocab_size(self) -> int:
        if self.tokenizer is None:
            raise RuntimeError("call setup() first: the vocabulary comes from the training text")
        return self.tokenizer.vocab_size

    @property
    def net_kwargs(self) -> dict:
        """What a net needs to know that only the data can tell."""
        return {"vocab_size": self.vocab_size}

    # ---------------------------------------------------------------------------- dataloaders
    def train_dataset(self) -> RandomWindows:
        tokens = self.tokens["train"]
        return RandomWindows(
            tokens, self.block_size, max(1, len(tokens) // self.block_size), self.seed
        )

    def dataset(self, split: str) -> StridedWindows:
        tokens = self.tokens[split]
        if len(tokens) < self.block_size + 1:
            raise UserError(f"the {split} split is shorter than one block; adjust data.splits")
        return StridedWindows(tokens, self.block_size, self.max_eval_windows)
