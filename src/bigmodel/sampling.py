"""Decoding next tokens from logits: one home for the training-time samples, generate.py, the
exported runtime and the server.

Below nets and deploy (it imports neither): a caller gives logits, or a function from token ids
to logits, and gets ids back. The softmax runs in fp32 whatever the model's precision, so that a
bf16 model samples from the distribution its logits say and a seed gives the same ids on every
engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bigmodel.errors import UserError


def check_sampling(
    temperature: float, top_k: int | None, max_new_tokens: int, prefix: str = ""
) -> None:
    """Refuse sampling settings that would silently mean something else; `prefix` is where the
    keys live in the config (e.g. `callbacks.text_sample.`)."""
    if not temperature >= 0:  # also NaN
        raise UserError(
            f"{prefix}temperature={temperature} must be >= 0; 0 decodes greedily (the most "
            "likely token each step), higher values sample more randomly"
        )
    if top_k is not None and top_k < 1:
        raise UserError(
            f"{prefix}top_k={top_k} must be >= 1; {prefix}top_k=null samples from all tokens"
        )
    if max_new_tokens < 0:
        raise UserError(f"{prefix}max_new_tokens={max_new_tokens} must be >= 0")


def next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Logits of the last position (B, V) -> the next id of each row (B, 1).

    temperature=0 is greedy (the most likely token; top_k, top_p unused); top_k=None samples
    from all; top_p keeps the smallest set of most likely tokens whose probability reaches it
    (nucleus sampling), after top_k.
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature  # fp32: bf16 logits would flatten the distribution
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the ones before it already reach top_p (the first always stays)
        drop_sorted = (cumulative - F.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate(
    logits_of: Callable[..., torch.Tensor],
    idx: torch.Tensor,
    max_new_tokens: int,
    block_size: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Extend each row of idx (B, T) by up to max_new_tokens ids -> (B, T + n).

    logits_of: token ids (B, t) -> logits (B, t, V), e.g. a language net. A net with
    `new_cache(batch, size)` (bigmodel.nets.GPT) decodes from a key/value cache: the prompt runs
    once, then each step runs the new token only. Past `block_size` ids (the context the model
    was trained for), and for a plain function throughout, each step runs over the last
    `block_size` ids; a net with a `sliding_window` keeps decoding from its rolling cache
    instead, positions going on (a prompt longer than block_size too, unless left-padded).
    on_token(idx) is called after each step with every id so far (streaming).

    eos_id: a row that emits it is finished (it gets eos_id after, as padding); decoding stops
    when every row is. pad_mask (B, T): True at the real tokens of left-padded prompts (a batch
    of prompts of different lengths); each row decodes as it would alone.
    """
    check_sampling(temperature, top_k, max_new_tokens)
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p={top_p} must be in (0, 1]; 1 (or null) keeps every token")
    if max_new_tokens == 0:
        return idx
    cached = hasattr(logits_of, "new_cache")
    if pad_mask is not None and not cached:
        raise ValueError("left-padded prompts need a net that takes pad_mask (a cached net)")
    B = idx.shape[0]
    done = torch.zeros(B, 1, dtype=torch.bool, device=idx.device)
    cache = None
    # a sliding window attends to its last keys only: its cache rolls on past block_size
    rolling = getattr(logits_of, "sliding_window", None) is not None and pad_mask is None
    if cached and (idx.shape[1] < block_size or rolling):
        size = idx.shape[1] + max_new_tokens
        cache = logits_of.new_cache(B, size if rolling else min(block_size, size))
        logits = logits_of(idx, cache=cache, pad_mask=pad_mask)[:, -1, :]  # (B, V) prefill
    else:
        logits = _window(logits_of, idx, block_size, pad_mask)
    for step in range(max_new_tokens):
        token = next_token(logits, temperature, top_k, generator, top_p)  # (B, 1)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done = done | (token == eos_id)
        idx = torch.cat([idx, token], dim=1)
        if pad_mask is not None:
            pad_mask = torch.cat([pad_mask, torch.ones_like(token, dtype=pad_mask.dtype)], 1)
        if on_token is not None:
            on_token(idx)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if cache is not None and cache.length < cache.size:
            logits = logits_of(token, cache=cache, pad_mask=pad_mask)[:, -1, :]  # (B, V)
        else:  # the context is full: the last block_size ids, run whole (as without a cache)
            cache = None
            logits = _window(logits_of, idx, block_size, pad_mask)
    return idx


