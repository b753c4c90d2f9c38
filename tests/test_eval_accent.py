"""Pitch-accent metrics on audio the tests make: pure tones and sweeps of known frequency,
pyopenjtalk speech at known pitch shifts and speeds, and the minimal pairs 箸/橋/端 and 雨/飴
rendered by pyopenjtalk with OpenJTalk's accent of each word."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from zipvoice.eval.accent import f0_match, probe, probe_list
from zipvoice.eval.accent.f0 import SAMPLE_RATE, F0Config, extract_f0, hz_to_cents
from zipvoice.eval.accent.f0_match import F0MatchScorer, compare_waves
from zipvoice.eval.accent.hts_duration import load_duration_model, phoneme_frames
from zipvoice.eval.accent.moras import accent_phrase, label_moras, pitch_pattern
from zipvoice.eval.utils import EvalError, TestItem, read_scores, read_test_list
from zipvoice.utils.audio import resample


def speech(text: str, half_tone: float = 0.0, speed: float = 1.0) -> np.ndarray:
    """pyopenjtalk's voice at 16 kHz, float32 in [-1, 1]."""
    import pyopenjtalk

    wave, sr = pyopenjtalk.tts(text, half_tone=half_tone, speed=speed)
    return resample((wave / 32768.0).astype(np.float32), sr, SAMPLE_RATE)


def write(path: Path, wave: np.ndarray) -> Path:
    sf.write(path, wave, SAMPLE_RATE)
    return path


@pytest.mark.parametrize("method", ["praat", "dio"])
def test_f0_of_tones_within_a_few_cents(method: str):
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    for freq in (110.0, 220.0, 330.0):
        tone = 0.5 * np.sin(2 * np.pi * freq * t)
        f0 = extract_f0(tone, SAMPLE_RATE, F0Config(method=method))[10:-10]
        assert np.mean(f0 > 0) > 0.95
        error = hz_to_cents(f0[f0 > 0]) - hz_to_cents(np.array([freq]))
        assert np.median(np.abs(error)) < 5.0


