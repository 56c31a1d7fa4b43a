"""Image files as uint8 (N, C, H, W) tensors: sklearn digits, MNIST IDX, CIFAR-10 pickles, folders.

Each `load_*_source` returns ({split: (images, labels)}, class names); a source without a
validation or test split returns what it has ("train" and "test", or "all").
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bigmodel.data.sources.decoded import cached_arrays
from bigmodel.data.sources.files import handle_bad_file, scan_class_folders
from bigmodel.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F", "P;gray"}

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


def load_folder_source(
    root: Path,
    image_size: int,
    channels: int | None,
    on_bad_file: str,
    cache_dir: Path | None = None,
) -> tuple[dict[str, Split], list[str], int]:
    """Images of class folders (see `scan_class_folders`) resized to image_size x image_size
    -> (splits, classes, channels): 1 when every image is grayscale, else 3, unless given.

    Decoded once: with a cache_dir, later runs memory-map the arrays (`decoded.cached_arrays`).
    """
    if not root.is_dir():
        raise UserError(
            f"data.root={root} is not a folder; point it at DIR with DIR/train/<class>/*.png "
            "(or DIR/<class>/*.png)"
        )
    files, classes = scan_class_folders(root, IMAGE_SUFFIXES, "images")
    train_dir = root / "train" if "train" in files else root
    all_files = [f for fs in files.values() for f, _ in fs]
    params = {"image_size": image_size, "channels": channels, "on_bad_file": on_bad_file}
    params["splits"] = {s: len(fs) for s, fs in files.items()}

    def decode() -> tuple[dict[str, np.ndarray], dict]:
        return decode_folder(files, image_size, channels, on_bad_file)

    arrays, meta = cached_arrays(cache_dir, "image_folder", all_files, params, decode)
    if meta["skipped"] and meta.get("cached"):  # reported file by file when decoded
        log.warning(
            f"{meta['skipped']} unreadable images were skipped when the folder was decoded "
            "(on_bad_file=skip); they stay out until the folder changes"
        )
    out: dict[str, Split] = {}
    for split in files:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if split in ("train", "all"):
            empty = sorted(set(range(len(classes))) - set(np.unique(labels).tolist()))
            if empty:
                raise UserError(
                    f"class folder {train_dir / classes[empty[0]]} has no readable images; add "
                    "images or remove the folder"
                )
        out[split] = (torch.from_numpy(images), torch.from_numpy(labels))
    return out, classes, int(meta["channels"])


def decode_folder(
    files: dict[str, list[tuple[Path, int]]],
    image_size: int,
    channels: int | None,
    on_bad_file: str,
) -> tuple[dict[str, np.ndarray], dict]:
    """Every readable image, resized -> ({<split>_images (N, C, H, W), <split>_labels (N,)},
    {"channels": C, "skipped": number of unreadable files})."""
    from PIL import Image

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

    arrays: dict[str, np.ndarray] = {}
    skipped = 0
    for split, fs in files.items():
        with ThreadPoolExecutor(workers) as pool:
            decoded = list(pool.map(decode, [f for f, _ in fs]))
        keep = [(a, y) for a, (_, y) in zip(decoded, fs, strict=True) if a is not None]
        skipped += len(fs) - len(keep)
        arrays[f"{split}_images"] = (
            np.stack([a for a, _ in keep])
            if keep
            else np.zeros((0, channels, image_size, image_size), np.uint8)
        )
        arrays[f"{split}_labels"] = np.array([y for _, y in keep], dtype=np.int64)
    return arrays, {"channels": channels, "skipped": skipped}
