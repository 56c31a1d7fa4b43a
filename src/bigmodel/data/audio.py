"""Audio clips for classification: `AudioDataModule` and the clips-from-files Dataset.

Sources (`source=`):
- `spoken_digits`: the digits zero to nine spoken by the espeak-ng engine that the pip package
  `espeakng-loader` bundles (`sources/espeak.py`), over many voices, rates and pitches, with
  noise; deterministic from the seed and cached after first use. Good for demos and smoke tests:
  models trained on it transfer poorly to real recordings.
- `folder`: `root/<label>/*.wav|flac|ogg` or `root/{train,val,test}/<label>/`; a seeded split
  otherwise, by clip or (`split_by=speaker`, file names `<label>_<speaker>_<n>.wav`) by speaker.
- `speech_commands`: the Speech Commands v0.02 layout with its validation_list.txt and
  testing_list.txt; `_background_noise_` is skipped.

Every clip is decoded with soundfile (no FFmpeg), mixed to mono, resampled to `sample_rate` and
padded or cropped to `clip_seconds` (`sources/audio_files.py`). Batches are raw waveforms (B, L):
the log-mel features are computed by the net's front end on the training device.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from bigmodel.data.base import SPLITS, DataModule
from bigmodel.data.sources.audio_files import (
    AUDIO_SUFFIXES,
    check_clips,
    decode_clips,
    read_clip,
    speaker_split,
    speech_commands_files,
    split_files,
)
from bigmodel.data.sources.decoded import cached_arrays
from bigmodel.data.sources.espeak import DIGITS, spoken_digits
from bigmodel.data.sources.files import (
    LabelledFiles,
    check_held_out,
    check_on_bad_file,
    scan_class_folders,
    split_indices,
)
from bigmodel.errors import UserError

log = logging.getLogger("bigmodel")

SOURCES = ("spoken_digits", "folder", "speech_commands")


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


class AudioDataModule(DataModule):
    """Audio classification data: (waveforms float (B, L), labels int64 (B,)) batches."""

    learning = "classification"
    summary = "audio classification"
    provides = ("num_classes", "sample_rate")

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
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.datasets: dict[str, Dataset] = {}
        self.files: dict[str, list[Path]] = {}  # per split, for folder sources (for inspection)

    # --------------------------------------------------------------------------------- sources
    def _folder_files(self) -> dict[str, LabelledFiles]:
        if not self.root.is_dir():
            raise UserError(
                f"data.root={self.root} is not a folder; point it at DIR with DIR/<label>/*.wav"
            )
        files, self.classes = scan_class_folders(self.root, AUDIO_SUFFIXES, "audio clips")
        return files

    def _synthetic_datasets(self) -> dict[str, Dataset]:
        self.classes = list(DIGITS)
        waves, labels, speakers = spoken_digits(
            self.clips_per_class,
            self.num_speakers,
            self.sample_rate,
            self.num_samples,
            self.snr_db,
            self.seed,
            self.cache_dir,
        )
        fractions = [self.val_fraction, self.test_fraction]
        if self.split_by == "speaker":
            parts = speaker_split(speakers, fractions, self.seed)
        else:
            parts = split_indices(labels, fractions, self.seed)
        x, y = torch.from_numpy(waves), torch.from_numpy(labels.astype(np.int64))
        return {s: TensorDataset(x[p], y[p]) for s, p in zip(SPLITS, parts, strict=True)}

    def _file_datasets(self) -> dict[str, Dataset]:
        if self.source == "folder":
            files = self._folder_files()
        else:
            files, self.classes = speech_commands_files(self.root, self.wanted_classes)
        files = split_files(files, self.val_fraction, self.test_fraction, self.split_by, self.seed)
        self.files = {s: [f for f, _ in fs] for s, fs in files.items()}
        datasets: dict[str, Dataset] = {}
        for s in SPLITS:
            if self.preload:
                datasets[s] = TensorDataset(*self._decoded(files[s]))
            else:
                ok = check_clips(files[s], self.on_bad_file)
                datasets[s] = ClipFiles(
                    [f for f, _ in ok], [y for _, y in ok], self.sample_rate, self.num_samples
                )
        return datasets

    def _decoded(self, files: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The clips of one split decoded, once: memory-mapped from the cache afterwards."""

        def decode() -> tuple[dict[str, np.ndarray], dict]:
            x, y = decode_clips(files, self.sample_rate, self.num_samples, self.on_bad_file)
            return {"waves": x.numpy(), "labels": y.numpy()}, {"skipped": len(files) - len(y)}

        params = {"sample_rate": self.sample_rate, "num_samples": self.num_samples}
        params |= {"on_bad_file": self.on_bad_file, "labels": [y for _, y in files]}
        arrays, meta = cached_arrays(
            self.cache_dir, "audio_folder", [f for f, _ in files], params, decode
        )
        if meta["skipped"] and meta.get("cached"):  # reported file by file when decoded
            log.warning(f"{meta['skipped']} unreadable clips were skipped when first decoded")
        return torch.from_numpy(arrays["waves"]), torch.from_numpy(arrays["labels"])

    # ------------------------------------------------------------------------------ lifecycle
    def build(self) -> None:
        if self.source == "spoken_digits":
            self.datasets = self._synthetic_datasets()
        else:
            self.datasets = self._file_datasets()
        self.check_saved_classes()
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
    def dataset(self, split: str) -> Dataset:
        if len(self.datasets[split]) == 0:
            raise UserError(f"the {split} split is empty; raise data.{split}_fraction or add clips")
        return self.datasets[split]

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
