"""Print and log a short generated sample after each validation, to see what the model learned."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from bigmodel.console import printable
from bigmodel.errors import UserError
from bigmodel.media import log_text
from bigmodel.sampling import check_sampling

log = logging.getLogger("bigmodel")


class TextSample(L.Callback):
    """After validation, sample `max_new_tokens` from `prompt` with the task's `generate_text`.

    The sample is printed, appended to `<run dir>/samples.txt` and sent to loggers with a text API
    (W&B, TensorBoard). Tasks without `generate_text`, or data without a tokenizer, are skipped.
    A prompt the vocabulary cannot encode (a newline in a corpus without one) falls back to the
    empty prompt's start token, or skips the sample, with a warning: sampling never ends a run.
    Every rank samples (the same text, from the same seed), because under sharded strategies
    (FSDP, FSDP2, ZeRO-3) each forward pass gathers weights from all ranks; rank 0 reports it.
    """

    def __init__(
        self,
        prompt: str = "\n",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = 50,
        seed: int = 0,
        every_n_validations: int = 1,
    ) -> None:
        # Bad settings are a config error, reported before training rather than at the sample.
        check_sampling(temperature, top_k, max_new_tokens, prefix="callbacks.text_sample.")
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.every_n_validations = max(1, every_n_validations)
        self.validations = 0
        self._warned: set[str] = set()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if trainer.sanity_checking or tokenizer is None or not hasattr(pl_module, "generate_text"):
            return
        self.validations += 1
        last = 0 < trainer.max_steps <= trainer.global_step  # always show the final model
        if (self.validations - 1) % self.every_n_validations and not last:
            return
        text = self._sample(pl_module, tokenizer)
        if text is None or not trainer.is_global_zero:
            return
        step = trainer.global_step
        text = printable(text)  # control characters escaped: any byte is a BPE token
        print(f"\n--- sample at step {step} ---\n{text}\n---", flush=True)
        if trainer.default_root_dir:
            with open(Path(trainer.default_root_dir) / "samples.txt", "a", encoding="utf-8") as f:
                f.write(f"--- step {step} ---\n{text}\n")
        log_text(trainer.loggers, "val/sample", text, step)

    def _sample(self, pl_module: L.LightningModule, tokenizer) -> str | None:
        """The sample from `prompt`, else from the start token, else None; warns once per cause."""
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "seed": self.seed,
        }
        try:
            return pl_module.generate_text(self.prompt, tokenizer, **kwargs)[0]
        except UserError as e:
            problem = f"callbacks.text_sample.prompt={self.prompt!r}: {e}"
        except RuntimeError as e:  # a diverged model: non-finite logits cannot be sampled
            self._warn_once(f"no text sample at this validation: {str(e).splitlines()[0][:200]}")
            return None
        if self.prompt:
            try:
                text = pl_module.generate_text("", tokenizer, **kwargs)[0]
            except UserError as e:
                problem += f"; the empty prompt: {e}"
            else:
                self._warn_once(f"{problem}; sampling from the empty prompt's start token instead")
                return text
        self._warn_once(f"{problem}; skipping the text samples")
        return None

    @rank_zero_only
    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning(message)
