"""What each task needs of its net: every method and attribute the task uses, and no more.

A net works with a task when it is an `nn.Module` with the members of that task's Protocol;
nothing inherits from these classes (structural typing). The tasks call the net itself
(`self.net(x)`), which runs its `forward`. Two members any net may have, used where present:

- `blocks`: a list of modules, each sharded on its own under strategy=fsdp2
  (bigmodel.distributed.fully_shard_net); without it the net is sharded as one unit.
- `no_weight_decay() -> set[str]`: names of parameters kept out of weight decay (bigmodel.optim).

A net without a closed-form FLOPs count (`CountsTokenFlops`, `CountsForwardFlops`) has its forward
pass counted by torch's FlopCounterMode instead (Task.forward_flops).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn


class ClassifierNet(Protocol):
    """What `Classifier` needs: inputs to class logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, ...) images or audio clips -> logits (B, num_classes)."""
        ...


class RegressionNet(Protocol):
    """What `Regressor` needs: inputs to predictions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D_in) -> predictions, any shape with as many values as the targets (B, D_out)."""
        ...


class LanguageNet(Protocol):
    """What `LanguageModel` needs of a decoder-only net: next-token logits over a known
    vocabulary and context. Any family meets it (bigmodel.nets.GPT and its presets: GPT-2, Llama,
    Qwen, Mistral); the task imports no net module, and samples with bigmodel.sampling."""

    vocab_size: int
    """Number of token ids: the logits' last dimension."""
    block_size: int
    """Longest context the net reads; sampling crops the ids to the last block_size."""
    blocks: nn.ModuleList
    """The transformer blocks: each is one FSDP2 unit (and one activation-checkpointing unit,
    one LoRA scope)."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids, T <= block_size -> logits (B, T, vocab_size) of each next token.
        `ChatModel` on packed windows (data.packing=true) also passes `documents=` (B, T), the
        sequence each token belongs to: positions restart and attention stays within each."""
        ...


@runtime_checkable
class CountsTokenFlops(Protocol):
    """A language net with a closed-form FLOPs count (GPT: PaLM's 6N + 12 L C T)."""

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token of a seq_len-long window."""
        ...


class PadConfig(Protocol):
    pad_id: int
    """The padding id of source and target batches: never scored, never attended to."""


class Seq2SeqNet(Protocol):
    """What `Seq2Seq` needs: teacher-forced logits, decoding, and the padding id."""

    config: PadConfig

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """src (B, S) and target ids tgt (B, T) (bos first) -> logits (B, T, tgt_vocab_size)."""
        ...

    def translate(
        self,
        src: torch.Tensor,
        beam_size: int = 1,
        length_penalty: float = 1.0,
        max_len_ratio: float = 1.5,
        max_len_offset: int = 10,
    ) -> list[list[int]]:
        """Decode src (B, S) -> B lists of target ids (no bos or eos).

        beam_size=1 decodes greedily; beam scores are log-probability / length ** length_penalty;
        each output stops at max_len_ratio x its source length + max_len_offset ids.
        """
        ...


@runtime_checkable
class CountsForwardFlops(Protocol):
    """A sequence-to-sequence net with a closed-form FLOPs count of its forward."""

    def forward_flops(self, batch_size: int, src_len: int, tgt_len: int) -> int:
        """FLOPs of `forward` on (batch_size, src_len) source and (batch_size, tgt_len) target."""
        ...
