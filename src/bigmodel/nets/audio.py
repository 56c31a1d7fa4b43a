"""Audio nets: a log-mel front end (computed on the training device, in batches), SpecAugment
masking, and a convolutional classifier over the spectrogram.

Waveforms go in, so the features are computed where the model runs (GPU when there is one)
and the checkpoint holds everything needed to classify raw audio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from bigmodel.nets.cnn import ClassifierHead, ResNetBody, check_num_classes
from bigmodel.nets.layers import build_config


def hz_to_mel(f: torch.Tensor | float) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(
    n_freqs: int, n_mels: int, sample_rate: int, f_min: float, f_max: float
) -> torch.Tensor:
    """Triangular filters on the HTK mel scale -> (n_freqs, n_mels)."""
    all_freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)
    m_pts = torch.linspace(
        float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2, dtype=torch.float64
    )
    f_pts = mel_to_hz(m_pts)  # (n_mels + 2,) filter edges in Hz
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - all_freqs[:, None]  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0.0).float()


class LogMel(nn.Module):
    """Waveforms (B, L) -> log-mel spectrograms (B, n_mels, frames)."""

    def __init__(
        self,
        sample_rate: int,
        n_fft: int = 512,
        win_length: int | None = None,
        hop_length: int = 160,
        n_mels: int = 40,
        f_min: float = 20.0,
        f_max: float | None = None,
    ) -> None:
        super().__init__()
        win_length = win_length or n_fft
        f_max = f_max or sample_rate / 2
        if not 0 < win_length <= n_fft or hop_length <= 0 or n_mels <= 0:
            raise ValueError(
                f"log-mel needs 0 < win_length <= n_fft, hop_length > 0, n_mels > 0 (got "
                f"{win_length}, {n_fft}, {hop_length}, {n_mels}); fix model.net"
            )
        if not 0 <= f_min < f_max <= sample_rate / 2:
            raise ValueError(
                f"mel range {f_min}-{f_max} Hz does not fit a {sample_rate} Hz sample rate "
                f"(at most {sample_rate / 2} Hz); lower model.net.f_max or raise data.sample_rate"
            )
        self.n_fft, self.win_length, self.hop_length = n_fft, win_length, hop_length
        # Non-persistent: fully determined by the config, so checkpoints need not carry them.
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)
        fb = mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate, f_min, f_max)
        self.register_buffer("fbank", fb, persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(
            wave.float(),
            self.n_fft,
            self.hop_length,
            self.win_length,
            self.window,
            center=True,
            return_complex=True,
        )  # (B, n_fft // 2 + 1, frames)
        power = spec.real.square() + spec.imag.square()
        mel = torch.einsum("bft,fm->bmt", power, self.fbank)  # (B, n_mels, frames)
        return torch.log(mel + 1e-6)


class SpecAugment(nn.Module):
    """SpecAugment-style masking (Park et al. 2019) in training: `num_masks` bands of up to
    `freq_mask` mel bins and up to `time_mask` frames per example are set to zero."""

    def __init__(self, freq_mask: int = 0, time_mask: int = 0, num_masks: int = 2) -> None:
        super().__init__()
        self.freq_mask, self.time_mask, self.num_masks = freq_mask, time_mask, num_masks

    @staticmethod
    def _mask(n: int, max_width: int, batch: int, num: int, device: torch.device) -> torch.Tensor:
        width = torch.randint(0, max_width + 1, (batch, num, 1), device=device)
        start = (torch.rand(batch, num, 1, device=device) * (n - width + 1)).long()
        pos = torch.arange(n, device=device)  # (n,)
        return ((pos >= start) & (pos < start + width)).any(dim=1)  # (B, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_masks <= 0:
            return x
        B, F, T = x.shape[0], x.shape[-2], x.shape[-1]
        keep = torch.ones(B, F, T, dtype=torch.bool, device=x.device)
        if self.freq_mask > 0:
            keep &= ~self._mask(F, min(self.freq_mask, F), B, self.num_masks, x.device)[:, :, None]
        if self.time_mask > 0:
            keep &= ~self._mask(T, min(self.time_mask, T), B, self.num_masks, x.device)[:, None, :]
        return x * keep.view(x.shape).to(x.dtype)


@dataclass
class AudioCNNConfig:
    num_classes: int
    """Number of classes; filled from the data module when left as `???`."""
    sample_rate: int
    """Sample rate of the waveforms in Hz; filled from the data module when left as `???`."""
    n_fft: int = 512
    """STFT size in samples (n_fft // 2 + 1 frequency bins)."""
    win_length: int | None = None
    """STFT window in samples; None: n_fft."""
    hop_length: int = 320
    """Samples between frames (320 = 20 ms at 16 kHz)."""
    n_mels: int = 32
    """Mel bins of the spectrogram."""
    f_min: float = 20.0
    """Lowest frequency of the mel filters in Hz."""
    f_max: float | None = None
    """Highest frequency of the mel filters in Hz; None: half the sample rate."""
    freq_mask: int = 0
    """SpecAugment (training only): widest band of mel bins set to zero; 0 disables."""
    time_mask: int = 0
    """SpecAugment: widest band of frames set to zero; 0 disables."""
    num_masks: int = 2
    """SpecAugment: bands of each kind per example."""
    widths: list[int] | tuple[int, ...] = (16, 32, 64)
    """Channels per ResNet stage; every stage after the first halves the resolution."""
    blocks_per_stage: int = 1
    """Basic blocks (two 3x3 convs and a shortcut) per stage."""
    dropout: float = 0.0
    """Dropout on the pooled features, before the output layer."""

    def __post_init__(self) -> None:
        check_num_classes(self.num_classes)


class AudioCNN(nn.Module):
    """Waveforms (B, L) at `sample_rate` -> class logits (B, num_classes).

    log-mel -> per-mel-bin batch norm (a learned standardisation, robust to loudness) ->
    SpecAugment (training only) -> the ResNet body and head of nets/cnn.py over the 1-channel
    image.
    """

    config_class = AudioCNNConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """`AudioCNN(AudioCNNConfig(...))`, or AudioCNNConfig's fields: `AudioCNN(10, 16000)`."""
        super().__init__()
        self.config = cfg = build_config(AudioCNNConfig, args, kwargs)
        self.num_classes = cfg.num_classes
        self.features = LogMel(
            cfg.sample_rate,
            cfg.n_fft,
            cfg.win_length,
            cfg.hop_length,
            cfg.n_mels,
            cfg.f_min,
            cfg.f_max,
        )
        self.norm = nn.BatchNorm1d(cfg.n_mels)
        self.spec_augment = SpecAugment(cfg.freq_mask, cfg.time_mask, cfg.num_masks)
        self.body = ResNetBody(1, list(cfg.widths), cfg.blocks_per_stage)
        self.head = ClassifierHead(self.body.out_features, cfg.num_classes, cfg.dropout)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.features(wave))  # (B, n_mels, frames)
        x = self.spec_augment(x).unsqueeze(1)  # (B, 1, n_mels, frames)
        return self.head(self.body(x))  # (B, num_classes)
