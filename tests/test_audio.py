"""Audio I/O and prompt clean-up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from zipvoice.utils.audio import (
    AudioError,
    SilentAudioError,
    check_not_silent,
    is_silent,
    load_audio,
    resample,
    rms,
    rms_normalize,
    save_wav,
    trim_silence,
)


def _sine(seconds: float, sr: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _dominant_freq(wave: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave))
    return float(np.argmax(spectrum) * sr / len(wave))


@pytest.mark.parametrize(
    ("suffix", "fmt", "subtype"),
    [("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_24"), ("ogg", "OGG", "VORBIS")],
)
def test_load_formats_resamples_to_24k(tmp_path: Path, suffix: str, fmt: str, subtype: str) -> None:
    path = tmp_path / f"tone.{suffix}"
    sf.write(path, _sine(1.0, 16000), 16000, format=fmt, subtype=subtype)
    wave = load_audio(path)
    assert wave.dtype == torch.float32 and wave.ndim == 1
    assert abs(wave.shape[0] - 24000) <= 1
    assert abs(_dominant_freq(wave.numpy(), 24000) - 440.0) < 2.0
    assert abs(rms(wave[2400:-2400]) - 0.5 / np.sqrt(2)) < 0.02


def test_stereo_is_mixed_to_mono(tmp_path: Path) -> None:
    left, right = _sine(0.5, 24000, 300.0), _sine(0.5, 24000, 300.0, amp=0.1)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 24000, subtype="FLOAT")
    wave = load_audio(path)
    np.testing.assert_allclose(wave.numpy(), (left + right) / 2, atol=1e-6)


def test_resample_lengths_and_types() -> None:
    wave = _sine(1.0, 16000)
    up = resample(wave, 16000, 24000)
    assert isinstance(up, np.ndarray) and up.shape == (24000,) and up.dtype == np.float32
    up_torch = resample(torch.from_numpy(wave), 16000, 24000)
    assert isinstance(up_torch, torch.Tensor) and up_torch.shape == (24000,)
    stereo = resample(np.stack([wave, wave]), 16000, 24000)
    assert stereo.shape == (2, 24000)
    assert resample(wave, 16000, 16000) is wave
    with pytest.raises(ValueError, match="positive"):
        resample(wave, 0, 24000)


def test_rms_normalize_scales_up_only() -> None:
    quiet = torch.from_numpy(_sine(0.5, 24000, amp=0.01))
    normalised, scale = rms_normalize(quiet, target_rms=0.1)
    assert abs(rms(normalised) - 0.1) < 1e-4
    assert scale == pytest.approx(0.1 / rms(quiet))
    torch.testing.assert_close(normalised / scale, quiet)
    loud = _sine(0.5, 24000, amp=0.5)
    same, scale = rms_normalize(loud, target_rms=0.1)
    assert scale == 1.0 and same is loud
    silent, scale = rms_normalize(np.zeros(100, dtype=np.float32))
    assert scale == 1.0 and not silent.any()


def test_silence_detection_and_error_names_source() -> None:
    assert is_silent(np.zeros(2400, dtype=np.float32))
    assert is_silent(_sine(0.1, 24000, amp=1e-4))  # about -83 dBFS
    assert not is_silent(_sine(0.1, 24000, amp=0.01))  # about -43 dBFS
    with pytest.raises(SilentAudioError, match="prompt.wav is silent"):
        check_not_silent(np.zeros(2400, dtype=np.float32), "prompt.wav")
    with pytest.raises(SilentAudioError, match="prompt.wav is empty"):
        check_not_silent(torch.zeros(0), "prompt.wav")
    check_not_silent(_sine(0.1, 24000), "prompt.wav")


def test_trim_silence_edges_and_long_pauses() -> None:
    sr = 24000
    gap = np.zeros(sr, dtype=np.float32)  # 1 s
    short_gap = np.zeros(sr // 10, dtype=np.float32)  # 0.1 s, kept
    tone = _sine(0.5, sr)
    wave = np.concatenate([gap, tone, gap, tone, short_gap, tone, gap])
    wave += np.random.default_rng(0).normal(0, 1e-4, wave.size).astype(np.float32)
    trimmed = trim_silence(wave, sr, edge_keep_s=0.05, max_internal_silence_s=0.3)
    # three tones (1.5 s) + one pause cut to 0.3 s + the short gap + two 0.05 s edges
    expected = 1.5 + 0.3 + 0.1 + 0.1
    assert abs(trimmed.size / sr - expected) < 0.03
    assert np.abs(trimmed[: int(0.04 * sr)]).max() < 0.01  # kept lead-in is still silence
    assert np.abs(trimmed[int(0.07 * sr) : int(0.5 * sr)]).max() > 0.4  # tone follows
    as_tensor = trim_silence(torch.from_numpy(wave), sr, max_internal_silence_s=0.3)
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.shape[0] == trimmed.size
    quiet = wave * 0.01  # the threshold is relative to the loudest frame
    assert trim_silence(quiet, sr, max_internal_silence_s=0.3).size == trimmed.size
    untouched = np.zeros(sr, dtype=np.float32)
    assert trim_silence(untouched, sr).size == sr


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.wav"
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        load_audio(missing)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(AudioError, match="cannot read audio file .*garbage.wav"):
        load_audio(garbage)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 24000)
    with pytest.raises(AudioError, match="empty.wav is empty"):
        load_audio(empty)
    with pytest.raises(AudioError, match="not a file"):
        load_audio(tmp_path)


def test_save_wav_float_and_pcm16(tmp_path: Path) -> None:
    wave = torch.from_numpy(_sine(0.25, 24000, amp=0.8))
    float_path = save_wav(tmp_path / "f.wav", wave, subtype="FLOAT")
    data, sr = sf.read(float_path, dtype="float32")
    info = sf.info(str(float_path))
    assert sr == 24000 and info.subtype == "FLOAT"
    np.testing.assert_array_equal(data, wave.numpy())

    loud = wave * 2.0  # out of range: clipped, not wrapped
    pcm_path = save_wav(tmp_path / "p.wav", loud)
    data, _ = sf.read(pcm_path, dtype="float32")
    assert sf.info(str(pcm_path)).subtype == "PCM_16"
    np.testing.assert_allclose(data, np.clip(loud.numpy(), -1, 1), atol=1 / 32767)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.wav", "p.wav"]  # no temp files

    with pytest.raises(FileExistsError, match="p.wav exists"):
        save_wav(pcm_path, wave, overwrite=False)
    save_wav(pcm_path, wave * 0.0, overwrite=True)
    assert np.abs(sf.read(pcm_path)[0]).max() == 0.0
    with pytest.raises(ValueError, match="subtype"):
        save_wav(tmp_path / "x.wav", wave, subtype="PCM_24")  # type: ignore[arg-type]