def test_f0_follows_a_sweep():
    seconds, start, stop = 1.5, 120.0, 360.0
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    freq = start * (stop / start) ** (t / seconds)  # exponential sweep: linear in cents
    phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
    f0 = extract_f0(0.5 * np.sin(phase), SAMPLE_RATE)
    frames = np.arange(10, len(f0) - 10)
    truth = freq[np.minimum(frames * SAMPLE_RATE // 100, len(freq) - 1)]
    error = hz_to_cents(f0[frames]) - hz_to_cents(truth)
    assert np.median(np.abs(error)) < 10.0


@pytest.mark.parametrize("method", ["praat", "dio", "harvest"])
def test_f0_sees_a_known_half_tone_shift(method: str):
    base, up = speech("これは雨です。"), speech("これは雨です。", half_tone=3.0)
    config = F0Config(method=method)
    f0_base, f0_up = extract_f0(base, SAMPLE_RATE, config), extract_f0(up, SAMPLE_RATE, config)
    n = min(len(f0_base), len(f0_up))
    both = (f0_base[:n] > 0) & (f0_up[:n] > 0)
    shift = hz_to_cents(f0_up[:n][both]) - hz_to_cents(f0_base[:n][both])
    assert abs(np.median(shift) - 300.0) < 10.0


def test_recording_against_itself_is_perfect():
    wave = speech("これは箸です。")
    match = compare_waves(wave, wave)
    assert match.log_f0_corr == pytest.approx(1.0, abs=1e-9)
    assert match.f0_rmse_cents == 0.0
    assert match.vuv_error == 0.0


def test_minimal_pair_partner_is_clearly_worse_than_a_faster_take():
    reference = speech("これは箸です。")
    faster = compare_waves(speech("これは箸です。", speed=1.2), reference)
    for partner in ("これは橋です。", "これは端です。"):
        other = compare_waves(speech(partner), reference)
        assert other.log_f0_corr < faster.log_f0_corr - 0.05
        assert other.f0_rmse_cents > faster.f0_rmse_cents + 50.0
    rain = speech("これは雨です。")
    assert compare_waves(speech("これは飴です。"), rain).log_f0_corr < 0.85


def test_f0_match_scorer_and_cli(tmp_path: Path, capsys):
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    gen.mkdir(), ref.mkdir()
    write(ref / "u1.wav", speech("これは雨です。"))
    write(ref / "u2.wav", speech("これは飴です。"))
    write(gen / "u1.wav", speech("これは雨です。"))  # right accent
    write(gen / "u2.wav", speech("これは雨です。"))  # the partner's accent
    test_list = tmp_path / "list.tsv"
    test_list.write_text("u1\tp\tp.wav\tこれは雨です。\nu2\tp\tp.wav\tこれは飴です。\n", "utf-8")
    items = read_test_list(test_list)
    scorer = F0MatchScorer(ref, metric="f0_rmse_cents")
    assert scorer.score(items[0], gen) == 0.0
    assert scorer.score(items[1], gen) > 100.0
    out = tmp_path / "corr.tsv"
    argv = ["--wav-path", str(gen), "--test-list", str(test_list), "--ref-wav-dir", str(ref)]
    assert f0_match.main([*argv, "--output-file", str(out)]) in (0, None)
    assert "log_f0_corr: mean" in capsys.readouterr().out
    scores = read_scores(out)
    assert scores["u1"] == pytest.approx(1.0) and scores["u2"] < 0.9
    (ref / "u2.wav").unlink()
    assert f0_match.main([*argv, "--metric", "vuv_error"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "u2.wav" in err[0] and "not found" in err[0]


def test_hts_durations_reproduce_the_rendering():
    import pyopenjtalk

    model = load_duration_model()
    text = "明日は雨が降るそうですが、傘を持っていきますか？"
    labels = pyopenjtalk.extract_fullcontext(text)
    wave, _ = pyopenjtalk.synthesize(labels)
    frames = phoneme_frames(labels, num_samples=len(wave))  # raises if the total differs
    bounds = np.concatenate([[0], np.cumsum(frames)]) * model.frame_period
    phones = [re.search(r"-([^+]+)\+", label).group(1) for label in labels]
    pause = phones.index("pau")
    quiet = np.sqrt(np.mean(wave[bounds[pause] : bounds[pause + 1]] ** 2))
    vowel = phones.index("a")
    loud = np.sqrt(np.mean(wave[bounds[vowel] : bounds[vowel + 1]] ** 2))
    assert quiet < 0.05 * loud  # the pause the model times is where the audio is silent


def test_openjtalk_accent_patterns_of_the_minimal_pairs():
    import pyopenjtalk

    expected = {"箸": (1, 0, 0, 0), "橋": (0, 1, 0, 0), "端": (0, 1, 1, 0)}
    for word, pattern in expected.items():
        moras = label_moras(pyopenjtalk.extract_fullcontext(f"これは{word}です。"))
        assert [m.phones for m in moras][3:5] == ["ha", "shi"]
        assert pitch_pattern(accent_phrase(moras, 3)) == pattern


@pytest.mark.parametrize("group", ["hashi", "ame"])
def test_probe_classifies_pyopenjtalk_renderings(group: str):
    members = [p for p in probe.PROBE_WORDS if p.group == group]
    for member in members:
        text = probe.probe_sentence(member)
        spec = probe.prepare_probe(text)
        for variant in ({}, {"half_tone": -5.0, "speed": 0.9}):
            result = probe.classify(speech(text, **variant), spec)
            assert result.predicted == member.name, (member.name, variant, result)


def test_probe_command_scores_right_and_swapped_accents(tmp_path: Path, capsys):
    test_list = tmp_path / "probes.tsv"
    assert probe_list.main(
        ["--output", str(test_list), "--prompt-wav", "p.wav", "--prompt-text", "はい"]
    ) in (0, None)
    assert (
        probe_list.main(
            ["--output", str(test_list), "--prompt-wav", "p.wav", "--prompt-text", "はい"]
        )
        == 1
    )  # no overwriting unasked
    items = {item.name: item for item in read_test_list(test_list)}
    assert len(items) == len(probe.PROBE_WORDS)
    wavs = tmp_path / "gen"
    wavs.mkdir()
    write(wavs / "ame_rain.wav", speech("これは雨です。"))
    write(wavs / "ame_candy.wav", speech("これは雨です。"))  # 飴 said with 雨's accent
    subset = tmp_path / "subset.tsv"
    lines = test_list.read_text("utf-8").splitlines()
    subset.write_text("\n".join(x for x in lines if x.startswith("ame_")) + "\n", "utf-8")
    out = tmp_path / "probe.tsv"
    argv = ["--wav-path", str(wavs), "--test-list", str(subset), "--output-file", str(out)]
    assert probe.main(argv) in (0, None)
    assert "accent_probe: mean 0.5000" in capsys.readouterr().out
    assert read_scores(out) == {"ame_rain": 1.0, "ame_candy": 0.0}


def test_probe_rejects_text_without_probe_word(tmp_path: Path):
    item = TestItem("x", "", tmp_path / "p.wav", "今日はいい天気です。")
    with pytest.raises(EvalError, match="none of the probe words"):
        probe.AccentProbeScorer().score(item, tmp_path)
