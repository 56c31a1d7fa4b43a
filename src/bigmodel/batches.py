"""How big a batch is, whatever its layout: a tuple (inputs, targets) or a dict of tensors.

Tasks log metrics weighted by `batch_size`; Lightning's ThroughputMonitor reads both functions
(configs/callbacks/default.yaml) to report samples and tokens per second.
"""

from __future__ import annotations


def batch_size(batch) -> int:
    """Samples in a batch, for Lightning's ThroughputMonitor."""
    first = batch[0] if isinstance(batch, (tuple, list)) else next(iter(batch.values()))
    return int(first.shape[0])


def num_tokens(batch) -> int:
    """Input tokens in a batch (B * T), so ThroughputMonitor reports tokens per second."""
    first = batch[0] if isinstance(batch, (tuple, list)) else next(iter(batch.values()))
    return int(first.numel())
