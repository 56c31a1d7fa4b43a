"""An encoder-decoder transformer for translation, with batched greedy and beam search.

Pre-norm blocks (nets/layers.py), attention through `scaled_dot_product_attention`, sinusoidal
positions (no length limit), embeddings shared between encoder and decoder and/or tied to the
output layer by config. Decoding runs one token a step over a key/value cache: each decoder layer
keeps the keys and values of the tokens generated so far, and the cross-attention keys and values
of the source, computed once.

The search functions (`greedy_search`, `beam_search`) only need a `step` function mapping the last
token of each row to next-token log-probabilities, and a `reorder` of the decoding state; any
model offering those (see tests) decodes with them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from bigmodel.nets.layers import Block, build_config


@dataclass
class Seq2SeqConfig:
    src_vocab_size: int = 1000
    """Source token ids; filled from the tokenizer by the data module when left as `???`."""
    tgt_vocab_size: int = 1000
    """Target token ids; filled like src_vocab_size."""
    pad_id: int = 0
    """Padding id of both sides: never attended to, its embedding row stays zero at init."""
    bos_id: int = 1
    """Id each target starts with (and decoding starts from)."""
    eos_id: int = 2
    """Id that ends a target; decoding stops at it."""
    n_embd: int = 256
    """Width of the tokens."""
    n_head: int = 4
    """Attention heads per attention layer; each is n_embd / n_head wide."""
    n_enc_layer: int = 3
    """Encoder blocks."""
    n_dec_layer: int = 3
    """Decoder blocks (causal self-attention, cross-attention to the encoder output, MLP)."""
    mlp_ratio: int = 4
    """Hidden width of each block's MLP, in multiples of n_embd."""
    dropout: float = 0.1
    """Dropout on the embeddings, attention weights and residual branches."""
    bias: bool = True
    """Bias in Linear and LayerNorm layers."""
    share_embeddings: bool = True
    """One embedding table for encoder and decoder (needs a shared source/target vocabulary)."""
    tie_output: bool = True
    """The output projection reuses the decoder's embedding table."""

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                "change model.net.n_embd or model.net.n_head"
            )
        for name in (
            "src_vocab_size",
            "tgt_vocab_size",
            "n_embd",
            "n_head",
            "n_enc_layer",
            "n_dec_layer",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.net.{name} must be positive, got {getattr(self, name)}")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(
                f"model.net.share_embeddings=true needs one vocabulary for both sides, but source "
                f"has {self.src_vocab_size} ids and target {self.tgt_vocab_size}; set "
                "data.shared_vocab=true or model.net.share_embeddings=false"
            )


