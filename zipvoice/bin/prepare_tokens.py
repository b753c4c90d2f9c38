#!/usr/bin/env python3
"""Tokenise every supervision's text of a cuts manifest and store the tokens in it.

Tokens go to `supervision.custom["tokens"]` (read back as `supervision.tokens`, as upstream
does), so training does not run the text front-end again every epoch.

Usage:

python3 -m zipvoice.bin.prepare_tokens \\
    --input-file data/manifests/custom_cuts_raw_train.jsonl.gz \\
    --output-file data/manifests/custom_cuts_train.jsonl.gz \\
    --tokenizer japanese

A text that yields no tokens (only punctuation or emoji, say), or none that the optional
--token-file knows, cannot be trained on. Such cuts are reported by id: `--on-error fail`
(default) writes no manifest, `--on-error skip` leaves them out. Either way they are listed in
`{output name}_rejected.tsv` beside the output.
"""

from __future__ import annotations

import argparse
import os
import sys

from zipvoice.dataset.config import ON_ERROR_CHOICES
from zipvoice.tokenizer.tokenizer import TOKENIZER_NAMES
from zipvoice.utils.cli import exit_on_error, setup_logging


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input-file", type=str, required=True, help="Cuts without tokens.")
    parser.add_argument("--output-file", type=str, required=True, help="Cuts with tokens.")
    parser.add_argument(
        "--num-jobs", type=int, default=min(8, os.cpu_count() or 1), help="Tokeniser processes."
    )
    parser.add_argument(
        "--tokenizer",
        choices=TOKENIZER_NAMES,
        default="emilia",
        help="Text front end (default emilia, as upstream; Japanese corpora pass japanese).",
    )
    parser.add_argument(
        "--lang", type=str, default="en-us", help="espeak voice, for --tokenizer espeak."
    )
    parser.add_argument(
        "--token-file",
        type=str,
        default=None,
        help="Optional token file: tokens it lacks are reported (training would drop them).",
    )
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR_CHOICES,
        default="fail",
        help="fail: write nothing if any text yields no tokens (default); skip: leave those "
        "cuts out. Either way they are reported.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output.")
    return parser


@exit_on_error(system_exit=True)
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_parser().parse_args(argv)
    from zipvoice.dataset.tokens import prepare_tokens  # here: --help stays light

    prepare_tokens(
        input_file=args.input_file,
        output_file=args.output_file,
        tokenizer=args.tokenizer,
        lang=args.lang,
        token_file=args.token_file,
        num_jobs=args.num_jobs,
        on_error=args.on_error,
        overwrite=args.overwrite,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
