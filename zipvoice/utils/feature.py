"""Vocos-compatible log-mel features, computed with torch alone.

torchaudio cannot be installed here, so the mel filterbank and framing are built in this module
to match what the published ZipVoice models and the Vocos vocoder were trained on: magnitude STFT
(n_fft 1024, hop 256, periodic Hann, reflect centre padding), 100 HTK mel bands without
normalisation from 0 Hz to Nyquist, natural log clamped at 1e-7.

`VocosFbank` is registered with lhotse under upstream's name ("VocosFbank") so manifests
written by upstream ZipVoice recipes load here unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from lhotse.features.base import FeatureExtractor, register_extractor
from lhotse.utils import Seconds

LOG_CLAMP = 1e-7
SAMPLING_RATE = 24000
N_MELS = 100
N_FFT = 1024
HOP_LENGTH = 256


def _hz_to_mel_htk(freq_hz: float) -> float:
    return 2595.0 * math.log10(1.0 + freq_hz / 700.0)


def mel_filterbank(
    sampling_rate: int = SAMPLING_RATE,
    n_fft: int = N_FFT,
    n_mels: int = N_MELS,
    f_min: float = 0.0,
    f_max: float | None = None,
) -> torch.Tensor:
    """Triangular HTK-scale filters, unnormalised, shape (n_fft // 2 + 1, n_mels).

    Filter edges are evenly spaced on the mel scale and each triangle is evaluated at the linear
    FFT bin frequencies. Computed in float32 on purpose: that is how the published Vocos
    extractor built its buffer, so ours matches it bit for bit.
    """
    f_max = sampling_rate / 2 if f_max is None else f_max
    n_freqs = n_fft // 2 + 1
    bin_freqs = torch.linspace(0.0, sampling_rate // 2, n_freqs)
    mel_edges = torch.linspace(_hz_to_mel_htk(f_min), _hz_to_mel_htk(f_max), n_mels + 2)
    edge_hz = 700.0 * (10.0 ** (mel_edges / 2595.0) - 1.0)
    widths = edge_hz[1:] - edge_hz[:-1]  # (n_mels + 1,)
    offsets = edge_hz.unsqueeze(0) - bin_freqs.unsqueeze(1)  # (n_freqs, n_mels + 2)
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


def num_frames_for(num_samples: int, hop_length: int = HOP_LENGTH) -> int:
    """lhotse's `compute_num_frames` rule for this frame shift: round(samples / hop)."""
    return (num_samples + hop_length // 2) // hop_length


def _reflect_pad(waves: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect-pad the last axis like `F.pad(mode="reflect")`, also for waves shorter than pad.

    torch refuses reflect padding wider than the input; repeated reflection (numpy's "reflect")
    agrees with it wherever torch works and still gives short prompts a frame or two.
    """
    n = waves.shape[-1]
    if n == 0:
        return waves.new_zeros(*waves.shape[:-1], 2 * pad)
    if n == 1:
        return waves.expand(*waves.shape[:-1], n + 2 * pad)
    period = 2 * (n - 1)

    def fold(idx: torch.Tensor) -> torch.Tensor:
        idx = idx.abs() % period
        return torch.where(idx >= n, period - idx, idx)

    left = fold(torch.arange(-pad, 0, device=waves.device))
    right = fold(torch.arange(n, n + pad, device=waves.device))
    return torch.cat([waves[..., left], waves, waves[..., right]], dim=-1)


class _MelKernel:
    """Window and filterbank tensors, cached per device and dtype."""

    def __init__(self, sampling_rate: int, n_fft: int, n_mels: int) -> None:
        self.n_fft = n_fft
        self._window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64).float()
        self._filters = mel_filterbank(sampling_rate, n_fft, n_mels)
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = (
                self._window.to(device=device, dtype=dtype),
                self._filters.to(device=device, dtype=dtype),
            )
        return self._cache[key]


_DEFAULT_KERNEL = _MelKernel(SAMPLING_RATE, N_FFT, N_MELS)


def _log_mel_padded(padded: torch.Tensor, kernel: _MelKernel, hop_length: int) -> torch.Tensor:
    """(B, S_padded) already centre-padded -> (B, frames, n_mels) log-mel."""
    window, filters = kernel.get(padded.device, padded.dtype)
    spec = torch.stft(
        padded,
        n_fft=kernel.n_fft,
        hop_length=hop_length,
        window=window,
        center=False,
        onesided=True,
        return_complex=True,
    ).abs()  # (B, n_freqs, frames)
    mel = torch.matmul(spec.transpose(1, 2), filters)
    return torch.log(torch.clamp(mel, min=LOG_CLAMP))


def _fit_frames(mel: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Cut extra frames or repeat the last one, along dim -2."""
    have = mel.shape[-2]
    if have >= num_frames:
        return mel[..., :num_frames, :]
    if have == 0:
        return mel.new_full((*mel.shape[:-2], num_frames, mel.shape[-1]), math.log(LOG_CLAMP))
    extra = mel[..., -1:, :].expand(*mel.shape[:-2], num_frames - have, mel.shape[-1])
    return torch.cat([mel, extra], dim=-2)


def _log_mel_batch(
    waves: list[torch.Tensor], kernel: _MelKernel, hop_length: int
) -> list[torch.Tensor]:
    """Variable-length 1-D waves -> list of (T_i, n_mels), computed in one STFT.

    Each wave is reflect-padded on its own before zero right-padding to a common length, so
    every kept frame sees exactly the samples it would see alone.
    """
    if not waves:
        return []
    pad = kernel.n_fft // 2
    padded = [_reflect_pad(w.unsqueeze(0), pad).squeeze(0) for w in waves]
    longest = max(p.shape[-1] for p in padded)
    batch = torch.stack([torch.nn.functional.pad(p, (0, longest - p.shape[-1])) for p in padded])
    mel = _log_mel_padded(batch, kernel, hop_length)
    return [
        _fit_frames(mel[i], num_frames_for(w.shape[-1], hop_length)) for i, w in enumerate(waves)
    ]


def compute_vocos_mel(wave: torch.Tensor) -> torch.Tensor:
    """24 kHz waves (B, S) -> log-mel (B, T, 100) with T = (S + 128) // 256.

    For inference: prompt features on whatever device the wave lives on.
    """
    if wave.ndim != 2:
        raise ValueError(
            f"compute_vocos_mel expects a (batch, samples) wave, got {tuple(wave.shape)}"
        )
    if not wave.is_floating_point():
        wave = wave.float()
    padded = _reflect_pad(wave, N_FFT // 2)
    mel = _log_mel_padded(padded, _DEFAULT_KERNEL, HOP_LENGTH)
    return _fit_frames(mel, num_frames_for(wave.shape[-1], HOP_LENGTH))


@dataclass
class VocosFbankConfig:
    sampling_rate: int = SAMPLING_RATE
    n_mels: int = N_MELS
    n_fft: int = N_FFT
    hop_length: int = HOP_LENGTH

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> VocosFbankConfig:
        return VocosFbankConfig(**data)


def _as_mono_tensor(samples: np.ndarray | torch.Tensor, num_channels: int) -> torch.Tensor:
    """Accept (S,), (1, S) or (2, S); returns (channels, S) float32."""
    wave = samples if isinstance(samples, torch.Tensor) else torch.from_numpy(np.asarray(samples))
    if not wave.is_floating_point():
        raise ValueError(f"audio samples must be floating point, got dtype {wave.dtype}")
    wave = wave.float()
    if wave.ndim == 1:
        wave = wave.unsqueeze(0)
    if wave.ndim != 2:
        raise ValueError(
            f"audio samples must be (samples,) or (channels, samples), got {tuple(wave.shape)}"
        )
    if num_channels == 1 and wave.shape[0] > 1:
        wave = wave.mean(dim=0, keepdim=True)
    elif num_channels == 2 and wave.shape[0] != 2:
        raise ValueError(f"a 2-channel VocosFbank needs 2-channel audio, got {wave.shape[0]}")
    return wave


@register_extractor
class VocosFbank(FeatureExtractor):
    """Log-mel features for the Vocos 24 kHz vocoder, as lhotse extractor "VocosFbank"."""

    name = "VocosFbank"
    config_type = VocosFbankConfig

    def __init__(self, config: VocosFbankConfig | None = None, num_channels: int = 1) -> None:
        super().__init__(config=config if config is not None else VocosFbankConfig())
        if num_channels not in (1, 2):
            raise ValueError(f"num_channels must be 1 or 2, got {num_channels}")
        self.num_channels = num_channels
        c = self.config
        self._kernel = (
            _DEFAULT_KERNEL
            if (c.sampling_rate, c.n_fft, c.n_mels) == (SAMPLING_RATE, N_FFT, N_MELS)
            else _MelKernel(c.sampling_rate, c.n_fft, c.n_mels)
        )

    @property
    def frame_shift(self) -> Seconds:
        return self.config.hop_length / self.config.sampling_rate

    def feature_dim(self, sampling_rate: int | None = None) -> int:
        return self.config.n_mels * self.num_channels

    def _check_rate(self, sampling_rate: int) -> None:
        if sampling_rate != self.config.sampling_rate:
            raise ValueError(
                f"VocosFbank expects {self.config.sampling_rate} Hz audio, got {sampling_rate} Hz; "
                "resample first (zipvoice.utils.audio.resample)"
            )

    def extract(
        self, samples: np.ndarray | torch.Tensor, sampling_rate: int
    ) -> np.ndarray | torch.Tensor:
        """(S,) or (channels, S) -> (T, n_mels * num_channels); numpy in, numpy out."""
        self._check_rate(sampling_rate)
        return_numpy = not isinstance(samples, torch.Tensor)
        wave = _as_mono_tensor(samples, self.num_channels)
        mels = _log_mel_batch(list(wave), self._kernel, self.config.hop_length)
        mel = torch.cat(mels, dim=-1)  # channels side by side, as upstream lays them out
        return mel.numpy() if return_numpy else mel

    def extract_batch(
        self,
        samples: np.ndarray | torch.Tensor | list[np.ndarray] | list[torch.Tensor],
        sampling_rate: int,
        lengths: np.ndarray | torch.Tensor | None = None,
    ) -> list[np.ndarray] | list[torch.Tensor]:
        """Many waves in one STFT; returns one (T_i, n_mels) array per wave.

        `samples` is a list of waves or a padded (B, S) array with `lengths`.
        """
        self._check_rate(sampling_rate)
        if self.num_channels != 1:
            return [self.extract(s, sampling_rate) for s in samples]
        if lengths is not None:
            waves = [samples[i, : int(n)] for i, n in enumerate(lengths)]
        elif isinstance(samples, (list, tuple)):
            waves = list(samples)
        elif samples.ndim == 1:
            waves = [samples]
        else:
            waves = list(samples)
        return_numpy = bool(waves) and not isinstance(waves[0], torch.Tensor)
        tensors = [_as_mono_tensor(w, 1)[0] for w in waves]
        mels = _log_mel_batch(tensors, self._kernel, self.config.hop_length)
        return [m.numpy() for m in mels] if return_numpy else mels
