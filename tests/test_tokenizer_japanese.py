"""Golden tests for the Japanese tokenizer (OpenJTalk phonemes + ESPnet prosody marks).

The expected sequences were produced by this implementation and checked by hand against the
marks described in docs/japanese.md; the first five are the examples of that page. Accents come from
the dictionary that pyopenjtalk-plus ships, so the golden values hold for one version only.
"""

from __future__ import annotations

import importlib.metadata
import logging
import random
import subprocess
import sys

import pytest

from tests.conftest import REPO
from zipvoice.tokenizer.tokenizer import (
    JAPANESE_SYMBOLS,
    JapaneseTokenizer,
    get_tokenizer,
    normalize_japanese,
)

PINNED_PYOPENJTALK_PLUS = "0.4.1.post10"


def _installed_version() -> str | None:
    try:
        return importlib.metadata.version("pyopenjtalk-plus")
    except importlib.metadata.PackageNotFoundError:
        return None


requires_pinned_dictionary = pytest.mark.skipif(
    _installed_version() != PINNED_PYOPENJTALK_PLUS,
    reason=(
        f"golden accents were recorded with pyopenjtalk-plus {PINNED_PYOPENJTALK_PLUS}, "
        f"installed: {_installed_version()}; accents differ between dictionary versions"
    ),
)

DOC_EXAMPLES = [
    ("箸を使う。", "^ h a ] sh i o # ts u [ k a u $"),
    ("橋を渡る。", "^ h a [ sh i ] o # w a [ t a r u $"),
    ("雨が降る。", "^ a ] m e g a # f u ] r u $"),
    ("飴をなめる。", "^ a [ m e o # n a [ m e ] r u $"),
    ("本当ですか？", "^ h o [ N t o o d e ] s u k a ?"),
]

GOLDEN = [
    ("明日は晴れますか?", "^ a [ sh i t a ] w a # h a [ r e m a ] s u k a ?"),
    ("これは何ですか？", "^ k o [ r e w a # n a ] N d e s u k a ?"),
    (
        "2024年3月15日に会いましょう。",
        "^ n i [ s e ] N # n i ] j u u # y o [ n e N # s a ] N g a ts u # j u ] u # g o ] n i ch i n i # a [ i m a ] sh o o $",  # noqa: E501
    ),
    (
        "円周率は3.14です。",
        "^ e [ N sh u ] u r i ts u w a # s a [ N t e N # i [ ch i y o ] N d e s u $",
    ),
    ("価格は1,000円です。", "^ k a [ k a k u w a # s e [ N e N d e ] s u $"),
    (
        "会議は10:30に始まります。",
        "^ k a ] i g i w a # j u ] u j i # s a [ N j u ] cl p u N n i # h a [ j i m a r i m a ] s u $",  # noqa: E501
    ),
    (
        "締め切りは2024/03/15です。",
        "^ sh i [ m e k i r i w a # n i [ s e ] N # n i ] j u u # y o [ n e N # s a ] N g a ts u # j u ] u # g o ] n i ch i d e s u $",  # noqa: E501
    ),
    (
        "参加者は3〜5人です。",
        "^ s a [ N k a ] sh a w a # s a [ N k a r a # g o [ n i ] N d e s u $",
    ),
    ("ＡＩとＤＸの時代。", "^ e [ e a ] i t o # d i [ i e ] cl k u s u n o # j i [ d a i $"),
    ("iPhoneを買った。", "^ a ] i f o N o # k a [ cl t a $"),
    ("NHKのニュースを見た。", "^ e [ n u e i ch i ] k e i n o # ny u ] u s u o # m i ] t a $"),
    (
        "コンピューターとインターネット。",
        "^ k o [ N py u ] u t a a t o # i [ N t a a n e ] cl t o $",
    ),
    (
        "東京特許許可局長今日急遽休暇許可拒否。",
        "^ t o [ o ky o o t o cl ky o ky o k a ky o ] k u ch o o # ky o ] o # ky u ] u ky o # ky u [ u k a ky o k a ky o ] h i $",  # noqa: E501
    ),
    (
        "国際連合教育科学文化機関。",
        "^ k o [ k u s a i r e N g o o ky o o i k u k a g a k u b u N k a k i ] k a N $",
    ),
    (
        "はい、そうです！いいえ…違います。",
        "^ h a ] i _ s o [ o d e s u _ i [ i e _ ch i [ g a i m a ] s u $",
    ),
    ("「こんにちは」と彼は言った。", "^ k o [ N n i ch i w a _ t o # k a ] r e w a # i [ cl t a $"),
    ("ちょっと待って。", "^ ch o ] cl t o # m a ] cl t e $"),
    ("学校に行った。", "^ g a [ cl k o o n i # i [ cl t a $"),
    ("おばあさんとおじいさん。", "^ o [ b a ] a s a N t o # o [ j i ] i s a N $"),
    ("ラーメンを食べたい。", "^ r a ] a m e N o # t a ] b e t a i $"),
    ("新幹線でしんおおさかへ。", "^ sh i [ N k a ] N s e N d e sh i N # o [ o s a k a e $"),
    ("こんにちは😀元気ですか？", "^ k o [ N n i ch i w a # g e ] N k i d e s u k a ?"),
    ("한국어とロシア語Д。", "^ t o # r o [ sh i a g o $"),
    ("ｶﾀｶﾅとひらがな。", "^ k a [ t a k a ] n a t o # h i [ r a g a n a $"),
    ("カフェでcaféを飲む。", "^ k a ] f e d e # k a ] f e o # n o ] m u $"),
    (
        "今日は、とても、いい天気ですね。",
        "^ ky o ] o w a _ t o [ t e m o _ i ] i # t e ] N k i d e s u n e $",
    ),
    (
        "彼女は５０％の確率で来る。",
        "^ k a ] n o j o w a # g o [ j u cl p a a s e ] N t o n o # k a [ k u r i ts u d e # k u ] r u $",  # noqa: E501
    ),
    ("ヴァイオリンとティーカップ。", "^ v a [ i o r i N t o # t i [ i k a ] cl p u $"),
    ("ファイル、フィルム、フェンス。", "^ f a ] i r u _ f i ] r u m u _ f e ] N s u $"),
    ("一石二鳥。", "^ i [ cl s e k i n i ] ch o o $"),
]
ALL_CASES = DOC_EXAMPLES + GOLDEN


