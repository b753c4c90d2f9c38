"""Intelligibility scoring: kana-normalised CER and WER arithmetic (checked against jiwer on
the normalised text and against hand counts), and the Whisper plumbing with a tiny randomly
initialised Whisper of the real architecture, saved and loaded like a downloaded one."""

from __future__ import annotations

import json
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf

from zipvoice.eval.utils import EvalError, TestItem, read_scores
from zipvoice.eval.wer import whisper as whisper_mod
from zipvoice.eval.wer.cer import CharErrorRate, WordErrorRate
from zipvoice.eval.wer.normalize import english_words, error_rate, japanese_reading

SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|ja|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]


@pytest.mark.parametrize(
    ("reference", "hypothesis", "expected"),
    [
        ("漢字", "かんじ", 0.0),  # same reading in kanji and hiragana
        ("漢字", "カンジ", 0.0),
        ("これは箸です。", "これは橋です", 0.0),  # homophones: CER cannot hear accent
        ("今日は、いい天気ですね！", "きょうは いい てんき ですね", 0.0),  # punctuation, spaces
        ("カンジ", "カンシ", 1 / 3),  # one substitution in three kana
        ("カンジ", "カンジダ", 1 / 3),  # one insertion
        ("雨が降る", "あめ", 3 / 5),  # アメガフル -> アメ: three deletions
    ],
)
def test_japanese_cer_hand_counts_and_jiwer(reference: str, hypothesis: str, expected: float):
    assert error_rate(reference, hypothesis, "ja") == pytest.approx(expected)
    ref, hyp = japanese_reading(reference), japanese_reading(hypothesis)
    assert error_rate(reference, hypothesis, "ja") == pytest.approx(jiwer.cer(ref, hyp))


def test_kana_normalisation_is_what_makes_scripts_equal():
    assert japanese_reading("漢字を書く。") == "カンジヲカク"
    assert jiwer.cer("漢字を書く", "かんじをかく") > 0.5  # raw characters differ
    assert error_rate("漢字を書く。", "かんじをかく", "ja") == 0.0


@pytest.mark.parametrize(
    ("reference", "hypothesis", "expected"),
    [
        ("Hello, World!", "hello world", 0.0),
        ("The cat sat.", "the cat sat on", 1 / 3),
        ("It's John's dog.", "its johns dog", 2 / 3),  # apostrophes inside words count
        ("one two three four", "one too three", 2 / 4),
    ],
)
def test_english_wer_hand_counts_and_jiwer(reference: str, hypothesis: str, expected: float):
    assert error_rate(reference, hypothesis, "en") == pytest.approx(expected)
    jiwer_value = jiwer.wer(english_words(reference), english_words(hypothesis))
    assert error_rate(reference, hypothesis, "en") == pytest.approx(jiwer_value)


def test_empty_hypothesis_and_reference():
    assert error_rate("雨が降る", "", "ja") == 1.0
    assert error_rate("雨が降る", "。、", "ja") == 1.0
    with pytest.raises(ValueError, match="empty after normalisation"):
        error_rate("。！", "あめ", "ja")
    with pytest.raises(ValueError, match="unsupported language"):
        error_rate("a", "a", "fr")


def _byte_level_alphabet() -> list[str]:
    """GPT-2 style byte-to-character table: the 256 single-byte tokens a byte-level BPE
    vocabulary needs so that any token sequence decodes."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised Whisper (real architecture, tiny sizes) with a byte-level
    tokenizer and Whisper's special tokens, saved like a downloaded model folder."""
    import torch
    from tokenizers import AddedToken
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    folder = tmp_path_factory.mktemp("tiny_whisper")
    vocab = {c: i for i, c in enumerate(_byte_level_alphabet())}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = WhisperTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_tokens([AddedToken(s, special=True) for s in SPECIALS], special_tokens=True)
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIALS}
    eot = ids["<|endoftext|>"]
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_target_positions=64,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=ids["<|startoftranscript|>"],
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=eot,
        pad_token_id=eot,
        bos_token_id=eot,
        lang_to_id={"<|en|>": ids["<|en|>"], "<|ja|>": ids["<|ja|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        is_multilingual=True,
    )
    model.save_pretrained(folder)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(folder)
    return folder


def _write_tone_wav(path: Path, seconds: float = 1.0, freq: float = 220.0) -> Path:
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)
    return path


def test_tiny_whisper_forces_language_and_scores_its_transcript(tiny_whisper: Path, tmp_path):
    import transformers

    tokenizer = transformers.WhisperTokenizer.from_pretrained(tiny_whisper)
    wave = np.zeros(16000, dtype=np.float32)
    for language in ("ja", "en"):
        asr = whisper_mod.WhisperASR(tiny_whisper, language=language, max_new_tokens=8)
        prompts = []

        def record(module, args, kwargs, seen=prompts):
            ids = kwargs.get("input_ids", args[0] if args else None)
            seen.append(ids[0].tolist())

        hook = asr.model.model.decoder.register_forward_pre_hook(record, with_kwargs=True)
        try:
            asr.generate_ids(wave)
        finally:
            hook.remove()
        # The first decoder step sees Whisper's prompt with the forced language.
        assert tokenizer.convert_ids_to_tokens(prompts[0]) == [
            "<|startoftranscript|>",
            f"<|{language}|>",
            "<|transcribe|>",
            "<|notimestamps|>",
        ]
    _write_tone_wav(tmp_path / "u1.wav")
    item = TestItem("u1", "", tmp_path / "p.wav", "今日は雨です。")
    scorer = CharErrorRate(model_dir=tiny_whisper)
    value = scorer.score(item, tmp_path)
    heard = scorer.last_transcripts["u1"]
    assert "<|" not in heard  # special tokens are not part of the transcript
    assert value == pytest.approx(error_rate(item.text, heard, "ja"))
    assert value > 0  # a random model does not say the sentence
    assert WordErrorRate(model_dir=tiny_whisper).language == "en"


def test_whisper_cli_writes_scores(tiny_whisper: Path, tmp_path, capsys):
    for name in ("a", "b"):
        _write_tone_wav(tmp_path / f"{name}.wav", freq=150.0 if name == "a" else 300.0)
    test_list = tmp_path / "list.tsv"
    test_list.write_text("a\tp\tp.wav\tこんにちは。\nb\tp\tp.wav\tさようなら。\n", "utf-8")
    out = tmp_path / "cer.tsv"
    argv = ["--wav-path", str(tmp_path), "--test-list", str(test_list)]
    argv += ["--model-dir", str(tiny_whisper), "--lang", "ja", "--output-file", str(out)]
    assert whisper_mod.main(argv) in (0, None)
    assert "cer: mean" in capsys.readouterr().out
    assert set(read_scores(out)) == {"a", "b"}


def test_whisper_refuses_missing_or_pickled_models(tiny_whisper: Path, tmp_path, capsys):
    with pytest.raises(EvalError, match="not found"):
        whisper_mod.WhisperASR(tmp_path / "nope")
    import torch
    import transformers

    pickled = tmp_path / "pickled"
    model = transformers.WhisperForConditionalGeneration.from_pretrained(tiny_whisper)
    model.save_pretrained(pickled)
    transformers.WhisperProcessor.from_pretrained(tiny_whisper).save_pretrained(pickled)
    for weights in pickled.glob("*.safetensors"):  # keep only a pickled copy of the weights
        weights.unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(EvalError, match="cannot load Whisper"):
        whisper_mod.WhisperASR(pickled)
    with pytest.raises(EvalError, match="language token"):
        whisper_mod.WhisperASR(tiny_whisper, language="fr")
