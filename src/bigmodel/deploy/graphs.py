"""The inference graphs of each kind of model: what runs in PyTorch and what goes to ONNX.

Each graph takes raw inputs (images scaled to [0, 1], waveforms, feature rows, token ids) and
does the rest itself, so an exported ONNX file needs no Python around it beyond decoding a file:
the image classifier normalises inside, the audio classifier computes its log-mel spectrogram
inside (the net's own front end), the language model returns next-token logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.export import Dim

from bigmodel.deploy.bundle import Bundle


class ImageGraph(nn.Module):
    """Images (B, C, H, W) in [0, 1] -> logits (B, K): the training normalisation, then the net."""

    def __init__(self, net: nn.Module, mean: list[float] | None, std: list[float] | None):
        super().__init__()
        self.net = net
        c = len(mean) if mean else 1
        self.register_buffer("mean", torch.tensor(mean or [0.0]).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(std or [1.0]).view(1, c, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images - self.mean) / self.std)  # (B, K)


class EncoderGraph(nn.Module):
    """Source ids (B, S) -> encoder memory (B, S, C) and the mask of real tokens (B, S)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory, mask = self.net.encode(src)  # (B, S, C), (B, 1, 1, S)
        return memory, mask[:, 0, 0, :]


class DecoderStepGraph(nn.Module):
    """Memory (B, S, C), mask (B, S) and the target so far (B, T) -> log-probabilities of the
    next token (B, V). Without a key/value cache: each step reruns the target prefix, which
    keeps the graph free of the cache's Python dicts."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, memory: torch.Tensor, mask: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        m = mask[:, None, None, :]  # (B, 1, 1, S)
        x = self.net.embed(self.net.tgt_emb, tgt)  # (B, T, C)
        for block in self.net.decoder:
            x = block(x, memory_kv=block.cross_attn.keys_values(memory), memory_mask=m)
        logits = self.net.lm_head(self.net.ln_dec(x[:, -1]))  # (B, V)
        return torch.log_softmax(logits.float(), dim=-1)


class LMPrefillGraph(nn.Module):
    """The prompt's pass of cached decoding: token ids (B, T) -> the next token's logits (B, V)
    and every layer's keys and values (n_layer, B, n_kv_head, T, head_dim) each."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from bigmodel.nets.kv_cache import PastKV

        cache = PastKV()
        logits = self.net(idx, cache=cache)[:, -1]  # (B, V)
        return (logits, *cache.stacked())


class LMStepGraph(nn.Module):
    """One step of cached decoding: a new token per row (B, 1) and the keys and values so far
    (n_layer, B, n_kv_head, P, head_dim) -> its logits (B, V) and the keys and values with it
    (n_layer, B, n_kv_head, P + 1, head_dim). The cache travels as inputs and outputs."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(
        self, idx: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from bigmodel.nets.kv_cache import PastKV

        cache = PastKV(keys, values)
        logits = self.net(idx, cache=cache)[:, -1]  # (B, V)
        return (logits, *cache.stacked())


@dataclass
class Graph:
    """One graph to export: the module, example inputs, names and dynamic axes."""

    name: str
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple


def example_inputs(bundle: Bundle, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of the model's own shapes (the parity check feeds them to both runtimes)."""
    g = torch.Generator().manual_seed(seed)
    p = bundle.prep
    if bundle.kind == "image":
        return (torch.rand(batch, p["channels"], p["image_size"], p["image_size"], generator=g),)
    if bundle.kind == "audio":
        return (0.1 * torch.randn(batch, p["num_samples"], generator=g),)
    if bundle.kind == "regression":
        return (torch.randn(batch, p["in_features"], generator=g),)
    if bundle.kind == "lm":
        t = max(2, min(p["block_size"], 16))
        return (torch.randint(0, p["vocab_size"], (batch, t), generator=g),)
    raise ValueError(bundle.kind)


def graphs_of(bundle: Bundle) -> list[Graph]:
    """The graphs that make up the model: one, or an encoder and a decoder step (seq2seq)."""
    batch = Dim("batch", min=1, max=4096)
    net = bundle.net
    if bundle.kind == "image":
        module = ImageGraph(net, bundle.prep["mean"], bundle.prep["std"]).eval()
        return [
            Graph("model", module, example_inputs(bundle), ["images"], ["logits"], ({0: batch},))
        ]
    if bundle.kind in ("audio", "regression"):
        name = "waves" if bundle.kind == "audio" else "x"
        out = "logits" if bundle.kind == "audio" else "y"
        return [Graph("model", net, example_inputs(bundle), [name], [out], ({0: batch},))]
    if bundle.kind == "lm":
        block = bundle.prep["block_size"]
        seq = Dim("seq", min=1, max=block)
        whole = Graph(
            "model", net, example_inputs(bundle), ["idx"], ["logits"], ({0: batch, 1: seq},)
        )
        if not hasattr(net, "new_cache") or block < 4:
            return [whole]
        # cached decoding: the prompt's pass, then one graph call per new token
        (idx,) = example_inputs(bundle)
        prefill = LMPrefillGraph(net).eval()
        _, keys, values = prefill(idx)
        past = Dim("past", min=1, max=block - 1)
        kv = {1: batch, 3: past}
        return [
            whole,
            Graph(
                "prefill",
                prefill,
                (idx,),
                ["idx"],
                ["logits", "keys", "values"],
                ({0: batch, 1: seq},),
            ),  # fmt: skip
            Graph(
                "decode_step",
                LMStepGraph(net).eval(),
                (idx[:, -1:], keys, values),
                ["idx", "keys", "values"],
                ["logits", "keys_out", "values_out"],
                ({0: batch}, kv, kv),
            ),  # fmt: skip
        ]
    # seq2seq: the encoder once per sentence, the decoder step once per output token
    cfg = net.config
    src_len, tgt_len = Dim("src_len", min=2, max=4096), Dim("tgt_len", min=1, max=4096)
    src = torch.randint(3, cfg.src_vocab_size, (2, 7))
    src[1, 5:] = cfg.pad_id  # a padded row, so the mask is traced as data, not a constant
    enc = EncoderGraph(net).eval()
    memory, mask = enc(src)
    tgt = torch.randint(3, cfg.tgt_vocab_size, (2, 4))
    return [
        Graph("encoder", enc, (src,), ["src"], ["memory", "mask"], ({0: batch, 1: src_len},)),
        Graph(
            "decoder_step",
            DecoderStepGraph(net).eval(),
            (memory, mask, tgt),
            ["memory", "mask", "tgt"],
            ["logprobs"],
            ({0: batch, 1: src_len}, {0: batch, 1: src_len}, {0: batch, 1: tgt_len}),
        ),
    ]


def torch_graph(bundle: Bundle) -> nn.Module:
    """The module PyTorch runs for a classifier or regressor (the ONNX graph's source)."""
    (graph,) = graphs_of(bundle)
    return graph.module
