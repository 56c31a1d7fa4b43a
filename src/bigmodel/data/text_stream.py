"""Language modelling from token shards, on disk or in object storage: `TextStreamDataModule`.

    python -m bigmodel.prepare_data source=corpus/ out=shards
    python train.py data=text_stream data.path=shards            # or data.path=s3://bucket/shards

The shards are litdata's (`python -m bigmodel.prepare_data` writes them with `litdata.optimize`)
and are read with litdata's `StreamingDataset` / `StreamingDataLoader`: only the chunks being read
are on local disk (downloaded ahead into `cache_dir` from s3://), so a corpus of any size trains
in bounded memory. litdata cuts each chunk into windows of block_size + 1 tokens (x and its
next-token targets y), shuffles chunk order and windows within the chunks being read (seeded,
per epoch), gives each DDP rank and each loader worker its own part, and keeps the position in
the stream in the loader's state: Lightning saves it in checkpoints, so a resumed run reads the
windows the stopped one had not read yet, bit for bit.

Validation holds out whole shards holding at least `val_fraction` of the windows (drawn with the
run's seed), or reads another shard folder (`val_path`). `test` (what
eval.py scores) is the validation set.

Before training, every chunk the index lists is checked to be there at its size (a missing or
cut-short shard is named, not met at step 40,000), the bucket is reached with a short timeout,
and the shards' tokenizer is checked against `tokenizer` (and a checkpoint's).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel.data.base import DataModule
from bigmodel.data.shards import check_shards, is_remote, litdata, tokens_in
from bigmodel.data.tokenizers import BPETokenizer, tokenizer_from_dict
from bigmodel.errors import UserError

log = logging.getLogger("bigmodel")


def collate_windows(items: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of block_size + 1 token ids -> (x, y), int64."""
    w = torch.from_numpy(np.stack(items).astype(np.int64))
    return w[:, :-1], w[:, 1:]


