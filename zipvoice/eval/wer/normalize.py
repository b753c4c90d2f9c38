"""Text normalisation and error rates for intelligibility scores.

Japanese is scored as CER over katakana readings: hypothesis and reference are both read by
pyopenjtalk (kanji, kana, digits and Latin letters all become the katakana OpenJTalk would
pronounce), then punctuation, symbols and spaces are dropped. So 漢字 / かんじ / カンジ are the
same word, and an ASR system's choice of script or numerals does not count as an error; what
counts is a different pronunciation. English is scored as WER over lower-cased words with
punctuation removed (apostrophes inside words kept). The edit-distance counting is jiwer's."""

from __future__ import annotations

import re
import unicodedata

LANGUAGES = ("ja", "en")
_DROP_CATEGORIES = ("P", "S", "Z", "C")  # punctuation, symbols, separators, control
_EN_KEEP = re.compile(r"[^\w\s']|_")
_EN_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")


def _drop_marks(text: str) -> str:
    return "".join(c for c in text if not unicodedata.category(c).startswith(_DROP_CATEGORIES))


def japanese_reading(text: str) -> str:
    """Katakana reading of `text` by pyopenjtalk, without punctuation, symbols or spaces."""
    import pyopenjtalk

    text = unicodedata.normalize("NFKC", text)
    reading = pyopenjtalk.g2p(text, kana=True) if _drop_marks(text) else ""
    return _drop_marks(unicodedata.normalize("NFKC", reading))


def english_words(text: str) -> str:
    """Lower-cased words separated by single spaces, punctuation removed."""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    text = _EN_APOSTROPHE.sub(" ", _EN_KEEP.sub(" ", text))
    return " ".join(text.split())


def normalize(text: str, language: str) -> str:
    """The form that is compared: katakana for "ja", lower-cased words for "en"."""
    if language == "ja":
        return japanese_reading(text)
    if language == "en":
        return english_words(text)
    raise ValueError(f"unsupported language {language!r}; choose from {LANGUAGES}")


def error_rate(reference: str, hypothesis: str, language: str) -> float:
    """CER (ja: characters of the katakana reading) or WER (en: words) of `hypothesis`
    against `reference`, after `normalize`. Can exceed 1 (insertions)."""
    import jiwer

    ref, hyp = normalize(reference, language), normalize(hypothesis, language)
    if not ref:
        raise ValueError(f"reference text {reference!r} is empty after normalisation")
    if not hyp:
        return 1.0  # nothing recognised: every reference unit deleted
    if language == "ja":
        return float(jiwer.cer(ref, hyp))
    return float(jiwer.wer(ref, hyp))