def _window(
    logits_of: Callable[..., torch.Tensor],
    idx: torch.Tensor,
    block_size: int,
    pad_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Logits of the next token (B, V) from the last block_size ids, run whole."""
    if pad_mask is None:
        return logits_of(idx[:, -block_size:])[:, -1, :]
    return logits_of(idx[:, -block_size:], pad_mask=pad_mask[:, -block_size:])[:, -1, :]


@dataclass
class RowSampling:
    """How one row of a batch is decoded (each request of a server batch has its own)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


@torch.no_grad()
def generate_rows(
    net: Any, prompts: list[list[int]], rows: list[RowSampling], block_size: int
) -> list[list[int]]:
    """Several prompts decoded together from one key/value cache: left-padded to one batch,
    one forward per step for all, each row sampled with its own settings and generator and
    stopped at its own max_new_tokens -> each row's new ids.

    Every row decodes as it would alone (`generate` of that prompt, same settings and seed),
    up to the rounding of a batched matmul. The batch must fit the context: prompt lengths plus
    new tokens at most block_size (the caller decodes the others alone).
    """
    out: list[list[int]] = [[] for _ in rows]
    for new in decode_rows(net, prompts, rows, block_size):
        for ids, t in zip(out, new, strict=True):
            if t is not None:
                ids.append(t)
    return out


def decode_rows(
    net: Any,
    prompts: list[list[int]],
    rows: list[RowSampling],
    block_size: int,
    finished: Callable[[int, list[int]], bool] | None = None,
) -> Iterator[list[int | None]]:
    """`generate_rows` step by step, for streaming: each step yields every row's new id, None
    for a row that has finished. A row finishes at its max_new_tokens, or when
    `finished(row, its new ids so far)` says so after an id (an end-of-turn token, a stop
    string); decoding ends when every row has finished."""
    width = max(len(p) for p in prompts)
    steps = max(r.max_new_tokens for r in rows)
    if width + steps > block_size:
        raise ValueError(f"{width} + {steps} positions exceed block_size {block_size}")
    for r in rows:
        check_sampling(r.temperature, r.top_k, r.max_new_tokens)
    if steps == 0:
        return
    with torch.no_grad():
        device = net.wte.weight.device if hasattr(net, "wte") else None
        B = len(prompts)
        idx = torch.zeros(B, width, dtype=torch.long, device=device)
        pad_mask = torch.zeros(B, width, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            idx[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            pad_mask[i, width - len(p) :] = True
        gens = [
            torch.Generator(device=device or "cpu").manual_seed(r.seed)
            if r.seed is not None
            else None
            for r in rows
        ]
        out: list[list[int]] = [[] for _ in rows]
        done = [r.max_new_tokens == 0 for r in rows]
        cache = net.new_cache(B, width + steps)
        logits = net(idx, cache=cache, pad_mask=pad_mask)[:, -1, :]  # (B, V)
    while True:
        with torch.no_grad():
            tokens = torch.zeros(B, 1, dtype=torch.long, device=idx.device)
            new: list[int | None] = [None] * B
            for i, r in enumerate(rows):
                if not done[i]:  # a finished row feeds a token nobody reads
                    tokens[i] = next_token(
                        logits[i : i + 1], r.temperature, r.top_k, gens[i], r.top_p
                    )
                    new[i] = int(tokens[i])
                    out[i].append(new[i])
                    stop = finished is not None and bool(finished(i, out[i]))
                    done[i] = stop or len(out[i]) >= r.max_new_tokens
        yield new
        if all(done):
            return
        with torch.no_grad():
            pad_mask = torch.cat([pad_mask, torch.ones_like(tokens, dtype=torch.bool)], dim=1)
            logits = net(tokens, cache=cache, pad_mask=pad_mask)[:, -1, :]
