"""Vocos log-mel features for a cuts manifest, stored with lhotse (lilcom, as upstream).

Features are computed in worker processes over chunks of the cut list; each chunk writes its
own archive, so workers never share a file, and the manifest is written only once all are done.
A rerun (--overwrite) writes archives under new names beside the old ones and removes the old
ones only after the new manifest is in place: a rerun that fails leaves the previous features
and manifest whole.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from lhotse import CutSet, LilcomChunkyWriter, load_manifest
from lhotse.cut import Cut
from tqdm.auto import tqdm

from zipvoice.dataset.config import FEATURE_TYPES
from zipvoice.dataset.manifests import manifest_paths, write_manifest_atomically
from zipvoice.utils.cli import ignore_interrupts
from zipvoice.utils.feature import VocosFbank

logger = logging.getLogger(__name__)

CHUNKS_PER_JOB = 4  # more chunks than workers keeps the progress bar moving and loads balanced


class FeatureComputationError(ValueError):
    """A cut's audio could not be turned into features."""


def _audio_source(cut: Cut) -> str:
    try:
        return ", ".join(str(s.source) for s in cut.recording.sources)
    except AttributeError:
        return "<no recording>"


def _compute_chunk(cuts: list[Cut], storage_path: str, progress: bool = False) -> list[Cut]:
    """Features for `cuts` into one lilcom archive; runs in a worker process or inline."""
    torch.set_num_threads(1)
    extractor = VocosFbank()
    done = []
    with LilcomChunkyWriter(storage_path) as writer:
        for cut in tqdm(cuts, desc="Computing features", unit="cut", disable=not progress):
            try:
                done.append(cut.compute_and_store_features(extractor, writer))
            except Exception as e:
                reason = " ".join(str(e).split())[:500] or type(e).__name__
                raise FeatureComputationError(
                    f"cut {cut.id} (audio {_audio_source(cut)}): cannot compute features: {reason}"
                ) from None
    return done


def _load_cuts(source_dir: Path, prefix: str, subset: str) -> tuple[CutSet, Path]:
    """prepare_dataset's cuts, or cuts rebuilt from its recordings and supervisions."""
    paths = manifest_paths(source_dir, prefix, subset)
    if paths["cuts"].is_file():
        return CutSet.from_file(paths["cuts"]), paths["cuts"]
    recordings, supervisions = paths["recordings"], paths["supervisions"]
    if recordings.is_file() and supervisions.is_file():
        cuts = CutSet.from_manifests(
            recordings=load_manifest(recordings), supervisions=load_manifest(supervisions)
        )
        return cuts.trim_to_supervisions(keep_overlapping=False), recordings
    raise FileNotFoundError(
        f"no manifest for prefix {prefix!r}, subset {subset!r}: expected {paths['cuts']} "
        f"(or {recordings} with {supervisions})"
    )


def _pool_context() -> multiprocessing.context.BaseContext:
    # Not fork: the parent holds torch threads, and forking a threaded process can deadlock.
    if sys.platform != "win32" and "forkserver" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")


SPLIT_DIGITS = 8  # upstream's split pieces: {prefix}_cuts_{subset}.{index:08d}.jsonl.gz


def compute_fbank_split(
    source_dir: str | os.PathLike,
    dest_dir: str | os.PathLike,
    prefix: str,
    subset: str,
    split_begin: int,
    split_end: int,
    **kwargs: object,
) -> list[Path]:
    """Upstream's --split-cuts: the pieces `{prefix}_cuts_{subset}.{i:08d}.jsonl.gz` for i in
    [split_begin, split_end), each as its own subset; missing pieces are skipped with a
    warning, finished ones skipped (see zipvoice.dataset.finished)."""
    if split_end < split_begin:
        raise ValueError(f"--split-end {split_end} is before --split-begin {split_begin}")
    written = []
    for index in range(split_begin, split_end):
        piece = f"{subset}.{index:0{SPLIT_DIGITS}d}"
        if not manifest_paths(Path(source_dir), prefix, piece)["cuts"].is_file():
            logger.warning("split piece %s of %s not found in %s, skipping", piece, prefix,
                           source_dir)  # fmt: skip
            continue
        written.append(compute_fbank(source_dir, dest_dir, prefix, piece, **kwargs))  # type: ignore[arg-type]
    return written


