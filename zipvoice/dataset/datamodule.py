"""Data loaders for ZipVoice training: manifests, duration filtering, bucketing, resumable sampling.

Flags follow upstream ZipVoice (`--manifest-dir --max-duration --bucketing-sampler ...`), with
the dataset selection (`--dataset --train-manifest --dev-manifest --min-len --max-len`) here
rather than in the training script, so every entry point that trains shares one definition.

The training sampler's position lives in `train_dl.sampler.state_dict()`; with workers the
sampler runs ahead of training (prefetch), so a checkpoint saves it as of the last consumed batch
(`zipvoice.dataset.sampler_position.SamplerPosition`) and passes it back as
`train_dataloaders(cuts, sampler_state_dict=...)` to resume mid-epoch. Call
`train_dl.sampler.set_epoch(epoch)` at the start of each epoch so the shuffle differs per epoch
but is reproducible.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from lhotse import CutSet, load_manifest_lazy
from lhotse.dataset import DynamicBucketingSampler, SimpleCutSampler
from lhotse.dataset.sampling.base import CutSampler
from lhotse.utils import fix_random_seed
from torch.utils.data import DataLoader

from zipvoice.dataset.config import add_data_arguments
from zipvoice.dataset.dataset import (
    CutDataError,
    SpeechSynthesisDataset,
    cut_tokens,
    missing_feature_files,
    on_the_fly_features,
)
from zipvoice.utils.resources import choose_num_workers

DEV_NUM_WORKERS = 2
DEV_NUM_BUCKETS = 10
MIN_BATCHES_PER_BUCKET = 4
MIN_CUTS_PER_BUCKET = 10  # lhotse cannot estimate bucket bins from a handful of cuts


class _SeedWorkers:
    """Gives each data loader worker its own reproducible random state, and leaves Ctrl-C and
    SIGTERM to the training process.

    A terminal's Ctrl-C (or a batch system's SIGTERM) reaches the whole process group; a
    worker that died of it would make the training process fail instead of finishing its step
    and saving (zipvoice.training.interrupt). Nothing in SpeechSynthesisDataset draws random
    numbers, so batches do not depend on which worker (or how many) made them; a random
    transform added there must draw from a generator seeded by the batch, not from these
    per-worker states.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, worker_id: int) -> None:
        import signal

        # A worker ends when the loader shuts it down or its parent is gone (torch's watchdog).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        fix_random_seed(self.seed + worker_id)


def _num_cuts(cuts: CutSet) -> int | None:
    """Length of an eager CutSet; None for a lazy one (counting would read the whole file)."""
    try:
        return len(cuts)
    except TypeError:
        return None


