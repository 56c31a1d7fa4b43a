"""Images for classification: sources, seeded splits, and normalisation / augmentation by config.

Sources (`source=`):
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

import gzip
import logging
import os
import pickle
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bigmodel.data.resumable import ResumableLoader, eval_loader, loader_kwargs, train_loader
from bigmodel.errors import UserError

log = logging.getLogger("bigmodel")

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F", "P;gray"}
SOURCES = ("digits", "folder", "mnist", "cifar10")


# ---------------------------------------------------------------------------- shared helpers
def split_indices(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Stratified, seeded split of range(len(labels)) into len(fractions) + 1 parts: the parts
    take `fractions` of each class, the first (train) part takes the rest."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for k, frac in enumerate(fractions):
            n = int(round(frac * len(idx)))
            parts[k + 1].append(idx[start : start + n])
            start += n
        parts[0].append(idx[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def class_folders(folder: Path, what: str) -> list[Path]:
    """Sub-folders of `folder`, one per class (hidden and `_`-prefixed ones skipped), sorted."""
    subdirs = sorted(
        d for d in folder.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))
    )
    if not subdirs:
        raise UserError(f"{folder} has no class folders; put the {what} in {folder}/<class name>/")
    return subdirs


def check_classes(classes: list[str], where: str) -> None:
    if len(classes) < 2:
        raise UserError(
            f"{where} has only one class ({', '.join(classes)}); classification needs at least two "
            "class folders"
        )


def handle_bad_file(path: Path, err: Exception, on_bad_file: str, kind: str) -> None:
    """Fail with the file's path (`on_bad_file=error`) or warn and go on (`skip`)."""
    msg = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    if on_bad_file == "skip":
        log.warning(f"skipping unreadable {kind} file {path} ({msg})")
        return
    raise UserError(
        f"cannot read {kind} file {path} ({msg}); fix or delete it, or set data.on_bad_file=skip"
    )


def check_common(
    batch_size: int, val_fraction: float, test_fraction: float, on_bad_file: str, split: str
) -> None:
    if batch_size is None or batch_size <= 0:
        raise UserError(f"data.batch_size must be a positive integer, got {batch_size}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be in "
            "[0, 1) and sum to less than 1"
        )
    if on_bad_file not in ("error", "skip"):
        raise UserError(f"data.on_bad_file={on_bad_file} is not one of: error, skip")
    if split not in SPLITS:
        raise UserError(f"data.split={split} is not one of {', '.join(SPLITS)}")


# ------------------------------------------------------------------------------------ sources
Split = tuple[torch.Tensor, torch.Tensor]  # images uint8 (N, C, H, W), labels int64 (N,)


def load_digits_source() -> tuple[dict[str, Split], list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # 17 grey levels (0..16) -> distinct uint8 values, so nothing is lost.
    images = torch.from_numpy(np.round(d.images * (255 / 16)).astype(np.uint8))[
        :, None
    ]  # (N, 1, 8, 8)
    return {"all": (images, torch.from_numpy(d.target.astype(np.int64)))}, [
        str(i) for i in range(10)
    ]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), raw or gzipped, as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"magic number {data[:4].hex()} is not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if arr.size != int(np.prod(shape)):
            raise ValueError(f"holds {arr.size} values, its header says {shape}")
        return arr.reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise UserError(
            f"cannot read the IDX file {path} ({type(e).__name__}: {e}); replace it with an intact "
            "copy of the MNIST files"
        ) from None


MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_mnist_file(root: Path, stem: str) -> Path:
    for d in (root, root / "raw", root / "MNIST" / "raw"):
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
            if (d / name).is_file():
                return d / name
    raise UserError(
        f"MNIST file {stem}[.gz] not found in data.root={root}; put the four standard MNIST files "
        "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        f"t10k-labels-idx1-ubyte, raw or .gz) in {root}: nothing is downloaded at run time"
    )


def load_mnist_source(root: Path) -> tuple[dict[str, Split], list[str]]:
    out = {}
    for split, (img_stem, lab_stem) in MNIST_FILES.items():
        images, labels = (
            read_idx(_find_mnist_file(root, img_stem)),
            read_idx(_find_mnist_file(root, lab_stem)),
        )
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(
                f"MNIST {split} files in {root} disagree: images {images.shape}, labels "
                f"{labels.shape}; replace them with intact copies"
            )
        out[split] = (
            torch.from_numpy(images.copy())[:, None],
            torch.from_numpy(labels.astype(np.int64)),
        )
    return out, [str(i) for i in range(10)]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle the CIFAR batches (dicts of numpy arrays) without running arbitrary code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UserError(
            f"cannot read the CIFAR batch {path} ({type(e).__name__}: {e}); replace it with an "
            "intact copy of cifar-10-batches-py"
        ) from None
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def load_cifar10_source(root: Path) -> tuple[dict[str, Split], list[str]]:
    base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    missing = [n for ns in names.values() for n in ns if not (base / n).is_file()]
    if missing:
        raise UserError(
            f"CIFAR-10 batches {', '.join(missing)} not found in {base}; extract the python "
            f"version of CIFAR-10 (cifar-10-python.tar.gz) into data.root={root}: nothing is "
            "downloaded at run time"
        )
    out = {}
    for split, files in names.items():
        xs, ys = [], []
        for n in files:
            d = _load_pickle(base / n)
            if "data" not in d or "labels" not in d:
                raise UserError(
                    f"{base / n} has no data/labels entries; it is not a CIFAR-10 batch"
                )
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d["labels"], dtype=np.int64))
        out[split] = (torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))
    classes = [str(i) for i in range(10)]
    if (base / "batches.meta").is_file():
        meta = _load_pickle(base / "batches.meta")
        names_ = meta.get("label_names")
        if names_ is not None:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names_]
    return out, classes


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    )


