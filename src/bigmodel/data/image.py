"""Images for classification: `ImageDataModule`, seeded splits, augmentation on the device.

Sources (`source=`, read by `sources/image_files.py`):
- `digits`: scikit-learn's bundled 8x8 digits (1,797 images), no download.
- `folder`: `root/train/<class>/*.png|jpg|jpeg` plus optional `root/val/`, `root/test/` (or
  `root/<class>/` alone); class names from folder names, sorted.
- `mnist`: the standard IDX files (raw or .gz) in `root`.
- `cifar10`: the standard python pickle batches in `root` (or `root/cifar-10-batches-py`).

Images are held in memory as uint8 (N, C, H, W). Scaling to [0, 1], normalisation and
augmentation (random crop with padding, horizontal flip) run on whole batches after they reach the
training device, in `on_after_batch_transfer`: plain torch ops, no torchvision.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from bigmodel.data.base import DataModule
from bigmodel.data.sources.files import (
    check_classes,
    check_held_out,
    check_on_bad_file,
    split_indices,
)
from bigmodel.data.sources.image_files import (
    Split,
    load_cifar10_source,
    load_digits_source,
    load_folder_source,
    load_mnist_source,
)
from bigmodel.errors import UserError

log = logging.getLogger("bigmodel")

SOURCES = ("digits", "folder", "mnist", "cifar10")


# --------------------------------------------------------------------------------- transforms
def random_crop(
    x: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pad by `padding` (zeros) then crop back to the original size at a random offset per image."""
    B, C, H, W = x.shape
    padded = F.pad(x, (padding,) * 4)  # (B, C, H + 2p, W + 2p)
    oy = torch.randint(0, 2 * padding + 1, (B, 1), device=x.device, generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (B, 1), device=x.device, generator=generator)
    rows = (oy + torch.arange(H, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (ox + torch.arange(W, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    b = torch.arange(B, device=x.device)[:, None, None, None]
    c = torch.arange(C, device=x.device)[None, :, None, None]
    return padded[b, c, rows, cols]  # (B, C, H, W)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# -------------------------------------------------------------------------------- the module
class ImageDataModule(DataModule):
    """Image classification data: (images, labels) batches of float (B, C, H, W) and int64 (B,).

    Splits the source does not provide are cut from its training images, stratified by class and
    seeded (`val_fraction`, `test_fraction` of each class).
    """

    learning = "classification"
    summary = "image classification"
    provides = ("num_classes", "in_channels", "image_size")

    def __init__(
        self,
        source: str = "digits",
        root: str | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        batch_size: int = 64,
        normalize: bool = True,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        random_crop_padding: int = 0,
        hflip: bool = False,
        on_bad_file: str = "error",
        cache_dir: str | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
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
        if source not in SOURCES:
            raise UserError(f"data.source={source} is not one of: {', '.join(SOURCES)}")
        check_held_out(val_fraction, test_fraction)
        check_on_bad_file(on_bad_file)
        if image_size is not None and image_size <= 0:
            raise UserError(f"data.image_size must be a positive integer or null, got {image_size}")
        if source == "folder" and image_size is None:
            raise UserError(
                "data.image_size must be set for an image folder (images are resized to it)"
            )
        if source != "digits" and not root:
            raise UserError(f"data.root must point at the {source} files (data=... data.root=DIR)")
        if random_crop_padding < 0:
            raise UserError(f"data.random_crop_padding must be >= 0, got {random_crop_padding}")
        self.source, self.root = source, Path(root).expanduser() if root else None
        self.image_size, self.channels = image_size, channels
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.normalize, self.mean, self.std = normalize, mean, std
        self.random_crop_padding, self.hflip = random_crop_padding, hflip
        self.on_bad_file = on_bad_file
        # an image folder is decoded once into memory-mapped arrays here (null: every run)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.data: dict[str, Split] = {}

    # ------------------------------------------------------------------------------ lifecycle
    def load_source(self) -> dict[str, Split]:
        if self.source == "digits":
            data, self.classes = load_digits_source()
        elif self.source == "mnist":
            data, self.classes = load_mnist_source(self.root)
        elif self.source == "cifar10":
            data, self.classes = load_cifar10_source(self.root)
        else:
            data, self.classes, self.channels = load_folder_source(
                self.root, self.image_size, self.channels, self.on_bad_file, self.cache_dir
            )
        return data

    def build(self) -> None:
        data = self.load_source()
        self.data = self.make_splits(data)
        x = self.data["train"][0]
        if self.image_size is None:
            self.image_size = int(x.shape[-1])
        elif x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            self.data = {k: (resize(v[0], self.image_size), v[1]) for k, v in self.data.items()}
        self.channels = int(self.data["train"][0].shape[1])
        self.check_saved_classes()
        if self.normalize and (self.mean is None or self.std is None):
            xf = self.data["train"][0].float() / 255
            self.mean = xf.mean(dim=(0, 2, 3)).tolist()
            self.std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
        sizes = ", ".join(f"{k} {len(v[1])}" for k, v in self.data.items())
        log.info(
            f"{self.source}: {len(self.classes)} classes, {self.channels}x{self.image_size}x"
            f"{self.image_size} images ({sizes})"
        )

    def make_splits(self, data: dict[str, Split]) -> dict[str, Split]:
        pool = data.get("all") or data["train"]
        missing = [s for s in ("val", "test") if s not in data]
        fractions = [self.val_fraction if s == "val" else self.test_fraction for s in missing]
        parts = split_indices(pool[1].numpy(), fractions, self.seed)
        out = {"train": (pool[0][parts[0]], pool[1][parts[0]])}
        for s in ("val", "test"):
            if s in data:
                out[s] = data[s]
            else:
                i = parts[1 + missing.index(s)]
                out[s] = (pool[0][i], pool[1][i])
        for s in ("train", "val"):
            if len(out[s][1]) == 0:
                raise UserError(f"the {s} split is empty; add images or raise data.val_fraction")
        check_classes(
            sorted({self.classes[int(i)] for i in out["train"][1].unique()}), "the training split"
        )
        return out

    @property
    def net_kwargs(self) -> dict:
        """What a net needs to know that only the data can tell."""
        if not self.data:
            raise RuntimeError("call setup() first")
        return {
            "num_classes": len(self.classes),
            "in_channels": self.channels,
            "image_size": self.image_size,
        }

    # ---------------------------------------------------------------------------- dataloaders
    def dataset(self, split: str) -> TensorDataset:
        if len(self.data[split][1]) == 0:
            raise UserError(
                f"the {split} split is empty; raise data.{split}_fraction or add images"
            )
        return TensorDataset(*self.data[split])

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 -> float in [0, 1], augmentation (training only), normalisation: on the device."""
        x, y = batch
        x = x.float() / 255  # (B, C, H, W)
        if self.trainer is not None and self.trainer.training:
            if self.random_crop_padding > 0:
                x = random_crop(x, self.random_crop_padding)
            if self.hflip:
                x = random_hflip(x)
        if self.normalize:
            mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x, y

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "mean": self.mean,
            "std": self.std,
            "image_size": self.image_size,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.normalize and state.get("mean") is not None:
            self.mean, self.std = list(state["mean"]), list(state["std"])
        if self.image_size is None and state.get("image_size"):
            self.image_size = int(state["image_size"])


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), bilinear with antialiasing, in chunks."""
    out = []
    for chunk in images.split(4096):
        y = F.interpolate(
            chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out.append(y.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images