class TtsDataModule:
    """Builds the train and dev DataLoaders from lhotse cut manifests.

    Args:
      args: the flags of `add_arguments`: parsed arguments, or any object with those
        attributes (`zipvoice.training.config.DataConfig`).
      tokenizer: used only for cuts whose supervisions carry no stored tokens.
      seed: of the samplers' shuffles and the workers; default `args.seed`, else 42.
      processes: training processes on this machine (DDP ranks), for the automatic worker
        count.
    """

    def __init__(
        self, args: Any, tokenizer=None, seed: int | None = None, processes: int = 1
    ) -> None:
        self.args = args
        # --num-workers -1 (auto) shares the cores among this many training processes.
        self.num_workers = choose_num_workers(int(args.num_workers), processes)
        self.tokenizer = tokenizer
        self.seed = int(seed if seed is not None else getattr(args, "seed", 42))
        self.train_manifest: str | None = None
        self.dev_manifest: str | None = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The data flags (upstream's name for it); see zipvoice.dataset.config."""
        add_data_arguments(parser)

    # ------------------------------------------------------------------ manifests

    def _resolve(self, manifest: str | None, flag: str) -> Path:
        if manifest is None:
            raise ValueError(f"--dataset custom needs {flag}")
        path = Path(manifest)
        if not path.is_file() and not path.is_absolute():
            in_dir = Path(self.args.manifest_dir) / path
            if in_dir.is_file():
                return in_dir
        if not path.is_file():
            raise FileNotFoundError(f"{flag} {manifest}: manifest not found")
        return path

    @staticmethod
    def _require(path: Path, dataset: str) -> Path:
        if not path.is_file():
            raise FileNotFoundError(
                f"--dataset {dataset} expects {path}; prepare it, or point --manifest-dir at "
                "the folder that holds it"
            )
        return path

    def check_first_cut(self, cuts: CutSet, manifest: str) -> None:
        """Fail at start-up, not at the first batch, when a whole manifest is unusable."""
        first = next(iter(cuts), None)
        if first is None:
            raise ValueError(f"manifest {manifest} holds no cuts")
        if not self.args.on_the_fly_feats:
            # An eager (in-memory) set is checked whole: one cut without features would
            # otherwise stop training hours later with an error from inside lhotse.
            eager = _num_cuts(cuts) is not None
            lacking = [c.id for c in (cuts if eager else [first]) if not c.has_features]
            if lacking:
                more = f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
                raise CutDataError(
                    f"{len(lacking)} cut(s) in {manifest} have no precomputed features "
                    f"(cut {', '.join(lacking[:5])}{more}): run zipvoice.bin.compute_fbank on "
                    "it, or pass --on-the-fly-feats true"
                )
            missing = missing_feature_files(cuts if eager else [first])
            if missing:
                cut_id, path = missing[0]
                more = f" (and {len(missing) - 1} more file(s))" if len(missing) > 1 else ""
                raise CutDataError(
                    f"cut {cut_id} in {manifest}: its feature file {path} does not exist{more}; "
                    "rerun zipvoice.bin.compute_fbank, or restore the file"
                )
        if first.supervisions and cut_tokens(first) is None and self.tokenizer is None:
            raise CutDataError(
                f"cuts in {manifest} have no tokens (cut {first.id}): run "
                "zipvoice.bin.prepare_tokens on it first"
            )

    def filter_by_duration(self, cuts: CutSet, manifest: str) -> CutSet:
        """Keep cuts with min_len <= duration <= max_len; eager sets get a logged count."""
        min_len, max_len = self.args.min_len, self.args.max_len
        if min_len > max_len:
            raise ValueError(f"--min-len {min_len} is larger than --max-len {max_len}")

        def keep(cut) -> bool:
            return min_len <= cut.duration <= max_len

        total = _num_cuts(cuts)
        if total is None:
            logging.info("Keeping cuts of %s between %.2f and %.2f s", manifest, min_len, max_len)
            return cuts.filter(keep)
        too_short = sum(1 for c in cuts if c.duration < min_len)
        too_long = sum(1 for c in cuts if c.duration > max_len)
        kept = cuts.filter(keep).to_eager()
        removed = too_short + too_long
        logging.info(
            "%s: removed %d of %d cuts outside [%.2f, %.2f] s (%d too short, %d too long)",
            manifest,
            removed,
            total,
            min_len,
            max_len,
            too_short,
            too_long,
        )
        if not len(kept):
            raise ValueError(
                f"all {total} cuts of {manifest} are outside [{min_len}, {max_len}] s; "
                "adjust --min-len / --max-len"
            )
        return kept

    def train_cuts(self) -> CutSet:
        args = self.args
        if args.dataset == "custom":
            path = self._resolve(args.train_manifest, "--train-manifest")
            self.train_manifest = str(path)
            logging.info("Loading custom training cuts from %s", path)
            # Eager: fine-tuning corpora are small, and it allows an exact filter count.
            cuts = CutSet.from_file(path)
        elif args.dataset == "emilia":
            en = self._require(Path(args.manifest_dir) / "emilia_cuts_EN.jsonl.gz", "emilia")
            zh = self._require(Path(args.manifest_dir) / "emilia_cuts_ZH.jsonl.gz", "emilia")
            self.train_manifest = f"{en} + {zh}"
            cuts = CutSet.mux(load_manifest_lazy(en), load_manifest_lazy(zh), seed=self.seed)
        else:
            path = self._require(
                Path(args.manifest_dir) / "libritts_cuts_train-all-shuf.jsonl.gz", "libritts"
            )
            self.train_manifest = str(path)
            cuts = load_manifest_lazy(path)
        self.check_first_cut(cuts, self.train_manifest)
        kept = self.filter_by_duration(cuts, self.train_manifest)
        self.check_max_duration(kept, self.train_manifest)
        return kept

    def check_max_duration(self, cuts: CutSet, manifest: str) -> None:
        """Refuse a --max-duration below every cut of an eager set: each batch would then be
        one over-long cut (lhotse only warns), or nothing with bucketing, so the run would
        train nothing useful. Lazy sets are not read through for this."""
        if _num_cuts(cuts) is None or not len(cuts):
            return
        shortest = min(cuts, key=lambda c: c.duration)
        max_duration = self.args.max_duration
        if max_duration < shortest.duration:
            longest = max(cuts, key=lambda c: c.duration)
            raise ValueError(
                f"--max-duration {max_duration:g} s is below every cut of {manifest}: the "
                f"shortest, {shortest.id}, lasts {shortest.duration:.2f} s and the longest, "
                f"{longest.id}, {longest.duration:.2f} s; a batch holds at most --max-duration "
                f"seconds of audio, so pass at least {longest.duration:.2f}"
            )

    def train_custom_cuts(self, manifest_file: str) -> CutSet:
        """Upstream's name: the training cuts of `manifest_file` (checked, length-filtered)."""
        cuts = CutSet.from_file(self._resolve(manifest_file, "--train-manifest"))
        self.check_first_cut(cuts, str(manifest_file))
        kept = self.filter_by_duration(cuts, str(manifest_file))
        self.check_max_duration(kept, str(manifest_file))
        return kept

    def dev_custom_cuts(self, manifest_file: str) -> CutSet:
        """Upstream's name: the validation cuts of `manifest_file`."""
        cuts = CutSet.from_file(self._resolve(manifest_file, "--dev-manifest"))
        self.check_first_cut(cuts, str(manifest_file))
        return cuts

    def dev_cuts(self) -> CutSet:
        args = self.args
        if args.dataset == "custom":
            path = self._resolve(args.dev_manifest, "--dev-manifest")
            self.dev_manifest = str(path)
            cuts = CutSet.from_file(path)
        elif args.dataset == "emilia":
            en = self._require(Path(args.manifest_dir) / "emilia_cuts_EN-dev.jsonl.gz", "emilia")
            zh = self._require(Path(args.manifest_dir) / "emilia_cuts_ZH-dev.jsonl.gz", "emilia")
            self.dev_manifest = f"{en} + {zh}"
            cuts = CutSet.from_file(en) + CutSet.from_file(zh)
        else:
            path = self._require(
                Path(args.manifest_dir) / "libritts_cuts_dev-clean.jsonl.gz", "libritts"
            )
            self.dev_manifest = str(path)
            cuts = CutSet.from_file(path)
        self.check_first_cut(cuts, self.dev_manifest)
        return cuts

    # ------------------------------------------------------------------ loaders

    def _dataset(self, manifest: str | None) -> SpeechSynthesisDataset:
        return SpeechSynthesisDataset(
            feature_input_strategy=on_the_fly_features() if self.args.on_the_fly_feats else None,
            return_cuts=self.args.return_cuts,
            tokenizer=self.tokenizer,
            manifest=manifest,
        )

    def _loader(self, dataset, sampler: CutSampler, num_workers: int, seed: int) -> DataLoader:
        return DataLoader(
            dataset,
            sampler=sampler,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=2 if num_workers > 0 else None,
            worker_init_fn=_SeedWorkers(seed),
            # Starting an iterator draws the workers' base seed; from its own generator, not
            # the global RNG, so loaders never shift the random numbers training draws.
            generator=torch.Generator().manual_seed(seed),
        )

    def _sampler_plan(
        self, cuts: CutSet, num_buckets: int, drop_last: bool, max_duration: float | None = None
    ) -> tuple[int, bool]:
        """(buckets, drop_last) that still yield batches on a small eager CutSet.

        Each bucket drops its own incomplete last batch, so upstream's defaults (30 buckets,
        200 s, drop_last) give *no batch at all* for a 100-utterance corpus. Buckets are cut
        until each holds about MIN_BATCHES_PER_BUCKET full batches and MIN_CUTS_PER_BUCKET
        cuts (1 bucket = no bucketing), and drop_last is turned off when the whole set is less
        than one batch.
        """
        if _num_cuts(cuts) is None:
            return num_buckets, drop_last
        total = sum(c.duration for c in cuts)
        max_duration = self.args.max_duration if max_duration is None else max_duration
        fitting = (
            int(total // (max_duration * MIN_BATCHES_PER_BUCKET)) if drop_last else num_buckets
        )
        by_count = len(cuts) // MIN_CUTS_PER_BUCKET
        buckets = max(1, min(num_buckets, fitting, by_count))
        if drop_last and buckets < min(num_buckets, by_count):
            logging.warning(
                "%.1f s of audio in %d cuts: using %d bucket(s) instead of %d so that batches "
                "of up to %.1f s are not all dropped as incomplete",
                total,
                len(cuts),
                buckets,
                num_buckets,
                max_duration,
            )
        if drop_last and total < max_duration:
            logging.warning(
                "all %d cuts (%.1f s) fit in one batch of --max-duration %.1f s; not dropping "
                "that incomplete batch (set a smaller --max-duration for several batches)",
                len(cuts),
                total,
                max_duration,
            )
            drop_last = False
        return buckets, drop_last

    def _sampler(
        self,
        cuts: CutSet,
        shuffle: bool,
        drop_last: bool,
        buckets: int,
        seed: int,
        max_duration: float | None = None,
        buffer_size: int | None = None,
    ):
        max_duration = self.args.max_duration if max_duration is None else max_duration
        if buckets >= 2:
            with warnings.catch_warnings():
                # Eager sets are the norm for fine-tuning corpora; lhotse's advice is moot.
                warnings.filterwarnings("ignore", message=".*eagerly read CutSet.*")
                return DynamicBucketingSampler(
                    cuts,
                    max_duration=max_duration,
                    shuffle=shuffle,
                    num_buckets=buckets,
                    # upstream's buffer + shuffle buffer (lhotse has merged the two)
                    buffer_size=buffer_size or buckets * 7000,
                    drop_last=drop_last,
                    seed=seed,
                )
        return SimpleCutSampler(
            cuts, max_duration=max_duration, shuffle=shuffle, drop_last=drop_last, seed=seed
        )

    def train_dataloaders(
        self,
        cuts_train: CutSet,
        sampler_state_dict: dict[str, Any] | None = None,
        replay_cuts: CutSet | None = None,
    ) -> DataLoader:
        """Shuffled, duration-bucketed batches of at most --max-duration seconds of audio;
        with `replay_cuts` (zipvoice.dataset.replay) --replay-ratio of each batch's duration
        is replay."""
        args = self.args
        seed = self.seed
        wanted = args.num_buckets if args.bucketing_sampler else 1
        max_duration = args.max_duration
        if replay_cuts is not None:
            from zipvoice.dataset.replay import batch_caps, replay_sampler

            max_duration, replay_share = batch_caps(args, cuts_train, replay_cuts)
        buckets, drop_last = self._sampler_plan(cuts_train, wanted, args.drop_last, max_duration)
        sampler = self._sampler(cuts_train, args.shuffle, drop_last, buckets, seed, max_duration)
        if replay_cuts is not None:
            sampler = replay_sampler(self, sampler, replay_cuts, wanted, replay_share)
        if sampler_state_dict is not None:
            logging.info("Restoring the training sampler's state")
            sampler.load_state_dict(sampler_state_dict)
        return self._loader(self._dataset(self.train_manifest), sampler, self.num_workers, seed)

    def dev_dataloaders(self, cuts_valid: CutSet) -> DataLoader:
        """Unshuffled batches; every cut is used (no drop_last)."""
        seed = self.seed
        buckets, _ = self._sampler_plan(cuts_valid, DEV_NUM_BUCKETS, drop_last=False)
        sampler = self._sampler(cuts_valid, False, False, buckets, seed)
        workers = min(DEV_NUM_WORKERS, self.num_workers)
        return self._loader(self._dataset(self.dev_manifest), sampler, workers, seed)
