"""Next-token prediction for decoder-only nets: (B, T) ids -> (B, T, V) logits."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torchmetrics.text import Perplexity

from bigmodel.data.tokenizers import CharTokenizer
from bigmodel.errors import UserError
from bigmodel.sampling import check_sampling, generate
from bigmodel.tasks.base import Task
from bigmodel.tasks.protocols import CountsTokenFlops, LanguageNet


class LanguageModel(Task):
    """Cross-entropy language modelling with `*/loss` and `val/ppl`, `test/ppl` (torchmetrics)."""

    learning = "language modelling"

    @dataclass
    class Generation:
        """generate.py's keys for a language model (configs/generate.yaml has the defaults)."""

        prompt: str = field(default="", metadata={"example": 'prompt="The"'})
        """The text to continue; "" starts from the start token (a newline, else a space)."""
        max_new_tokens: int = 200
        """Tokens sampled after the prompt."""
        temperature: float = 0.8
        """0 decodes greedily; higher samples more randomly."""
        top_k: int | None = 50
        """Sample only from the k most likely tokens (None: from all)."""
        top_p: float | None = None
        """Sample only from the most likely tokens whose probability reaches top_p (nucleus
        sampling, after top_k; None: from all)."""
        stop: list[str] | None = None
        """Texts that end a continuation: it is cut before the first one it makes."""
        num_samples: int = 1
        """Continuations of the one prompt."""
        seed: int | None = 1337
        """Seeds the sampling (None: unseeded)."""

    def __init__(
        self,
        net: LanguageNet,
        optimizer: functools.partial | None = None,
        scheduler: dict | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__(net, optimizer, scheduler, compile)
        self.val_ppl = Perplexity()
        self.test_ppl = Perplexity()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def _loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch  # (B, T), (B, T)
        logits = self.net(x)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        return loss, logits, y

    def forward_flops(self, batch) -> int | None:
        # GPT's closed form (PaLM's 6N + 12 L C T per token for forward + backward): a third
        if not isinstance(self.net, CountsTokenFlops):
            return super().forward_flops(batch)
        x = batch[0]
        key = ("per token", x.shape[1])  # num_params walks every parameter: once per length
        if key not in self._flops_per_sample:
            self._flops_per_sample[key] = self.net.flops_per_token(x.shape[1])
        return self._flops_per_sample[key] * x.numel() // 3

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._loss(batch)
        self.log_metric("train/loss", loss, batch, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, logits, y = self._loss(batch)
        self.val_ppl.update(logits.float(), y)
        self.log_metric("val/loss", loss, batch, prog_bar=True)
        self.log("val/ppl", self.val_ppl, on_epoch=True, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        loss, logits, y = self._loss(batch)
        self.test_ppl.update(logits.float(), y)
        self.log_metric("test/loss", loss, batch)
        self.log("test/ppl", self.test_ppl, on_epoch=True)

    @torch.no_grad()
    def generate_text(
        self,
        prompt: str,
        tokenizer,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = 50,
        num_samples: int = 1,
        seed: int | None = None,
        top_p: float | None = None,
        stop: list[str] | None = None,
    ) -> list[str]:
        """Sample continuations of `prompt` and return them decoded (prompt included).

        An empty prompt starts from `start_token`, which the returned text leaves out. A
        continuation ends before the first of the `stop` texts it makes.
        """
        check_sampling(temperature, top_k, max_new_tokens)  # before the prompt: name the key
        if num_samples < 1:
            raise UserError(f"num_samples={num_samples} must be >= 1")
        ids = encode_prompt(tokenizer, prompt) if prompt else [start_token(tokenizer)]
        skip = 0 if prompt else 1
        idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=self.device)  # (N, T)
        g = None
        if seed is not None:
            g = torch.Generator(device=self.device).manual_seed(seed)
        was_training = self.training
        self.eval()
        try:
            out = generate(
                self.net, idx, max_new_tokens, self.net.block_size, temperature, top_k, g,
                top_p=top_p,
            )  # (N, T + max_new_tokens)  # fmt: skip
        finally:
            self.train(was_training)
        texts = [tokenizer.decode(row[skip:].tolist()) for row in out]
        return [cut_at_stop(t, len(tokenizer.decode(ids[skip:])), stop) for t in texts]

    def generate_texts(self, tokenizer, options: LanguageModel.Generation) -> list[str]:
        """generate.py: `options.num_samples` continuations of `options.prompt`, in order."""
        return self.generate_text(
            options.prompt,
            tokenizer,
            max_new_tokens=options.max_new_tokens,
            temperature=options.temperature,
            top_k=options.top_k,
            num_samples=options.num_samples,
            seed=options.seed,
            top_p=options.top_p,
            stop=[options.stop] if isinstance(options.stop, str) else options.stop,
        )


def cut_at_stop(text: str, start: int, stop: list[str] | None) -> str:
    """`text` up to the first of the `stop` texts that begins at or after `start` (the end of
    the prompt), that stop text left out."""
    ends = [i for s in stop or () if s and (i := text.find(s, start)) >= 0]
    return text[: min(ends)] if ends else text


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt. A character the char vocabulary lacks is an error here, not the
    unknown id the data gets: the model cannot read what it never saw."""
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.encode(prompt, strict=True)
    return tokenizer.encode(prompt)


def start_token(tokenizer) -> int:
    """The id an empty prompt starts from: a newline, what separates the documents and paragraphs
    of the training text; a space for a char vocabulary without newlines."""
    for text in ("\n", " "):
        try:
            ids = encode_prompt(tokenizer, text)
        except UserError:
            continue
        if len(ids) == 1:
            return ids[0]
    raise UserError(
        'prompt="" starts from a newline or a space, and this model\'s vocabulary has neither; '
        'give a prompt, e.g. prompt="The"'
    )
