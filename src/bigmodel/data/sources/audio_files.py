"""Audio files as float32 mono clips: decoding, resampling, Speech Commands lists, speaker splits.

Every clip is decoded with soundfile (no FFmpeg), mixed to mono, resampled to the sample rate
asked for and padded or cropped to a fixed number of samples.
"""

from __future__ import annotations

import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bigmodel.data.base import SPLITS
from bigmodel.data.sources.files import (
    LabelledFiles,
    check_classes,
    class_folders,
    handle_bad_file,
    split_indices,
)
from bigmodel.errors import UserError

log = logging.getLogger("bigmodel")

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg"}
SPEAKER_RE = re.compile(r"^(?P<label>[^_]+)_(?P<speaker>[^_]+)_(?P<n>[^_]+)$")


# ------------------------------------------------------------------------------ decoding
def resample(wave: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Polyphase resampling (anti-aliased) from sr_in to sr_out Hz."""
    if sr_in == sr_out:
        return wave
    from scipy.signal import resample_poly

    g = math.gcd(sr_in, sr_out)
    return resample_poly(wave, sr_out // g, sr_in // g).astype(np.float32)


def fit_length(wave: np.ndarray, n: int) -> np.ndarray:
    """Zero-pad at the end, or crop the middle, to exactly n samples."""
    if len(wave) >= n:
        start = (len(wave) - n) // 2
        return wave[start : start + n]
    return np.pad(wave, (0, n - len(wave)))


def read_clip(path: Path, sample_rate: int, num_samples: int) -> np.ndarray:
    """A file -> float32 mono (num_samples,) at sample_rate. Raises on unreadable files."""
    import soundfile as sf

    wave, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (L, channels)
    if wave.shape[0] == 0:
        raise ValueError("the file holds no samples")
    return fit_length(resample(wave.mean(axis=1), sr, sample_rate), num_samples)


def decode_clips(
    files: LabelledFiles, sample_rate: int, num_samples: int, on_bad_file: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every readable file -> (waves float32 (N, num_samples), labels int64 (N,))."""

    def load(path: Path) -> np.ndarray | None:
        try:
            return read_clip(path, sample_rate, num_samples)
        except Exception as e:  # soundfile raises several kinds on bad files
            handle_bad_file(path, e, on_bad_file, "audio")
            return None

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        waves = list(pool.map(load, [f for f, _ in files]))
    keep = [(w, y) for w, (_, y) in zip(waves, files, strict=True) if w is not None]
    x = torch.from_numpy(np.stack([w for w, _ in keep])) if keep else torch.zeros(0, num_samples)
    return x, torch.tensor([y for _, y in keep], dtype=torch.long)


def check_clips(files: LabelledFiles, on_bad_file: str) -> LabelledFiles:
    """The files whose header reads, so that a corrupt file fails (or is skipped) up front."""
    import soundfile as sf

    ok = []
    for f, y in files:
        try:
            sf.info(str(f))
            ok.append((f, y))
        except Exception as e:
            handle_bad_file(f, e, on_bad_file, "audio")
    return ok


# ------------------------------------------------------------------------------- layouts
def speech_commands_files(
    root: Path, wanted: list[str] | None
) -> tuple[dict[str, LabelledFiles], list[str]]:
    """The Speech Commands v0.02 layout: <word>/*.wav, split by validation_list.txt and
    testing_list.txt -> ({split: [(file, class index), ...]}, classes: `wanted` or every word)."""
    if not root.is_dir():
        raise UserError(
            f"data.root={root} is not a folder; extract speech_commands_v0.02.tar.gz into it "
            "(nothing is downloaded at run time)"
        )
    lists = {}
    for split, name in (("val", "validation_list.txt"), ("test", "testing_list.txt")):
        p = root / name
        if not p.is_file():
            raise UserError(
                f"{p} is missing; data=speech_commands needs the standard layout with "
                "validation_list.txt and testing_list.txt beside the word folders"
            )
        lists[split] = {line.strip() for line in p.read_text().splitlines() if line.strip()}
    words = [d.name for d in class_folders(root, "clips")]
    classes = wanted or words
    unknown = sorted(set(classes) - set(words))
    if unknown:
        raise UserError(f"data.classes {unknown} have no folder in {root}; choose from {words}")
    check_classes(classes, str(root))
    files: dict[str, LabelledFiles] = {s: [] for s in SPLITS}
    for label, word in enumerate(classes):
        clips = sorted((root / word).glob("*.wav"))
        if not clips:
            raise UserError(f"class folder {root / word} holds no .wav clips")
        for f in clips:
            rel = f"{word}/{f.name}"
            split = "val" if rel in lists["val"] else "test" if rel in lists["test"] else "train"
            files[split].append((f, label))
    return files, classes


# -------------------------------------------------------------------------------- splits
def speaker_split(
    speakers: np.ndarray,
    fractions: list[float],
    seed: int,
    parts: tuple[str, ...] = ("val", "test"),
) -> list[np.ndarray]:
    """Whole speakers go to one split: no voice is both trained and tested on.

    -> indices of the train part, then of one part per fraction (of the speakers). A fraction
    too small to give one speaker still gets one (a split is never left empty), with a warning
    that names the share it gets instead. parts: the splits the fractions are for.
    """
    names = np.unique(speakers)
    rng = np.random.default_rng(seed)
    order = rng.permutation(names)
    counts = [max(1, int(round(f * len(names)))) if f > 0 else 0 for f in fractions]
    if sum(counts) >= len(names):
        raise UserError(
            f"data.split_by=speaker: {len(names)} speakers are too few to give "
            f"{sum(counts)} to val/test and keep some for training; use data.split_by=clip"
        )
    # a fraction under one speaker: its split gets one, a larger share than asked
    short = [(s, f) for s, f in zip(parts, fractions, strict=True) if 0 < f * len(names) < 1]
    if short:
        one = len(short) == 1
        asked = " and ".join(f"data.{s}_fraction={f:g}" for s, f in short)
        need = math.ceil(1 / min(f for _, f in short))
        log.warning(
            f"data.split_by=speaker: {len(names)} speakers are fewer than {asked} "
            f"{'needs' if one else 'need'} ({need} for one speaker"
            f"{'' if one else ' each'}); {' and '.join(s for s, _ in short)} "
            f"{'gets' if one else 'get'} 1 speaker{'' if one else ' each'}, "
            f"{1 / len(names):.0%} of the speakers; add speakers or use data.split_by=clip"
        )
    groups, start = [], len(names) - sum(counts)
    groups.append(set(order[:start]))
    for c in counts:
        groups.append(set(order[start : start + c]))
        start += c
    return [np.flatnonzero(np.isin(speakers, list(g))) for g in groups]


def split_files(
    files: dict[str, LabelledFiles],
    val_fraction: float,
    test_fraction: float,
    split_by: str,
    seed: int,
) -> dict[str, LabelledFiles]:
    """Cut the splits a layout lacks from its training files (or all of them), seeded: by clip,
    stratified by class, or (`split_by=speaker`) by the speaker of `<label>_<speaker>_<n>.wav`."""
    if "all" not in files and "train" in files and all(s in files for s in SPLITS):
        return files
    pool = files.get("all") or files["train"]
    missing = [s for s in ("val", "test") if s not in files]
    fractions = [val_fraction if s == "val" else test_fraction for s in missing]
    if split_by == "speaker":
        speakers = []
        for f, _ in pool:
            m = SPEAKER_RE.match(f.stem)
            if not m:
                raise UserError(
                    f"data.split_by=speaker needs file names <label>_<speaker>_<n>.wav, got "
                    f"{f.name}; rename the files or use data.split_by=clip"
                )
            speakers.append(m["speaker"])
        parts = speaker_split(np.array(speakers), fractions, seed, tuple(missing))
    else:
        parts = split_indices(np.array([y for _, y in pool]), fractions, seed)
    out = {"train": [pool[i] for i in parts[0]]}
    for s in ("val", "test"):
        out[s] = files[s] if s in files else [pool[i] for i in parts[1 + missing.index(s)]]
    return out
