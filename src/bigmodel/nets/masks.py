"""Positions and attention masks of the decoder (bigmodel.nets.gpt) beyond plain causal
training: decoding over a key/value cache, left-padded batches of prompts (each row counts its
own tokens), windows that pack several sequences (each attends within itself and counts its
positions from its own start), and sliding-window attention (Mistral v0.1: a query sees itself
and the `window - 1` keys before it, as transformers' `sliding_window_overlay`).
"""

from __future__ import annotations

import torch


def in_window(query: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
    """(T, S): True where the key (absolute index) is not in the query's future and, with a
    window, among its last `window` positions (itself included)."""
    seen = keys[None, :] <= query[:, None]
    return seen if window is None else seen & (keys[None, :] > query[:, None] - window)


def packed_positions_and_mask(
    documents: torch.Tensor, window: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, T) counted from the start of each token's sequence, and the mask
    (B, 1, T, T): causal, within a sequence (and a window)."""
    B, T = documents.shape
    index = torch.arange(T, device=documents.device).expand(B, T)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    same = documents[:, :, None] == documents[:, None, :]
    causal = in_window(index[0], index[0], window)
    return index - first, (same & causal).unsqueeze(1)


def positions_and_mask(
    B: int,
    T: int,
    past: int,
    pad_mask: torch.Tensor | None,
    device: torch.device,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions of the T new tokens, (T,) or (B, T) per row, and the attention mask over
    the past + T keys, (B or 1, 1, T, past + T), or None where SDPA's own causal flag (a
    prefill) or no mask (one new token) says it. window: sliding-window attention, counted in
    positions of the batch (left padding included, as transformers counts them)."""
    S = past + T
    if window is not None and window >= S:
        window = None  # no key is that far back
    if pad_mask is None:
        positions = torch.arange(past, S, device=device)
        if (T == 1 or past == 0) and window is None:
            return positions, None
        keys = torch.arange(S, device=device)
        return positions, in_window(positions, keys, window)[None, None]  # (1, 1, T, S)
    if pad_mask.shape != (B, S):
        raise ValueError(f"pad_mask is {tuple(pad_mask.shape)}; ({B}, {S}) expected")
    real = pad_mask.bool()
    all_positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
    positions = all_positions[:, past:]  # (B, T)
    query = torch.arange(past, S, device=device)  # (T,) absolute index of each query
    keys = torch.arange(S, device=device)
    causal = in_window(query, keys, window)  # (T, S)
    mask = causal[None] & real[:, None, :]  # (B, T, S): real keys, not the future
    # a padding query attends to itself only: no row of the mask is empty (SDPA would give
    # NaN, and NaN values times a zero weight spread to the real rows)
    mask = mask | (keys[None, :] == query[:, None])[None]
    return positions, mask.unsqueeze(1)  # (B, 1, T, S)
