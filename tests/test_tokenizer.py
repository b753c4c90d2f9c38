"""Simple tokenizer, token files, the prepare_token_file CLI, and the optional emilia/espeak."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PARITY, REPO
from zipvoice.bin import prepare_token_file as prepare_cli
from zipvoice.tokenizer.token_file import (
    TokenFileError,
    check_token_prefix,
    extend_token_file,
    read_token_file,
    write_token_file,
)
from zipvoice.tokenizer.tokenizer import (
    JAPANESE_SYMBOLS,
    EmiliaTokenizer,
    SimpleTokenizer,
    get_tokenizer,
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- simple tokenizer


def test_simple_tokenizer_characters_and_ids(tmp_path):
    token_file = _write(tmp_path / "tokens.txt", "_\t0\na\t1\nb\t2\n \t3\n")
    tokenizer = SimpleTokenizer(token_file)
    assert tokenizer.texts_to_tokens(["ab a", ""]) == [["a", "b", " ", "a"], []]
    assert tokenizer.vocab_size == 4 and tokenizer.pad_id == 0
    # "c" is unknown: dropped by default, an error when strict
    assert tokenizer.texts_to_token_ids(["abc b"]) == [[1, 2, 3, 2]]
    with pytest.raises(ValueError, match="'c' is not in the token file"):
        SimpleTokenizer(token_file, strict=True).texts_to_token_ids(["abc"])


def test_simple_tokenizer_without_token_file():
    tokenizer = SimpleTokenizer()
    assert tokenizer.texts_to_tokens(["xy"]) == [["x", "y"]]
    with pytest.raises(ValueError, match="without a token file"):
        _ = tokenizer.vocab_size


def test_get_tokenizer_names():
    assert isinstance(get_tokenizer("simple"), SimpleTokenizer)
    assert get_tokenizer("japanese").texts_to_tokens(["雨"])[0][0] == "^"
    with pytest.raises(ValueError, match="simple, japanese, emilia, espeak"):
        get_tokenizer("klingon")


def test_reads_fixture_token_file():
    token2id = read_token_file(PARITY / "tokens.txt")
    assert len(token2id) == 38 and token2id["_"] == 0 and token2id[" "] == 27
    tokenizer = get_tokenizer("simple", PARITY / "tokens.txt")
    assert tokenizer.vocab_size == 38 and tokenizer.pad_id == 0


# ---------------------------------------------------------------- token files


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("_\t0\na\t1\na\t2\n", r"tokens.txt:3: duplicate token 'a'"),
        ("_\t0\na\t1\nb\t1\n", r"tokens.txt:3: duplicate id 1"),
        ("_\t0\na 1\n", r"tokens.txt:2: expected 'token<TAB>id'"),
        ("_\t0\na\tone\n", r"tokens.txt:2: id 'one' of token 'a' is not an integer"),
        ("a\t0\nb\t1\n", r"no padding token '_'"),
        ("", r"token file is empty"),
    ],
)
def test_read_token_file_errors(tmp_path, content, message):
    path = _write(tmp_path / "tokens.txt", content)
    with pytest.raises(TokenFileError, match=message):
        read_token_file(path)


def test_read_missing_token_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_token_file(tmp_path / "nope.txt")


def test_write_read_round_trip_and_refuse_overwrite(tmp_path):
    path = tmp_path / "sub" / "tokens.txt"
    token2id = {"b": 2, "_": 0, " ": 1, "ʃ": 3}
    write_token_file(path, token2id)
    assert path.read_text(encoding="utf-8") == "_\t0\n \t1\nb\t2\nʃ\t3\n"  # id order
    assert read_token_file(path) == token2id
    with pytest.raises(FileExistsError, match="overwrite"):
        write_token_file(path, {"_": 0})
    assert read_token_file(path) == token2id  # untouched
    write_token_file(path, {"_": 0}, overwrite=True)
    assert read_token_file(path) == {"_": 0}
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokens.txt"]  # no temp files


def test_write_rejects_bad_tables(tmp_path):
    with pytest.raises(TokenFileError, match="no padding token"):
        write_token_file(tmp_path / "t.txt", {"a": 0})
    with pytest.raises(TokenFileError, match="duplicate ids"):
        write_token_file(tmp_path / "t.txt", {"_": 0, "a": 0})
    assert not (tmp_path / "t.txt").exists()


def test_extend_token_file_keeps_base_ids():
    base = {"_": 0, "a": 1, "b": 2}
    extended = extend_token_file(base, ["b", "sh", "a", "N", "sh"])
    assert extended == {"_": 0, "a": 1, "b": 2, "sh": 3, "N": 4}
    assert base == {"_": 0, "a": 1, "b": 2}  # not mutated
    assert extend_token_file(base, []) == base
    # A base with a gap in its ids still gets new ids after its largest one.
    assert extend_token_file({"_": 0, "z": 5}, ["y"])["y"] == 6


def test_check_token_prefix():
    base = {"_": 0, "a": 1, "b": 2}
    check_token_prefix(base, {"_": 0, "a": 1, "b": 2, "c": 3}, "base.txt", "ext.txt")
    with pytest.raises(
        TokenFileError, match=r"ext\.txt does not extend base\.txt: id 1 is 'a' .* but 'b'"
    ):
        check_token_prefix(base, {"_": 0, "b": 1, "a": 2}, "base.txt", "ext.txt")
    with pytest.raises(TokenFileError, match=r"ext\.txt.*id 2 is 'b'.*but nothing"):
        check_token_prefix(base, {"_": 0, "a": 1}, "base.txt", "ext.txt")


# ---------------------------------------------------------------- prepare_token_file CLI


def test_cli_japanese_extends_base(tmp_path, capsys):
    output = tmp_path / "data" / "tokens_japanese_extended.txt"
    base_file = PARITY / "tokens.txt"
    code = prepare_cli.main(
        ["--tokenizer", "japanese", "--base-token-file", str(base_file), "--output", str(output)]
    )
    assert code == 0
    base = read_token_file(base_file)
    extended = read_token_file(output)
    for token, token_id in base.items():
        assert extended[token] == token_id  # every pretrained id unchanged
    added = [t for t in JAPANESE_SYMBOLS if t not in base]
    assert [t for t, _ in sorted(extended.items(), key=lambda kv: kv[1])][len(base) :] == added
    assert set(JAPANESE_SYMBOLS) <= set(extended)
    assert {"sh", "cl", "N", "[", "]", "#"} <= set(added) and "a" not in added
    out = capsys.readouterr().out
    assert f"base tokens:  {len(base)}" in out and f"added tokens: {len(added)}" in out

    # Ids the Japanese tokenizer produces through this file hit base rows for shared tokens.
    tokenizer = get_tokenizer("japanese", output)
    ids = tokenizer.texts_to_token_ids(["雨が降る。"])[0]
    assert ids[1] == base["a"] and extended["]"] >= len(base)

    # Refuses to overwrite, then overwrites when asked, with the same content.
    before = output.read_text(encoding="utf-8")
    assert prepare_cli.main(["--tokenizer", "japanese", "--output", str(output)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert output.read_text(encoding="utf-8") == before
    argv = ["--base-token-file", str(base_file), "--output", str(output), "--overwrite"]
    assert prepare_cli.main(argv) == 0
    assert output.read_text(encoding="utf-8") == before  # deterministic


def test_cli_japanese_without_base(tmp_path):
    output = tmp_path / "tokens.txt"
    assert prepare_cli.main(["--tokenizer", "japanese", "--output", str(output)]) == 0
    token2id = read_token_file(output)
    assert token2id["_"] == 0
    assert sorted(token2id) == JAPANESE_SYMBOLS
    assert sorted(token2id.values()) == list(range(len(JAPANESE_SYMBOLS)))


def test_cli_simple_needs_texts(tmp_path, capsys):
    output = tmp_path / "tokens.txt"
    assert prepare_cli.main(["--tokenizer", "simple", "--output", str(output)]) == 1
    assert "text file" in capsys.readouterr().err and not output.exists()
    texts = _write(tmp_path / "texts.txt", "cab\nba d\n")
    argv = ["--tokenizer", "simple", "--output", str(output), "--text-file", str(texts)]
    assert prepare_cli.main(argv) == 0
    assert read_token_file(output) == {"_": 0, " ": 1, "a": 2, "b": 3, "c": 4, "d": 5}


def test_cli_bad_base_file(tmp_path, capsys):
    base = _write(tmp_path / "base.txt", "_\t0\na\t0\n")
    argv = ["--base-token-file", str(base), "--output", str(tmp_path / "out.txt")]
    assert prepare_cli.main(argv) == 1
    assert "base.txt:2: duplicate id 0" in capsys.readouterr().err
    assert not (tmp_path / "out.txt").exists()


def test_cli_stdout_is_only_the_summary(tmp_path):
    output = tmp_path / "tokens.txt"
    result = subprocess.run(
        [sys.executable, "-m", "zipvoice.bin.prepare_token_file", "--output", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.splitlines() == [
        "base tokens:  1",
        f"added tokens: {len(JAPANESE_SYMBOLS) - 1}",
        f"total:        {len(JAPANESE_SYMBOLS)} -> {output}",
    ]


# ---------------------------------------------------------------- emilia / espeak


def test_missing_extra_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "piper_phonemize", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'zipvoice\[emilia\]'"):
        get_tokenizer("espeak")
    with pytest.raises(ImportError, match=r"pip install 'zipvoice\[emilia\]'"):
        get_tokenizer("emilia")


def test_espeak_tokenizer():
    piper = pytest.importorskip("piper_phonemize")
    tokenizer = get_tokenizer("espeak", lang="en-us")
    tokens = tokenizer.texts_to_tokens(["Hello world. How are you?"])[0]
    assert tokens[:6] == ["h", "ə", "l", "ˈ", "o", "ʊ"] and tokens[-1] == "?"
    assert "." in tokens  # both sentences are kept, concatenated
    symbols = tokenizer.symbols()
    assert symbols[:3] == ["_", "^", "$"] and len(symbols) == len(piper.get_espeak_map())
    assert set(tokens) <= set(symbols)


def test_emilia_tokenizer():
    pytest.importorskip("piper_phonemize")
    pytest.importorskip("pypinyin")
    pytest.importorskip("jieba")
    pytest.importorskip("cn2an")
    pytest.importorskip("inflect")
    tokenizer = EmiliaTokenizer()
    zh, mixed, spelt = tokenizer.texts_to_tokens(["你好。", "我有2个apple", "<ni3>[laughter]"])
    assert zh == ["n0", "i2", "h0", "ao3", "."]  # third-tone sandhi: ni3 -> ni2
    # 2 -> 二 (cn2an), 个 -> ge4, apple -> espeak IPA
    assert mixed == ["w0", "o3", "y0", "ou3", "er4", "g0", "e4", "ˈ", "æ", "p", "ə", "l"]
    assert spelt == ["n0", "i3", "[laughter]"]
    symbols = tokenizer.symbols()
    assert len(symbols) == len(set(symbols))
    assert {"n0", "i2", "zh0", "ang1", "er4"} <= set(symbols)
    assert set(zh) | set(mixed) <= set(symbols)
    english = tokenizer.texts_to_tokens(["Dr. Smith paid $5."])[0]
    assert "".join(english).startswith("dˈɑːktɚ")  # Dr. -> doctor
