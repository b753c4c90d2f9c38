"""Making a token file for a tokenizer: the base vocabulary kept, every new token appended.

Beside the file format (token_file.py) and the tokenizers (tokenizer.py), which it uses both;
neither imports this module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from zipvoice.tokenizer.token_file import (
    PAD_TOKEN,
    check_token_prefix,
    extend_token_file,
    read_token_file,
    write_token_file,
)
from zipvoice.tokenizer.tokenizer import get_tokenizer
from zipvoice.utils.validate import read_text_lines

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenFileSummary:
    output: Path
    base_count: int
    added_count: int
    added_tokens: list[str]

    @property
    def total(self) -> int:
        return self.base_count + self.added_count


def prepare_token_file(
    tokenizer_name: str,
    output: str | Path,
    base_token_file: str | Path | None = None,
    overwrite: bool = False,
    lang: str = "en-us",
    text_file: str | Path | None = None,
) -> TokenFileSummary:
    """Base tokens unchanged + every token the tokenizer can emit (and any seen in `text_file`).

    Without a base file the result starts with `_` at id 0 so that it is a valid token file.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it")
    if base_token_file is not None:
        base = read_token_file(base_token_file)
    else:
        base = {PAD_TOKEN: 0}

    tokenizer = get_tokenizer(tokenizer_name, lang=lang)
    try:
        new_tokens = list(tokenizer.symbols())
    except NotImplementedError as err:
        if text_file is None:
            raise ValueError(f"{err}; pass a text file to collect its tokens from") from None
        new_tokens = []
    if text_file is not None:
        texts = [line for _, line in read_text_lines(text_file, what="text file")]
        seen = {token for tokens in tokenizer.texts_to_tokens(texts) for token in tokens}
        new_tokens.extend(sorted(seen))

    extended = extend_token_file(base, new_tokens)
    check_token_prefix(base, extended, base_token_file or "<no base>", output)
    write_token_file(output, extended, overwrite=overwrite)
    added = [token for token in extended if token not in base]
    logger.info("wrote %s: %d base + %d added tokens", output, len(base), len(added))
    return TokenFileSummary(
        output=output, base_count=len(base), added_count=len(added), added_tokens=added
    )
