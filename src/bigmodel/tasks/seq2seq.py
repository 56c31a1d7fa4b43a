"""Sequence to sequence learning: label-smoothed cross-entropy, decoding, BLEU and chrF.

The net is any module with the members of `Seq2SeqNet` (bigmodel.tasks.protocols): `forward(src
(B, S), tgt_in (B, T)) -> logits (B, T, V)`, `translate(src, beam_size, length_penalty,
max_len_ratio, max_len_offset) -> list of id lists` and `config.pad_id`. Batches are dicts with
`src`, `tgt` (bos + ids + eos) and the raw `src_text` / `tgt_text`; text goes through the data
module's tokenizer (`encode` source, `decode` target).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics.text import CHRFScore, Perplexity, SacreBLEUScore

from bigmodel.media import log_text
from bigmodel.tasks.base import Task
from bigmodel.tasks.protocols import CountsForwardFlops, Seq2SeqNet

log = logging.getLogger("bigmodel")


class Seq2Seq(Task):
    """Translation: teacher-forced training; validation and test decode and score the text.

    Args:
        label_smoothing: of the training cross-entropy (padding never counts).
        loss: a loss module replacing that cross-entropy (from the `loss` group); its
            `ignore_index`, if it has one, is set to the padding id.
        beam_size: beams when validating (1 = greedy, fastest); test_beam_size when testing.
        length_penalty: beam scores are log-probability / length ** length_penalty.
        max_len_ratio, max_len_offset: outputs stop at ratio x source length + offset tokens.
        num_examples: source / reference / hypothesis triples shown after each validation.
    """

    learning = "translation"
    losses = (nn.CrossEntropyLoss,)

    @dataclass
    class Generation:
        """generate.py's keys for a translation model (configs/generate.yaml has the defaults)."""

        text: list[str] = field(
            metadata={"example": 'text="a sentence" (or a list: \'text=["one","two"]\')'}
        )
        """The sentences to translate, one output each, in order."""
        beam_size: int | None = 4
        """Beams; 1 (or None) decodes greedily."""
        length_penalty: float | None = None
        """Beam scores are log-probability / length ** length_penalty (None: the model's)."""
        max_len_ratio: float | None = None
        """Outputs stop at max_len_ratio x source tokens + an offset (None: the model's)."""

    def __init__(
        self,
        net: Seq2SeqNet,
        optimizer: functools.partial | None = None,
        scheduler: dict | None = None,
        compile: bool = False,
        loss: nn.Module | None = None,
        label_smoothing: float = 0.1,
        beam_size: int = 1,
        test_beam_size: int = 4,
        length_penalty: float = 1.0,
        max_len_ratio: float = 1.5,
        max_len_offset: int = 10,
        num_examples: int = 3,
    ) -> None:
        super().__init__(net, optimizer, scheduler, compile)
        self.pad_id = net.config.pad_id
        self.loss_fn = loss
        if loss is not None and hasattr(loss, "ignore_index"):
            loss.ignore_index = self.pad_id
        self.label_smoothing = label_smoothing
        self.beam_size, self.test_beam_size = beam_size, test_beam_size
        self.decode_kwargs = {
            "length_penalty": length_penalty,
            "max_len_ratio": max_len_ratio,
            "max_len_offset": max_len_offset,
        }
        self.num_examples = num_examples
        self.val_ppl = Perplexity(ignore_index=self.pad_id)
        self.test_ppl = Perplexity(ignore_index=self.pad_id)
        # torchmetrics scores are fractions; they are logged x100, on sacrebleu's scale.
        self.val_bleu, self.test_bleu = SacreBLEUScore(), SacreBLEUScore()
        self.val_chrf, self.test_chrf = CHRFScore(n_word_order=0), CHRFScore(n_word_order=0)
        self.examples: list[tuple[str, str, str]] = []

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.net(src, tgt_in)

    def _loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (training loss, plain cross-entropy, logits (B, T, V), targets (B, T))."""
        src, tgt = batch["src"], batch["tgt"]
        logits = self.net(src, tgt[:, :-1])  # (B, T, V): predict each next target token
        y = tgt[:, 1:]
        flat, flat_y = logits.flatten(0, 1).float(), y.flatten()
        nll = F.cross_entropy(flat, flat_y, ignore_index=self.pad_id)
        if self.loss_fn is not None:
            loss = self.loss_fn(flat, flat_y)
        elif self.label_smoothing and self.training:
            loss = F.cross_entropy(
                flat, flat_y, ignore_index=self.pad_id, label_smoothing=self.label_smoothing
            )
        else:
            loss = nll
        return loss, nll, logits, y

    def forward_flops(self, batch) -> int | None:
        """The teacher-forced forward of `_loss`, in the net's closed form (None without one)."""
        if not isinstance(self.net, CountsForwardFlops):
            return None
        src, tgt = batch["src"], batch["tgt"]
        return self.net.forward_flops(src.shape[0], src.shape[1], tgt.shape[1] - 1)

    def eval_flops(self, batch) -> int | None:
        # validation and test also decode (greedy or beam search), whose work no formula here
        # follows: no figure rather than the scoring forward's alone
        return None

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, _, _, _ = self._loss(batch)
        self.log_metric("train/loss", loss, batch, prog_bar=True)
        return loss

    # ---------------------------------------------------------------------- decoding / text
    @property
    def tokenizer(self):
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tok = getattr(dm, "tokenizer", None)
        if tok is None:
            raise RuntimeError("Seq2Seq scores text through the data module's `tokenizer`")
        return tok

    def decode_batch(self, src: torch.Tensor, tokenizer, beam_size: int) -> list[str]:
        ids = self.net.translate(src, beam_size=beam_size, **self.decode_kwargs)
        return [tokenizer.decode(row) for row in ids]

    @torch.no_grad()
    def translate(
        self, texts: list[str], tokenizer, beam_size: int = 4, batch_size: int = 64, **decode_kwargs
    ) -> list[str]:
        """Translate sentences with `tokenizer` (a TokenizerPair); order is kept."""
        was_training = self.training
        self.eval()
        kwargs = {**self.decode_kwargs, **{k: v for k, v in decode_kwargs.items() if v is not None}}
        out: list[str] = []
        for i in range(0, len(texts), batch_size):
            ids = tokenizer.encode_batch(list(texts[i : i + batch_size]))
            src = torch.full((len(ids), max(map(len, ids))), self.pad_id, dtype=torch.long)
            for j, row in enumerate(ids):
                src[j, : len(row)] = torch.tensor(row)
            hyp = self.net.translate(src.to(self.device), beam_size=beam_size, **kwargs)
            out += [tokenizer.decode(row) for row in hyp]
        self.train(was_training)
        return out

    def generate_texts(self, tokenizer, options: Seq2Seq.Generation) -> list[str]:
        """generate.py: the translation of each of `options.text`, in order."""
        return self.translate(
            list(options.text),
            tokenizer,
            beam_size=options.beam_size or 1,
            length_penalty=options.length_penalty,
            max_len_ratio=options.max_len_ratio,
        )

    def _eval_step(self, batch, split: str, beam_size: int) -> None:
        loss, nll, logits, y = self._loss(batch)
        ppl = self.val_ppl if split == "val" else self.test_ppl
        ppl.update(logits.float(), y)
        self.log_metric(f"{split}/loss", nll, batch, prog_bar=split == "val")
        self.log(f"{split}/ppl", ppl, on_epoch=True, prog_bar=split == "val")
        hyps = self.decode_batch(batch["src"], self.tokenizer, beam_size)
        refs = [[r] for r in batch["tgt_text"]]
        (self.val_bleu if split == "val" else self.test_bleu).update(hyps, refs)
        (self.val_chrf if split == "val" else self.test_chrf).update(hyps, refs)
        if split == "val" and len(self.examples) < self.num_examples:
            n = self.num_examples - len(self.examples)
            self.examples += list(
                zip(batch["src_text"][:n], batch["tgt_text"][:n], hyps[:n], strict=True)
            )

    def _log_scores(self, split: str) -> None:
        bleu, chrf = (
            (self.val_bleu, self.val_chrf) if split == "val" else (self.test_bleu, self.test_chrf)
        )
        self.log(f"{split}/bleu", bleu.compute() * 100, prog_bar=split == "val", sync_dist=False)
        self.log(f"{split}/chrf", chrf.compute() * 100, sync_dist=False)
        bleu.reset()
        chrf.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.beam_size)

    def on_validation_epoch_start(self) -> None:
        self.examples = []

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")
        if not self.trainer.sanity_checking:
            self._show_examples()

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_beam_size)

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    @rank_zero_only
    def _show_examples(self) -> None:
        if not self.examples:
            return
        step = self.trainer.global_step
        text = "\n".join(f"src: {s}\nref: {r}\nhyp: {h}\n" for s, r, h in self.examples)
        print(f"\n--- translations at step {step} ---\n{text}---", flush=True)
        if self.trainer.default_root_dir:
            path = Path(self.trainer.default_root_dir) / "samples.txt"
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"--- step {step} ---\n{text}")
        log_text(
            self.trainer.loggers,
            "val/translations",
            text.replace("\n", "  \n"),  # Markdown: a line break per line
            step,
            columns=("source", "reference", "hypothesis"),
            rows=self.examples,
        )
