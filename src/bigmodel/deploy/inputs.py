"""Raw inputs -> model inputs, as the training data prepared them: image and audio files or bytes,
rows of numbers, prompts and sentences.

A file or request that cannot be read raises `BadInput`, whose message names the problem;
predict.py skips or stops on it (`on_bad_file`), serve.py answers 400 with it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from bigmodel.data.sources.audio_files import AUDIO_SUFFIXES, fit_length, resample
from bigmodel.data.sources.image_files import IMAGE_SUFFIXES


class BadInput(ValueError):
    """An input the model cannot read (not an image, not audio, the wrong length ...)."""


Source = Path | bytes


def _open(source: Source):
    return io.BytesIO(source) if isinstance(source, bytes) else source


def _name(source: Source, what: str) -> str:
    return f"the {what} sent" if isinstance(source, bytes) else str(source)


def decode_image(source: Source, prep: dict) -> np.ndarray:
    """A PNG / JPEG / ... file or its bytes -> float32 (C, H, W) in [0, 1], resized as the
    training images were (PIL bilinear to image_size, grey or RGB as the net takes)."""
    from PIL import Image, UnidentifiedImageError

    size, channels = prep["image_size"], prep["channels"]
    try:
        with Image.open(_open(source)) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        why = type(e).__name__ if isinstance(source, bytes) else f"{type(e).__name__}: {e}"
        raise BadInput(
            f"{_name(source, 'image')} is not a readable image file (PNG, JPEG, ...): {why}"
        ) from None
    a = a[None] if channels == 1 else a.transpose(2, 0, 1)  # (C, H, W)
    return a.astype(np.float32) / 255


def decode_audio(source: Source, prep: dict) -> np.ndarray:
    """A WAV / FLAC / OGG file or its bytes -> float32 mono (num_samples,) at the model's sample
    rate, padded or cropped as the training clips were."""
    import soundfile as sf

    try:
        wave, sr = sf.read(_open(source), dtype="float32", always_2d=True)  # (L, channels)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise BadInput(
            f"{_name(source, 'audio')} is not a readable audio clip (WAV, FLAC or OGG): {e}"
        ) from None
    if wave.shape[0] == 0:
        raise BadInput(f"{_name(source, 'audio')} holds no audio samples")
    wave = resample(wave.mean(axis=1), sr, prep["sample_rate"])
    return fit_length(wave, prep["num_samples"]).astype(np.float32)


def decode_row(values, prep: dict, where: str) -> np.ndarray:
    """A list of numbers -> float32 (in_features,)."""
    try:
        x = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise BadInput(f"{where} must be a list of numbers") from None
    if x.ndim != 1 or x.shape[0] != prep["in_features"]:
        raise BadInput(
            f"{where} must hold {prep['in_features']} numbers (the model's inputs), got shape "
            f"{list(x.shape)}"
        )
    if not np.isfinite(x).all():
        raise BadInput(f"{where} holds a NaN or infinite value")
    return x


def media_suffixes(kind: str) -> set[str]:
    return IMAGE_SUFFIXES if kind == "image" else AUDIO_SUFFIXES


def decoder(kind: str):
    return decode_image if kind == "image" else decode_audio
