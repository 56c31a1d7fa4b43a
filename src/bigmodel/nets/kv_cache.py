"""Key/value caches of the decoder (bigmodel.nets.gpt): what a layer's attention appends its
keys and values to while decoding, so that each new token runs alone over the cached prefix.

- `KVCache`: allocated once for a batch and a number of positions, written in place (PyTorch
  decoding: generate.py, the server, the text samples).
- `RollingKVCache`: the same for a sliding-window net (Mistral v0.1) decoding past its window:
  only the last `window` positions are kept, in a ring of slots, so decoding goes on for any
  number of tokens in the memory of the window.
- `PastKV`: given as tensors and grown by concatenation, without in-place writes: the form an
  exported decoding graph takes its cache in and gives it back (bigmodel.deploy.graphs).

Both have `append(layer, k, v) -> (all keys, all values)` of that layer, `length` (positions
held before this step) and `empty` (a Python bool, also while a graph is traced).
"""

from __future__ import annotations

import torch


class KVCache:
    """The keys and values of every layer for up to `size` positions of a batch, allocated once
    (a static cache: no reallocation per token). Holds (n_layer, B, n_kv_head, size, head_dim)
    each, so grouped-query models keep only the key/value heads they have: 2 x n_layer x
    n_kv_head x head_dim values per token."""

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        size: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layer, batch, n_kv_head, size, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.size, self.length = size, 0  # positions held; the model advances `length`

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, nkv, T, hs) after the `length` positions held -> all keys and values
        of the layer so far, (B, nkv, length + T, hs) each."""
        end = self.length + k.shape[2]
        if end > self.size:
            raise ValueError(f"the cache holds {self.size} positions; {end} were asked")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    @property
    def empty(self) -> bool:
        return self.length == 0

    def bytes_per_token(self) -> int:
        n_layer, batch, n_kv, _, hs = self.k.shape
        return 2 * n_layer * n_kv * hs * self.k.element_size()


class RollingKVCache(KVCache):
    """A static cache of `min(window, size)` slots taking up to `size` positions: position p is
    written to slot p % slots, over position p - window, which sliding-window attention no
    longer sees. A decoding step attends to every filled slot: they hold exactly the window
    (attention does not care in which order its keys come; each key was rotated at its own
    absolute position when it was computed).

    It takes a prefill (an empty cache, any number of positions: attention runs over the new
    keys themselves, under the net's sliding-window mask, and the last slots' worth is kept),
    then one position at a time; rows without left padding (bigmodel.sampling keeps padded
    batches within block_size), since the slots carry no padding mask."""

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        size: int,
        head_dim: int,
        window: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(n_layer, batch, n_kv_head, min(window, size), head_dim, device, dtype)
        self.slots, self.size = min(window, size), size  # memory; positions it takes in all

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        T, past = k.shape[2], self.length
        if past + T > self.size:
            raise ValueError(f"the cache takes {self.size} positions; {past + T} were asked")
        if past == 0:  # the prefill: its own keys; the last slots' worth is kept
            keep = min(T, self.slots)
            where = torch.arange(T - keep, T, device=k.device) % self.slots
            self.k[layer].index_copy_(2, where, k[:, :, T - keep :])
            self.v[layer].index_copy_(2, where, v[:, :, T - keep :])
            return k, v
        if T != 1:
            raise ValueError("a rolling cache takes a prefill, then one position at a time")
        slot = past % self.slots
        self.k[layer, :, :, slot : slot + 1] = k
        self.v[layer, :, :, slot : slot + 1] = v
        filled = min(past + 1, self.slots)
        return self.k[layer, :, :, :filled], self.v[layer, :, :, :filled]


class PastKV:
    """A cache given as tensors and grown by concatenation, without in-place writes: the form
    an exported decoding graph takes and returns (bigmodel.deploy.graphs). k, v: every layer's
    keys and values so far, (n_layer, B, n_kv_head, P, head_dim) each, or None (empty)."""

    def __init__(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> None:
        self.past_k, self.past_v = k, v
        self.length = 0 if k is None else k.shape[3]
        self.empty = k is None  # a Python bool, also while a graph is traced
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.past_k is not None:
            k = torch.cat([self.past_k[layer], k], dim=2)  # (B, nkv, P + T, hs)
            v = torch.cat([self.past_v[layer], v], dim=2)
        self.keys.append(k)
        self.values.append(v)
        return k, v

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's keys and values with this step's: (n_layer, B, nkv, P + T, hs) each."""
        return torch.stack(self.keys), torch.stack(self.values)
