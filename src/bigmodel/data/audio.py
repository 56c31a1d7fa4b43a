"""Audio clips for classification: sources, decoding, resampling and seeded splits.

Sources (`source=`):
- `spoken_digits`: the digits zero to nine spoken by the espeak-ng engine that the pip package
  `espeakng-loader` bundles (driven through ctypes), over many voices, rates and pitches, with
  noise; deterministic from the seed and cached after first use. Good for demos and smoke tests:
  models trained on it transfer poorly to real recordings.
- `folder`: `root/<label>/*.wav|flac|ogg` or `root/{train,val,test}/<label>/`; a seeded split
  otherwise, by clip or (`split_by=speaker`, file names `<label>_<speaker>_<n>.wav`) by speaker.
- `speech_commands`: the Speech Commands v0.02 layout with its validation_list.txt and
  testing_list.txt; `_background_noise_` is skipped.

Every clip is decoded with soundfile (no FFmpeg), mixed to mono, resampled to `sample_rate` and
padded or cropped to `clip_seconds`. Batches are raw waveforms (B, L): the log-mel features are
computed by the net's front end on the training device.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from bigmodel.data.image import (
    check_classes,
    check_common,
    class_folders,
    handle_bad_file,
    split_indices,
)
from bigmodel.data.resumable import ResumableLoader, eval_loader, loader_kwargs, train_loader
from bigmodel.errors import UserError

log = logging.getLogger("bigmodel")

SPLITS = ("train", "val", "test")
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg"}
SOURCES = ("spoken_digits", "folder", "speech_commands")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
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


class ClipFiles(Dataset):
    """Clips decoded from their files on access (for corpora too large to hold in memory)."""

    def __init__(self, files: list[Path], labels: list[int], sample_rate: int, num_samples: int):
        self.files, self.labels = files, labels
        self.sample_rate, self.num_samples = sample_rate, num_samples

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            wave = read_clip(self.files[i], self.sample_rate, self.num_samples)
        except Exception as e:
            raise UserError(
                f"cannot read audio file {self.files[i]} ({type(e).__name__}: {e}); "
                "fix or delete it"
            ) from None
        return torch.from_numpy(wave), self.labels[i]


# ----------------------------------------------------------------------------- synthesis
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


# -------------------------------------------------------------------------------- the module
class AudioDataModule(L.LightningDataModule):
    """Audio classification data: (waveforms float (B, L), labels int64 (B,)) batches."""

    def __init__(
        self,
        source: str = "spoken_digits",
        root: str | None = None,
        sample_rate: int = 16000,
        clip_seconds: float = 1.0,
        split_by: str = "clip",
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        classes: list[str] | None = None,
        clips_per_class: int = 200,
        num_speakers: int = 40,
        snr_db: tuple[float, float] = (10.0, 40.0),
        time_shift: float = 0.1,
        preload: bool = True,
        on_bad_file: str = "error",
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        cache_dir: str | None = None,
        seed: int = 1337,
        split: str = "test",
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise UserError(f"data.source={source} is not one of: {', '.join(SOURCES)}")
        check_common(batch_size, val_fraction, test_fraction, on_bad_file, split)
        if not isinstance(sample_rate, int) or sample_rate < 1000:
            raise UserError(
                f"data.sample_rate={sample_rate} cannot work; use an integer >= 1000 Hz"
            )
        if clip_seconds is None or clip_seconds * sample_rate < 512:
            raise UserError(
                f"data.clip_seconds={clip_seconds} at {sample_rate} Hz gives fewer than 512 "
                "samples; use longer clips"
            )
        if split_by not in ("clip", "speaker"):
            raise UserError(f"data.split_by={split_by} is not one of: clip, speaker")
        if source != "spoken_digits" and not root:
            raise UserError(f"data.root must point at the {source} folder (data.root=DIR)")
        if source == "spoken_digits" and (clips_per_class < 1 or num_speakers < 1):
            raise UserError("data.clips_per_class and data.num_speakers must be >= 1")
        self.source, self.root = source, Path(root).expanduser() if root else None
        self.sample_rate, self.clip_seconds = sample_rate, clip_seconds
        self.num_samples = int(round(clip_seconds * sample_rate))
        self.split_by, self.val_fraction, self.test_fraction = split_by, val_fraction, test_fraction
        self.wanted_classes = list(classes) if classes else None
        self.clips_per_class, self.num_speakers = clips_per_class, num_speakers
        self.snr_db, self.time_shift = tuple(snr_db), time_shift
        self.preload, self.on_bad_file = preload, on_bad_file
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.seed, self.split = seed, split
        self.classes: list[str] = []
        self.datasets: dict[str, Dataset] = {}
        self.files: dict[str, list[Path]] = {}  # per split, for folder sources (for inspection)
        self._saved_classes: list[str] | None = None

    # --------------------------------------------------------------------------------- sources
    def _spoken_digits(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        params = {
            "clips_per_class": self.clips_per_class,
            "num_speakers": self.num_speakers,
            "sample_rate": self.sample_rate,
            "num_samples": self.num_samples,
            "snr_db": list(self.snr_db),
            "seed": self.seed,
            "version": 1,
        }
        key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
        f = self.cache_dir / "spoken_digits" / f"{key}.npz" if self.cache_dir else None
        if f is not None and f.is_file():
            with np.load(f) as z:
                return z["waves"].astype(np.float32) / 32767, z["labels"], z["speakers"]
        import time

        t0 = time.perf_counter()
        waves, labels, speakers = synthesize_spoken_digits(
            self.clips_per_class,
            self.num_speakers,
            self.sample_rate,
            self.num_samples,
            self.snr_db,
            self.seed,
        )
        log.info(
            f"spoken_digits: synthesised {len(labels)} clips in {time.perf_counter() - t0:.1f} s"
        )
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

    def _folder_files(self) -> dict[str, list[tuple[Path, int]]]:
        root = self.root
        if not root.is_dir():
            raise UserError(
                f"data.root={root} is not a folder; point it at DIR with DIR/<label>/*.wav"
            )
        layout = {s: root / s for s in SPLITS if (root / s).is_dir()}
        if "train" not in layout:
            layout = {"all": root}
        train_dir = layout.get("train", root)
        self.classes = [d.name for d in class_folders(train_dir, "audio clips")]
        check_classes(self.classes, str(train_dir))
        files = {}
        for split, folder in layout.items():
            files[split] = []
            for d in class_folders(folder, "audio clips"):
                if d.name not in self.classes:
                    raise UserError(
                        f"{d} is a class that {train_dir} lacks; every class needs training clips"
                    )
                found = sorted(f for f in d.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES)
                if not found and split in ("train", "all"):
                    raise UserError(
                        f"class folder {d} holds no audio clips (.wav/.flac/.ogg); add clips or "
                        "remove the folder"
                    )
                files[split] += [(f, self.classes.index(d.name)) for f in found]
        return files

    def _speech_commands_files(self) -> dict[str, list[tuple[Path, int]]]:
        root = self.root
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
        self.classes = self.wanted_classes or words
        unknown = sorted(set(self.classes) - set(words))
        if unknown:
            raise UserError(f"data.classes {unknown} have no folder in {root}; choose from {words}")
        check_classes(self.classes, str(root))
        files: dict[str, list[tuple[Path, int]]] = {s: [] for s in SPLITS}
        for label, word in enumerate(self.classes):
            clips = sorted((root / word).glob("*.wav"))
            if not clips:
                raise UserError(f"class folder {root / word} holds no .wav clips")
            for f in clips:
                rel = f"{word}/{f.name}"
                split = (
                    "val" if rel in lists["val"] else "test" if rel in lists["test"] else "train"
                )
                files[split].append((f, label))
        return files

    def _split_files(
        self, files: dict[str, list[tuple[Path, int]]]
    ) -> dict[str, list[tuple[Path, int]]]:
        if "all" not in files and "train" in files and all(s in files for s in SPLITS):
            return files
        pool = files.get("all") or files["train"]
        missing = [s for s in ("val", "test") if s not in files]
        fractions = [self.val_fraction if s == "val" else self.test_fraction for s in missing]
        if self.split_by == "speaker":
            speakers = []
            for f, _ in pool:
                m = SPEAKER_RE.match(f.stem)
                if not m:
                    raise UserError(
                        f"data.split_by=speaker needs file names <label>_<speaker>_<n>.wav, got "
                        f"{f.name}; rename the files or use data.split_by=clip"
                    )
                speakers.append(m["speaker"])
            parts = self._speaker_parts(np.array(speakers), fractions)
        else:
            parts = split_indices(np.array([y for _, y in pool]), fractions, self.seed)
        out = {"train": [pool[i] for i in parts[0]]}
        for s in ("val", "test"):
            out[s] = files[s] if s in files else [pool[i] for i in parts[1 + missing.index(s)]]
        return out

    def _speaker_parts(self, speakers: np.ndarray, fractions: list[float]) -> list[np.ndarray]:
        """Whole speakers go to one split: no voice is both trained and tested on."""
        names = np.unique(speakers)
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(names)
        counts = [max(1, int(round(f * len(names)))) if f > 0 else 0 for f in fractions]
        if sum(counts) >= len(names):
            raise UserError(
                f"data.split_by=speaker: {len(names)} speakers are too few to give "
                f"{sum(counts)} to val/test and keep some for training; use data.split_by=clip"
            )
        groups, start = [], len(names) - sum(counts)
        groups.append(set(order[:start]))
        for c in counts:
            groups.append(set(order[start : start + c]))
            start += c
        return [np.flatnonzero(np.isin(speakers, list(g))) for g in groups]

    def _decode(self, files: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        def load(path: Path) -> np.ndarray | None:
            try:
                return read_clip(path, self.sample_rate, self.num_samples)
            except Exception as e:  # soundfile raises several kinds on bad files
                handle_bad_file(path, e, self.on_bad_file, "audio")
                return None

        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            waves = list(pool.map(load, [f for f, _ in files]))
        keep = [(w, y) for w, (_, y) in zip(waves, files, strict=True) if w is not None]
        x = (
            torch.from_numpy(np.stack([w for w, _ in keep]))
            if keep
            else torch.zeros(0, self.num_samples)
        )
        return x, torch.tensor([y for _, y in keep], dtype=torch.long)

    def _check_files(self, files: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
        """Without preloading, read each header now so a corrupt file fails before training."""
        import soundfile as sf

        ok = []
        for f, y in files:
            try:
                sf.info(str(f))
                ok.append((f, y))
            except Exception as e:
                handle_bad_file(f, e, self.on_bad_file, "audio")
        return ok

    # ------------------------------------------------------------------------------ lifecycle
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:  # idempotent: run.py sets up before building the model, Lightning again
            return
        if self.source == "spoken_digits":
            self.classes = list(DIGITS)
            waves, labels, speakers = self._spoken_digits()
            fractions = [self.val_fraction, self.test_fraction]
            if self.split_by == "speaker":
                parts = self._speaker_parts(speakers, fractions)
            else:
                parts = split_indices(labels, fractions, self.seed)
            x, y = torch.from_numpy(waves), torch.from_numpy(labels.astype(np.int64))
            self.datasets = {
                s: TensorDataset(x[p], y[p]) for s, p in zip(SPLITS, parts, strict=True)
            }
        else:
            files = (
                self._folder_files() if self.source == "folder" else self._speech_commands_files()
            )
            files = self._split_files(files)
            self.files = {s: [f for f, _ in fs] for s, fs in files.items()}
            for s in SPLITS:
                if self.preload:
                    self.datasets[s] = TensorDataset(*self._decode(files[s]))
                else:
                    ok = self._check_files(files[s])
                    self.datasets[s] = ClipFiles(
                        [f for f, _ in ok], [y for _, y in ok], self.sample_rate, self.num_samples
                    )
        if self._saved_classes is not None and self._saved_classes != self.classes:
            raise UserError(
                f"the checkpoint was trained on classes {self._saved_classes}, this data has "
                f"{self.classes}; evaluate on data with the same classes"
            )
        for s in ("train", "val"):
            if len(self.datasets[s]) == 0:
                raise UserError(
                    f"the {s} split holds no readable clips; add clips or change the split"
                )
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.datasets.items())
        log.info(
            f"{self.source}: {len(self.classes)} classes, {self.clip_seconds} s clips at "
            f"{self.sample_rate} Hz ({sizes})"
        )

    @property
    def net_kwargs(self) -> dict:
        """What a net needs to know that only the data can tell."""
        if not self.classes:
            raise RuntimeError("call setup() first")
        return {"num_classes": len(self.classes), "sample_rate": self.sample_rate}

    # ---------------------------------------------------------------------------- dataloaders
    def _loader(self, split: str, shuffle: bool = False) -> DataLoader | ResumableLoader:
        if len(self.datasets[split]) == 0:
            raise UserError(f"the {split} split is empty; raise data.{split}_fraction or add clips")
        kwargs = loader_kwargs(self.batch_size, self.num_workers, self.pin_memory)
        if shuffle:  # training: a seeded order per epoch that resumes mid-epoch
            return train_loader(self, self.datasets[split], shuffle=True, seed=self.seed, **kwargs)
        return eval_loader(self.datasets[split], **kwargs)

    def train_dataloader(self) -> ResumableLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.split)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Random circular time shift of up to `time_shift` seconds (training only), on device."""
        x, y = batch  # (B, L), (B,)
        if self.time_shift > 0 and self.trainer is not None and self.trainer.training:
            B, n = x.shape
            m = int(self.time_shift * self.sample_rate)
            shift = torch.randint(-m, m + 1, (B, 1), device=x.device)
            idx = (torch.arange(n, device=x.device) - shift) % n  # (B, L)
            x = x.gather(1, idx)
        return x, y

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"classes": list(self.classes)}

    def load_state_dict(self, state: dict) -> None:
        self._saved_classes = list(state.get("classes") or []) or None
