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
import os
import sys

from zipvoice.dataset.config import FEATURE_TYPES
from zipvoice.utils.cli import exit_on_error, setup_logging


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
    return parser


@exit_on_error(system_exit=True)
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_parser().parse_args(argv)
    from zipvoice.dataset.fbank import compute_fbank  # here: --help stays light (no lhotse)

    compute_fbank(
        source_dir=args.source_dir,
        dest_dir=args.dest_dir,
        prefix=args.dataset,
        subset=args.subset,
        num_jobs=args.num_jobs,
        sampling_rate=args.sampling_rate,
        feature_type=args.type,
        overwrite=args.overwrite,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
