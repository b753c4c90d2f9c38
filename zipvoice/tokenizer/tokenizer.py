"""Text front ends: text -> tokens -> ids.

`japanese` carries pitch accent (ESPnet's "prosody" marks from OpenJTalk full-context labels,
see docs/japanese.md) so that adapters can learn it; `emilia` / `espeak` are the
pretrained model's own Chinese/English front ends; `simple` splits characters.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import multiprocessing
import os
import re
import sys
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from zipvoice.tokenizer.token_file import PAD_TOKEN, read_token_file

logger = logging.getLogger(__name__)

EMILIA_INSTALL_HINT = "pip install 'zipvoice[emilia]'"


class Tokenizer(ABC):
    """Common interface; the token file is optional so that g2p alone works without one."""

    def __init__(self, token_file: str | Path | None = None, strict: bool = False) -> None:
        self.token_file = None if token_file is None else Path(token_file)
        self.strict = strict
        self.token2id: dict[str, int] | None = (
            None if token_file is None else read_token_file(token_file)
        )

    @abstractmethod
    def texts_to_tokens(self, texts: list[str]) -> list[list[str]]:
        """One token list per text."""

    def symbols(self) -> list[str]:
        """Every token this tokenizer can emit, in a fixed order (for building token files)."""
        raise NotImplementedError(f"the {type(self).__name__} has no fixed token inventory")

    def _require_token2id(self) -> dict[str, int]:
        if self.token2id is None:
            raise ValueError(
                f"{type(self).__name__} was created without a token file; "
                "pass token_file=... to map tokens to ids"
            )
        return self.token2id

    @property
    def vocab_size(self) -> int:
        return len(self._require_token2id())

    @property
    def pad_id(self) -> int:
        return self._require_token2id()[PAD_TOKEN]

    def tokens_to_token_ids(self, tokens: list[list[str]]) -> list[list[int]]:
        """Unknown tokens are dropped (as upstream does) unless `strict`."""
        token2id = self._require_token2id()
        all_ids: list[list[int]] = []
        for token_list in tokens:
            ids: list[int] = []
            for token in token_list:
                token_id = token2id.get(token)
                if token_id is None:
                    if self.strict:
                        raise ValueError(
                            f"token {token!r} is not in the token file {self.token_file}"
                        )
                    logger.debug("skipping token %r: not in %s", token, self.token_file)
                    continue
                ids.append(token_id)
            all_ids.append(ids)
        return all_ids

    def texts_to_token_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokens_to_token_ids(self.texts_to_tokens(texts))


class SimpleTokenizer(Tokenizer):
    """Every character is a token, without normalisation (upstream's `simple`)."""

    def texts_to_tokens(self, texts: list[str]) -> list[list[str]]:
        return [list(text) for text in texts]

    def symbols(self) -> list[str]:
        raise NotImplementedError(
            "the simple tokenizer emits whatever characters the texts contain, so it has no "
            "fixed token inventory"
        )


# --------------------------------------------------------------------------------------
# Japanese
# --------------------------------------------------------------------------------------

# Every phoneme OpenJTalk emits (unvoiced A I U E O are lower-cased to their voiced vowel).
# Enumerated by running every katakana, alone and with each small kana, through
# pyopenjtalk-plus 0.4.1.post10; `cl` is the geminate (small tsu), `N` the moraic nasal.
JAPANESE_PHONEMES: tuple[str, ...] = (
    "N", "a", "b", "by", "ch", "cl", "d", "dy", "e", "f", "fy", "g", "gw", "gy", "h", "hy",
    "i", "j", "k", "kw", "ky", "m", "my", "n", "ny", "o", "p", "py", "r", "ry", "s", "sh",
    "t", "ts", "ty", "u", "v", "w", "y", "z",
)  # fmt: skip

# ESPnet "prosody" marks: ^ start, $ end, ? end of a question, _ pause (OpenJTalk `pau`),
# # accent-phrase boundary, [ pitch rises, ] pitch falls (accent nucleus).
JAPANESE_MARKS: tuple[str, ...] = ("^", "$", "?", "_", "#", "[", "]")

# The complete, fixed, sorted inventory of the Japanese tokenizer. `_` doubles as the padding
# token of token files: a pause and the padding after an utterance are both silence.
JAPANESE_SYMBOLS: list[str] = sorted(set(JAPANESE_PHONEMES) | set(JAPANESE_MARKS))

_UNVOICED_VOWELS = {"A": "a", "I": "i", "U": "u", "E": "e", "O": "o"}
# Phonemes that end a mora, after which an accent-phrase boundary can fall.
_MORA_FINAL = {"a", "i", "u", "e", "o", "A", "I", "U", "E", "O", "N", "cl"}

_LABEL_RE = re.compile(
    r"^[^-]*-(?P<p>[^+]+)\+.*?/A:(?P<a1>-?\d+|xx)\+(?P<a2>\d+|xx)\+(?P<a3>\d+|xx)/"
    r".*?/E:[^!]*!(?P<e3>\d+|xx)_.*?/F:(?P<f1>\d+|xx)_"
)


def _int_or_none(value: str) -> int | None:
    return None if value == "xx" else int(value)


def labels_to_prosody_tokens(labels: Sequence[str]) -> list[str]:
    """Phonemes with ESPnet prosody marks, following the marks of docs/japanese.md."""
    parsed = []
    for label in labels:
        match = _LABEL_RE.search(label)
        if match is None:
            raise ValueError(f"unexpected OpenJTalk full-context label: {label!r}")
        parsed.append(
            (
                match["p"],
                _int_or_none(match["a1"]),
                _int_or_none(match["a2"]),
                _int_or_none(match["a3"]),
                _int_or_none(match["e3"]),
                _int_or_none(match["f1"]),
            )
        )

    tokens: list[str] = []
    last = len(parsed) - 1
    for i, (phoneme, a1, a2, a3, e3, f1) in enumerate(parsed):
        if phoneme == "sil":
            if i == 0:
                tokens.append("^")
            elif i == last:
                tokens.append("?" if e3 == 1 else "$")
            else:  # OpenJTalk puts sil only at the ends; treat any other as a pause
                tokens.append("_")
            continue
        if phoneme == "pau":
            tokens.append("_")
            continue
        tokens.append(_UNVOICED_VOWELS.get(phoneme, phoneme))
        next_a2 = parsed[i + 1][2] if i < last else None
        if a3 == 1 and next_a2 == 1 and phoneme in _MORA_FINAL:
            tokens.append("#")
        elif a1 == 0 and a2 is not None and next_a2 == a2 + 1 and a2 != f1:
            tokens.append("]")
        elif a2 == 1 and next_a2 == 2:
            tokens.append("[")
    return tokens


# Symbols (category So) that OpenJTalk reads aloud; every other So (emoji, dingbats) is silent.
_READABLE_SYMBOLS = {"〒", "○"}
# Latin letters NFKD cannot reduce to ASCII.
_LATIN_SPECIAL = {"ß": "ss", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O", "œ": "oe", "Œ": "OE",
                  "đ": "d", "Đ": "D", "ł": "l", "Ł": "L", "ı": "i"}  # fmt: skip
_DATE_RE = re.compile(r"(?<!\d)(\d{4})/(\d{1,2})/(\d{1,2})(?!\d)")
# H:MM or H:MM:SS, not part of a longer run of digits and colons.
_TIME_RE = re.compile(r"(?<![\d:])(\d{1,2}):(\d{2})(?::(\d{2}))?(?![\d:])")
# Any other digit:digit (16:9, 2:3, 1:2:1) is a ratio or a score, read 対 as Japanese does
# (OpenJTalk would read the colon as a pause, leaving "にさん").
_RATIO_RE = re.compile(r"(?<=\d)\s*:\s*(?=\d)")
# Words that make the next N:MM a ratio or a score rather than a clock time, when they come
# earlier in the same sentence: 比率は2:30, 試合は3:15で, 縦横比16:10.
_RATIO_WORDS = ("比", "割合", "対", "スコア", "得点", "点差", "倍率", "オッズ", "配合", "勝", "負")
_SENTENCE_END_RE = re.compile(r"[。！？!?\n]")
_RANGE_RE = re.compile(r"(\d)\s*[~〜](?=\s*\d)")
_SPACES_RE = re.compile(r"\s+")


def _is_japanese_or_greek_letter(char: str) -> bool:
    code = ord(char)
    return (
        0x0370 <= code <= 0x03FF  # Greek: OpenJTalk reads α as アルファ
        or 0x3005 <= code <= 0x3007  # 々 〆 〇
        or 0x3040 <= code <= 0x30FF  # hiragana, katakana, ー
        or 0x31F0 <= code <= 0x31FF  # small katakana extensions
        or 0x3400 <= code <= 0x4DBF  # CJK extension A
        or 0x4E00 <= code <= 0x9FFF  # CJK unified ideographs
        or 0xF900 <= code <= 0xFAFF  # CJK compatibility ideographs
        or 0x20000 <= code <= 0x3FFFF  # CJK extensions B-H
    )


def _latin_to_ascii(char: str) -> str | None:
    """é -> e so OpenJTalk spells or reads the word instead of pausing at it."""
    if char in _LATIN_SPECIAL:
        return _LATIN_SPECIAL[char]
    if "LATIN" not in unicodedata.name(char, ""):
        return None
    base = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
    return base if base.isascii() and base else None


def _replace_date(match: re.Match[str]) -> str:
    year, month, day = match[1], int(match[2]), int(match[3])
    if 1 <= month <= 12 and 1 <= day <= 31:
        return f"{year}年{month}月{day}日"
    return match[0]


def _replace_time(match: re.Match[str]) -> str:
    """H:MM(:SS) -> 時/分/秒, unless a ratio word comes earlier in the same sentence (then
    `_RATIO_RE` reads the colon as 対)."""
    hour, minute = int(match[1]), int(match[2])
    second = None if match[3] is None else int(match[3])
    if hour > 24 or minute >= 60 or (second is not None and second >= 60):
        return match[0]
    before = match.string[: match.start()]
    sentence = _SENTENCE_END_RE.split(before)[-1]
    if any(word in sentence for word in _RATIO_WORDS):
        return match[0]
    spoken = f"{hour}時" + ("" if minute == 0 and not second else f"{minute}分")
    return spoken + (f"{second}秒" if second else "")


def normalize_japanese(text: str) -> str:
    """Text OpenJTalk reads sensibly: NFKC, dates/times/ranges spelt out, unreadable chars dropped.

    digit:digit is a clock time (2:30 -> 2時30分, 10:05:30 -> 10時5分30秒) when it can be one
    (H <= 24, MM and SS < 60) and no ratio word (比, 割合, 対, スコア, 得点, 勝 ...) comes
    earlier in the sentence; otherwise it is a ratio or score, read 対 (比率は2:30 ->
    比率は2対30, 16:9 -> 16対9).

    OpenJTalk already reads digits (2024年 -> にせんにじゅうよねん, 3.14, 1,000) and spells
    Latin words (NHK -> エヌエイチケー); what it cannot read (emoji, Hangul, Cyrillic, control
    characters) it would turn into a pause, so those are dropped here with a debug log.
    """
    text = unicodedata.normalize("NFKC", text)
    text = _DATE_RE.sub(_replace_date, text)
    text = _TIME_RE.sub(_replace_time, text)
    text = _RATIO_RE.sub("対", text)
    text = _RANGE_RE.sub(r"\1から", text)
    kept: list[str] = []
    for char in text:
        category = unicodedata.category(char)
        if char.isspace():
            kept.append(" ")
        elif category[0] == "L":
            if char.isascii() or _is_japanese_or_greek_letter(char):
                kept.append(char)
            elif (ascii_form := _latin_to_ascii(char)) is not None:
                kept.append(ascii_form)
            else:
                logger.debug("dropping %r (U+%04X): OpenJTalk cannot read it", char, ord(char))
        elif category[0] in "NP" or category in ("Sm", "Sc") or char in _READABLE_SYMBOLS:
            kept.append(char)
        else:
            logger.debug("dropping %r (U+%04X, %s): not pronounceable", char, ord(char), category)
    return _SPACES_RE.sub(" ", "".join(kept)).strip()


_pyopenjtalk: ModuleType | None = None


def _import_pyopenjtalk() -> ModuleType:
    """Import pyopenjtalk with its import-time notice on stdout silenced (clean CLI output)."""
    global _pyopenjtalk
    if _pyopenjtalk is None:
        with contextlib.redirect_stdout(io.StringIO()):
            import pyopenjtalk
        _pyopenjtalk = pyopenjtalk
    return _pyopenjtalk


# OpenJTalk refuses inputs over 16383 bytes after its own full-width normalisation (5461
# characters of 3 bytes); 4000 characters stay below that even at 4 bytes a character.
OPENJTALK_MAX_CHARS = 4000
_SPLIT_AFTER = ("。！？!?．.\n", "、，,；;：: 　")  # sentence ends first, then clause breaks


def split_for_openjtalk(text: str, limit: int = OPENJTALK_MAX_CHARS) -> list[str]:
    """Pieces of at most `limit` characters, cut after the last sentence end before the limit
    (else the last clause break or space, else at the limit), so long texts are read whole."""
    pieces: list[str] = []
    while len(text) > limit:
        window = text[:limit]
        cut = 0
        for breaks in _SPLIT_AFTER:
            cut = max(window.rfind(char) for char in breaks) + 1
            if cut > 0:
                break
        cut = cut or limit
        pieces.append(text[:cut])
        text = text[cut:]
    return [piece for piece in [*pieces, text] if piece.strip()]


def _openjtalk_tokens(normalized: str, text: str) -> list[str]:
    pyopenjtalk = _import_pyopenjtalk()
    try:
        labels = pyopenjtalk.extract_fullcontext(normalized)
    except Exception as err:  # one odd sentence must not abort a whole data set
        logger.warning("OpenJTalk failed on %r: %s; emitting no tokens", text[:80], err)
        return []
    return labels_to_prosody_tokens(labels)


def _join_pieces(pieces: list[list[str]]) -> list[str]:
    """One utterance from separately read pieces: the start mark of the first, the end mark
    of the last, a pause where two pieces meet."""
    pieces = [piece for piece in pieces if piece]
    joined: list[str] = []
    for index, piece in enumerate(pieces):
        if index > 0:
            piece = piece[1:] if piece[0] == "^" else piece
            joined.append("_")
        if index < len(pieces) - 1 and piece and piece[-1] in ("$", "?"):
            piece = piece[:-1]
        joined.extend(piece)
    return joined


def japanese_text_to_tokens(text: str) -> list[str]:
    """One text -> prosody tokens; empty list when nothing in it can be read. Texts longer
    than OpenJTalk accepts are read piece by piece (`split_for_openjtalk`)."""
    normalized = normalize_japanese(text)
    if not any(unicodedata.category(c)[0] in "LN" or c in _READABLE_SYMBOLS for c in normalized):
        if text.strip():
            logger.debug("no readable characters in %r; emitting no tokens", text)
        return []
    pieces = split_for_openjtalk(normalized)
    tokens = _join_pieces([_openjtalk_tokens(piece, text) for piece in pieces])
    if not any(token in JAPANESE_PHONEMES for token in tokens):
        logger.debug("OpenJTalk found nothing to read in %r; emitting no tokens", text[:80])
        return []
    return tokens


def _japanese_chunk_to_tokens(texts: list[str]) -> list[list[str]]:
    return [japanese_text_to_tokens(text) for text in texts]


def available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _process_pool_context() -> multiprocessing.context.BaseContext:
    # forkserver, not fork: the parent may hold torch / onnxruntime threads, and forking a
    # threaded process can deadlock the child.
    if sys.platform != "win32" and "forkserver" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")


class JapaneseTokenizer(Tokenizer):
    """OpenJTalk (pyopenjtalk-plus) phonemes with pitch-accent marks.

    Args:
      token_file: optional; only needed to map tokens to ids.
      num_workers: processes for large `texts_to_tokens` calls; None = all available CPUs.
      min_texts_per_worker: below this many texts per worker a pool costs more than it saves
        (each worker loads OpenJTalk and Sudachi, about 1 s, while one core reads ~500-900
        sentences/s).
    """

    def __init__(
        self,
        token_file: str | Path | None = None,
        strict: bool = False,
        num_workers: int | None = None,
        min_texts_per_worker: int = 1000,
    ) -> None:
        super().__init__(token_file, strict)
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.min_texts_per_worker = max(1, min_texts_per_worker)

    def symbols(self) -> list[str]:
        return list(JAPANESE_SYMBOLS)

    def texts_to_tokens(self, texts: list[str]) -> list[list[str]]:
        workers = min(self.num_workers or available_cpus(), len(texts) // self.min_texts_per_worker)
        if workers <= 1:
            return _japanese_chunk_to_tokens(list(texts))
        # Contiguous chunks, results in input order: the output does not depend on scheduling.
        chunk_size = math.ceil(len(texts) / (workers * 4))
        chunks = [list(texts[i : i + chunk_size]) for i in range(0, len(texts), chunk_size)]
        from zipvoice.utils.cli import ignore_interrupts

        with _process_pool_context().Pool(workers, initializer=ignore_interrupts) as pool:
            results = pool.map(_japanese_chunk_to_tokens, chunks)
        return [tokens for chunk in results for tokens in chunk]


# --------------------------------------------------------------------------------------
# The pretrained model's front ends (optional extra: piper_phonemize, pypinyin, jieba)
# --------------------------------------------------------------------------------------


def _import_optional(module: str) -> ModuleType:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{module} is needed by the emilia/espeak tokenizers but is not installed "
            f"({err}); install the extra with: {EMILIA_INSTALL_HINT}"
        ) from err


def _concat_sentences(sentences: list[list[str]]) -> list[str]:
    return [token for sentence in sentences for token in sentence]


class EspeakTokenizer(Tokenizer):
    """espeak-ng phonemes via piper_phonemize, one token per IPA character (upstream `espeak`)."""

    def __init__(
        self, token_file: str | Path | None = None, lang: str = "en-us", strict: bool = False
    ) -> None:
        super().__init__(token_file, strict)
        self.lang = lang
        self._piper = _import_optional("piper_phonemize")

    def g2p(self, text: str) -> list[str]:
        try:
            return _concat_sentences(self._piper.phonemize_espeak(text, self.lang))
        except Exception as err:  # espeak errors must not abort a whole data set
            logger.warning("espeak (%s) failed on %r: %s", self.lang, text, err)
            return []

    def texts_to_tokens(self, texts: list[str]) -> list[list[str]]:
        return [self.g2p(text) for text in texts]

    def symbols(self) -> list[str]:
        return espeak_symbols(self._piper)


def espeak_symbols(piper: ModuleType) -> list[str]:
    """piper's espeak token map in id order: the first ids of the pretrained tokens.txt."""
    return [token for token, ids in sorted(piper.get_espeak_map().items(), key=lambda kv: kv[1][0])]


class _EnglishNormalizer:
    """Abbreviations and numbers spelt out, as upstream's EnglishTextNormalizer (via inflect)."""

    _ABBREVIATIONS = (
        ("mrs", "misess"), ("mr", "mister"), ("dr", "doctor"), ("st", "saint"),
        ("co", "company"), ("jr", "junior"), ("maj", "major"), ("gen", "general"),
        ("drs", "doctors"), ("rev", "reverend"), ("lt", "lieutenant"), ("hon", "honorable"),
        ("sgt", "sergeant"), ("capt", "captain"), ("esq", "esquire"), ("ltd", "limited"),
        ("col", "colonel"), ("ft", "fort"), ("etc", "et cetera"), ("btw", "by the way"),
    )  # fmt: skip

    def __init__(self) -> None:
        inflect = _import_optional("inflect")
        self._inflect = inflect.engine()
        self._abbreviations = [
            (re.compile(rf"\b{short}\b", re.IGNORECASE), long)
            for short, long in self._ABBREVIATIONS
        ]
        self._comma_number = re.compile(r"([0-9][0-9,]+[0-9])")
        self._decimal_number = re.compile(r"([0-9]+\.[0-9]+)")
        self._percent_number = re.compile(r"([0-9.,]*[0-9]+%)")
        self._pounds = re.compile(r"£([0-9,]*[0-9]+)")
        self._dollars = re.compile(r"\$([0-9.,]*[0-9]+)")
        self._fraction = re.compile(r"([0-9]+)/([0-9]+)")
        self._ordinal = re.compile(r"[0-9]+(st|nd|rd|th)")
        self._number = re.compile(r"[0-9]+")

    def normalize(self, text: str) -> str:
        for pattern, replacement in self._abbreviations:
            text = pattern.sub(replacement, text)
        text = self._comma_number.sub(lambda m: m[1].replace(",", ""), text)
        text = self._pounds.sub(r"\1 pounds", text)
        text = self._dollars.sub(self._dollars_words, text)
        text = self._fraction.sub(lambda m: self._fraction_words(int(m[1]), int(m[2])), text)
        text = self._decimal_number.sub(lambda m: m[1].replace(".", " point "), text)
        text = self._percent_number.sub(lambda m: m[1].replace("%", " percent "), text)
        text = self._ordinal.sub(lambda m: f" {self._inflect.number_to_words(m[0])} ", text)
        return self._number.sub(self._number_words, text)

    def _fraction_words(self, numerator: int, denominator: int) -> str:
        if numerator == 1 and denominator == 2:
            return " one half "
        if numerator == 1 and denominator == 4:
            return " one quarter "
        words = self._inflect.number_to_words(numerator)
        if denominator == 2:
            return f" {words} halves "
        if denominator == 4:
            return f" {words} quarters "
        return f" {words} {self._inflect.ordinal(self._inflect.number_to_words(denominator))} "

    @staticmethod
    def _dollars_words(match: re.Match[str]) -> str:
        parts = match[1].split(".")
        if len(parts) > 2:
            return f" {match[1]} dollars "
        dollars = int(parts[0]) if parts[0] else 0
        cents = int(parts[1]) if len(parts) > 1 and parts[1] else 0
        dollar_unit = "dollar" if dollars == 1 else "dollars"
        cent_unit = "cent" if cents == 1 else "cents"
        if dollars and cents:
            return f" {dollars} {dollar_unit}, {cents} {cent_unit} "
        if dollars:
            return f" {dollars} {dollar_unit} "
        if cents:
            return f" {cents} {cent_unit} "
        return " zero dollars "

    def _number_words(self, match: re.Match[str]) -> str:
        number = int(match[0])
        words = self._inflect.number_to_words
        if 1000 < number < 3000:
            if number == 2000:
                return " two thousand "
            if 2000 < number < 2010:
                return f" two thousand {words(number % 100)} "
            if number % 100 == 0:
                return f" {words(number // 100)} hundred "
            return " " + words(number, andword="", zero="oh", group=2).replace(", ", " ") + " "
        return f" {words(number, andword='')} "


_EMILIA_PUNCTUATION = (
    ("，", ","), ("。", "."), ("！", "!"), ("？", "?"), ("；", ";"), ("：", ":"), ("、", ","),
    ("‘", "'"), ("“", '"'), ("”", '"'), ("’", "'"), ("⋯", "…"), ("···", "…"), ("・・・", "…"),
    ("...", "…"),
)  # fmt: skip
_EMILIA_PART_RE = re.compile(r"[<[].*?[>\]]|.")
_EMILIA_SPECIAL_RE = re.compile(r"([<[].*?[>\]])")


def _is_tone3_pinyin(syllable: str) -> bool:
    return syllable[:-1].isalpha() and syllable[-1:] in ("1", "2", "3", "4", "5")


class EmiliaTokenizer(Tokenizer):
    """Upstream's `emilia` front end: Chinese -> pinyin initials (+"0") and tone-3 finals,
    English -> espeak IPA characters, `<pin1yin1>` spelt pinyin, `[tag]` kept as one token."""

    def __init__(self, token_file: str | Path | None = None, strict: bool = False) -> None:
        super().__init__(token_file, strict)
        self._piper = _import_optional("piper_phonemize")
        self._pypinyin = _import_optional("pypinyin")
        self._tone_convert = _import_optional("pypinyin.contrib.tone_convert")
        self._jieba = _import_optional("jieba")
        self._jieba.setLogLevel(logging.WARNING)  # keep its "Building prefix dict" quiet
        self._cn2an = _import_optional("cn2an")
        self._english = _EnglishNormalizer()

    def texts_to_tokens(self, texts: list[str]) -> list[list[str]]:
        return [self._text_to_tokens(text) for text in texts]

    def symbols(self) -> list[str]:
        """espeak map in id order, then every pinyin initial/final that pypinyin knows, sorted."""
        tone_convert = self._tone_convert
        pinyin_dict = _import_optional("pypinyin.pinyin_dict").pinyin_dict
        syllables = set()
        for readings in pinyin_dict.values():
            for reading in readings.split(","):
                syllable = tone_convert.to_tone3(reading, neutral_tone_with_five=True)
                syllables.add(syllable if syllable[-1:].isdigit() else syllable + "5")
        pinyin_tokens = {token for syllable in syllables for token in self._split_pinyin(syllable)}
        return espeak_symbols(self._piper) + sorted(pinyin_tokens)

    def _text_to_tokens(self, text: str) -> list[str]:
        for source, target in _EMILIA_PUNCTUATION:
            text = text.replace(source, target)
        tokens: list[str] = []
        for segment, kind in self._segments(text):
            if kind == "zh":
                tokens += self._chinese(segment)
            elif kind == "en":
                tokens += self._english_tokens(segment)
            elif kind == "pinyin":
                tokens += self._spelt_pinyin(segment)
            elif kind == "tag":
                tokens.append(segment)
            else:
                logger.warning("skipping segment with no Chinese or English: %r", segment)
        return tokens

    def _chinese(self, text: str) -> list[str]:
        try:
            text = self._cn2an.transform(text, "an2cn")
            words = list(self._jieba.cut(text))
            syllables = self._pypinyin.lazy_pinyin(
                words,
                style=self._pypinyin.Style.TONE3,
                tone_sandhi=True,
                neutral_tone_with_five=True,
            )
        except Exception as err:
            logger.warning("Chinese g2p failed on %r: %s", text, err)
            return []
        tokens: list[str] = []
        for syllable in syllables:
            if _is_tone3_pinyin(syllable):
                tokens += self._split_pinyin(syllable)
            else:
                tokens.append(syllable)
        return tokens

    def _english_tokens(self, text: str) -> list[str]:
        try:
            text = self._english.normalize(text)
            return _concat_sentences(self._piper.phonemize_espeak(text, "en-us"))
        except Exception as err:
            logger.warning("English g2p failed on %r: %s", text, err)
            return []

    def _spelt_pinyin(self, text: str) -> list[str]:
        syllable = text[1:-1]
        if not _is_tone3_pinyin(syllable):
            logger.warning("<...> must hold tone-3 pinyin such as <ni3>; skipping %r", text)
            return []
        return self._split_pinyin(syllable)

    def _split_pinyin(self, syllable: str) -> list[str]:
        # Initials get a "0" and finals keep their tone digit so no token collides with espeak's.
        initial = self._tone_convert.to_initials(syllable, strict=False)
        final = self._tone_convert.to_finals_tone3(
            syllable, strict=False, neutral_tone_with_five=True
        )
        return ([initial + "0"] if initial else []) + ([final] if final else [])

    @staticmethod
    def _char_kind(part: str) -> str:
        if "\u4e00" <= part <= "\u9fa5" or (part.startswith("<") and part.endswith(">")):
            return "zh"
        if part.isascii() and part.isalpha():
            return "en"
        return "other"

    def _segments(self, text: str) -> list[tuple[str, str]]:
        """Runs of one language; neutral characters join the run before them."""
        parts = _EMILIA_PART_RE.findall(text)
        if not parts:
            return []
        runs: list[tuple[str, str]] = []
        current, current_kind = "", ""
        for index, part in enumerate(parts):
            kind = self._char_kind(part) if len(part) == 1 or part[0] == "<" else "other"
            if index == 0 or current_kind == "other":
                current += part
                current_kind = kind
            elif kind in (current_kind, "other"):
                current += part
            else:
                runs.append((current, current_kind))
                current, current_kind = part, kind
        runs.append((current, current_kind))

        segments: list[tuple[str, str]] = []
        for run, kind in runs:
            for piece in _EMILIA_SPECIAL_RE.split(run):
                if not piece:
                    continue
                if piece.startswith("<") and piece.endswith(">"):
                    segments.append((piece, "pinyin"))
                elif piece.startswith("[") and piece.endswith("]"):
                    segments.append((piece, "tag"))
                else:
                    segments.append((piece, kind))
        return segments


TOKENIZER_NAMES = ("simple", "japanese", "emilia", "espeak")
# The language each front end reads; only espeak takes it from --lang (its voice).
_FRONTEND_LANGUAGES = {"japanese": "ja", "emilia": "zh+en", "simple": "any"}


def frontend_language(tokenizer: str, lang: str | None) -> str | None:
    """What to record as the language of text read by `tokenizer`: `--lang` means the espeak
    voice, so for the other front ends their own language is recorded instead of the unused
    flag's default (a Japanese adapter must not say "en-us")."""
    return lang if tokenizer == "espeak" else _FRONTEND_LANGUAGES.get(tokenizer, lang)


def get_tokenizer(
    name: str, token_file: str | Path | None = None, lang: str = "en-us"
) -> Tokenizer:
    """Build a tokenizer by name; `lang` is the espeak voice of the `espeak` tokenizer."""
    if name == "simple":
        return SimpleTokenizer(token_file)
    if name == "japanese":
        return JapaneseTokenizer(token_file)
    if name == "emilia":
        return EmiliaTokenizer(token_file)
    if name == "espeak":
        return EspeakTokenizer(token_file, lang=lang)
    raise ValueError(f"unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZER_NAMES)}")
