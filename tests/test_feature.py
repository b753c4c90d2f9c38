"""Vocos mel features: reference parity, frame rule, lhotse registration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from lhotse import CutSet, Recording
from lhotse.features.base import FeatureExtractor, create_default_feature_extractor
from lhotse.features.io import NumpyFilesWriter

from zipvoice.utils.feature import (
    VocosFbank,
    VocosFbankConfig,
    compute_vocos_mel,
    mel_filterbank,
)


def _sine(num_samples: int, freq: float = 440.0, sr: int = 24000) -> np.ndarray:
    t = np.arange(num_samples) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_matches_reference_fbank(parity_dir: Path) -> None:
    case = torch.load(parity_dir / "fbank_case.pt", weights_only=True)
    extractor = VocosFbank()
    mel = extractor.extract(case["wave"], case["sampling_rate"])
    assert isinstance(mel, torch.Tensor) and mel.shape == case["mel"].shape
    torch.testing.assert_close(mel, case["mel"], atol=1e-4, rtol=0)
    batched = compute_vocos_mel(case["wave"].unsqueeze(0))
    torch.testing.assert_close(batched[0], case["mel"], atol=1e-4, rtol=0)
    from_numpy = extractor.extract(case["wave"].numpy(), 24000)
    assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.float32
    np.testing.assert_allclose(from_numpy, case["mel"].numpy(), atol=1e-4)


def test_filterbank_matches_published_buffer(parity_dir: Path) -> None:
    state = torch.load(parity_dir / "vocos" / "pytorch_model.bin", weights_only=True)
    published = state["feature_extractor.mel_spec.mel_scale.fb"]
    torch.testing.assert_close(mel_filterbank(), published, atol=1e-7, rtol=0)


@pytest.mark.parametrize("num_samples", [0, 100, 127, 128, 300, 511, 1000, 24000, 24001, 47223])
def test_frame_count_rule(num_samples: int) -> None:
    mel = VocosFbank().extract(_sine(num_samples), 24000)
    assert mel.shape == ((num_samples + 128) // 256, 100)
    assert np.isfinite(mel).all()


def test_batch_equals_single_and_compute_vocos_mel() -> None:
    extractor = VocosFbank()
    waves = [_sine(n, freq=200.0 + n % 500) for n in (24000, 7001, 300, 513)]
    batch = extractor.extract_batch(waves, sampling_rate=24000)
    assert len(batch) == len(waves)
    for wave, feats in zip(waves, batch, strict=True):
        np.testing.assert_allclose(feats, extractor.extract(wave, 24000), atol=1e-5)
    # padded tensor + lengths, as on-the-fly feature code passes them
    padded = torch.zeros(2, 24000)
    padded[0] = torch.from_numpy(waves[0])
    padded[1, :7001] = torch.from_numpy(waves[1])
    from_padded = extractor.extract_batch(padded, 24000, lengths=torch.tensor([24000, 7001]))
    torch.testing.assert_close(from_padded[1], torch.from_numpy(batch[1]), atol=1e-5, rtol=0)
    same_length = torch.from_numpy(np.stack([waves[0], waves[0] * 0.5]))
    mel = compute_vocos_mel(same_length)
    assert mel.shape == (2, (24000 + 128) // 256, 100)
    torch.testing.assert_close(mel[0], from_padded[0], atol=1e-5, rtol=0)
    # halving the amplitude shifts the log-magnitude by log(0.5) wherever above the clamp
    torch.testing.assert_close(mel[1], mel[0] + np.log(0.5), atol=1e-3, rtol=0)


def test_stereo_is_mixed_down() -> None:
    left, right = _sine(4800, 300.0), _sine(4800, 900.0)
    extractor = VocosFbank()
    stereo = extractor.extract(np.stack([left, right]), 24000)
    mono = extractor.extract((left + right) / 2, 24000)
    np.testing.assert_allclose(stereo, mono, atol=1e-5)


def test_wrong_sampling_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="expects 24000 Hz audio, got 16000 Hz"):
        VocosFbank().extract(_sine(16000), 16000)
    with pytest.raises(ValueError, match="16000 Hz"):
        VocosFbank().extract_batch([_sine(16000)], 16000)


def test_extractor_properties_and_config_round_trip() -> None:
    extractor = VocosFbank()
    assert extractor.frame_shift == 256 / 24000
    assert extractor.feature_dim(24000) == 100
    data = extractor.to_dict()
    assert data["feature_type"] == "VocosFbank"
    restored = FeatureExtractor.from_dict(dict(data))
    assert isinstance(restored, VocosFbank) and restored.config == VocosFbankConfig()
    assert isinstance(create_default_feature_extractor("VocosFbank"), VocosFbank)


def test_lhotse_cut_features_and_manifest_round_trip(tmp_path: Path) -> None:
    wave = _sine(30000, 330.0)
    audio_path = tmp_path / "utt1.wav"
    sf.write(audio_path, wave, 24000, subtype="FLOAT")
    recording = Recording.from_file(audio_path, recording_id="utt1")
    cut = recording.to_cut()
    with NumpyFilesWriter(tmp_path / "feats") as storage:
        cut = cut.compute_and_store_features(VocosFbank(), storage)
    assert cut.features.type == "VocosFbank"
    assert cut.num_frames == (30000 + 128) // 256
    manifest = tmp_path / "cuts.jsonl.gz"
    CutSet.from_cuts([cut]).to_file(manifest)

    loaded = next(iter(CutSet.from_file(manifest)))
    extractor = create_default_feature_extractor(loaded.features.type)
    assert isinstance(extractor, VocosFbank)
    stored = loaded.load_features()
    fresh = extractor.extract(loaded.load_audio(), loaded.sampling_rate)
    np.testing.assert_allclose(stored, fresh, atol=1e-5)
    np.testing.assert_allclose(stored, VocosFbank().extract(wave, 24000), atol=1e-5)


def test_lhotse_on_the_fly_features(tmp_path: Path) -> None:
    from lhotse.dataset import OnTheFlyFeatures

    cuts = []
    for i, n in enumerate((24000, 9000)):
        path = tmp_path / f"u{i}.wav"
        sf.write(path, _sine(n, 250.0 + 100 * i), 24000, subtype="FLOAT")
        cuts.append(Recording.from_file(path, recording_id=f"u{i}").to_cut())
    feats, lens = OnTheFlyFeatures(VocosFbank())(CutSet.from_cuts(cuts))
    assert feats.shape == (2, (24000 + 128) // 256, 100)
    assert lens.tolist() == [(24000 + 128) // 256, (9000 + 128) // 256]
    alone = VocosFbank().extract(_sine(9000, 350.0), 24000)
    np.testing.assert_allclose(feats[1, : lens[1]].numpy(), alone, atol=1e-5)
