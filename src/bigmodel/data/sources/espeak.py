"""Spoken digits from espeak-ng: a ctypes binding to the engine and a seeded clip synthesizer.

The engine is the one the pip package `espeakng-loader` bundles; `spoken_digits` speaks the digits
zero to nine over many voices, rates and pitches, with noise, deterministically from the seed,
and caches the clips.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
import os
import threading
import time
from pathlib import Path

import numpy as np

from bigmodel.data.sources.audio_files import resample
from bigmodel.errors import UserError

log = logging.getLogger("bigmodel")

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class Espeak:
    """The espeak-ng engine from the `espeakng-loader` wheel, through ctypes (one per process)."""

    _instance: Espeak | None = None
    _lock = threading.Lock()
    CALLBACK = ctypes.CFUNCTYPE(
        ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
    )
    RATE, VOLUME, PITCH, RANGE = 1, 2, 3, 4  # espeak_PARAMETER values

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError:
            raise UserError(
                "data=spoken_digits synthesises speech with espeak-ng: pip install espeakng-loader"
            ) from None
        self.data_path = espeakng_loader.get_data_path()
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        # AUDIO_OUTPUT_SYNCHRONOUS = 2: samples come back through the callback, nothing is played.
        self.sample_rate = lib.espeak_Initialize(2, 0, self.data_path.encode(), 0)
        if self.sample_rate <= 0:
            raise UserError("espeak-ng failed to initialise; reinstall espeakng-loader")
        self._chunks: list[np.ndarray] = []

        def on_audio(wav, n, events) -> int:
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._callback = self.CALLBACK(on_audio)  # kept alive: espeak holds the pointer
        lib.espeak_SetSynthCallback(self._callback)
        self.lib = lib

    @classmethod
    def get(cls) -> Espeak:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def variants(self) -> list[str]:
        """Voice variants (`m3`, `f2`, `klatt`...) shipped with the engine, sorted."""
        return sorted(
            p.name for p in (Path(self.data_path) / "voices" / "!v").iterdir() if p.is_file()
        )

    def say(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> np.ndarray:
        """Speak `text` -> float32 samples in [-1, 1] at self.sample_rate."""
        with self._lock:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise UserError(f"espeak-ng has no voice {voice!r}")
            self.lib.espeak_SetParameter(self.RATE, rate, 0)
            self.lib.espeak_SetParameter(self.PITCH, pitch, 0)
            self.lib.espeak_SetParameter(self.RANGE, pitch_range, 0)
            self._chunks = []
            b = text.encode()
            self.lib.espeak_Synth(b, len(b) + 1, 0, 1, 0, 0, None, None)  # POS_CHARACTER = 1
            self.lib.espeak_Synchronize()
            chunks, self._chunks = self._chunks, []
        return (np.concatenate(chunks) if chunks else np.zeros(1, np.int16)).astype(
            np.float32
        ) / 32768


ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-us-nyc")


def synthesize_spoken_digits(
    clips_per_class: int,
    num_speakers: int,
    sample_rate: int,
    num_samples: int,
    snr_db: tuple[float, float],
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> waves float32 (N, num_samples), labels (N,), speaker ids (N,). Deterministic in seed.

    A speaker is an accent + voice variant + base pitch and rate; each clip varies rate and pitch
    around the speaker's, is placed at a random offset, scaled, and mixed with white noise at a
    random SNR.
    """
    engine = Espeak.get()
    rng = np.random.default_rng(seed)
    variants = engine.variants()
    speakers = [
        (
            f"{ACCENTS[rng.integers(len(ACCENTS))]}+{variants[rng.integers(len(variants))]}",
            int(rng.integers(120, 200)),
            int(rng.integers(25, 75)),
        )
        for _ in range(num_speakers)
    ]
    n = clips_per_class * len(DIGITS)
    waves = np.zeros((n, num_samples), np.float32)
    labels = np.repeat(np.arange(len(DIGITS)), clips_per_class)
    spk = rng.integers(0, num_speakers, n)
    for i in range(n):
        voice, rate, pitch = speakers[spk[i]]
        w = engine.say(
            DIGITS[labels[i]],
            voice,
            rate + int(rng.integers(-25, 26)),
            int(np.clip(pitch + rng.integers(-10, 11), 0, 99)),
            int(rng.integers(20, 80)),
        )
        w = resample(w, engine.sample_rate, sample_rate)
        w = (
            w[np.abs(w) > 1e-3].size and w[np.flatnonzero(np.abs(w) > 1e-3)[0] :]
        )  # trim lead silence
        w = np.asarray(w, np.float32)[:num_samples]
        peak = np.abs(w).max() if w.size else 0.0
        w = w / max(peak, 1e-4) * rng.uniform(0.3, 0.9)
        offset = int(rng.integers(0, max(1, num_samples - len(w) + 1)))
        waves[i, offset : offset + len(w)] = w
        power = float(np.mean(w**2)) if w.size else 1e-4
        snr = rng.uniform(*snr_db)
        waves[i] += rng.normal(0, math.sqrt(power / 10 ** (snr / 10)), num_samples).astype(
            np.float32
        )
    return np.clip(waves, -1, 1), labels, spk


def spoken_digits(
    clips_per_class: int,
    num_speakers: int,
    sample_rate: int,
    num_samples: int,
    snr_db: tuple[float, float],
    seed: int,
    cache_dir: Path | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`synthesize_spoken_digits`, cached as int16 under cache_dir (when given) after first use.

    The clips returned are the cached ones (int16-rounded) whether they were just written or read.
    """
    params = {
        "clips_per_class": clips_per_class,
        "num_speakers": num_speakers,
        "sample_rate": sample_rate,
        "num_samples": num_samples,
        "snr_db": list(snr_db),
        "seed": seed,
        "version": 1,
    }
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    f = cache_dir / "spoken_digits" / f"{key}.npz" if cache_dir else None
    if f is not None and f.is_file():
        with np.load(f) as z:
            return z["waves"].astype(np.float32) / 32767, z["labels"], z["speakers"]
    t0 = time.perf_counter()
    waves, labels, speakers = synthesize_spoken_digits(
        clips_per_class, num_speakers, sample_rate, num_samples, snr_db, seed
    )
    log.info(f"spoken_digits: synthesised {len(labels)} clips in {time.perf_counter() - t0:.1f} s")
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.stem}.{os.getpid()}.tmp.npz")  # atomic: ranks may race
        np.savez(
            tmp,
            waves=np.round(waves * 32767).astype(np.int16),
            labels=labels,
            speakers=speakers,
        )
        os.replace(tmp, f)
        return (
            np.round(waves * 32767).astype(np.int16).astype(np.float32) / 32767,
            labels,
            speakers,
        )
    return waves, labels, speakers