def plain(tree: Any) -> Any:
    """litdata's state with numpy scalars as Python numbers: checkpoints hold plain data only
    (torch.load(..., weights_only=True) must read them)."""
    if isinstance(tree, dict):
        return {k: plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(plain(v) for v in tree)
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


def _loader_class():
    StreamingDataLoader = litdata().StreamingDataLoader  # noqa: N806

    class ShardLoader(StreamingDataLoader):
        """litdata's loader, with a resume state that does not fit refused in one line before
        training (litdata raises it from inside the first batch)."""

        _resumed = False  # an iteration has begun from a restored state

        def __iter__(self):
            # litdata ends a restored iteration's `restore` only when the iteration runs out;
            # Lightning stops after the epoch's last batch (it knows the length) without running
            # it out, and the next epoch would replay the old state. Ended here instead.
            if self.restore and self._resumed:
                self.restore = False
            self._resumed = self.restore
            yield from super().__iter__()

        def state_dict(self) -> dict[str, Any]:
            return plain(super().state_dict())

        def load_state_dict(self, obj: dict[str, Any]) -> None:
            state, ds = obj.get("dataset") or {}, self.dataset
            env = ds.distributed_env
            checks = [
                ("world_size", env.world_size, "training processes (trainer.devices x num_nodes)"),
                ("num_workers", self.num_workers or 1, "loader workers (data.num_workers)"),
                ("shuffle", ds.shuffle, "shuffle setting (data.shuffle)"),
                ("seed", ds.seed, "seed"),
                ("item_loader", ds.item_loader.state_dict(), "window (model.net.block_size)"),
                ("subsampled_files", ds.subsampled_files, "training shards (data.val_fraction)"),
            ]
            for key, now, what in checks:
                if key in state and state[key] != now:
                    then = state[key] if not isinstance(now, list) else f"{len(state[key])} files"
                    now_ = now if not isinstance(now, list) else f"{len(now)} files"
                    raise UserError(
                        f"the checkpoint read the shards with another {what}: {then}, this run "
                        f"{now_}; resume with the settings it was trained with"
                    )
            for key in ("input_dir_path", "input_dir_url"):
                if state.get(key) != getattr(ds.input_dir, key.split("_")[-1]):
                    raise UserError(
                        f"the checkpoint was trained from {state.get(key)}, this run reads "
                        f"{getattr(ds.input_dir, key.split('_')[-1])}; resume with the same "
                        "data.path (and data.cache_dir)"
                    )
            super().load_state_dict(obj)
            self._resumed = False

    return ShardLoader


def held_out(per_chunk: dict[str, int], fraction: float, seed: int) -> set[str]:
    """Whole shards for validation, drawn in an order fixed by the seed until they hold at least
    `fraction` of the windows (at least one shard, never all of them)."""
    import random

    names = sorted(per_chunk)
    random.Random(seed).shuffle(names)
    total, held, chosen = sum(per_chunk.values()), 0, set()
    for name in names[:-1]:
        if held >= fraction * total and chosen:
            break
        chosen.add(name)
        held += per_chunk[name]
    return chosen


class TextStreamDataModule(DataModule):
    """Token shards (python -m bigmodel.prepare_data) -> (x, y) windows, streamed by litdata."""

    learning = "language modelling"
    summary = "language-modelling token shards"
    provides = ("vocab_size",)

    def __init__(
        self,
        path: str | None = None,
        val_path: str | None = None,
        val_fraction: float = 0.05,
        tokenizer: str | None = None,
        block_size: int = 64,
        batch_size: int = 12,
        shuffle: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
        cache_dir: str | None = None,
        max_cache_gb: float = 50.0,
        seed: int = 1337,
        split: str = "test",
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
            split=split,
        )
        if block_size is None or block_size <= 0:
            raise UserError(f"the block size must be a positive integer, got {block_size}")
        if val_path is None and not 0 < val_fraction < 1:
            raise UserError(
                f"data.val_fraction={val_fraction} must be between 0 and 1 (exclusive), or give "
                "data.val_path=SHARDS for a validation set of its own"
            )
        self.path, self.val_path = str(path or "").rstrip("/"), val_path
        self.val_fraction, self.tokenizer_dir = val_fraction, tokenizer
        self.block_size, self.shuffle = block_size, shuffle
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.max_cache_gb = max_cache_gb
        self.manifest: dict[str, Any] = {}
        self.windows: dict[str, int] = {}
        self.val_chunks: set[str] = set()  # the shards of path held out for validation

    # ------------------------------------------------------------------------------ lifecycle
    def build(self) -> None:
        if not self.path:
            raise UserError(
                "data=text_stream needs data.path: a shard folder or s3://bucket/prefix written "
                "by python -m bigmodel.prepare_data source=YOUR_TEXT out=SHARDS"
            )
        litdata()  # installed: checked before anything is read
        window = self.block_size + 1
        manifest, index = check_shards(self.path)
        if manifest.get("window") not in (None, window):
            raise UserError(
                f"the shards in {self.path} are packed into windows of {manifest['window']} "
                f"tokens (pack=bos), and this model reads block_size + 1 = {window}; set "
                f"model.net.block_size={manifest['window'] - 1} or prepare them again"
            )
        tokens, windows = tokens_in(index, window)
        shards = tokenizer_from_dict(manifest["tokenizer"])
        if self.tokenizer_dir:
            wanted = BPETokenizer.from_folder(self.tokenizer_dir)
            if wanted.to_dict() != shards.to_dict():
                raise UserError(
                    f"the shards in {self.path} were tokenized with another tokenizer than "
                    f"data.tokenizer={self.tokenizer_dir}; prepare them with it "
                    f"(python -m bigmodel.prepare_data ... tokenizer={self.tokenizer_dir}) or "
                    "leave data.tokenizer unset to use theirs"
                )
        if self.val_path:
            val_manifest, val_index = check_shards(self.val_path)
            if val_manifest["tokenizer"] != manifest["tokenizer"]:
                raise UserError(
                    f"data.val_path={self.val_path} was tokenized with another tokenizer than "
                    f"data.path={self.path}; prepare both with the same one"
                )
            self.windows = {"train": windows, "val": tokens_in(val_index, window)[1]}
        else:
            per_chunk = {c["filename"]: int(c["dim"]) // window for c in index["chunks"]}
            self.val_chunks = held_out(per_chunk, self.val_fraction, self.seed)
            held = sum(per_chunk[f] for f in self.val_chunks)
            self.windows = {"train": windows - held, "val": held}
        for split in ("train", "val"):
            if self.windows[split] < 1:
                where = self.val_path if split == "val" and self.val_path else self.path
                raise UserError(
                    f"the {split} split of {where} "
                    f"has {self.windows[split]} windows of block_size + 1 = {window} tokens "
                    f"({tokens} tokens in all, cut into windows shard by shard); use a larger "
                    "corpus, a smaller model.net.block_size, smaller shards (prepare_data "
                    "chunk_tokens=), another data.val_fraction, or data.val_path=SHARDS"
                )
        unread = 1 - windows * window / max(tokens, 1)
        log.info(
            f"{self.path}: {tokens:,} tokens in {len(index['chunks'])} shards, "
            f"{windows:,} windows of {window} tokens ({unread:.1%} of the tokens, at shard ends, "
            f"in no window); {self.windows['train']:,} train, {self.windows['val']:,} val"
        )
        self.manifest = manifest
        self.tokenizer = shards  # a checkpoint's tokenizer is compared with it (base.py)

    @property
    def vocab_size(self) -> int:
        if self.tokenizer is None:
            raise RuntimeError("call setup() first: the vocabulary comes from the shards")
        return self.tokenizer.vocab_size

    @property
    def net_kwargs(self) -> dict:
        return {"vocab_size": self.vocab_size}

    # ------------------------------------------------------------------------------ datasets
    def _streaming(self, path: str, shuffle: bool):
        """litdata's StreamingDataset over a shard folder, cut into block_size + 1 windows.

        Made when a loader is asked for, not in build(): litdata reads the DDP world from the
        process group, which Lightning starts after the data is set up."""
        ld = litdata()
        cache = None
        if is_remote(path):
            root = self.cache_dir or Path(".cache")
            cache = str(root / "shards" / hashlib.sha1(path.encode()).hexdigest()[:16])
        return ld.StreamingDataset(
            path,
            cache_dir=cache,
            item_loader=ld.TokensLoader(block_size=self.block_size + 1),
            shuffle=shuffle,
            drop_last=True,
            seed=self.seed,
            max_cache_size=f"{self.max_cache_gb}GB",
        )

    def dataset(self, split: str):
        if split == "train":
            return self._split(self.shuffle, 0)
        if self.val_path:
            return self._streaming(self.val_path, False)
        return self._split(False, 1)

    def _split(self, shuffle: bool, which: int):
        """Training (0) or validation (1) shards of `path`: whole shards, as `held_out` chose.

        litdata's own `train_test_split` can cut a shard between the two, and a cut shard read by
        several loader workers with shuffling crashes them (litdata 0.2.44); whole shards do not.
        """
        ds = self._streaming(self.path, shuffle)
        if self.val_path:
            return ds
        keep = [
            i for i, f in enumerate(ds.subsampled_files) if (f in self.val_chunks) == (which == 1)
        ]
        ds.subsampled_files = [ds.subsampled_files[i] for i in keep]
        ds.region_of_interest = [ds.region_of_interest[i] for i in keep]
        ds.reset()
        return ds

    # ---------------------------------------------------------------------------- dataloaders
    def _loader(self, dataset, seed: int):
        return _loader_class()(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate_windows,
            # the loader's base-seed draw comes from its own generator, not the global ones
            generator=torch.Generator().manual_seed(seed),
        )

    def train_dataloader(self):
        # litdata gives each worker its own part of the stream, so the length is right
        warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__`")
        return self._loader(self.dataset("train"), self.seed)

    def val_dataloader(self):
        return self._loader(self.dataset("val"), 0)

    def test_dataloader(self):
        return self._loader(self.dataset("val"), 0)
