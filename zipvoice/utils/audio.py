"""Audio I/O and prompt clean-up without torchaudio: soundfile to read and write, soxr to resample.

Waves are float32 in [-1, 1]. Functions that transform a wave return the same kind (numpy or
torch) they were given, so dataset code (numpy) and inference code (torch) share them.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import soundfile as sf
import soxr
import torch

from zipvoice.utils.fileio import atomic_write

Wave = TypeVar("Wave", np.ndarray, torch.Tensor)

DEFAULT_SR = 24000
# Sample rates a speech recording can have (telephone 8 kHz and below, studio 384 kHz and
# above): anything outside is a damaged header.
MIN_SAMPLE_RATE = 4000
MAX_SAMPLE_RATE = 768000


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, empty, silent or malformed."""


class SilentAudioError(AudioError):
    """A prompt (or other input) with no audible signal."""


def _to_numpy(wave: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(wave, torch.Tensor):
        return wave.detach().cpu().float().numpy()
    return np.asarray(wave, dtype=np.float32)


def _like(result: np.ndarray, template: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    if isinstance(template, torch.Tensor):
        return torch.from_numpy(np.ascontiguousarray(result)).to(template.device)
    return result


def load_audio(path: str | Path, target_sr: int = DEFAULT_SR) -> torch.Tensor:
    """Read any format soundfile supports -> mono float32 tensor (samples,) at `target_sr`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"audio file {path} does not exist")
    if not path.is_file():
        raise AudioError(f"audio path {path} is not a file")
    try:
        data, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile's errors are terse; say which file and why
        raise AudioError(f"cannot read audio file {path}: {err}") from err
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        # A header claiming 1 Hz would make resampling allocate 24000 samples per sample.
        raise AudioError(
            f"audio file {path}: its header claims a sample rate of {sample_rate} Hz, outside "
            f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz; the file is damaged or not audio"
        )
    if data.shape[0] == 0:
        raise AudioError(f"audio file {path} is empty (0 samples)")
    if not np.isfinite(data).all():
        raise AudioError(f"audio file {path} contains NaN or infinite samples")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sample_rate != target_sr:
        mono = resample(mono, sample_rate, target_sr)
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))


def resample(wave: Wave, orig_sr: int, target_sr: int) -> Wave:
    """High-quality (soxr HQ) resampling of (samples,) or (channels, samples)."""
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    if orig_sr == target_sr:
        return wave
    data = _to_numpy(wave)
    if data.ndim == 1:
        out = soxr.resample(data, orig_sr, target_sr, quality="HQ")
    elif data.ndim == 2:  # soxr wants (frames, channels)
        out = soxr.resample(data.T, orig_sr, target_sr, quality="HQ").T
    else:
        raise ValueError(f"resample expects (samples,) or (channels, samples), got {data.shape}")
    return _like(out.astype(np.float32, copy=False), wave)


def rms(wave: np.ndarray | torch.Tensor) -> float:
    data = _to_numpy(wave)
    return float(np.sqrt(np.mean(np.square(data, dtype=np.float64)))) if data.size else 0.0


def rms_normalize(wave: Wave, target_rms: float = 0.1) -> tuple[Wave, float]:
    """Raise a quiet wave's RMS to `target_rms`; louder waves are left alone.

    Returns (wave, scale); generated audio divided by `scale` comes back at the prompt's level,
    as the reference inference tool does. A silent wave gets scale 1 (nothing to scale).
    """
    level = rms(wave)
    if level <= 0.0 or level >= target_rms:
        return wave, 1.0
    scale = target_rms / level
    return wave * scale, scale


# Highest |sample| the limiter lets through: a little headroom below full scale, so that 16-bit
# rounding and a player's resampling do not clip either.
PEAK_CEILING = 0.99
# How far ahead (and behind) the limiter looks: gain changes are spread over about twice this,
# short enough to catch a transient, long enough not to distort (no sample-wise clipping).
LIMITER_WINDOW_S = 0.005


def limit_peaks(
    wave: Wave,
    ceiling: float = PEAK_CEILING,
    sr: int = DEFAULT_SR,
    window_s: float = LIMITER_WINDOW_S,
) -> Wave:
    """A look-ahead limiter: a smooth gain that keeps every |sample| <= `ceiling`, 1 elsewhere.

    The gain each sample needs (ceiling / |x|, at most 1) is min-filtered over a window of 2h+1
    samples, then averaged over the same window. Every average at n covers only minima of
    windows that contain n, so it never exceeds the gain n needs: no sample passes the ceiling,
    and the gain moves smoothly instead of flattening the peaks (hard clipping). Quiet waves
    come back unchanged. (samples,) or (channels, samples), numpy or torch.
    """
    from scipy.ndimage import minimum_filter1d, uniform_filter1d

    if not 0.0 < ceiling <= 1.0:
        raise ValueError(f"ceiling must be in (0, 1], got {ceiling}")
    data = _to_numpy(wave).astype(np.float64)
    if data.ndim not in (1, 2):
        raise ValueError(f"limit_peaks expects (samples,) or (channels, samples), got {data.shape}")
    peak = np.abs(data) if data.ndim == 1 else np.abs(data).max(axis=0)
    if peak.size == 0 or peak.max() <= ceiling:
        return wave
    needed = np.minimum(1.0, ceiling / np.maximum(peak, 1e-12))
    size = 2 * max(1, round(window_s * sr)) + 1
    gain = uniform_filter1d(minimum_filter1d(needed, size, mode="nearest"), size, mode="nearest")
    gain = np.minimum(gain, needed)  # float rounding of the average only
    limited = (data * gain).astype(np.float32)
    return _like(np.clip(limited, -ceiling, ceiling), wave)


def normalize_loudness(
    wave: Wave, target_rms: float, ceiling: float = PEAK_CEILING, sr: int = DEFAULT_SR
) -> Wave:
    """Scale to `target_rms` (0 or less: keep the level), then `limit_peaks`, so the result
    never clips. The RMS ends a little below target only where peaks had to be limited."""
    if not math.isfinite(target_rms):
        raise ValueError(f"target RMS must be finite, got {target_rms}")
    level = rms(wave)
    if target_rms > 0 and level > 0:
        wave = wave * (target_rms / level)
    return limit_peaks(wave, ceiling=ceiling, sr=sr)


def level_db(wave: np.ndarray | torch.Tensor) -> float:
    """RMS level in dB relative to full scale (-inf for digital silence)."""
    level = rms(wave)
    return 20.0 * math.log10(level) if level > 0.0 else -math.inf


def is_silent(wave: np.ndarray | torch.Tensor, threshold_db: float = -60.0) -> bool:
    """True when the wave's RMS level is below `threshold_db` dBFS (or it has no samples)."""
    return level_db(wave) < threshold_db


def check_not_silent(
    wave: np.ndarray | torch.Tensor, source: str | Path, threshold_db: float = -60.0
) -> None:
    """Refuse a silent prompt, naming where it came from."""
    if _to_numpy(wave).size == 0:
        raise SilentAudioError(f"audio from {source} is empty")
    if is_silent(wave, threshold_db):
        raise SilentAudioError(
            f"audio from {source} is silent (RMS {level_db(wave):.1f} dBFS, below "
            f"{threshold_db:.1f} dBFS); record a prompt with audible speech"
        )


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index ranges where mask is True."""
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


def trim_silence(
    wave: Wave,
    sample_rate: int = DEFAULT_SR,
    threshold_db: float = -40.0,
    frame_s: float = 0.01,
    edge_keep_s: float = 0.05,
    max_internal_silence_s: float = 0.5,
) -> Wave:
    """Cut leading/trailing silence and shorten internal pauses longer than a limit.

    A frame is silent when its RMS is `threshold_db` below the loudest frame's, so the rule works
    for quiet and loud recordings alike. `edge_keep_s` of silence stays at each end so onsets
    are not clipped; an internal pause keeps half the limit on each side of the cut.
    A wave with no signal at all is returned unchanged (reject it with `check_not_silent`).
    """
    data = _to_numpy(wave)
    if data.ndim != 1:
        raise ValueError(f"trim_silence expects a mono (samples,) wave, got {data.shape}")
    frame = max(1, round(frame_s * sample_rate))
    num_frames = math.ceil(data.size / frame)
    if num_frames == 0:
        return wave
    framed = np.pad(data, (0, num_frames * frame - data.size)).reshape(num_frames, frame)
    energy = np.mean(np.square(framed, dtype=np.float64), axis=1)
    peak = energy.max()
    if peak <= 0.0:
        return wave
    silent = energy < peak * 10.0 ** (threshold_db / 10.0)

    keep_edge = round(edge_keep_s * sample_rate)
    keep_side = round(max_internal_silence_s * sample_rate / 2)
    pieces: list[tuple[int, int]] = []
    cursor = 0
    for start_frame, end_frame in _runs(silent):
        start, end = start_frame * frame, min(end_frame * frame, data.size)
        if start == 0:  # leading silence
            cursor = max(0, end - keep_edge)
        elif end >= data.size:  # trailing silence
            pieces.append((cursor, min(data.size, start + keep_edge)))
            cursor = data.size
        elif end - start > 2 * keep_side:
            pieces.append((cursor, start + keep_side))
            cursor = end - keep_side
    if cursor < data.size:
        pieces.append((cursor, data.size))
    trimmed = np.concatenate([data[a:b] for a, b in pieces]) if pieces else data[:0]
    return _like(trimmed, wave)


def save_wav(
    path: str | Path,
    wave: np.ndarray | torch.Tensor,
    sr: int = DEFAULT_SR,
    subtype: Literal["PCM_16", "FLOAT"] = "PCM_16",
    overwrite: bool = True,
) -> Path:
    """Write a WAV atomically (temp file in the same folder, fsync, rename).

    `wave` is (samples,) or (channels, samples). 16-bit output is clipped to [-1, 1] rather
    than letting out-of-range samples wrap around.
    """
    path = Path(path)
    if subtype not in ("PCM_16", "FLOAT"):
        raise ValueError(f"subtype must be 'PCM_16' or 'FLOAT', got {subtype!r}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    data = _to_numpy(wave)
    if data.ndim == 2:
        data = data.T  # soundfile wants (frames, channels)
    elif data.ndim != 1:
        raise ValueError(f"save_wav expects (samples,) or (channels, samples), got {data.shape}")
    if not np.isfinite(data).all():
        raise AudioError(f"refusing to write {path}: wave contains NaN or infinite samples")
    if subtype == "PCM_16":
        data = np.clip(data, -1.0, 1.0)

    try:
        atomic_write(path, lambda tmp: sf.write(tmp, data, sr, subtype=subtype, format="WAV"))
    except (sf.LibsndfileError, OSError) as err:
        # libsndfile reports a full disk (or a file-size limit) as "System error." only.
        free = shutil.disk_usage(path.parent).free
        raise AudioError(
            f"cannot write {path}: {err} ({free / 2**20:.1f} MiB free in {path.parent}; "
            "is the disk full?)"
        ) from None
    return path
