"""Callbacks Lightning does not already ship, and helpers for the ones it does."""

# first: every command that builds a Trainer imports this package; Lightning's log lines go
# through Hydra's logging from here on (see bigmodel.console)
import bigmodel.console  # noqa: F401  isort: skip
from bigmodel.batches import batch_size, num_tokens  # configs of older runs name them here
from bigmodel.callbacks.text_sample import TextSample

__all__ = ["TextSample", "batch_size", "num_tokens"]
