"""Parallel text for translation: `TranslationDataModule`, length filtering, bucketed batches.

Three sources, one batch format:
- `synthetic`: an embedded English -> German corpus generated from a seed (`sources/grammar.py`),
  about quantities, prices, dates, clock times and where things stand, with German agreement
  and word order to learn. Millions of distinct sentences, so a model cannot memorise them.
- `files`: `{train,val,test}.<lang>` plain-text files (optionally `.gz`), one sentence per line.
- `hf`: HF datasets parquet/json files with a `translation` column of `{lang: text}` dicts, the
  layout of the common WMT copies (`train-*.parquet`, `validation-*.parquet`, `test-*.parquet`).

Both sides are tokenized with BPE (`tokenizers.TokenizerPair`) trained on the training pairs.
A batch is a dict: `src` (B, S) source ids ending in eos, `tgt` (B, T) bos + target ids + eos,
both right-padded with pad; `src_text` and `tgt_text` are the raw sentences (BLEU references).
"""

from __future__ import annotations

import logging
import random

import torch
from torch.utils.data import Dataset

from bigmodel.data.base import SPLITS, DataModule
from bigmodel.data.sources.grammar import synthetic_corpus
from bigmodel.data.sources.parallel_text import read_hf_translation, read_parallel_files
from bigmodel.data.tokenizers import TokenizerPair
from bigmodel.errors import UserError

log = logging.getLogger("bigmodel")

SOURCES = ("synthetic", "files", "hf")


