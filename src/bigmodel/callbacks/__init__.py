"""Callbacks Lightning does not already ship, and helpers for the ones it does."""

# first: every command that builds a Trainer imports this package; Lightning's log lines go
# through Hydra's logging from here on (see bigmodel.console)
import bigmodel.console  # noqa: F401  isort: skip
from bigmodel.callbacks.text_sample import TextSample

__all__ = ["TextSample", "batch_size", "num_tokens"]


def batch_size(batch) -> int:
    """Samples in a batch, for Lightning's ThroughputMonitor."""
    first = batch[0] if isinstance(batch, (tuple, list)) else next(iter(batch.values()))
    return int(first.shape[0])


def num_tokens(batch) -> int:
    """Input tokens in a batch (B * T), so ThroughputMonitor reports tokens per second."""
    first = batch[0] if isinstance(batch, (tuple, list)) else next(iter(batch.values()))
    return int(first.numel())