def compute_fbank(
    source_dir: str | os.PathLike = "data/manifests",
    dest_dir: str | os.PathLike = "data/fbank",
    prefix: str = "custom",
    subset: str = "train",
    num_jobs: int = 1,
    sampling_rate: int = 24000,
    feature_type: str = "vocos",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Returns the written `{dest_dir}/{prefix}_cuts_{subset}.jsonl.gz`; an output already
    made from the same manifest and settings is kept (skipped), another one refused."""
    if feature_type not in FEATURE_TYPES:
        raise ValueError(
            f"feature type {feature_type!r} is not supported; use one of {FEATURE_TYPES}"
        )
    extractor_rate = VocosFbank().config.sampling_rate
    if sampling_rate != extractor_rate:
        raise ValueError(
            f"vocos features are defined at {extractor_rate} Hz (the vocoder's rate); "
            f"--sampling-rate {sampling_rate} cannot be used"
        )
    source_dir, dest_dir = Path(source_dir), Path(dest_dir).resolve()
    output = manifest_paths(dest_dir, prefix, subset)["cuts"]
    from zipvoice.dataset.finished import already_done, mark_done

    inputs = [p for p in manifest_paths(source_dir, prefix, subset).values() if p.is_file()]
    settings = {"step": "compute_fbank", "sampling_rate": sampling_rate, "type": feature_type}
    if output.exists() and not inputs:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it")
    if already_done(output, inputs, settings, overwrite):
        return output

    cut_set, source = _load_cuts(source_dir, prefix, subset)
    cuts = list(cut_set)
    if not cuts:
        raise ValueError(f"{source} holds no cuts")
    off_rate = Counter(c.sampling_rate for c in cuts if c.sampling_rate != sampling_rate)
    if off_rate:
        rates = ", ".join(f"{n} at {sr} Hz" for sr, n in sorted(off_rate.items()))
        logger.info("Resampling %s to %d Hz", rates, sampling_rate)
        cuts = [c.resample(sampling_rate) if c.sampling_rate != sampling_rate else c for c in cuts]

    storage_dir = dest_dir / f"{prefix}_feats_{subset}"
    storage_dir.mkdir(parents=True, exist_ok=True)
    run = f"feats-{secrets.token_hex(4)}-"  # this run's archives; older ones stay until done
    try:
        with_feats = _compute_all(cuts, storage_dir, run, num_jobs, progress, source)
        dest_dir.mkdir(parents=True, exist_ok=True)
        write_manifest_atomically(CutSet.from_cuts(with_feats), output)
        mark_done(output, inputs, settings)
    except BaseException:
        for partial in storage_dir.glob(f"{run}*"):
            partial.unlink()
        raise
    # Archives here belong to this prefix/subset only; the new manifest refers to none of these.
    for stale in storage_dir.glob("feats-*.lca"):
        if not stale.name.startswith(run):
            stale.unlink()
    logger.info("Wrote %d cuts with features to %s", len(with_feats), output)
    return output


def _compute_all(
    cuts: list[Cut], storage_dir: Path, run: str, num_jobs: int, progress: bool, source: Path
) -> list[Cut]:
    """Features for every cut, in input order, in `num_jobs` processes (at most one per cut)."""
    if num_jobs < 1:
        raise ValueError(f"--num-jobs must be >= 1, got {num_jobs}")
    num_jobs = min(num_jobs, len(cuts))  # --num-jobs as asked, even for a small set
    logger.info("Computing features for %d cuts of %s with %d job(s)", len(cuts), source, num_jobs)
    if num_jobs == 1:
        return _compute_chunk(cuts, str(storage_dir / f"{run}0000"), progress=progress)
    num_chunks = min(len(cuts), num_jobs * CHUNKS_PER_JOB)
    chunks = [cuts[i::num_chunks] for i in range(num_chunks)]
    results: dict[int, list[Cut]] = {}
    with (
        ProcessPoolExecutor(
            num_jobs, mp_context=_pool_context(), initializer=ignore_interrupts
        ) as pool,
        tqdm(total=len(cuts), desc="Computing features", unit="cut", disable=not progress) as bar,
    ):
        futures = {
            pool.submit(_compute_chunk, chunk, str(storage_dir / f"{run}{i:04d}")): i
            for i, chunk in enumerate(chunks)
        }
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(len(results[futures[future]]))
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)  # do not wait for queued chunks
            raise
    by_id = {c.id: c for chunk in results.values() for c in chunk}
    return [by_id[c.id] for c in cuts]
