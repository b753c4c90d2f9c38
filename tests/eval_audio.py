"""Real speech the evaluation tests make themselves: flite and espeak-ng voices (English),
pyopenjtalk's HTS voice at shifted pitch and vocal-tract length (Japanese), and noise mixed
in at a chosen SNR. Each voice says two different sentences (a and b)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

ENGLISH = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please call Stella and ask her to bring these things with her from the store.",
)
JAPANESE = (
    "今日は天気が良いので、公園まで散歩に行きました。",
    "駅の近くに新しいパン屋ができたそうです。",
)
# name -> how it is made. The pyopenjtalk variants are the same HTS voice with its pitch raised
# five semitones, or its formants scaled by 1.2 (a shorter vocal tract) at the original pitch.
VOICES = {
    "flite_slt": ("flite", "slt"),
    "flite_awb": ("flite", "awb"),
    "flite_rms": ("flite", "rms"),
    "espeak_us": ("espeak-ng", "en-us"),
    "ojt_mei": ("openjtalk", (0.0, 1.0)),
    "ojt_mei_high": ("openjtalk", (5.0, 1.0)),
    "ojt_mei_formant": ("openjtalk", (0.0, 1.2)),
}
SETUP_HINT = "install it (scripts/setup.sh does, or: apt-get install -y flite espeak-ng)"


def require_binary(name: str) -> None:
    if shutil.which(name) is None:
        pytest.skip(f"{name} not found on PATH: {SETUP_HINT}")


def synth_openjtalk(text: str, path: Path, half_tone: float = 0.0, formant: float = 1.0) -> Path:
    """pyopenjtalk's voice; `formant` > 1 shortens the vocal tract: synthesise slower and
    lower by that factor, then resample so it plays back faster at the original pitch."""
    import pyopenjtalk

    shift = half_tone - 12.0 * np.log2(formant)
    wave, sr = pyopenjtalk.tts(text, speed=1.0 / formant, half_tone=shift)
    wave = (wave / 32768.0).astype(np.float32)
    if formant != 1.0:
        wave = soxr.resample(wave, sr * formant, sr).astype(np.float32)
    sf.write(path, wave, sr)
    return path


def synth(voice: str, index: int, path: Path) -> Path:
    """Sentence `index` (0 or 1) in `voice` (a key of VOICES), written to `path`."""
    engine, arg = VOICES[voice]
    if engine == "openjtalk":
        half_tone, formant = arg
        return synth_openjtalk(JAPANESE[index], path, half_tone, formant)
    require_binary(engine)
    if engine == "flite":
        cmd = ["flite", "-voice", arg, "-t", ENGLISH[index], "-o", str(path)]
    else:
        cmd = ["espeak-ng", "-v", arg, "-w", str(path), ENGLISH[index]]
    subprocess.run(cmd, check=True, capture_output=True)
    return path


def make_voices(folder: Path, voices: tuple[str, ...] = tuple(VOICES)) -> dict[str, list[Path]]:
    """voice -> [path of sentence a, path of sentence b]."""
    folder.mkdir(parents=True, exist_ok=True)
    return {v: [synth(v, i, folder / f"{v}_{'ab'[i]}.wav") for i in (0, 1)] for v in voices}


def add_noise(wave: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    """`wave` plus white noise at `snr_db` (relative to the wave's power), peak-limited."""
    rng = np.random.default_rng(seed)
    power = float(np.mean(wave.astype(np.float64) ** 2))
    noise = rng.normal(0.0, np.sqrt(power / 10 ** (snr_db / 10)), wave.shape)
    mixed = wave + noise
    return (mixed / max(1.0, float(np.abs(mixed).max()) / 0.99)).astype(np.float32)


def write_test_list(path: Path, rows: list[tuple[str, str, Path, str]]) -> Path:
    """An inference-format list: name, prompt_text, prompt_wav, text per line."""
    lines = [f"{name}\t{ptext}\t{pwav}\t{text}" for name, ptext, pwav, text in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