def load_folder_source(
    root: Path, image_size: int, channels: int | None, on_bad_file: str
) -> tuple[dict[str, Split], list[str], int]:
    from PIL import Image

    if not root.is_dir():
        raise UserError(
            f"data.root={root} is not a folder; point it at DIR with DIR/train/<class>/*.png "
            "(or DIR/<class>/*.png)"
        )
    layout = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if "train" not in layout:
        layout = {"all": root}
    train_dir = layout.get("train", root)
    classes = [d.name for d in class_folders(train_dir, "images")]
    check_classes(classes, str(train_dir))
    files: dict[str, list[tuple[Path, int]]] = {}
    for split, folder in layout.items():
        dirs = class_folders(folder, "images")
        unknown = [d.name for d in dirs if d.name not in classes]
        if unknown:
            raise UserError(
                f"{folder} has class folders {unknown} that {train_dir} lacks; every class needs "
                "training images"
            )
        files[split] = []
        for d in dirs:
            found = _image_files(d)
            if not found and split in ("train", "all"):
                raise UserError(
                    f"class folder {d} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add "
                    "images or remove the folder"
                )
            files[split] += [(f, classes.index(d.name)) for f in found]

    def mode(path: Path) -> str | None:
        try:
            with Image.open(path) as im:
                return im.mode
        except Exception as e:  # PIL raises many kinds on bad files
            handle_bad_file(path, e, on_bad_file, "image")
            return None

    all_files = [f for fs in files.values() for f, _ in fs]
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        modes = dict(zip(all_files, pool.map(mode, all_files), strict=True))
    if channels is None:  # grayscale only when every image is
        channels = 1 if all(m in GRAY_MODES for m in modes.values() if m is not None) else 3
    if channels not in (1, 3):
        raise UserError(f"data.channels={channels} must be 1 (grayscale), 3 (RGB) or null (detect)")

    def decode(path: Path) -> np.ndarray | None:
        if modes.get(path) is None:
            return None
        try:
            with Image.open(path) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                im = im.resize((image_size, image_size), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except Exception as e:
            handle_bad_file(path, e, on_bad_file, "image")
            return None
        return a[None] if channels == 1 else a.transpose(2, 0, 1)  # (C, H, W)

    out: dict[str, Split] = {}
    for split, fs in files.items():
        with ThreadPoolExecutor(workers) as pool:
            arrays = list(pool.map(decode, [f for f, _ in fs]))
        keep = [(a, y) for a, (_, y) in zip(arrays, fs, strict=True) if a is not None]
        if split in ("train", "all"):
            empty = sorted(set(range(len(classes))) - {y for _, y in keep})
            if empty:
                raise UserError(
                    f"class folder {train_dir / classes[empty[0]]} has no readable images; add "
                    "images or remove the folder"
                )
        images = (
            np.stack([a for a, _ in keep])
            if keep
            else np.zeros((0, channels, image_size, image_size), np.uint8)
        )
        labels = np.array([y for _, y in keep], dtype=np.int64)
        out[split] = (torch.from_numpy(images), torch.from_numpy(labels))
    return out, classes, channels


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
class ImageDataModule(L.LightningDataModule):
    """Image classification data: (images, labels) batches of float (B, C, H, W) and int64 (B,).

    Splits the source does not provide are cut from its training images, stratified by class and
    seeded (`val_fraction`, `test_fraction` of each class).
    """

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
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 1337,
        split: str = "test",
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise UserError(f"data.source={source} is not one of: {', '.join(SOURCES)}")
        check_common(batch_size, val_fraction, test_fraction, on_bad_file, split)
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
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.normalize, self.mean, self.std = normalize, mean, std
        self.random_crop_padding, self.hflip = random_crop_padding, hflip
        self.on_bad_file, self.seed, self.split = on_bad_file, seed, split
        self.data: dict[str, Split] = {}
        self.classes: list[str] = []
        self._saved_classes: list[str] | None = None

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
                self.root, self.image_size, self.channels, self.on_bad_file
            )
        return data

    def setup(self, stage: str | None = None) -> None:
        if self.data:  # idempotent: run.py sets up before building the model, Lightning again
            return
        data = self.load_source()
        self.data = self.make_splits(data)
        x = self.data["train"][0]
        if self.image_size is None:
            self.image_size = int(x.shape[-1])
        elif x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            self.data = {k: (resize(v[0], self.image_size), v[1]) for k, v in self.data.items()}
        self.channels = int(self.data["train"][0].shape[1])
        if self._saved_classes is not None and self._saved_classes != self.classes:
            raise UserError(
                f"the checkpoint was trained on classes {self._saved_classes}, this data has "
                f"{self.classes}; evaluate on data with the same classes"
            )
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
    def train_dataloader(self) -> ResumableLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.split)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.split)

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader | ResumableLoader:
        if len(self.data[split][1]) == 0:
            raise UserError(
                f"the {split} split is empty; raise data.{split}_fraction or add images"
            )
        ds = TensorDataset(*self.data[split])
        kwargs = loader_kwargs(self.batch_size, self.num_workers, self.pin_memory)
        if shuffle:  # training: a seeded order per epoch that resumes mid-epoch
            return train_loader(self, ds, shuffle=True, seed=self.seed, **kwargs)
        return eval_loader(ds, **kwargs)

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
            "classes": list(self.classes),
            "mean": self.mean,
            "std": self.std,
            "image_size": self.image_size,
        }

    def load_state_dict(self, state: dict) -> None:
        self._saved_classes = list(state.get("classes") or []) or None
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
