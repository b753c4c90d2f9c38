#!/usr/bin/env python3
"""Turn a tsv corpus description into lhotse manifests, checking every row.

Each line of the tsv is one utterance, in one of two forms:

    {uniq_id}\\t{text}\\t{wav_path}                       the text covers the whole file
    {uniq_id}\\t{text}\\t{wav_path}\\t{start}\\t{end}       the text covers [start, end) seconds

Ids must be unique; the part of an id before its first "_" is taken as the speaker
(`spk3_0012` -> `spk3`). Relative wav paths are resolved against the current directory, or
failing that against the tsv's own directory. Multi-channel files use their first channel.

Usage:

python3 -m zipvoice.bin.prepare_dataset \\
    --tsv-path data/raw/custom_train.tsv \\
    --prefix custom \\
    --subset raw_train \\
    --num-jobs 8 \\
    --output-dir data/manifests

Writes data/manifests/custom_{recordings,supervisions,cuts}_raw_train.jsonl.gz. Cut ids are the
tsv ids; cuts are resampled to --sampling-rate (24 kHz for ZipVoice) lazily, at load time.

Bad rows (wrong column count, empty id or text, duplicate id, missing or unreadable audio,
bad start/end) are all reported with their line number. With `--on-error fail` (the default:
a corpus should not quietly lose utterances) nothing is written but the report
`{prefix}_{subset}_rejected.tsv`; with `--on-error skip` the good rows are written, every
skipped row is logged, and the report lists them.
"""

from __future__ import annotations

import argparse
import os
import sys

from zipvoice.dataset.config import ON_ERROR_CHOICES
from zipvoice.utils.cli import exit_on_error, setup_logging


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tsv-path", type=str, required=True, help="The tsv file to read.")
    parser.add_argument("--prefix", type=str, default="custom", help="Manifest name prefix.")
    parser.add_argument(
        "--subset", type=str, default="train", help="Subset name, typically train or dev."
    )
    parser.add_argument(
        "--num-jobs", type=int, default=min(8, os.cpu_count() or 1), help="Audio-reading threads."
    )
    parser.add_argument(
        "--output-dir", type=str, default="data/manifests", help="Where manifests are written."
    )
    parser.add_argument(
        "--sampling-rate", type=int, default=24000, help="Cuts are resampled to this rate."
    )
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR_CHOICES,
        default="fail",
        help="fail: write nothing if any row is bad (default); skip: leave bad rows out. "
        "Either way every bad row is reported with its line number.",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace manifests that already exist."
    )
    return parser


@exit_on_error(system_exit=True)
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_parser().parse_args(argv)
    from zipvoice.dataset.manifests import prepare_dataset  # here: --help stays light

    prepare_dataset(
        tsv_path=args.tsv_path,
        prefix=args.prefix,
        subset=args.subset,
        output_dir=args.output_dir,
        num_jobs=args.num_jobs,
        sampling_rate=args.sampling_rate,
        on_error=args.on_error,
        overwrite=args.overwrite,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
