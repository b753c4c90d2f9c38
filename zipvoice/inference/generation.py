"""Text -> speech in a prompt's voice, for any backend.

A backend (PyTorch: zipvoice.inference.torch_backend; ONNX Runtime: zipvoice.onnx.runtime)
only supplies ``sample_features`` (token ids -> mel) and ``vocode`` (mel -> wave); chunking,
batching, joining and the file-level loop (one sentence or a test list) live here once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zipvoice.inference.chunking import (
    MAX_CHUNK_SECONDS,
    add_punctuation,
    batchify_tokens,
    chunk_tokens_punctuation,
    cross_fade_concat,
    remove_silence,
)
from zipvoice.inference.common import SAMPLING_RATE, InferenceError
from zipvoice.inference.prompt import Prompt, prepare_prompt
from zipvoice.utils.audio import normalize_loudness, save_wav
from zipvoice.utils.validate import (
    assert_not_input,
    check_fields_not_empty,
    read_text_lines,
    warn_if_transcript_mismatch,
)

# (token ids per chunk, prompt token ids, prompt features (T, F)) -> mel (F, T_i) per chunk
SampleFn = Callable[[list[list[int]], list[int], np.ndarray], list[np.ndarray]]
VocodeFn = Callable[[np.ndarray], np.ndarray]  # mel (F, T) -> wave (samples,)


@dataclass
class GenerationStats:
    seconds_model: float = 0.0
    seconds_vocoder: float = 0.0
    seconds_audio: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rtf(self) -> float:
        total = self.seconds_model + self.seconds_vocoder
        return total / self.seconds_audio if self.seconds_audio > 0 else float("nan")

    def add(self, other: GenerationStats) -> None:
        self.seconds_model += other.seconds_model
        self.seconds_vocoder += other.seconds_vocoder
        self.seconds_audio += other.seconds_audio


def generate_wave(
    text: str,
    prompt: Prompt,
    text_to_tokens: Callable[[str], list[str]],
    tokens_to_ids: Callable[[list[list[str]]], list[list[int]]],
    sample_features: SampleFn,
    vocode: VocodeFn,
    speed: float = 1.0,
    feat_scale: float = 0.1,
    max_duration: float = 100.0,
    remove_long_sil: bool = False,
    sr: int = SAMPLING_RATE,
    target_rms: float = 0.1,
) -> tuple[np.ndarray, GenerationStats]:
    """Synthesise ``text`` in the prompt's voice: chunk, batch, sample, vocode, join.

    The result is at ``target_rms`` (at a quieter prompt's own level, as the reference tool
    returns it; 0: the model's level), peak-limited below full scale instead of clipped."""
    if speed <= 0:
        raise InferenceError(f"speed must be positive, got {speed}")
    tokens = text_to_tokens(add_punctuation(text))
    if not tokens:
        raise InferenceError(f"text {text!r} gives no tokens")
    token_duration = prompt.duration / (len(prompt.tokens) * speed)
    warn_if_transcript_mismatch(prompt.duration, len(prompt.tokens))
    max_tokens = max(1, int((MAX_CHUNK_SECONDS - prompt.duration) / token_duration))
    chunks = chunk_tokens_punctuation(tokens, max_tokens=max_tokens)
    chunk_ids = tokens_to_ids(chunks)
    prompt_ids = tokens_to_ids([prompt.tokens])[0]
    if not prompt_ids:
        raise InferenceError("no prompt token is in the token file")
    if any(not ids for ids in chunk_ids):
        raise InferenceError(f"text {text!r}: a chunk has no token in the token file")
    batches, order = batchify_tokens(chunk_ids, max_duration, prompt.duration, token_duration)

    stats = GenerationStats()
    waves_sorted: list[np.ndarray] = []
    for batch in batches:
        start = time.perf_counter()
        mels = sample_features(batch, prompt_ids, prompt.features)
        stats.seconds_model += time.perf_counter() - start
        start = time.perf_counter()
        for mel in mels:
            waves_sorted.append(vocode(mel / feat_scale))
        stats.seconds_vocoder += time.perf_counter() - start
    waves: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(waves_sorted)
    for position, original in enumerate(order):
        waves[original] = waves_sorted[position]
    wave = cross_fade_concat(waves, sr=sr)
    wave = remove_silence(wave, sr, only_edge=not remove_long_sil)
    wave = normalize_loudness(wave, target_rms / prompt.rms_scale, sr=sr)
    stats.seconds_audio = wave.shape[-1] / sr
    return wave, stats


@dataclass
class TestItem:
    name: str
    prompt_text: str
    prompt_wav: str
    text: str


def read_test_list(path: str | os.PathLike) -> list[TestItem]:
    """``name<TAB>prompt_text<TAB>prompt_wav<TAB>text`` per line; blank lines are skipped.
    A relative prompt_wav is taken relative to the list's folder."""
    path = Path(path)
    items = []
    for number, line in read_text_lines(path, what="test list"):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            raise InferenceError(
                f"{path}:{number}: expected 4 tab-separated fields "
                f"(name, prompt_text, prompt_wav, text), got {len(fields)}"
            )
        name, prompt_text, prompt_wav, text = fields
        check_fields_not_empty(
            path, number, {"prompt_text": prompt_text, "prompt_wav": prompt_wav, "text": text}
        )
        if not name or "/" in name or name in (".", ".."):
            raise InferenceError(f"{path}:{number}: bad output name {name!r}")
        wav = Path(prompt_wav)
        if not wav.is_absolute() and not wav.exists():
            wav = path.parent / wav
        items.append(TestItem(name, prompt_text, str(wav), text))
    return items


class Synthesizer:
    """Ties a backend (sample + vocode functions) to the file-level pipeline."""

    def __init__(
        self,
        text_to_tokens: Callable[[str], list[str]],
        tokens_to_ids: Callable[[list[list[str]]], list[list[int]]],
        sample_features: SampleFn,
        vocode: VocodeFn,
        feat_scale: float = 0.1,
        target_rms: float = 0.1,
        speed: float = 1.0,
        max_duration: float = 100.0,
        remove_long_sil: bool = False,
    ) -> None:
        self.text_to_tokens = text_to_tokens
        self.tokens_to_ids = tokens_to_ids
        self.sample_features = sample_features
        self.vocode = vocode
        self.feat_scale = feat_scale
        self.target_rms = target_rms
        self.speed = speed
        self.max_duration = max_duration
        self.remove_long_sil = remove_long_sil

    def synthesize(
        self, text: str, prompt_wav: str | os.PathLike, prompt_text: str
    ) -> tuple[np.ndarray, GenerationStats]:
        prompt = prepare_prompt(
            prompt_wav, prompt_text, self.text_to_tokens, self.target_rms, self.feat_scale
        )
        return generate_wave(
            text,
            prompt,
            self.text_to_tokens,
            self.tokens_to_ids,
            self.sample_features,
            self.vocode,
            speed=self.speed,
            feat_scale=self.feat_scale,
            max_duration=self.max_duration,
            remove_long_sil=self.remove_long_sil,
            target_rms=self.target_rms,
        )

    def synthesize_to_file(
        self, text: str, prompt_wav: str | os.PathLike, prompt_text: str, out_path: str | Path
    ) -> GenerationStats:
        """Generate and write a WAV atomically (the folder is created if needed)."""
        wave, stats = self.synthesize(text, prompt_wav, prompt_text)
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        save_wav(out_path, wave, sr=SAMPLING_RATE)
        return stats

    def run_test_list(self, test_list: str | os.PathLike, res_dir: str | Path) -> GenerationStats:
        """Write ``res_dir/{name}.wav`` for each line; prints each and the average RTF."""
        items = read_test_list(test_list)
        names = [item.name for item in items]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InferenceError(f"{test_list}: duplicate names {duplicates}")
        prompts = {f"prompt_wav of {item.name!r}": item.prompt_wav for item in items}
        for item in items:
            out = Path(res_dir) / f"{item.name}.wav"
            assert_not_input(out, {**prompts, "--test-list": test_list}, f"output of {item.name!r}")
        total = GenerationStats()
        for index, item in enumerate(items):
            stats = self.synthesize_to_file(
                item.text, item.prompt_wav, item.prompt_text, Path(res_dir) / f"{item.name}.wav"
            )
            print(f"[{index}] {item.name}: RTF {stats.rtf:.4f}")
            total.add(stats)
        print(f"Average RTF: {total.rtf:.4f} ({total.seconds_audio:.2f} s of audio)")
        return total


def make_text_functions(
    tokenizer_name: str, token_file: str | Path, lang: str
) -> tuple[Callable[[str], list[str]], Callable[[list[list[str]]], list[list[int]]]]:
    from zipvoice.tokenizer.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(tokenizer_name, token_file=token_file, lang=lang)
    return (lambda text: tokenizer.texts_to_tokens([text])[0]), tokenizer.tokens_to_token_ids
