"""Token files: one `token<TAB>id` a line, `_` is the padding token.

A fine-tuned model keeps the pretrained embedding rows, so an extended token file must keep
every base token at its base id and only append new tokens after them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from zipvoice.utils.fileio import atomic_write_text
from zipvoice.utils.validate import ValidationError, read_text_lines

logger = logging.getLogger(__name__)

PAD_TOKEN = "_"


class TokenFileError(ValueError):
    """A token file is malformed or inconsistent with another one."""


def read_token_file(path: str | Path) -> dict[str, int]:
    """Read `token<TAB>id` lines, checking what the model relies on (unique ids, a pad token)."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"token file {path} is a directory, expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    token2id: dict[str, int] = {}
    id2token: dict[int, str] = {}
    try:
        lines = read_text_lines(path, what="token file")  # BOM dropped, encodings named
    except ValidationError as err:
        raise TokenFileError(str(err)) from None
    for line_no, line in lines:
        if not line:
            continue
        # The token itself may be a space, so split on the last tab only.
        token, sep, id_text = line.rpartition("\t")
        if not sep or token == "":
            raise TokenFileError(f"{path}:{line_no}: expected 'token<TAB>id', got {line!r}")
        try:
            token_id = int(id_text)
        except ValueError:
            raise TokenFileError(
                f"{path}:{line_no}: id {id_text!r} of token {token!r} is not an integer"
            ) from None
        if token_id < 0:
            raise TokenFileError(f"{path}:{line_no}: negative id {token_id} for {token!r}")
        if token in token2id:
            raise TokenFileError(
                f"{path}:{line_no}: duplicate token {token!r} (already has id {token2id[token]})"
            )
        if token_id in id2token:
            raise TokenFileError(
                f"{path}:{line_no}: duplicate id {token_id} for {token!r} "
                f"(already used by {id2token[token_id]!r})"
            )
        token2id[token] = token_id
        id2token[token_id] = token
    if not token2id:
        raise TokenFileError(f"{path}: token file is empty")
    if PAD_TOKEN not in token2id:
        raise TokenFileError(f"{path}: no padding token {PAD_TOKEN!r}")
    _check_no_gaps(path, id2token)
    return token2id


def _check_no_gaps(path: Path, id2token: Mapping[int, str]) -> None:
    """The model's embedding has one row per token, so ids must be exactly 0..N-1: an id past
    N-1 would index beyond the embedding (IndexError at the first batch that uses it)."""
    count = len(id2token)
    if max(id2token) == count - 1:
        return
    missing = [i for i in range(max(id2token) + 1) if i not in id2token]
    beyond = sorted(i for i in id2token if i >= count)
    shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
    raise TokenFileError(
        f"{path}: ids must run from 0 to {count - 1} without gaps ({count} tokens), but id(s) "
        f"{shown} are missing and {id2token[beyond[0]]!r} has id {beyond[0]}"
    )


def write_token_file(
    path: str | Path, token2id: Mapping[str, int], overwrite: bool = False
) -> None:
    """Write atomically (temp file + fsync + rename) in id order; never clobber by accident."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    if PAD_TOKEN not in token2id:
        raise TokenFileError(f"refusing to write {path}: no padding token {PAD_TOKEN!r}")
    ids = sorted(token2id.values())
    if len(set(ids)) != len(ids):
        raise TokenFileError(f"refusing to write {path}: duplicate ids")
    for token in token2id:
        if token == "" or "\t" in token or "\n" in token or "\r" in token:
            raise TokenFileError(f"refusing to write {path}: unwritable token {token!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"{token}\t{token_id}\n"
        for token, token_id in sorted(token2id.items(), key=lambda item: item[1])
    ]
    atomic_write_text(path, "".join(lines))


def extend_token_file(base: Mapping[str, int], new_tokens: Iterable[str]) -> dict[str, int]:
    """Append tokens missing from `base` after its largest id, in the order first given.

    Callers pass a sorted inventory, so the result depends only on the inputs.
    """
    extended = dict(base)
    next_id = max(base.values(), default=-1) + 1
    for token in new_tokens:
        if token in extended:
            continue
        extended[token] = next_id
        next_id += 1
    return extended


def check_token_prefix(
    base_token2id: Mapping[str, int],
    extended_token2id: Mapping[str, int],
    base_path: str | Path,
    extended_path: str | Path,
) -> None:
    """Fail loudly if the extended file would reassign any pretrained embedding row."""
    id2extended = {token_id: token for token, token_id in extended_token2id.items()}
    for token, token_id in sorted(base_token2id.items(), key=lambda item: item[1]):
        other = id2extended.get(token_id)
        if other != token:
            found = "nothing" if other is None else repr(other)
            raise TokenFileError(
                f"token file {extended_path} does not extend {base_path}: id {token_id} is "
                f"{token!r} in the base file but {found} in the extended file (the first "
                f"{len(base_token2id)} ids must be identical)"
            )


def check_tokens_fit_embedding(
    token_file: str | os.PathLike, vocab_size: int, model_source: str | os.PathLike
) -> None:
    """Every id of `token_file` must have an embedding row; a token file larger than the model
    (or its adapter) would fail with IndexError at the first sentence that uses a new id."""
    ids = read_token_file(token_file).values()
    if max(ids) >= vocab_size:
        raise ValidationError(
            f"{token_file} has ids up to {max(ids)} but {model_source} embeds only {vocab_size} "
            "tokens: use the token file the model (or adapter) was trained with"
        )
