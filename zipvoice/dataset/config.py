"""The data settings of a training run: `DataConfig` and the flags that fill it.

Light on purpose (no lhotse, no torch): entry points build their `--help` from it. The flags
follow upstream ZipVoice (`--manifest-dir --max-duration --bucketing-sampler ...`), with the
dataset selection (`--dataset --train-manifest --dev-manifest --min-len --max-len`) here too,
so every entry point that trains shares one definition, with the defaults of `DataConfig`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from zipvoice.utils.cli import str2bool

DATASETS = ("emilia", "libritts", "custom")


@dataclass(frozen=True)
class DataConfig:
    """Manifests and batching: the fields TtsDataModule reads (named like the flags)."""

    manifest_dir: Path = Path("data/fbank")
    max_duration: float = 200.0
    bucketing_sampler: bool = True
    num_buckets: int = 30
    on_the_fly_feats: bool = False
    shuffle: bool = True
    drop_last: bool = True
    return_cuts: bool = False
    num_workers: int = 8
    dataset: str = "emilia"
    train_manifest: str | None = None
    dev_manifest: str | None = None
    min_len: float = 1.0
    max_len: float = 30.0
    forgetting_manifest: str | None = None


DEFAULTS = DataConfig()


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the data flags as one argument group."""
    group = parser.add_argument_group(
        title="TTS data related options",
        description="Manifests, batch sizes, sampling and feature extraction.",
    )
    group.add_argument(
        "--manifest-dir",
        type=Path,
        default=DEFAULTS.manifest_dir,
        help="Directory with the train/dev cut manifests (relative --train-manifest and "
        "--dev-manifest paths are also looked up here).",
    )
    group.add_argument(
        "--max-duration",
        type=float,
        default=DEFAULTS.max_duration,
        help="Maximum total audio duration (seconds) in one batch; lower it on OOM.",
    )
    group.add_argument(
        "--bucketing-sampler",
        type=str2bool,
        default=DEFAULTS.bucketing_sampler,
        help="Batch utterances of similar duration together (less padding).",
    )
    group.add_argument(
        "--num-buckets",
        type=int,
        default=DEFAULTS.num_buckets,
        help="Buckets of the DynamicBucketingSampler (capped at the number of cuts).",
    )
    group.add_argument(
        "--on-the-fly-feats",
        type=str2bool,
        default=DEFAULTS.on_the_fly_feats,
        help="Compute features from audio while loading instead of reading compute_fbank's.",
    )
    group.add_argument(
        "--shuffle",
        type=str2bool,
        default=DEFAULTS.shuffle,
        help="Shuffle the training cuts each epoch.",
    )
    group.add_argument(
        "--drop-last",
        type=str2bool,
        default=DEFAULTS.drop_last,
        help="Drop the last incomplete batch.",
    )
    group.add_argument(
        "--return-cuts",
        type=str2bool,
        default=DEFAULTS.return_cuts,
        help="Put the cuts of each batch in batch['cut'].",
    )
    group.add_argument(
        "--num-workers",
        type=int,
        default=DEFAULTS.num_workers,
        help="Training data loader worker processes.",
    )
    group.add_argument(
        "--dataset",
        type=str,
        default=DEFAULTS.dataset,
        choices=DATASETS,
        help="Which manifests to train on; 'custom' uses --train-manifest/--dev-manifest.",
    )
    group.add_argument(
        "--train-manifest",
        type=str,
        default=DEFAULTS.train_manifest,
        help="Training cuts (for --dataset custom).",
    )
    group.add_argument(
        "--dev-manifest",
        type=str,
        default=DEFAULTS.dev_manifest,
        help="Validation cuts (for --dataset custom).",
    )
    group.add_argument(
        "--min-len",
        type=float,
        default=DEFAULTS.min_len,
        help="Drop training cuts shorter than this (s).",
    )
    group.add_argument(
        "--max-len",
        type=float,
        default=DEFAULTS.max_len,
        help="Drop training cuts longer than this (s).",
    )
    group.add_argument(
        "--forgetting-manifest",
        type=str,
        default=DEFAULTS.forgetting_manifest,
        help="Cuts of the pretraining domain: training logs a second dev loss on them, to "
        "watch forgetting.",
    )
