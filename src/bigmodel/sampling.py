"""Decoding next tokens from logits: one home for the training-time samples, generate.py, the
exported runtime and the server.

Below nets and deploy (it imports neither): a caller gives logits, or a function from token ids
to logits, and gets ids back. The softmax runs in fp32 whatever the model's precision, so that a
bf16 model samples from the distribution its logits say and a seed gives the same ids on every
engine.
"""

from __future__ import annotations

from collections.abc import Callable

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
) -> torch.Tensor:
    """Logits of the last position (B, V) -> the next id of each row (B, 1).

    temperature=0 is greedy (the most likely token, top_k unused); top_k=None samples from all.
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature  # fp32: bf16 logits would flatten the distribution
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    idx: torch.Tensor,
    max_new_tokens: int,
    block_size: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Extend each row of idx (B, T) by max_new_tokens ids -> (B, T + max_new_tokens).

    logits_of: token ids (B, t) -> logits (B, t, V), e.g. a language net. Each step sees the last
    `block_size` ids (the context the model was trained for). on_token(idx) is called after each
    step with every id so far (streaming).
    """
    check_sampling(temperature, top_k, max_new_tokens)
    for _ in range(max_new_tokens):
        logits = logits_of(idx[:, -block_size:])[:, -1, :]  # (B, V)
        idx = torch.cat([idx, next_token(logits, temperature, top_k, generator)], dim=1)
        if on_token is not None:
            on_token(idx)
    return idx
