"""Folders of labelled files: class folders, seeded stratified splits, unreadable files."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bigmodel.data.base import SPLITS
from bigmodel.errors import UserError

log = logging.getLogger("bigmodel")

# (file, class index) of every file of a split
LabelledFiles = list[tuple[Path, int]]


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


def check_held_out(val_fraction: float, test_fraction: float) -> None:
    """The fractions of a source's training files held out for validation and testing."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be in "
            "[0, 1) and sum to less than 1"
        )


def check_on_bad_file(on_bad_file: str) -> None:
    if on_bad_file not in ("error", "skip"):
        raise UserError(f"data.on_bad_file={on_bad_file} is not one of: error, skip")


def handle_bad_file(path: Path, err: Exception, on_bad_file: str, kind: str) -> None:
    """Fail with the file's path (`on_bad_file=error`) or warn and go on (`skip`)."""
    msg = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    if on_bad_file == "skip":
        log.warning(f"skipping unreadable {kind} file {path} ({msg})")
        return
    raise UserError(
        f"cannot read {kind} file {path} ({msg}); fix or delete it, or set data.on_bad_file=skip"
    )


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


def scan_class_folders(
    root: Path, suffixes: set[str], what: str
) -> tuple[dict[str, LabelledFiles], list[str]]:
    """`root/{train,val,test}/<class>/` (val and test optional) or `root/<class>/` alone
    -> ({split or "all": [(file, class index), ...]}, class names sorted).

    Files are found recursively by suffix (`suffixes`, lower case); `what` names them in
    messages ("images"). The classes are the training folder's; every class needs files there.
    """
    layout = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if "train" not in layout:
        layout = {"all": root}
    train_dir = layout.get("train", root)
    classes = [d.name for d in class_folders(train_dir, what)]
    check_classes(classes, str(train_dir))
    files: dict[str, LabelledFiles] = {}
    for split, folder in layout.items():
        dirs = class_folders(folder, what)
        unknown = [d.name for d in dirs if d.name not in classes]
        if unknown:
            raise UserError(
                f"{folder} has class folders {unknown} that {train_dir} lacks; every class needs "
                f"training {what}"
            )
        files[split] = []
        for d in dirs:
            found = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
            if not found and split in ("train", "all"):
                raise UserError(
                    f"class folder {d} holds no {what} ({', '.join(sorted(suffixes))}); add "
                    f"{what} or remove the folder"
                )
            files[split] += [(f, classes.index(d.name)) for f in found]
    return files, classes
