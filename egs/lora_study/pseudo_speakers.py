"""Pseudo-speakers by controlled WORLD resynthesis: many distinct voices from a few TTS voices.

The study needs speaker identity as a real variable (hundreds of voices, some never seen in
training) without downloading a corpus. A handful of engine voices (flite, festival, espeak-ng,
OpenJTalk) is analysed once with WORLD (pyworld: DIO + StoneMask F0, CheapTrick envelope, D4C
aperiodicity), then resynthesised under three controlled transforms, each a physical correlate
of who is speaking:

- F0 scaling (`f0_scale`): the speaker's pitch register;
- frequency warping of the spectral envelope and aperiodicity (`warp`): S'(f) = S(f / warp),
  the first-order effect of vocal-tract length (warp > 1: shorter tract, formants move up);
- rate (`rate`): the frame sequence is resampled in time, pitch untouched.

`PseudoSpeaker` holds one such setting on one base voice; `sample_speakers` draws many with a
fixed seed. `tests/test_lora_study.py` checks that the result is a voice by the metric the study
uses: Resemblyzer's similarity of two sentences of one pseudo-speaker beats that of two
pseudo-speakers of the same base voice.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np

FRAME_PERIOD_MS = 5.0
F0_FLOOR = 60.0
F0_CEIL = 600.0


def world() -> ModuleType:
    """pyworld, through the project's loader: pyworld 0.3.5's `__init__` imports
    `pkg_resources`, which current setuptools no longer ship (zipvoice.eval.accent.f0 loads the
    compiled extension directly in that case, so a fresh install needs no setuptools pin)."""
    from zipvoice.eval.accent.f0 import _import_pyworld

    return _import_pyworld()


@dataclass(frozen=True)
class WorldFeatures:
    """One utterance in WORLD's terms, at `sample_rate`, one frame every FRAME_PERIOD_MS."""

    f0: np.ndarray  # (frames,) Hz, 0 where unvoiced
    envelope: np.ndarray  # (frames, fft_size // 2 + 1) power spectral envelope
    aperiodicity: np.ndarray  # (frames, fft_size // 2 + 1) in [0, 1]
    sample_rate: int


def analyse(wave: np.ndarray, sample_rate: int) -> WorldFeatures:
    """WORLD analysis of a mono float wave. DIO + StoneMask rather than Harvest: about ten
    times faster, and clean TTS speech does not need Harvest's robustness."""
    pw = world()
    x = np.ascontiguousarray(wave, dtype=np.float64)
    f0, times = pw.dio(x, sample_rate, f0_floor=F0_FLOOR, f0_ceil=F0_CEIL,
                       frame_period=FRAME_PERIOD_MS)  # fmt: skip
    f0 = pw.stonemask(x, f0, times, sample_rate)
    fft_size = pw.get_cheaptrick_fft_size(sample_rate, F0_FLOOR)
    envelope = pw.cheaptrick(x, f0, times, sample_rate, f0_floor=F0_FLOOR, fft_size=fft_size)
    aperiodicity = pw.d4c(x, f0, times, sample_rate, fft_size=fft_size)
    return WorldFeatures(f0, envelope, aperiodicity, sample_rate)


def warp_frequency(spectra: np.ndarray, warp: float) -> np.ndarray:
    """S'(f) = S(f / warp) along the last axis (bins 0..Nyquist), linear interpolation; bins
    that map beyond Nyquist take the last bin's value."""
    if warp <= 0:
        raise ValueError(f"warp must be positive, got {warp}")
    bins = spectra.shape[-1]
    source = np.clip(np.arange(bins, dtype=np.float64) / warp, 0, bins - 1)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, bins - 1)
    frac = source - low
    return spectra[..., low] * (1.0 - frac) + spectra[..., high] * frac


def stretch_frames(features: WorldFeatures, rate: float) -> WorldFeatures:
    """Speak `rate` times faster: resample the frame sequence (nearest frame for F0, so voicing
    boundaries stay sharp; linear for the spectra)."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    frames = features.f0.shape[0]
    count = max(1, int(round(frames / rate)))
    position = np.linspace(0.0, frames - 1, count)
    nearest = np.clip(np.rint(position).astype(np.int64), 0, frames - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, frames - 1)
    frac = (position - low)[:, None]

    def interp(x: np.ndarray) -> np.ndarray:
        return x[low] * (1.0 - frac) + x[high] * frac

    return WorldFeatures(
        features.f0[nearest], interp(features.envelope), interp(features.aperiodicity),
        features.sample_rate,
    )  # fmt: skip


@dataclass(frozen=True)
class PseudoSpeaker:
    """A base engine voice and the three transforms that make it someone else."""

    name: str  # no "_" (it separates speaker and utterance number in ids)
    base: str  # a base-voice name (see corpus.py's catalogue)
    f0_scale: float = 1.0
    warp: float = 1.0
    rate: float = 1.0

    def __post_init__(self) -> None:
        if "_" in self.name:
            raise ValueError(f"pseudo-speaker name {self.name!r} must not contain '_'")
        for key in ("f0_scale", "warp", "rate"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{key} of {self.name} must be positive, got {value}")


def resynthesise(features: WorldFeatures, speaker: PseudoSpeaker) -> np.ndarray:
    """The utterance as `speaker` says it: float32 wave at the features' rate, peak 0.9."""
    pw = world()
    stretched = stretch_frames(features, speaker.rate)
    f0 = stretched.f0 * speaker.f0_scale
    envelope = np.ascontiguousarray(warp_frequency(stretched.envelope, speaker.warp))
    aperiodicity = np.clip(warp_frequency(stretched.aperiodicity, speaker.warp), 0.0, 1.0)
    wave = pw.synthesize(np.ascontiguousarray(f0), envelope, np.ascontiguousarray(aperiodicity),
                         features.sample_rate, FRAME_PERIOD_MS)  # fmt: skip
    peak = float(np.max(np.abs(wave))) if wave.size else 0.0
    if peak > 0:
        wave = wave * (0.9 / peak)
    return wave.astype(np.float32)


@dataclass(frozen=True)
class SpeakerRanges:
    """Where transforms are drawn from (log-uniform): wide enough that neighbours differ,
    narrow enough that WORLD still sounds like speech."""

    f0_scale: tuple[float, float] = (0.72, 1.4)
    warp: tuple[float, float] = (0.86, 1.16)
    rate: tuple[float, float] = (0.85, 1.18)


def _log_uniform(rng: random.Random, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return round(math.exp(rng.uniform(math.log(low), math.log(high))), 4)


def sample_speakers(
    prefix: str,
    bases: Sequence[str],
    count: int,
    seed: int,
    ranges: SpeakerRanges = SpeakerRanges(),
) -> list[PseudoSpeaker]:
    """`count` pseudo-speakers named `{prefix}{i:03d}`, base voices in turn (so every base
    voice gets about count / len(bases) of them), transforms drawn with `seed`."""
    if not bases:
        raise ValueError("no base voices to make pseudo-speakers from")
    rng = random.Random(seed)
    return [
        PseudoSpeaker(
            name=f"{prefix}{i:03d}",
            base=bases[i % len(bases)],
            f0_scale=_log_uniform(rng, ranges.f0_scale),
            warp=_log_uniform(rng, ranges.warp),
            rate=_log_uniform(rng, ranges.rate),
        )
        for i in range(count)
    ]
