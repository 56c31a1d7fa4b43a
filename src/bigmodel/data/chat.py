"""Conversations for supervised fine-tuning (`data=chat`): rendered with a chat template,
tokenized, the loss taken on the assistant's tokens only.

Each conversation becomes one sequence: the template's text (chat_template.py) tokenized as
transformers' `apply_chat_template(..., tokenize=True)` tokenizes it (no special tokens added
beyond the template's own), with a label mask that is true on every token overlapping an
assistant turn (its content and the end-of-turn marker the template writes after it). A batch
is `(x, y)`: x the ids, y the next ids with `IGNORE` (-100) wherever the next token is not the
assistant's and on the padding; sequences are padded on the right to the batch's longest, which a
causal decoder never attends to from the real tokens. With `packing=true` several conversations
share a window of up to block_size tokens instead (first fit, in order) and a batch is
`(x, y, documents)`: documents (B, T) says which conversation each token belongs to, so that the
net restarts positions and attends within a conversation only (a block-diagonal causal mask);
the padding is then only what the windows leave over.

`ConversationData` is what chat and preference data (preference.py) share: reading the rows, the
tokenizer and template, the splits, counted warnings for rows that are skipped, and the checkpoint
state (tokenizer and template, so a checkpoint renders conversations as it was trained to).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from bigmodel.data.base import SPLITS, DataModule
from bigmodel.data.chat_template import ChatTemplate, TemplateRefused
from bigmodel.data.sources.conversations import BadRow, chat_messages, read_rows
from bigmodel.data.tokenizers import BPETokenizer, CharTokenizer
from bigmodel.errors import UserError

log = logging.getLogger("bigmodel")

IGNORE = -100  # the target of a token the loss skips (torch's cross_entropy default)
OVERLONG = ("truncate", "skip")


class Encoded:
    """One rendered, tokenized sequence: ids and the mask of the tokens the loss is taken on."""

    __slots__ = ("ids", "mask")

    def __init__(self, ids: np.ndarray, mask: np.ndarray) -> None:
        self.ids, self.mask = ids, mask

    def xy(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.from_numpy(self.ids.astype(np.int64))
        y = ids[1:].clone()
        y[~torch.from_numpy(self.mask[1:])] = IGNORE
        return ids[:-1], y


def pad(seqs: Sequence[torch.Tensor], value: int, length: int | None = None) -> torch.Tensor:
    """Right-pad 1-D tensors to one length (the longest, or `length`)."""
    n = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), n), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


class ChatExamples(Dataset):
    def __init__(self, examples: list[Encoded]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.examples[i].xy()


def collate_chat(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    xs, ys = zip(*items, strict=True)
    return pad(xs, 0), pad(ys, IGNORE)


class PackedChat(Dataset):
    """Conversations packed into windows of up to `block_size` tokens: each goes to the first
    window with room for it, in order. An item is (x, y, documents): the conversations' x and y
    one after another, and the index of the conversation of each token."""

    def __init__(self, examples: list[Encoded], block_size: int) -> None:
        self.examples, self.windows = examples, []
        room: list[int] = []
        for i, e in enumerate(examples):
            n = len(e.ids) - 1  # x and y are one shorter than the ids
            k = next((k for k, r in enumerate(room) if r >= n), len(room))
            if k == len(room):
                self.windows.append([])
                room.append(block_size)
            self.windows[k].append(i)
            room[k] -= n

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs, ys, docs = [], [], []
        for d, j in enumerate(self.windows[i]):
            x, y = self.examples[j].xy()
            xs.append(x)
            ys.append(y)
            docs.append(torch.full_like(x, d))
        return torch.cat(xs), torch.cat(ys), torch.cat(docs)


def collate_packed(items: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    xs, ys, docs = zip(*items, strict=True)
    return pad(xs, 0), pad(ys, IGNORE), pad(docs, -1)  # the padding: a sequence of its own


class ConversationData(DataModule):
    """Rows of conversation files, a tokenizer and a chat template, split three ways; subclasses
    say what a row becomes (`encode_rows`) and how items are batched (`collate`)."""

    unit: ClassVar[str] = "conversations"

    def __init__(
        self,
        path: str | None = None,
        tokenizer: str | None = None,
        template: str | None = None,
        block_size: int = 512,
        overlong: str = "truncate",
        splits: tuple[float, float, float] = (0.9, 0.05, 0.05),
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
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
        if overlong not in OVERLONG:
            raise UserError(f"data.overlong={overlong} is not one of: {', '.join(OVERLONG)}")
        if len(splits) != 3 or min(splits) < 0 or splits[0] <= 0 or abs(sum(splits) - 1) > 1e-6:
            raise UserError(f"data.splits={list(splits)} must be 3 fractions >= 0 summing to 1")
        self.path, self.tokenizer_kind, self.template_name = path, tokenizer, template
        self.block_size, self.overlong, self.splits = block_size, overlong, tuple(splits)
        self.template: ChatTemplate | None = None
        self._saved_template: dict | None = None
        self.examples: dict[str, list] = {}

    # ---------------------------------------------------------------------------- subclasses
    def encode_rows(self, rows: list[tuple[str, Any]], skipped: Counter, first: dict) -> list:
        raise NotImplementedError

    def collate(self, items: list) -> Any:
        raise NotImplementedError

    def make_dataset(self, examples: list) -> Dataset:
        raise NotImplementedError

    # ------------------------------------------------------------------------------- building
    def build(self) -> None:
        if not self.path:
            raise UserError(
                f"data.path is not set: give a JSONL or parquet file of {self.unit} "
                "(data.path=FILE)"
            )
        rows, not_json = read_rows(self.path)
        if not_json:
            where = next(iter(not_json))
            log.warning(
                f"data.path={self.path}: skipped {sum(not_json.values())} lines that are not JSON "
                f"(first: {where})"
            )
        if not rows:
            raise UserError(f"data.path={self.path} holds no rows of {self.unit}")
        folder = self._tokenizer_folder()
        self.template = ChatTemplate.resolve(self.template_name, folder, self._saved_template)
        if self.tokenizer is None:
            if folder is not None:
                self.tokenizer = BPETokenizer.from_folder(folder)
            elif self.tokenizer_kind in ("char", "bpe"):
                self.tokenizer = self._train_tokenizer(rows)
            else:
                raise UserError(
                    f"data={self.unit} needs a tokenizer: model.init_from=DIR (a Hugging Face "
                    "folder) or a .ckpt of train.py gives it, or set data.tokenizer to a "
                    "tokenizer folder, char or bpe"
                )
        n = len(rows)
        a = int(round(n * self.splits[0]))
        b = a + int(round(n * self.splits[1]))
        parts = {"train": rows[:a], "val": rows[a:b], "test": rows[b:]}
        for name in SPLITS:
            skipped: Counter = Counter()
            first: dict[str, str] = {}
            self.examples[name] = self.encode_rows(parts[name], skipped, first)
            self._report(name, len(parts[name]), len(self.examples[name]), skipped, first)
        for name in ("train", "val"):
            if self.splits[SPLITS.index(name)] > 0 and not self.examples[name]:
                raise UserError(
                    f"the {name} split of data.path={self.path} has no usable {self.unit} "
                    f"({len(parts[name])} rows, data.splits={list(self.splits)}); give more rows "
                    "or other splits"
                )
        kind = "char" if isinstance(self.tokenizer, CharTokenizer) else "BPE"
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.examples.items())
        name = self.template.name or "the tokenizer's own"
        log.info(
            f"{self.unit} (data.path={self.path}): {sizes}; {kind} vocabulary of "
            f"{self.tokenizer.vocab_size}; chat template: {name}"
        )

    def _tokenizer_folder(self) -> str | None:
        kind = self.tokenizer_kind
        if kind in (None, "", "char", "bpe"):
            return None
        if not (os.sep in str(kind) or os.path.isdir(str(kind))):
            raise UserError(
                f"data.tokenizer={kind} is not one of: char, bpe, or the folder of a pretrained "
                "tokenizer (model.init_from=DIR sets it to DIR)"
            )
        return str(kind)

    def _train_tokenizer(self, rows: list[tuple[str, Any]]):
        texts = []
        for _, row in rows:
            try:
                texts.append(self.template.render(self.row_messages(row)))
            except (BadRow, TemplateRefused):
                continue
        if self.tokenizer_kind == "char":
            return CharTokenizer.train("".join(texts))
        return BPETokenizer.train(texts, vocab_size=2048)

    def row_messages(self, row: Any) -> list[dict]:
        """A row's whole conversation (for training a tokenizer on)."""
        return chat_messages(row)

    def _report(self, split: str, total: int, kept: int, skipped: Counter, first: dict) -> None:
        if not skipped:
            return
        parts = [f"{n} {reason} (first: {first[reason]})" for reason, n in skipped.most_common()]
        log.warning(
            f"data.path={self.path}, {split} split: of {total} {self.unit}, "
            f"{total - kept} skipped; " + "; ".join(parts)
        )

    # ----------------------------------------------------------------------------- encoding
    def encode(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, character offsets (n, 2)) of each text; no special tokens are added, as
        `apply_chat_template` tokenizes: the template writes the ones it wants."""
        if isinstance(self.tokenizer, CharTokenizer):
            out = []
            for t in texts:
                ids = np.asarray(self.tokenizer.encode(t), dtype=np.int64)
                starts = np.arange(len(t))
                out.append((ids, np.stack([starts, starts + 1], axis=1)))
            return out
        encodings = self.tokenizer.tok.encode_batch(texts, add_special_tokens=False)
        return [
            (
                np.asarray(e.ids, dtype=np.int64),
                np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2),
            )
            for e in encodings
        ]

    def sequences(
        self, conversations: list[tuple[str, list[dict], int | None]], skipped: Counter, first
    ) -> list[Encoded | None]:
        """Encode each (where, messages, last) conversation; `last`: take the loss on the last
        `last` assistant turns only (None: all). None for one that is skipped (counted)."""
        rendered: list[tuple[str, list[tuple[int, int]]] | None] = []
        for where, messages, last in conversations:
            try:
                text, spans = self.template.render_with_spans(messages)
            except TemplateRefused as e:
                _count(skipped, first, "the chat template refused", f"{where}: {e}")
                rendered.append(None)
                continue
            rendered.append((text, spans[-last:] if last else spans))
        encoded = self.encode([r[0] for r in rendered if r is not None])
        out: list[Encoded | None] = []
        k = 0
        limit = self.block_size + 1  # x and y are the first and last block_size of these
        for (where, _, _), r in zip(conversations, rendered, strict=True):
            if r is None:
                out.append(None)
                continue
            ids, offsets = encoded[k]
            k += 1
            mask = np.zeros(len(ids), dtype=bool)
            for start, end in r[1]:
                mask |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
            if len(ids) > limit:
                if self.overlong == "skip":
                    _count(skipped, first, "longer than the context (data.overlong=skip)", where)
                    out.append(None)
                    continue
                ids, mask = ids[:limit], mask[:limit]
                _count(skipped, first, "truncated to the context (data.overlong=truncate)", where)
            if not mask[1:].any():
                _count(skipped, first, "without an assistant token within the context", where)
                out.append(None)
                continue
            dtype = np.uint16 if self.tokenizer.vocab_size < 2**16 else np.int32
            out.append(Encoded(ids.astype(dtype), mask))
        return out

    # ---------------------------------------------------------------------------- interfaces
    @property
    def net_kwargs(self) -> dict:
        if self.tokenizer is None:
            raise RuntimeError("call setup() first: the vocabulary comes from the tokenizer")
        return {"vocab_size": self.tokenizer.vocab_size}

    def dataset(self, split: str) -> Dataset:
        return self.make_dataset(self.examples[split])

    def loader_kwargs(self) -> dict[str, Any]:
        return {**super().loader_kwargs(), "collate_fn": self.collate}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.template is not None:
            state["chat_template"] = self.template.to_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("chat_template"):
            self._saved_template = dict(state["chat_template"])


def _count(skipped: Counter, first: dict, reason: str, where: str) -> None:
    skipped[reason] += 1
    first.setdefault(reason, where)


class ChatDataModule(ConversationData):
    """Conversations (OpenAI messages, or Alpaca instruction/input/output rows) for supervised
    fine-tuning: the loss on every assistant turn's tokens, nothing else.

    Args:
        path: a JSONL, JSON-list or parquet file (or a folder or glob of them).
        tokenizer: a pretrained tokenizer's folder (model.init_from=DIR sets it), char or bpe
            (trained on the rendered training conversations); null: a checkpoint's
            (model.init_from=CKPT).
        template: a named template (chatml, plain) for a base model without a chat template;
            null: the tokenizer's own (tokenizer_config.json's chat_template).
        block_size: the longest sequence (the net's context).
        overlong: truncate or skip a conversation longer than block_size + 1 tokens (counted).
        splits: contiguous train / val / test fractions of the rows.
        packing: several conversations per window (positions restart, attention stays within
            each); false: one per sequence, padded to the batch's longest.
    """

    learning = "chat fine-tuning"
    summary = "chat conversations (loss on assistant turns)"
    provides = ("vocab_size",)

    def __init__(self, *args: Any, packing: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.packing = bool(packing)

    def encode_rows(self, rows, skipped: Counter, first: dict) -> list[Encoded]:
        conversations = []
        for where, row in rows:
            try:
                conversations.append((where, chat_messages(row), None))
            except BadRow as e:
                _count(skipped, first, e.reason, f"{where}: {e}" if str(e) != e.reason else where)
        return [e for e in self.sequences(conversations, skipped, first) if e is not None]

    def make_dataset(self, examples: list[Encoded]) -> Dataset:
        if self.packing:
            packed = PackedChat(examples, self.block_size)
            if examples:
                real = sum(len(e.ids) - 1 for e in examples)
                log.info(
                    f"data.packing: {len(examples)} conversations in {len(packed)} windows of up "
                    f"to {self.block_size} tokens, {real / (len(packed) * self.block_size):.1%} "
                    "of them filled"
                )
            return packed
        return ChatExamples(examples)

    def collate(self, items):
        return collate_packed(items) if self.packing else collate_chat(items)