# ================================================================================= batches
def length_buckets(
    lengths: list[int], batch_size: int, seed: int, pool: int = 100
) -> list[list[int]]:
    """Batches of indices of similar length: shuffle, sort within pools of `pool` batches, cut.

    Padding shrinks to a few tokens a batch while the batches still mix the whole corpus.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    span = batch_size * pool
    batches = []
    for i in range(0, len(order), span):
        chunk = sorted(order[i : i + span], key=lambda j: lengths[j])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    return batches


def pad(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class PairBatches(Dataset):
    """Item i is a whole batch (a dict, see the module docstring), built from pre-encoded pairs.

    Making batches the items lets Lightning shard them over devices with its DistributedSampler.
    """

    def __init__(self, pairs, src_ids, tgt_ids, batches: list[list[int]], pad_id: int) -> None:
        self.pairs, self.src_ids, self.tgt_ids = pairs, src_ids, tgt_ids
        self.batches, self.pad_id = batches, pad_id

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        idx = self.batches[i]
        return {
            "src": pad([self.src_ids[j] for j in idx], self.pad_id),  # (B, S)
            "tgt": pad([self.tgt_ids[j] for j in idx], self.pad_id),  # (B, T)
            "src_text": [self.pairs[j][0] for j in idx],
            "tgt_text": [self.pairs[j][1] for j in idx],
        }


class TranslationDataModule(DataModule):
    """Parallel sentences -> BPE ids -> length-bucketed batches of (source, target).

    Args:
        source: synthetic (embedded), files ({split}.{lang}[.gz] under root) or hf (parquet/json).
        root: folder of the files / hf source.
        src, tgt: language codes; the synthetic corpus is en <-> de, either direction.
        shared_vocab: one BPE tokenizer for both sides (needed to share embeddings) or one each.
        vocab_size: BPE vocabulary size (of each tokenizer when separate).
        max_len: training pairs with more tokens than this on either side are dropped.
        max_eval_pairs: score at most this many val/test pairs (null = all).
        split: the split eval.py scores.
    """

    learning = "translation"
    summary = "parallel sentences for translation"
    provides = ("src_vocab_size", "tgt_vocab_size", "pad_id", "bos_id", "eos_id")

    def __init__(
        self,
        source: str = "synthetic",
        root: str | None = None,
        src: str = "en",
        tgt: str = "de",
        translation_column: str = "translation",
        num_train: int = 20000,
        num_val: int = 500,
        num_test: int = 1000,
        shared_vocab: bool = True,
        vocab_size: int = 1000,
        max_len: int = 128,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        max_eval_pairs: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        split: str = "test",
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
            split=split,
        )
        if source not in SOURCES:
            raise UserError(f"data.source={source} is not one of: {', '.join(SOURCES)}")
        if source != "synthetic" and not root:
            raise UserError(f"data.source={source} needs data.root=DIR, the folder of its files")
        if source == "synthetic" and {src, tgt} != {"en", "de"}:
            raise UserError(
                f"the synthetic corpus is English <-> German; data.src={src} "
                f"data.tgt={tgt} must be en and de (either order)"
            )
        if src == tgt:
            raise UserError(f"data.src and data.tgt are both {src!r}; give two languages")
        for name, v in (("max_len", max_len), ("vocab_size", vocab_size)):
            if v is None or v <= 0:
                raise UserError(f"data.{name} must be a positive integer, got {v}")
        self.source, self.root, self.src, self.tgt = source, root, src, tgt
        self.translation_column = translation_column
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.shared_vocab, self.vocab_size, self.max_len = shared_vocab, vocab_size, max_len
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_eval_pairs = max_eval_pairs
        self.tokenizer: TokenizerPair | None = None
        self.pairs: dict[str, list[tuple[str, str]]] = {}
        self.ids: dict[str, tuple[list[list[int]], list[list[int]]]] = {}

    # ---------------------------------------------------------------------------------- text
    def load_pairs(self) -> dict[str, list[tuple[str, str]]]:
        if self.source == "synthetic":
            corpus = synthetic_corpus(*(self.sizes[s] for s in SPLITS), seed=self.seed)
            if self.src == "de":
                corpus = {k: [(de, en) for en, de in v] for k, v in corpus.items()}
        elif self.source == "files":
            corpus = read_parallel_files(self.root, self.src, self.tgt)
        else:
            corpus = read_hf_translation(self.root, self.src, self.tgt, self.translation_column)
        out = {}
        for split, pairs in corpus.items():
            kept = [(s.strip(), t.strip()) for s, t in pairs if s.strip() and t.strip()]
            if len(kept) < len(pairs):
                log.info(f"{split}: dropped {len(pairs) - len(kept)} pairs with an empty side")
            if split != "train" and self.max_eval_pairs:
                kept = kept[: self.max_eval_pairs]
            if not kept:
                raise UserError(
                    f"the {split} split of data.source={self.source} holds no sentence "
                    "pairs; give it non-empty parallel text"
                )
            out[split] = kept
        return out

    # ----------------------------------------------------------------------------- lifecycle
    def build(self) -> None:
        self.pairs = self.load_pairs()
        if self.tokenizer is None:
            train = self.pairs["train"]
            self.tokenizer = TokenizerPair.train(
                [s for s, _ in train], [t for _, t in train], self.vocab_size, self.shared_vocab
            )
        for split, pairs in self.pairs.items():
            src_ids = self.tokenizer.encode_batch([s for s, _ in pairs])
            tgt_ids = self.tokenizer.encode_target_batch([t for _, t in pairs])
            if split == "train":  # length filter: long outliers cost memory and teach little
                keep = [
                    i
                    for i in range(len(pairs))
                    if len(src_ids[i]) <= self.max_len and len(tgt_ids[i]) <= self.max_len + 1
                ]
                if len(keep) < len(pairs):
                    log.info(
                        f"train: dropped {len(pairs) - len(keep)} pairs longer than "
                        f"data.max_len={self.max_len} tokens"
                    )
                if not keep:
                    raise UserError(
                        f"every training pair is longer than data.max_len="
                        f"{self.max_len} tokens; raise data.max_len"
                    )
                pairs = self.pairs[split] = [pairs[i] for i in keep]
                src_ids, tgt_ids = [src_ids[i] for i in keep], [tgt_ids[i] for i in keep]
            self.ids[split] = (src_ids, tgt_ids)

    @property
    def net_kwargs(self) -> dict:
        """What the net needs to know that only the data can tell."""
        if self.tokenizer is None:
            raise RuntimeError("call setup() first: the vocabulary comes from the training text")
        t = self.tokenizer
        return {
            "src_vocab_size": t.src.vocab_size,
            "tgt_vocab_size": t.tgt.vocab_size,
            "pad_id": t.pad_id,
            "bos_id": t.bos_id,
            "eos_id": t.eos_id,
        }

    # --------------------------------------------------------------------------- dataloaders
    def _batches(self, split: str, batch_size: int) -> PairBatches:
        src_ids, tgt_ids = self.ids[split]
        lengths = [max(len(s), len(t)) for s, t in zip(src_ids, tgt_ids, strict=True)]
        batches = length_buckets(lengths, batch_size, self.seed)
        return PairBatches(self.pairs[split], src_ids, tgt_ids, batches, self.tokenizer.pad_id)

    def train_dataset(self) -> PairBatches:
        # batches keep their members; their order is reshuffled every epoch (seeded)
        return self._batches("train", self.batch_size)

    def dataset(self, split: str) -> PairBatches:
        return self._batches(split, self.eval_batch_size)

    def loader_kwargs(self) -> dict:
        # batch_size None: the items are whole batches (PairBatches)
        return {**super().loader_kwargs(), "batch_size": None}
