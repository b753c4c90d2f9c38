"""Write a token file: the pretrained tokens unchanged, then every token a tokenizer can emit.

    python -m zipvoice.bin.prepare_token_file --tokenizer japanese \\
        --base-token-file download/zipvoice/tokens.txt \\
        --output data/tokens_japanese_extended.txt
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from zipvoice.tokenizer.prepare import prepare_token_file
from zipvoice.tokenizer.tokenizer import TOKENIZER_NAMES
from zipvoice.utils.cli import exit_on_error, setup_logging


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", choices=TOKENIZER_NAMES, default="japanese")
    parser.add_argument(
        "--base-token-file",
        type=Path,
        default=None,
        help="the pretrained model's tokens.txt; its ids are kept and new tokens appended",
    )
    parser.add_argument("--output", type=Path, default=Path("data/tokens_japanese_extended.txt"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--lang", default="en-us", help="espeak voice for --tokenizer espeak")
    parser.add_argument(
        "--text-file",
        type=Path,
        default=None,
        help="also add every token found in these texts (one a line); required for 'simple'",
    )
    return parser


@exit_on_error
def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    setup_logging()
    summary = prepare_token_file(
        args.tokenizer,
        args.output,
        base_token_file=args.base_token_file,
        overwrite=args.overwrite,
        lang=args.lang,
        text_file=args.text_file,
    )
    print(f"base tokens:  {summary.base_count}")
    print(f"added tokens: {summary.added_count}")
    print(f"total:        {summary.total} -> {summary.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
