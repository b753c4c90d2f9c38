#!/usr/bin/env python3
"""Compute Vocos log-mel features for a cuts manifest and store them with lhotse.

Usage:

python3 -m zipvoice.bin.compute_fbank \\
    --source-dir data/manifests \\
    --dest-dir data/fbank \\
    --dataset custom \\
    --subset train \\
    --num-jobs 8

Reads data/manifests/custom_cuts_train.jsonl.gz (or, failing that, the recordings and
supervisions manifests of that prefix and subset) and writes data/fbank/custom_cuts_train.jsonl.gz
with features in data/fbank/custom_feats_train/ (lilcom-compressed, as upstream stores them).
Cuts that are not at 24 kHz are resampled first. Training can skip this step with
`--on-the-fly-feats true`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from zipvoice.dataset.config import FEATURE_TYPES
from zipvoice.utils.cli import exit_on_error, setup_logging, str2bool


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source-dir", type=str, default="data/manifests", help="Where the input manifests are."
    )
    parser.add_argument(
        "--dest-dir", type=str, default="data/fbank", help="Where features and cuts go."
    )
    parser.add_argument(
        "--dataset",
        "--prefix",
        dest="dataset",
        type=str,
        default="custom",
        help="Manifest prefix: reads {prefix}_cuts_{subset}.jsonl.gz.",
    )
    parser.add_argument("--subset", type=str, default="train", help="Manifest subset name.")
    parser.add_argument(
        "--num-jobs", type=int, default=min(8, os.cpu_count() or 1), help="Worker processes."
    )
    parser.add_argument(
        "--sampling-rate", type=int, default=24000, help="Audio is resampled to this rate."
    )
    parser.add_argument("--type", choices=FEATURE_TYPES, default="vocos", help="Feature type.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output.")
    parser.add_argument("--split-cuts", type=str2bool, default=False,
                        help="Process upstream's split pieces {prefix}_cuts_{subset}.{i:08d}"
                        ".jsonl.gz for i in [--split-begin, --split-end).")  # fmt: skip
    parser.add_argument("--split-begin", type=int, default=None,
                        help="First split piece (with --split-cuts 1).")  # fmt: skip
    parser.add_argument("--split-end", type=int, default=None,
                        help="One past the last split piece (with --split-cuts 1).")  # fmt: skip
    parser.add_argument("--batch-duration", type=int, default=1000,
                        help="Upstream's seconds of audio per batched GPU extraction; accepted, "
                        "without effect: features are computed cut by cut in --num-jobs "
                        "processes here.")  # fmt: skip
    return parser


@exit_on_error(system_exit=True)
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_parser().parse_args(argv)
    # Imported here: --help stays light (no lhotse).
    from zipvoice.dataset.fbank import compute_fbank, compute_fbank_split

    common = dict(num_jobs=args.num_jobs, sampling_rate=args.sampling_rate,
                  feature_type=args.type, overwrite=args.overwrite)  # fmt: skip
    if args.batch_duration != 1000:
        logging.info("--batch-duration has no effect here: features are computed per cut")
    if args.split_cuts:
        if args.split_begin is None or args.split_end is None:
            raise ValueError("--split-cuts 1 needs --split-begin and --split-end")
        compute_fbank_split(args.source_dir, args.dest_dir, args.dataset, args.subset,
                            args.split_begin, args.split_end, **common)  # fmt: skip
        return 0
    compute_fbank(args.source_dir, args.dest_dir, args.dataset, args.subset, **common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