def sinusoids(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al. position encodings: positions (T,) -> (T, dim)."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) / half)
    angle = positions.float()[:, None] * freq[None]  # (T, half)
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


class Seq2SeqTransformer(nn.Module):
    """Source ids (B, S) and target input ids (B, T) -> next-token logits (B, T, tgt_vocab_size)."""

    config_class = Seq2SeqConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """`Seq2SeqTransformer(Seq2SeqConfig(...))`, or Seq2SeqConfig's fields by name."""
        super().__init__()
        self.config = cfg = build_config(Seq2SeqConfig, args, kwargs)
        self.src_emb = nn.Embedding(cfg.src_vocab_size, cfg.n_embd, padding_idx=cfg.pad_id)
        self.tgt_emb = (
            self.src_emb
            if cfg.share_embeddings
            else nn.Embedding(cfg.tgt_vocab_size, cfg.n_embd, padding_idx=cfg.pad_id)
        )
        self.drop = nn.Dropout(cfg.dropout)
        # Every attention projects queries (q) and keys/values (kv) apart, as cross-attention must.
        block = partial(
            Block, cfg.n_embd, cfg.n_head, cfg.mlp_ratio, cfg.dropout, cfg.bias, fused_qkv=False
        )
        self.encoder = nn.ModuleList(block() for _ in range(cfg.n_enc_layer))
        self.ln_enc = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.decoder = nn.ModuleList(
            block(causal=True, cross_attention=True) for _ in range(cfg.n_dec_layer)
        )
        self.ln_dec = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.tgt_vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_output:
            self.lm_head.weight = self.tgt_emb.weight
        # Embeddings are scaled by sqrt(C) to the size of the sinusoids; init them at C^-1/2 so
        # that a tied output layer starts with small logits.
        for emb in {id(e): e for e in (self.src_emb, self.tgt_emb)}.values():
            nn.init.normal_(emb.weight, std=cfg.n_embd**-0.5)
            with torch.no_grad():
                emb.weight[cfg.pad_id].zero_()
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # residual outputs, scaled as in GPT-2
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * (cfg.n_enc_layer + cfg.n_dec_layer)))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def embed(self, emb: nn.Embedding, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = emb(ids) * math.sqrt(self.config.n_embd) + sinusoids(pos, self.config.n_embd)
        return self.drop(x)  # (B, T, C)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S) -> memory (B, S, C) and the attention mask of real tokens (B, 1, 1, S)."""
        mask = (src != self.config.pad_id)[:, None, None, :]
        x = self.embed(self.src_emb, src)
        for block in self.encoder:
            x = block(x, mask)  # padding keys masked, no causal mask
        return self.ln_enc(x), mask

    def forward_flops(self, batch_size: int, src_len: int, tgt_len: int) -> int:
        """FLOPs of `forward` on (B, S) source and (B, T) target ids: 2 per multiply-add of every
        matrix product (the linear layers, the attention scores and their weighted sums over
        all positions, masked or not, the output layer), as torch's FlopCounterMode counts."""
        cfg, B, S, T = self.config, batch_size, src_len, tgt_len
        C, V, r = cfg.n_embd, cfg.tgt_vocab_size, cfg.mlp_ratio
        # per token: q, k, v and output projections (8 C^2), the MLP (4 r C^2)
        encoder = cfg.n_enc_layer * (B * S * (8 + 4 * r) * C * C + 4 * B * S * S * C)
        decoder = cfg.n_dec_layer * (
            B * T * (8 + 4 + 4 * r) * C * C  # self-attention, cross-attention q and out, MLP
            + B * S * 4 * C * C  # cross-attention keys and values of the encoder output
            + 4 * B * T * T * C  # self-attention scores and sums
            + 4 * B * T * S * C  # cross-attention scores and sums
        )
        return encoder + decoder + 2 * B * T * C * V

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        memory, mask = self.encode(src)
        x = self.embed(self.tgt_emb, tgt)
        for block in self.decoder:
            x = block(x, memory_kv=block.cross_attn.keys_values(memory), memory_mask=mask)
        return self.lm_head(self.ln_dec(x))  # (B, T, V)

    # ------------------------------------------------------------------------------ decoding
    def start_state(self, src: torch.Tensor) -> dict[str, Any]:
        """Decoding state: cross-attention keys/values per layer, source mask, empty caches."""
        memory, mask = self.encode(src)
        return {
            "mem": [b.cross_attn.keys_values(memory) for b in self.decoder],
            "mask": mask,
            "cache": [{} for _ in self.decoder],
            "t": 0,
        }

    def step(self, last: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """last (N,) token ids -> next-token log-probabilities (N, V); extends the caches."""
        x = self.embed(self.tgt_emb, last[:, None], start=state["t"])  # (N, 1, C)
        for block, mem, cache in zip(self.decoder, state["mem"], state["cache"], strict=True):
            x = block(x, memory_kv=mem, memory_mask=state["mask"], cache=cache)
        state["t"] += 1
        return F.log_softmax(self.lm_head(self.ln_dec(x[:, 0])).float(), dim=-1), state

    @staticmethod
    def reorder(state: dict, index: torch.Tensor) -> dict:
        """Keep rows `index` of every cached tensor (beams that survive, or copies of a source)."""
        return {
            "mem": [(k[index], v[index]) for k, v in state["mem"]],
            "mask": state["mask"][index],
            "cache": [{n: t[index] for n, t in c.items()} for c in state["cache"]],
            "t": state["t"],
        }

    def max_lengths(self, src: torch.Tensor, ratio: float, offset: int) -> torch.Tensor:
        """Longest output per row (B,): ratio x source length (without padding) + offset."""
        return ((src != self.config.pad_id).sum(1) * ratio).long() + offset

    @torch.no_grad()
    def translate(
        self,
        src: torch.Tensor,
        beam_size: int = 1,
        length_penalty: float = 1.0,
        max_len_ratio: float = 1.5,
        max_len_offset: int = 10,
    ) -> list[list[int]]:
        """Decode a batch of sources (B, S) -> B token-id lists (no bos / eos)."""
        cfg = self.config
        max_lens = self.max_lengths(src, max_len_ratio, max_len_offset)
        state = self.start_state(src)
        if beam_size <= 1:
            return greedy_search(self.step, state, max_lens, cfg.bos_id, cfg.eos_id)
        return beam_search(
            self.step,
            self.reorder,
            state,
            max_lens,
            cfg.bos_id,
            cfg.eos_id,
            beam_size,
            length_penalty,
        )


StepFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]


def _force_eos(logp: torch.Tensor, stop: torch.Tensor, eos: int) -> torch.Tensor:
    """Rows where `stop` is set may only end: every token but eos gets -inf."""
    if not stop.any():
        return logp
    only_eos = torch.full_like(logp, float("-inf"))
    only_eos[..., eos] = logp[..., eos]
    return torch.where(stop[..., None], only_eos, logp)


@torch.no_grad()
def greedy_search(
    step: StepFn, state, max_lens: torch.Tensor, bos: int, eos: int
) -> list[list[int]]:
    """The most likely next token each step until eos, at most max_lens[i] tokens for row i."""
    B = max_lens.shape[0]
    last = torch.full((B,), bos, dtype=torch.long, device=max_lens.device)
    done = torch.zeros(B, dtype=torch.bool, device=max_lens.device)
    out: list[torch.Tensor] = []
    for t in range(int(max_lens.max()) + 1):
        logp, state = step(last, state)  # (B, V)
        logp = _force_eos(logp, t >= max_lens, eos)
        last = logp.topk(1, dim=-1).indices[:, 0]  # topk, as beam search, so ties break alike
        out.append(torch.where(done, eos, last))
        done |= last == eos
        if done.all():
            break
    rows = torch.stack(out, 1).tolist()  # (B, steps)
    return [r[: r.index(eos)] if eos in r else r for r in rows]


@torch.no_grad()
def beam_search(
    step: StepFn,
    reorder: Callable,
    state,
    max_lens: torch.Tensor,
    bos: int,
    eos: int,
    beam_size: int,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Batched beam search; returns the best finished hypothesis of each row.

    Each step extends the `beam_size` live hypotheses of every row by their 2 x beam_size best
    continuations. Those ending in eos among the top `beam_size` are finished and scored by
    log-probability / length ** length_penalty; the best `beam_size` others live on. A row is
    done once it has `beam_size` finished hypotheses (as in fairseq); at max_lens[i] tokens
    only eos is allowed.
    """
    B, K, device = max_lens.shape[0], beam_size, max_lens.device
    rows = torch.arange(B, device=device)
    state = reorder(state, rows.repeat_interleave(K))  # each source K times: (B*K) rows
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    tokens = torch.empty(B * K, 0, dtype=torch.long, device=device)
    last = torch.full((B * K,), bos, dtype=torch.long, device=device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(int(max_lens.max()) + 1):
        logp, state = step(last, state)  # (B*K, V)
        V = logp.shape[-1]
        logp = _force_eos(logp.view(B, K, V), (t >= max_lens)[:, None].expand(B, K), eos)
        cand = (scores[:, :, None] + logp).view(B, K * V)
        vals, idx = cand.topk(min(2 * K, K * V), dim=1)  # (B, 2K)
        beam, tok = idx // V, idx % V
        is_eos = tok == eos
        ended = is_eos[:, :K] & ~done[:, None] & (vals[:, :K] > float("-inf"))
        for b, r in ended.nonzero().tolist():
            if len(finished[b]) < K:
                hyp = tokens[b * K + beam[b, r]].tolist()
                finished[b].append((vals[b, r].item() / (len(hyp) + 1) ** length_penalty, hyp))
        done |= torch.tensor([len(f) >= K for f in finished], device=device)
        if done.all():
            break
        # The K best continuations that do not end: rank order, eos candidates pushed last.
        rank = torch.arange(vals.shape[1], device=device) + is_eos * vals.shape[1]
        order = rank.argsort(1)[:, :K]
        scores = vals.gather(1, order)
        src_rows = (rows[:, None] * K + beam.gather(1, order)).view(-1)
        last = tok.gather(1, order).view(-1)
        tokens = torch.cat([tokens[src_rows], last[:, None]], dim=1)
        state = reorder(state, src_rows)
    return [max(f, key=lambda h: h[0])[1] if f else [] for f in finished]
