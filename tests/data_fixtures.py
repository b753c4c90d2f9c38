"""Session fixtures with real Japanese speech taken through the whole data pipeline.

Import into a test module with `from tests.data_fixtures import *`. The corpus is made once per
test session (OpenJTalk voice, 2 pseudo-speakers x 3 sentences: 4 train and 2 dev utterances
of 2-3 s), then prepare_dataset -> prepare_tokens (japanese) -> compute_fbank.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import PARITY
from zipvoice.dataset.fbank import compute_fbank
from zipvoice.dataset.manifests import prepare_dataset
from zipvoice.dataset.synthetic import make_japanese_corpus
from zipvoice.dataset.tokens import prepare_tokens
from zipvoice.tokenizer.prepare import prepare_token_file

__all__ = ["japanese_corpus", "japanese_fbank_manifests"]

CORPUS_NAME = "japanese"

# Each test module that star-imports these fixtures registers its own copy, and pytest would
# build a session fixture once per copy; this module is imported once, so cache here.
_SESSION_CACHE: dict[str, dict] = {}


@pytest.fixture(scope="session")
def japanese_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"out_dir", "wav_dir", "train_tsv", "dev_tsv"} of a 2-speaker x 3-sentence corpus."""
    if "corpus" not in _SESSION_CACHE:
        _SESSION_CACHE["corpus"] = make_japanese_corpus(
            tmp_path_factory.mktemp("japanese_corpus"),
            num_speakers=2,
            num_sentences=3,
            name=CORPUS_NAME,
            progress=False,
        )
    return dict(_SESSION_CACHE["corpus"])  # a copy: tests may not alter what others see


@pytest.fixture(scope="session")
def japanese_fbank_manifests(
    japanese_corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path | None]:
    """Fbank cut manifests with tokens, and a token file that covers the japanese tokenizer.

    Keys: "train_cuts", "dev_cuts" (data/fbank-style manifests with VocosFbank features and
    `supervision.custom["tokens"]`), "manifest_dir" (their folder), "raw_manifest_dir",
    "token_file" (the parity models' tokens.txt with every JAPANESE_SYMBOLS token appended,
    so the first ids match the reference checkpoints), "base_token_file" (that tokens.txt,
    or None when the reference fixtures are absent and the file starts from "_" alone).
    """
    if "fbank" in _SESSION_CACHE:
        return dict(_SESSION_CACHE["fbank"])
    root = tmp_path_factory.mktemp("japanese_data")
    raw_dir, fbank_dir = root / "manifests", root / "fbank"
    for subset in ("train", "dev"):
        prepared = prepare_dataset(
            japanese_corpus[f"{subset}_tsv"],
            prefix=CORPUS_NAME,
            subset=f"raw_{subset}",
            output_dir=raw_dir,
        )
        prepare_tokens(
            prepared.cuts,
            raw_dir / f"{CORPUS_NAME}_cuts_{subset}.jsonl.gz",
            tokenizer="japanese",
        )
        compute_fbank(
            source_dir=raw_dir,
            dest_dir=fbank_dir,
            prefix=CORPUS_NAME,
            subset=subset,
            progress=False,
        )
    base = PARITY / "tokens.txt"
    base_token_file = base if base.is_file() else None
    token_file = root / "tokens_japanese_extended.txt"
    prepare_token_file("japanese", token_file, base_token_file=base_token_file)
    _SESSION_CACHE["fbank"] = {
        "train_cuts": fbank_dir / f"{CORPUS_NAME}_cuts_train.jsonl.gz",
        "dev_cuts": fbank_dir / f"{CORPUS_NAME}_cuts_dev.jsonl.gz",
        "manifest_dir": fbank_dir,
        "raw_manifest_dir": raw_dir,
        "token_file": token_file,
        "base_token_file": base_token_file,
    }
    return dict(_SESSION_CACHE["fbank"])