@pytest.fixture(scope="module")
def serial_tokenizer() -> JapaneseTokenizer:
    return JapaneseTokenizer(num_workers=1)


@requires_pinned_dictionary
@pytest.mark.parametrize(("text", "expected"), DOC_EXAMPLES, ids=[t for t, _ in DOC_EXAMPLES])
def test_doc_examples_exactly(serial_tokenizer: JapaneseTokenizer, text: str, expected: str):
    assert serial_tokenizer.texts_to_tokens([text]) == [expected.split()]


@requires_pinned_dictionary
def test_golden_sentences(serial_tokenizer: JapaneseTokenizer):
    texts = [text for text, _ in ALL_CASES]
    got = serial_tokenizer.texts_to_tokens(texts)
    mismatches = [
        (text, " ".join(tokens), expected)
        for (text, expected), tokens in zip(ALL_CASES, got, strict=True)
        if tokens != expected.split()
    ]
    assert not mismatches, "\n".join(
        f"{t}\n  got      {g}\n  expected {e}" for t, g, e in mismatches
    )


def test_golden_set_is_big_enough():
    assert len(ALL_CASES) >= 30
    assert len({text for text, _ in ALL_CASES}) == len(ALL_CASES)


def test_every_emitted_token_is_a_known_symbol(serial_tokenizer: JapaneseTokenizer):
    texts = [text for text, _ in ALL_CASES]
    emitted = {token for tokens in serial_tokenizer.texts_to_tokens(texts) for token in tokens}
    assert emitted <= set(JAPANESE_SYMBOLS), emitted - set(JAPANESE_SYMBOLS)


def test_symbol_inventory_covers_all_kana(serial_tokenizer: JapaneseTokenizer):
    katakana = [chr(code) for code in range(0x30A1, 0x30FB)]
    small = "ァィゥェォャュョヮ"
    texts = [k + "ア" for k in katakana] + [k + s + "ア" for k in katakana for s in small]
    emitted = {token for tokens in serial_tokenizer.texts_to_tokens(texts) for token in tokens}
    assert emitted <= set(JAPANESE_SYMBOLS), emitted - set(JAPANESE_SYMBOLS)
    # Every phoneme in the inventory is reachable, so none is dead weight in the token file.
    phonemes = set(JAPANESE_SYMBOLS) - {"^", "$", "?", "_", "#", "[", "]"}
    assert phonemes <= emitted


def test_symbols_are_sorted_unique_and_fixed():
    assert JAPANESE_SYMBOLS == sorted(set(JAPANESE_SYMBOLS))
    assert {"^", "$", "?", "_", "#", "[", "]", "N", "cl", "sh", "ts", "ch"} <= set(JAPANESE_SYMBOLS)
    assert not any(s in JAPANESE_SYMBOLS for s in ("A", "I", "U", "E", "O", "pau", "sil"))
    assert get_tokenizer("japanese").symbols() == JAPANESE_SYMBOLS


def test_unvoiced_vowels_are_lower_case(serial_tokenizer: JapaneseTokenizer):
    # OpenJTalk devoices the u of です/ます (label phoneme "U").
    tokens = serial_tokenizer.texts_to_tokens(["そうです。"])[0]
    assert tokens[-3:] == ["s", "u", "$"]


