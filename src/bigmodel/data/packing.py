"""Best-fit packing of documents into windows that each start at a document's beginning
(nanochat's packing for pre-training): no window starts mid-document, at the cost of the tokens
cropped off documents that do not fit (the share wasted is reported).
"""

from __future__ import annotations

import bisect

import numpy as np


def best_fit(docs: list[np.ndarray], window: int) -> tuple[np.ndarray, int]:
    """Rows of exactly `window` tokens, each starting with a document's first token.

    Each row takes the longest remaining document that fits in the space left, again and again;
    when none fits, the shortest one is cropped to fill the row and its rest is dropped. A last
    row that cannot be filled is dropped. Returns (the rows, concatenated; tokens dropped).
    """
    docs = sorted((d for d in docs if len(d)), key=len)
    lengths = [len(d) for d in docs]
    rows: list[np.ndarray] = []
    total = sum(lengths)
    while docs:
        space, row = window, []
        while space and docs:
            i = bisect.bisect_right(lengths, space) - 1
            if i < 0:  # nothing fits whole: crop the shortest
                row.append(docs.pop(0)[:space])
                lengths.pop(0)
                space = 0
            else:
                row.append(docs.pop(i))
                space -= lengths.pop(i)
        if space == 0:
            rows.append(np.concatenate(row))
    kept = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return kept, total - len(kept)
