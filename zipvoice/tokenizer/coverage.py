"""Token-file coverage: every symbol a tokenizer can emit must have an id in the token file.

`Tokenizer.tokens_to_token_ids` drops tokens the token file lacks (as upstream does). With
the base English tokens.txt and `--tokenizer japanese` that dropped 30% of the tokens, every
pitch-accent mark among them, and training still exited 0. Commands therefore check the
tokenizer's inventory (`Tokenizer.symbols()`) against the token file before any work.

- `japanese` and `espeak` have a small fixed inventory: a missing symbol is an error.
- `emilia`'s inventory is generated from pypinyin's whole dictionary (rare readings
  included), so a token file built from a corpus may lack a few of them; missing symbols
  are logged as a warning, listed, instead of refusing the run.
- `simple` emits whatever characters the texts hold (no fixed inventory): nothing to check.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from zipvoice.tokenizer.token_file import TokenFileError, read_token_file

logger = logging.getLogger(__name__)

STRICT_TOKENIZERS = frozenset({"japanese", "espeak"})
_MAX_LISTED = 40


class TokenCoverageError(TokenFileError):
    """The token file lacks symbols the tokenizer emits (they would be dropped silently)."""


def missing_symbols(tokenizer: object, token2id: Mapping[str, int]) -> list[str] | None:
    """The tokenizer's symbols that `token2id` lacks, in the tokenizer's order; None when the
    tokenizer has no fixed inventory."""
    try:
        symbols = tokenizer.symbols()  # type: ignore[attr-defined]
    except NotImplementedError:
        return None
    return [symbol for symbol in symbols if symbol not in token2id]


def _listing(symbols: list[str]) -> str:
    shown = " ".join(symbols[:_MAX_LISTED])
    if len(symbols) > _MAX_LISTED:
        shown += f" ... (+{len(symbols) - _MAX_LISTED} more)"
    return shown


def check_token_coverage(
    tokenizer: object,
    tokenizer_name: str,
    token_file: str | os.PathLike,
    token2id: Mapping[str, int] | None = None,
) -> list[str]:
    """Refuse (TokenCoverageError) a token file lacking symbols of a strict tokenizer, listing
    them and saying how to build a covering file; warn for the others. Returns the missing
    symbols ([] when covered or when there is no fixed inventory)."""
    token_file = Path(token_file)
    if token2id is None:
        token2id = getattr(tokenizer, "token2id", None) or read_token_file(token_file)
    missing = missing_symbols(tokenizer, token2id)
    if not missing:
        return []
    total = len(tokenizer.symbols())  # type: ignore[attr-defined]
    message = (
        f"token file {token_file} lacks {len(missing)} of the {total} symbols the "
        f"{tokenizer_name} tokenizer emits: {_listing(missing)}"
    )
    if tokenizer_name in STRICT_TOKENIZERS:
        raise TokenCoverageError(
            f"{message}; they would be dropped from every text. Build a covering token file "
            f"with: python -m zipvoice.bin.prepare_token_file --tokenizer {tokenizer_name} "
            f"--base-token-file {token_file} --output <new tokens.txt>"
        )
    logger.warning("%s; texts using them lose those tokens", message)
    return missing
