"""Preference pairs for DPO and its relatives (`data=preference`): a prompt and two replies, the
chosen and the rejected, each rendered with the chat template after the prompt, the loss and the
log-probabilities taken on the reply's tokens only (chat.py renders, tokenizes and masks).

Rows: `{"prompt": "...", "chosen": "...", "rejected": "..."}`, or `{"messages": [...], ...}` for a
multi-turn prompt; a reply is a string or a list of assistant messages. A batch of B pairs is
`(x, y)` of 2B sequences, the B chosen first and the B rejected after them, padded together.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils.data import Dataset

from bigmodel.data.chat import IGNORE, ConversationData, Encoded, _count, pad
from bigmodel.data.sources.conversations import BadRow, preference_messages


class PairExamples(Dataset):
    def __init__(self, pairs: list[tuple[Encoded, Encoded]]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        chosen, rejected = self.pairs[i]
        return (*chosen.xy(), *rejected.xy())


def collate_pairs(items: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    xs = [it[0] for it in items] + [it[2] for it in items]
    ys = [it[1] for it in items] + [it[3] for it in items]
    return pad(xs, 0), pad(ys, IGNORE)


class PreferenceDataModule(ConversationData):
    """Preference pairs: prompt, chosen and rejected reply (the settings are data=chat's).

    A row whose chosen reply equals its rejected one teaches nothing and is skipped, counted
    with the other bad rows; so is a pair either of whose replies has no token within the
    context.
    """

    learning = "preference tuning"
    summary = "preference pairs (a prompt, a chosen and a rejected reply)"
    provides = ("vocab_size",)
    unit = "preference pairs"

    def row_messages(self, row: Any) -> list[dict]:
        prompt, chosen, _ = preference_messages(row)
        return prompt + chosen

    def encode_rows(self, rows, skipped: Counter, first: dict) -> list[tuple[Encoded, Encoded]]:
        conversations = []
        for where, row in rows:
            try:
                prompt, chosen, rejected = preference_messages(row)
            except BadRow as e:
                _count(skipped, first, e.reason, f"{where}: {e}" if str(e) != e.reason else where)
                continue
            conversations.append((where, prompt + chosen, len(chosen)))
            conversations.append((where, prompt + rejected, len(rejected)))
        encoded = self.sequences(conversations, skipped, first)
        pairs = zip(encoded[0::2], encoded[1::2], strict=True)
        return [(c, r) for c, r in pairs if c is not None and r is not None]

    def make_dataset(self, examples) -> Dataset:
        return PairExamples(examples)

    def collate(self, items):
        return collate_pairs(items)
