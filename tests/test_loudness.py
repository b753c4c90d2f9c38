"""Output loudness: scaled to the requested RMS, peak-limited below full scale, never clipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import PARITY
from tests.helpers import PROMPT_TEXT, TEXT, make_model_dir
from zipvoice.bin import infer_zipvoice
from zipvoice.utils.audio import PEAK_CEILING, limit_peaks, normalize_loudness, rms

SR = 24000
# A 16-bit file cannot hold the ceiling exactly: allow one step of rounding.
PCM_STEP = 1.0 / 32768


def _speech_like(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """Harmonics under a syllable-rate envelope plus a few sharp clicks: a crest factor well
    above a sine's, so a level change pushes the peaks over full scale first."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    wave = sum(np.sin(2 * np.pi * 140 * k * t + rng.uniform(0, 6)) / k for k in range(1, 8))
    wave *= 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    wave[rng.integers(0, t.size, 6)] *= 4.0
    return (0.1 * wave / rms(wave)).astype(np.float32)


def test_limiter_keeps_every_sample_under_the_ceiling_without_flattening():
    loud = 8.0 * _speech_like()
    limited = limit_peaks(loud)
    assert np.abs(limited).max() <= PEAK_CEILING
    # A limiter lowers the gain around peaks; hard clipping would pin many samples at the ceiling.
    pinned = np.mean(np.abs(limited) > PEAK_CEILING - 1e-3)
    assert pinned < 0.002 and np.mean(np.abs(np.clip(loud, -0.99, 0.99)) >= 0.99) > 0.05
    # Where the wave is well below the ceiling nearby, it passes unchanged.
    quiet_region = np.abs(loud) < 0.05
    assert quiet_region.any()
    far = np.convolve(np.abs(loud) > PEAK_CEILING, np.ones(1001), mode="same") == 0
    np.testing.assert_allclose(limited[far], loud[far], rtol=1e-6)


def test_quiet_waves_are_returned_unchanged_and_types_are_kept():
    quiet = _speech_like()
    assert limit_peaks(quiet) is quiet
    as_tensor = limit_peaks(torch.from_numpy(6.0 * quiet))
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.abs().max() <= PEAK_CEILING
    stereo = limit_peaks(np.stack([6.0 * quiet, 0.5 * quiet]))
    assert stereo.shape == (2, quiet.size) and np.abs(stereo).max() <= PEAK_CEILING


def test_normalize_reaches_the_target_when_peaks_allow_and_limits_otherwise():
    wave = 3.0 * _speech_like()
    at_target = normalize_loudness(wave, 0.1)
    assert rms(at_target) == pytest.approx(0.1, rel=1e-3)
    loud = normalize_loudness(wave, 0.5)
    assert np.abs(loud).max() <= PEAK_CEILING
    # Only the limited peaks lose level: far louder than scaling the whole wave down to fit.
    scaled = wave * (0.5 / rms(wave))
    peak_normalised = rms(scaled * (PEAK_CEILING / np.abs(scaled).max()))
    assert 3 * peak_normalised < rms(loud) <= 0.5
    assert np.array_equal(normalize_loudness(wave / 3.0, 0.0), wave / 3.0)  # level kept
    kept = normalize_loudness(wave, 0.0)  # peaks over full scale are still limited
    assert np.abs(kept).max() <= PEAK_CEILING and rms(kept) > 0.95 * rms(wave)
    with pytest.raises(ValueError, match="finite"):
        normalize_loudness(wave, float("nan"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("loud") / "zipvoice", "zipvoice")


def _generate(model_dir: Path, prompt: np.ndarray, out: Path, *extra: str) -> np.ndarray:
    sf.write(out.with_suffix(".prompt.wav"), prompt, SR)
    code = infer_zipvoice.main(
        [
            "--model-dir", str(model_dir),
            "--vocoder-path", str(PARITY / "vocos"),
            "--tokenizer", "simple",
            "--prompt-wav", str(out.with_suffix(".prompt.wav")),
            "--prompt-text", PROMPT_TEXT,
            "--text", TEXT,
            "--res-wav-path", str(out),
            "--num-step", "3",
            *extra,
        ]
    )  # fmt: skip
    assert code == 0
    wave, sr = sf.read(out, dtype="float32")
    assert sr == SR and wave.size > SR // 4
    return wave


def test_generated_speech_from_a_loud_prompt_never_clips(model_dir, tmp_path):
    prompt = np.clip(20.0 * _speech_like(), -0.95, 0.95)  # a shouted, saturated prompt
    assert rms(prompt) > 0.5
    wave = _generate(model_dir, prompt, tmp_path / "loud.wav", "--target-rms", "0.5")
    assert np.abs(wave).max() <= PEAK_CEILING + PCM_STEP
    assert np.mean(np.abs(wave) >= PEAK_CEILING - 1e-3) < 0.005  # limited, not flattened
    assert 0.2 < rms(wave) <= 0.5 + 1e-3


def test_generated_speech_comes_at_the_requested_level(model_dir, tmp_path):
    from zipvoice.inference.prompt import prepare_prompt

    wave = _generate(model_dir, 1.5 * _speech_like(), tmp_path / "level.wav", "--target-rms", "0.1")
    assert rms(wave) == pytest.approx(0.1, rel=0.01)
    assert np.abs(wave).max() <= PEAK_CEILING + PCM_STEP
    # A quieter prompt is answered at its own level (as the pipeline measures it: trimmed, with
    # its trailing pause), as the reference tool does.
    quiet = _generate(model_dir, 0.3 * _speech_like(), tmp_path / "quiet.wav")
    prompt = prepare_prompt(tmp_path / "quiet.prompt.wav", PROMPT_TEXT, lambda text: list(text))
    assert prompt.rms_scale > 3
    assert rms(quiet) == pytest.approx(0.1 / prompt.rms_scale, rel=0.01)
