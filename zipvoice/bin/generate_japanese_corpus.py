#!/usr/bin/env python3
"""Generate a small real Japanese speech corpus with OpenJTalk, ready for prepare_dataset.

Usage:

python3 -m zipvoice.bin.generate_japanese_corpus \\
    --output-dir data/raw \\
    --name japanese \\
    --num-speakers 4 \\
    --num-sentences 40

Writes data/raw/wavs/spkN_XXXX.wav (24 kHz, 16-bit) and data/raw/japanese_train.tsv /
data/raw/japanese_dev.tsv with `id<TAB>text<TAB>wav_path` rows. Speakers are pitch/rate
variants of OpenJTalk's single bundled voice, so this is for smoke tests and pipeline checks,
not for training a voice anyone would want to hear.
"""

from __future__ import annotations

import argparse
import logging
import sys

from zipvoice.dataset.synthetic import (
    JAPANESE_SENTENCES,
    PSEUDO_SPEAKERS,
    load_sentences,
    make_japanese_corpus,
)
from zipvoice.utils.cli import exit_on_error, setup_logging


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output-dir", type=str, default="data/raw", help="Where the wavs and tsv files go."
    )
    parser.add_argument(
        "--name",
        type=str,
        default="japanese",
        help="Corpus name: {name}_train.tsv, {name}_dev.tsv.",
    )
    parser.add_argument(
        "--num-speakers",
        type=int,
        default=4,
        help=f"Pseudo-speakers (pitch/rate settings), 1 to {len(PSEUDO_SPEAKERS)}.",
    )
    parser.add_argument(
        "--num-sentences",
        type=int,
        default=None,
        help="Sentences per speaker (default: all of the list).",
    )
    parser.add_argument(
        "--sentences-file",
        type=str,
        default=None,
        help="A text file with one sentence a line to use instead of the "
        f"{len(JAPANESE_SENTENCES)} built-in sentences ('#' lines ignored).",
    )
    parser.add_argument(
        "--dev-fraction",
        type=float,
        default=0.1,
        help="Fraction of sentences (the last ones, for every speaker) held out for dev.",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace an existing corpus of the same name."
    )
    return parser


@exit_on_error(system_exit=True)
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_parser().parse_args(argv)
    sentences = load_sentences(args.sentences_file) if args.sentences_file else None
    pool_size = len(sentences) if sentences is not None else len(JAPANESE_SENTENCES)
    paths = make_japanese_corpus(
        args.output_dir,
        num_speakers=args.num_speakers,
        num_sentences=args.num_sentences if args.num_sentences is not None else pool_size,
        name=args.name,
        dev_fraction=args.dev_fraction,
        sentences=sentences,
        overwrite=args.overwrite,
    )
    logging.info("train: %s", paths["train_tsv"])
    logging.info("dev:   %s", paths["dev_tsv"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
