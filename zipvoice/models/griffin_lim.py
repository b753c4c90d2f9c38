"""Griffin-Lim vocoder for Vocos mel features: audio without any trained vocoder.

The offline demo and tests have no pretrained Vocos to download, and a random Vocos turns any mel
into noise. Inverting the mel filterbank (least squares, non-negative) and iterating Griffin-Lim
phase estimation gives audio whose spectral envelope follows the mel: speech-shaped, if buzzy.
Use the real Vocos (`load_vocoder`) for anything a person should listen to.
"""

from __future__ import annotations

import torch
from torch import nn

from zipvoice.utils.feature import HOP_LENGTH, N_FFT, SAMPLING_RATE, mel_filterbank

GRIFFIN_LIM_NAME = "griffin-lim"
MAX_MEL_MAGNITUDE = 100.0


class GriffinLimVocoder(nn.Module):
    """Log-mel (B, 100, T) -> waveform (B, T * 256), same interface as `Vocos.decode`."""

    def __init__(self, n_iter: int = 32, momentum: float = 0.99, seed: int = 0) -> None:
        super().__init__()
        self.n_iter = n_iter
        self.momentum = momentum
        self.seed = seed
        fb = mel_filterbank(SAMPLING_RATE, N_FFT)  # (freqs, mels)
        self.register_buffer("inverse_fb", torch.linalg.pinv(fb), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        self.sampling_rate = SAMPLING_RATE

    @torch.no_grad()
    def decode(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.ndim != 3:
            raise ValueError(f"decode expects mel (batch, n_mels, frames), got {tuple(mel.shape)}")
        # Bounded like Vocos' head bounds its magnitudes: an under-trained model's outlier bins
        # would otherwise dominate the whole signal.
        mel_mag = torch.clamp(torch.exp(mel), max=MAX_MEL_MAGNITUDE)
        mag = torch.clamp(mel_mag.transpose(1, 2) @ self.inverse_fb, min=0.0)  # (B, T, F)
        mag = mag.transpose(1, 2)  # (B, F, T)
        length = mel.shape[-1] * HOP_LENGTH
        gen = torch.Generator().manual_seed(self.seed)
        phase = torch.rand(mag.shape, generator=gen) * 2 * torch.pi
        spec = torch.polar(mag, phase.to(mag.device))
        prev = torch.zeros_like(spec)
        stft_args = dict(n_fft=N_FFT, hop_length=HOP_LENGTH, window=self.window, center=True)
        for _ in range(self.n_iter):
            wave = torch.istft(spec, length=length, **stft_args)
            rebuilt = torch.stft(wave, return_complex=True, pad_mode="reflect", **stft_args)
            rebuilt = rebuilt[..., : mag.shape[-1]]
            accelerated = rebuilt - (self.momentum / (1 + self.momentum)) * prev
            prev = rebuilt
            spec = mag * torch.exp(1j * torch.angle(accelerated))
        return torch.istft(spec, length=length, **stft_args)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.decode(mel)
