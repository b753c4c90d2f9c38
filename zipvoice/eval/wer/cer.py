"""The intelligibility scorers by metric name, as `zipvoice.eval.registry` builds them:
`CharErrorRate` (Japanese, kana-normalised CER) and `WordErrorRate` (English WER), both
Whisper through transformers (`whisper`)."""

from __future__ import annotations

from pathlib import Path

from zipvoice.eval.wer.whisper import WhisperErrorRate


class CharErrorRate(WhisperErrorRate):
    """CER over katakana readings (language "ja" unless told otherwise)."""

    def __init__(
        self, model_dir: str | Path | None = None, device: str = "cpu", language: str = "ja"
    ) -> None:
        super().__init__(model_dir, device, language)


class WordErrorRate(WhisperErrorRate):
    """WER over lower-cased words (language "en")."""

    def __init__(
        self, model_dir: str | Path | None = None, device: str = "cpu", language: str = "en"
    ) -> None:
        super().__init__(model_dir, device, language)
