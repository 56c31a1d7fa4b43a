"""Text for language modelling: `TextDataModule`, its token-id cache and window sampling.

The text comes from `sources/text_files.py`: the embedded corpus, a file, a folder or a glob.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from bigmodel.data.base import SPLITS, DataModule
from bigmodel.data.sources.decoded import cached_arrays, lookup
from bigmodel.data.sources.text_files import embedded_corpus, read_files, resolve_files
from bigmodel.data.tokenizers import BPETokenizer, CharTokenizer, tokenizer_from_dict
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
    def source_files(self) -> list[Path]:
        """The files the text is read from; the embedded corpus: the module that holds it."""
        if self.path is not None:
            return resolve_files(self.path)
        spec = importlib.util.find_spec("pydoc_data.topics")
        return [Path(spec.origin)]

    def load_text(self, files: list[Path] | None = None) -> str:
        """The whole text, one string; files: those `source_files()` named, if known."""
        if self.path is None:
            text = embedded_corpus()
        else:
            text = read_files(files or resolve_files(self.path), self.text_column)
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
        """Token ids of every split, tokenized once: later runs memory-map them from the cache.

        The cache entry is keyed by the source files (names, sizes, modification times), the
        text column, the splits and the tokenizer's settings (kind and vocabulary size, or the
        given tokenizer itself); it holds the trained tokenizer too, so a run that finds it reads
        no text and trains nothing. A changed, added or removed file is tokenized again.
        """
        files = self.source_files()
        source = {"text_column": self.text_column, "splits": list(self.splits)}
        if self.tokenizer is None and self.tokenizer_kind not in ("char", "bpe"):
            self.tokenizer = BPETokenizer.from_folder(self.tokenizer_kind)  # pretrained: given
        given = self.tokenizer  # a pretrained one, or a checkpoint's (restored before setup)
        settings = {"tokenizer": self.tokenizer_kind, "vocab_size": self.bpe_vocab_size}
        if self.tokenizer_kind == "char":
            settings.pop("vocab_size")
        params = {**source, **settings}
        if given is not None:
            # the tokenizer this config trains, when it is the one given: evaluating a run's
            # checkpoint reads the entry its training wrote
            hit = lookup(self.cache_dir, "text", files, params)
            if hit is None or hit[1]["tokenizer"] != given.to_dict():
                params = {**source, "tokenizer": given.to_dict()}
        arrays, meta = cached_arrays(
            self.cache_dir, "text", files, params, lambda: self._tokenize(files), done="tokenized"
        )
        if given is None:
            self.tokenizer = tokenizer_from_dict(meta["tokenizer"])
        self.tokens = {name: arrays[name] for name in SPLITS}
        for name in SPLITS:
            self._report_unknown(name, meta["unknown"].get(name))
        source_name = "embedded corpus" if self.path is None else f"data.path={self.path}"
        n_files = f"{meta['files']} file" + ("" if meta["files"] == 1 else "s")
        kind = "char" if isinstance(self.tokenizer, CharTokenizer) else "BPE"
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.tokens.items())
        log.info(
            f"text ({source_name}): {n_files}, {sum(meta['chars'].values())} characters, "
            f"{kind} vocabulary of {self.tokenizer.vocab_size}; tokens ({sizes})"
        )
        need = self.block_size + 1
        for name in ("train", "val"):
            if len(self.tokens[name]) < need:
                raise UserError(
                    f"the {name} split has {len(self.tokens[name])} tokens, fewer than one block "
                    f"({need}); use a larger corpus, a smaller model.net.block_size, or change "
                    f"data.splits={list(self.splits)}"
                )

    def _tokenize(self, files: list[Path]) -> tuple[dict[str, np.ndarray], dict]:
        """Read the text, train the tokenizer (unless one is given) and encode every split."""
        t0 = time.perf_counter()
        text = self.load_text(files)
        parts = self.split_text(text)
        tokenizer = self.tokenizer
        if tokenizer is None:
            if self.tokenizer_kind == "char":
                tokenizer = CharTokenizer.train(parts["train"])
            else:
                tokenizer = BPETokenizer.train(
                    parts["train"].splitlines(), vocab_size=self.bpe_vocab_size
                )
        dtype = np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32
        arrays = {
            name: np.asarray(tokenizer.encode(part), dtype=dtype) for name, part in parts.items()
        }
        unknown = {}
        if isinstance(tokenizer, CharTokenizer) and tokenizer.unk is not None:
            # BPE is byte-level; a tokenizer without unk refuses them when encoding
            for name, part in parts.items():
                chars = sorted(tokenizer.unknown(part))
                if chars:
                    unknown[name] = {"count": sum(part.count(c) for c in chars), "chars": chars}
        log.info(
            f"text: read {len(text)} characters and tokenized them in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        meta = {
            "tokenizer": tokenizer.to_dict(),
            "files": len(files),
            "chars": {name: len(part) for name, part in parts.items()},
            "unknown": unknown,
        }
        return arrays, meta

    def _report_unknown(self, split: str, unknown: dict | None) -> None:
        """Say how many characters of a split the char vocabulary encodes as unknown."""
        if not unknown:
            return
        chars = unknown["chars"]
        shown = "".join(chars[:20]) + (" ..." if len(chars) > 20 else "")
        log.warning(
            f"the {split} split has {unknown['count']} characters ({len(chars)} distinct: "
            f"{shown!r}) outside the character vocabulary (built from the training split); they "
            f"are encoded as the unknown character {self.tokenizer.unk!r} and scored as such"
        )

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
