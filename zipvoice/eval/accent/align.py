"""Frame alignment of two utterances of the same text by DTW on mel-cepstra.

Why spectral features and not F0: DTW warps time to make the two feature tracks agree, so
aligning on F0 would bend a wrong accent onto the reference's contour and hide exactly the error
the accent metrics must see. Low-order mel-cepstra (c1..c13, per-utterance mean/variance
normalised) follow the phonemes and the spectral envelope, not the harmonics, so the warp is
decided by what is said and the F0 comparison after it stays honest. Frames are 10 ms, the same
grid as `f0.extract_f0`, so path indices index F0 tracks directly."""

from __future__ import annotations

import numpy as np
from scipy.fft import dct

from zipvoice.eval.accent.f0 import FRAME_PERIOD_MS, SAMPLE_RATE
from zipvoice.utils.feature import mel_filterbank

N_FFT = 512
N_MELS = 40
N_CEPS = 13


def num_frames(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Frames on the 10 ms grid (frame k centred at k * period), as F0 tracks have."""
    return int(num_samples / sample_rate / (FRAME_PERIOD_MS / 1000.0)) + 1


def mel_cepstrum(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(frames, 13) CMVN-normalised mel-cepstra c1..c13 on the 10 ms grid."""
    hop = int(round(sample_rate * FRAME_PERIOD_MS / 1000.0))
    frames = num_frames(len(wave), sample_rate)
    padded = np.pad(np.asarray(wave, dtype=np.float64), (N_FFT // 2, N_FFT // 2 + hop))
    index = np.arange(N_FFT)[None, :] + hop * np.arange(frames)[:, None]
    spectrum = np.abs(np.fft.rfft(padded[index] * np.hanning(N_FFT), axis=1)) ** 2
    fbank = mel_filterbank(sample_rate, N_FFT, N_MELS, f_min=80.0, f_max=7600.0).numpy()
    log_mel = np.log(spectrum @ fbank.astype(np.float64) + 1e-8)
    ceps = dct(log_mel, type=2, norm="ortho", axis=1)[:, 1 : N_CEPS + 1]
    return (ceps - ceps.mean(axis=0)) / (ceps.std(axis=0) + 1e-8)


def dtw_path(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost monotonic path through `cost` (n, m) with steps (1,0), (0,1), (1,1),
    from (0, 0) to (n-1, m-1). Filled one anti-diagonal at a time, so numpy does the work."""
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for s in range(2, n + m + 1):
        i = np.arange(max(1, s - m), min(n, s - 1) + 1)
        j = s - i
        best = np.minimum(np.minimum(acc[i - 1, j - 1], acc[i - 1, j]), acc[i, j - 1])
        acc[i, j] = cost[i - 1, j - 1] + best
    i, j = n, m
    path = [(n - 1, m - 1)]
    while (i, j) != (1, 1):
        steps = ((i - 1, j - 1), (i - 1, j), (i, j - 1))
        i, j = min(steps, key=lambda ij: acc[ij])
        path.append((i - 1, j - 1))
    path.reverse()
    pairs = np.asarray(path)
    return pairs[:, 0], pairs[:, 1]


def align(features_a: np.ndarray, features_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DTW path (frame indices into a, into b) under Euclidean frame distance."""
    if len(features_a) == 0 or len(features_b) == 0:
        raise ValueError("cannot align an empty feature sequence")
    diff = features_a[:, None, :] - features_b[None, :, :]
    return dtw_path(np.sqrt(np.sum(diff * diff, axis=-1)))