def test_empty_and_unreadable_text(serial_tokenizer: JapaneseTokenizer, caplog):
    with caplog.at_level(logging.DEBUG, logger="zipvoice.tokenizer.tokenizer"):
        got = serial_tokenizer.texts_to_tokens(["", "   ", "😀👍", "、。", "한국어"])
    assert got == [[], [], [], [], []]
    assert "not pronounceable" in caplog.text  # the emoji were reported, not silently eaten
    assert "cannot read" in caplog.text  # Hangul too


def test_emoji_is_dropped_not_read_as_a_pause(serial_tokenizer: JapaneseTokenizer):
    with_emoji, without = serial_tokenizer.texts_to_tokens(["あ😀い", "あい"])
    assert with_emoji == without
    assert "_" not in with_emoji


def test_normalisation():
    assert normalize_japanese("ＡＢＣ　１２３？") == "ABC 123?"
    assert normalize_japanese("2024/03/15") == "2024年3月15日"
    assert normalize_japanese("10:00と9:05") == "10時と9時5分"
    assert normalize_japanese("3〜5人、3～5人") == "3から5人、3から5人"
    assert normalize_japanese("café naïve Straße") == "cafe naive Strasse"
    assert normalize_japanese("ｶﾞｷﾞ\n\tテスト") == "ガギ テスト"
    assert normalize_japanese("a\u200bb😀c") == "abc"


def test_numbers_are_read(serial_tokenizer: JapaneseTokenizer):
    full_width, half_width = serial_tokenizer.texts_to_tokens(["３．１４", "3.14"])
    assert full_width == half_width
    # さんてんいちよん
    assert [t for t in half_width if t not in "^$[]#"] == "s a N t e N i ch i y o N".split()


def test_deterministic(serial_tokenizer: JapaneseTokenizer):
    texts = [text for text, _ in ALL_CASES]
    first = serial_tokenizer.texts_to_tokens(texts)
    assert serial_tokenizer.texts_to_tokens(list(reversed(texts))) == list(reversed(first))
    assert JapaneseTokenizer(num_workers=1).texts_to_tokens(texts) == first


def test_parallel_equals_serial(serial_tokenizer: JapaneseTokenizer):
    texts = [text for text, _ in ALL_CASES] * 3  # 105 texts: several chunks per worker
    parallel = JapaneseTokenizer(num_workers=2, min_texts_per_worker=4)
    assert parallel.texts_to_tokens(texts) == serial_tokenizer.texts_to_tokens(texts)


def test_ids_need_a_token_file(serial_tokenizer: JapaneseTokenizer):
    with pytest.raises(ValueError, match="without a token file"):
        serial_tokenizer.texts_to_token_ids(["こんにちは"])


def test_ids_with_a_token_file(tmp_path):
    missing = "r"  # left out of the file: dropped, or an error when strict
    vocabulary = [t for t in JAPANESE_SYMBOLS if t != missing]
    token_file = tmp_path / "tokens.txt"
    token_file.write_text(
        "".join(f"{token}\t{i}\n" for i, token in enumerate(vocabulary)), encoding="utf-8"
    )
    tokenizer = JapaneseTokenizer(token_file, num_workers=1)
    assert tokenizer.pad_id == vocabulary.index("_")
    assert tokenizer.vocab_size == len(JAPANESE_SYMBOLS) - 1
    ids = tokenizer.texts_to_token_ids(["雨が降る。"])[0]
    expected = [t for t in "^ a ] m e g a # f u ] r u $".split() if t != missing]
    assert ids == [vocabulary.index(t) for t in expected]
    strict = JapaneseTokenizer(token_file, strict=True, num_workers=1)
    with pytest.raises(ValueError, match="token 'r' is not in the token file"):
        strict.texts_to_token_ids(["雨が降る。"])


def test_import_prints_nothing_on_stdout():
    code = (
        "from zipvoice.tokenizer.tokenizer import get_tokenizer;"
        "get_tokenizer('japanese').texts_to_tokens(['何ですか'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout == ""


def test_random_unicode_never_crashes(serial_tokenizer: JapaneseTokenizer):
    rng = random.Random(0)
    ranges = [(0x20, 0x7E), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xFF01, 0xFF5E),
              (0x2000, 0x2BFF), (0x1F300, 0x1FAFF), (0xAC00, 0xD7A3), (0x00, 0x1F)]  # fmt: skip
    texts = [
        "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 20)))
        for _ in range(100)
    ]
    emitted = {token for tokens in serial_tokenizer.texts_to_tokens(texts) for token in tokens}
    assert emitted <= set(JAPANESE_SYMBOLS)
