"""F0 extraction for the accent metrics.

Praat's autocorrelation tracker (praat-parselmouth) is the default: on OpenJTalk speech
shifted by known half-tones it had the fewest gross errors and the most stable voicing decision
of the trackers measured, was exact on pure tones, and ran at ~0.5% of real time
(benchmarks/f0_trackers.py; numbers in docs/evaluation-accent.md). pyworld's DIO and Harvest
(+StoneMask) stay selectable for comparison with WORLD-based papers; Harvest voices silence
and rejects pure tones, so it is not the default."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

SAMPLE_RATE = 16000  # F0 needs no more; Harvest's cost grows with the rate
FRAME_PERIOD_MS = 10.0
F0_FLOOR = 60.0
F0_CEIL = 800.0
METHODS = ("harvest", "dio", "praat")


@dataclass(frozen=True)
class F0Config:
    """How F0 is tracked. The range covers low male to high female/child voices."""

    method: str = "praat"
    frame_period_ms: float = FRAME_PERIOD_MS
    f0_floor: float = F0_FLOOR
    f0_ceil: float = F0_CEIL

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown F0 method {self.method!r}; choose from {METHODS}")
        if not 0 < self.f0_floor < self.f0_ceil:
            raise ValueError(f"need 0 < f0_floor < f0_ceil, got {self.f0_floor}, {self.f0_ceil}")


def _import_pyworld() -> ModuleType:
    """pyworld 0.3.5's `__init__` imports `pkg_resources`, which setuptools >= 81 no longer
    ships; its compiled extension does not need it, so load that directly when the package
    import fails for that reason alone."""
    try:
        import pyworld
    except ModuleNotFoundError as err:
        if err.name != "pkg_resources":
            msg = "F0 methods 'harvest'/'dio' need pyworld (pip install pyworld)"
            raise ImportError(msg) from err
        spec = importlib.util.find_spec("pyworld")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("pyworld is not installed (pip install pyworld)") from err
        folder = Path(list(spec.submodule_search_locations)[0])
        binaries = sorted(folder.glob("pyworld*.so")) + sorted(folder.glob("pyworld*.pyd"))
        if not binaries:
            raise ImportError(f"pyworld's compiled extension not found in {folder}") from err
        loader = importlib.machinery.ExtensionFileLoader("_pyworld_ext.pyworld", str(binaries[0]))
        ext_spec = importlib.util.spec_from_file_location(
            "_pyworld_ext.pyworld", binaries[0], loader=loader
        )
        module = importlib.util.module_from_spec(ext_spec)
        loader.exec_module(module)
        return module
    return pyworld


def _pyworld_f0(wave: np.ndarray, sample_rate: int, config: F0Config) -> np.ndarray:
    pyworld = _import_pyworld()
    x = np.ascontiguousarray(wave, dtype=np.float64)
    track = pyworld.harvest if config.method == "harvest" else pyworld.dio
    f0, times = track(
        x,
        sample_rate,
        f0_floor=config.f0_floor,
        f0_ceil=config.f0_ceil,
        frame_period=config.frame_period_ms,
    )
    # StoneMask refines each voiced frame's F0 from the instantaneous frequency.
    return pyworld.stonemask(x, f0, times, sample_rate)


def _praat_f0(wave: np.ndarray, sample_rate: int, config: F0Config) -> np.ndarray:
    try:
        import parselmouth
    except ImportError as err:
        raise ImportError(
            "F0 method 'praat' needs praat-parselmouth (pip install praat-parselmouth)"
        ) from err
    step = config.frame_period_ms / 1000.0
    num_frames = int(len(wave) / sample_rate / step) + 1
    if len(wave) / sample_rate < 3.0 / config.f0_floor + step:
        # Praat needs three periods of the lowest pitch; a shorter clip has no F0 to find.
        return np.zeros(num_frames)
    sound = parselmouth.Sound(np.asarray(wave, dtype=np.float64), sampling_frequency=sample_rate)
    pitch = sound.to_pitch_ac(
        time_step=step, pitch_floor=config.f0_floor, pitch_ceiling=config.f0_ceil
    )
    # Resample Praat's frame grid onto pyworld's (frame k at k * step seconds).
    times = np.arange(num_frames) * step
    values = np.nan_to_num(pitch.selected_array["frequency"])
    frame_times = pitch.xs()
    index = np.clip(np.round((times - frame_times[0]) / step).astype(int), 0, len(values) - 1)
    f0 = values[index]
    f0[(times < frame_times[0] - step) | (times > frame_times[-1] + step)] = 0.0
    return f0


def extract_f0(wave: np.ndarray, sample_rate: int, config: F0Config | None = None) -> np.ndarray:
    """F0 in Hz per frame (frame k centred at k * frame_period); 0 where unvoiced."""
    config = config or F0Config()
    wave = np.asarray(wave)
    if wave.ndim != 1 or wave.size == 0:
        raise ValueError(f"expected a non-empty mono waveform, got shape {wave.shape}")
    if config.method == "praat":
        f0 = _praat_f0(wave, sample_rate, config)
    else:
        f0 = _pyworld_f0(wave, sample_rate, config)
    f0 = np.where(np.isfinite(f0) & (f0 > 0), f0, 0.0)
    return f0.astype(np.float64)


def hz_to_cents(f0: np.ndarray, ref_hz: float = 55.0) -> np.ndarray:
    """Cents above `ref_hz` (1200 per octave); only meaningful where f0 > 0."""
    return 1200.0 * np.log2(np.maximum(f0, 1e-6) / ref_hz)
