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
from zipvoice.utils.validate import finite_float, positive_float

DATASETS = ("emilia", "libritts", "custom")
# Here rather than beside their code, so that the entry points' --help does not import lhotse.
FEATURE_TYPES = ("vocos",)  # zipvoice.dataset.fbank
ON_ERROR_CHOICES = ("fail", "skip")  # zipvoice.dataset.manifests


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
    num_workers: int = -1  # -1: min(2, cores - 1), see zipvoice.utils.resources
    dataset: str = "emilia"
    train_manifest: str | None = None
    dev_manifest: str | None = None
    min_len: float = 1.0
    max_len: float = 30.0
    forgetting_manifest: str | None = None
    # Replay of the pretraining domain (zipvoice.dataset.replay, docs/lora.md).
    replay_manifest: str | None = None
    replay_ratio: float = 0.1
    replay_tokenizer: str = "emilia"
    replay_lang: str = "en-us"


DEFAULTS = DataConfig()


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the data flags as one argument group, with the defaults of DataConfig."""
    group = parser.add_argument_group(
        title="TTS data related options",
        description="Manifests, batch sizes, sampling and feature extraction.",
    )
    add, d = group.add_argument, DEFAULTS
    # fmt: off
    add("--manifest-dir", type=Path, default=d.manifest_dir,
        help="Directory with the train/dev cut manifests (relative --train-manifest and "
        "--dev-manifest paths are also looked up here).")
    add("--max-duration", type=positive_float, default=d.max_duration,
        help="Maximum total audio duration (seconds) in one batch; lower it on OOM.")
    add("--bucketing-sampler", type=str2bool, default=d.bucketing_sampler,
        help="Batch utterances of similar duration together (less padding).")
    add("--num-buckets", type=int, default=d.num_buckets,
        help="Buckets of the DynamicBucketingSampler (capped at the number of cuts).")
    add("--on-the-fly-feats", type=str2bool, default=d.on_the_fly_feats,
        help="Compute features from audio while loading instead of reading compute_fbank's.")
    add("--shuffle", type=str2bool, default=d.shuffle,
        help="Shuffle the training cuts each epoch.")
    add("--drop-last", type=str2bool, default=d.drop_last, help="Drop the last incomplete batch.")
    add("--return-cuts", type=str2bool, default=d.return_cuts,
        help="Put the cuts of each batch in batch['cut'].")
    add("--num-workers", type=int, default=d.num_workers,
        help="Training data loader worker processes (-1: min(2, cores per process - 1), cores "
        "from the CPU affinity; 0: load in the training process). Results do not depend on it.")
    add("--dataset", type=str, default=d.dataset, choices=DATASETS,
        help="Which manifests to train on; 'custom' uses --train-manifest/--dev-manifest.")
    add("--train-manifest", type=str, default=d.train_manifest,
        help="Training cuts (for --dataset custom).")
    add("--dev-manifest", type=str, default=d.dev_manifest,
        help="Validation cuts (for --dataset custom).")
    add("--min-len", type=float, default=d.min_len,
        help="Drop training cuts shorter than this (s).")
    add("--max-len", type=float, default=d.max_len, help="Drop training cuts longer than this (s).")
    add("--forgetting-manifest", type=str, default=d.forgetting_manifest,
        help="Cuts of the pretraining domain: training logs a second dev loss on them, to "
        "watch forgetting.")
    add("--replay-manifest", type=str, default=d.replay_manifest,
        help="Cuts of the pretraining domain (with precomputed features) mixed into every "
        "training batch, against forgetting (docs/lora.md).")
    add("--replay-ratio", type=finite_float, default=d.replay_ratio,
        help="Share of each batch's duration taken by --replay-manifest cuts (0 < r < 1).")
    add("--replay-tokenizer", type=str, default=d.replay_tokenizer,
        help="Tokenizer of the base model, for replay cuts without stored tokens (their token "
        "strings are mapped through --token-file, which extends the base vocabulary).")
    add("--replay-lang", type=str, default=d.replay_lang,
        help="espeak language of --replay-tokenizer espeak.")
    # fmt: on
