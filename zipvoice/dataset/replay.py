"""Replay of the pretraining domain: `--replay-manifest` cuts in every training batch.

Fine-tuning on Japanese alone moves the model away from what made it a zero-shot English and
Chinese speaker; a small share of the original data in every batch holds it there (in
icefall's Zipformer fine-tuning, 5 % original data kept LibriSpeech WER at 2.13/4.72 against
3.61/7.83 without).

Mixing is lhotse's own `ZipSampler`: one sampler over the fine-tuning cuts with about
`(1 - r) * max_duration` seconds per batch and one over the replay cuts with about
`r * max_duration` (`batch_caps`), their batches merged. So every batch holds about
`--replay-ratio` of its duration as replay (not only on average over an epoch, as with
`CutSet.mux`, whose weights count cuts, not seconds, and which would replay the same first
cuts of a large manifest every epoch); an epoch is one pass over the fine-tuning cuts; the
replay cuts repeat endlessly, reshuffled each epoch by the sampler's seed + epoch (the whole
replay set sits in the sampler's buffer). Replay cuts longer than their share of a
batch cannot fit one and are left out (logged).

Tokens: the replay text is English/Chinese, so the run's tokenizer (often Japanese) must not
read it. Cuts that already carry `supervision.custom["tokens"]` (upstream's fbank manifests
after prepare_tokens) keep them; the others are tokenised here with `--replay-tokenizer` (the
base model's, `emilia` by default), as prepare_tokens would store them. Token strings reach ids
through the run's `--token-file`, which keeps the base vocabulary's ids (an extended token
file), so replay tokens get the base model's ids. A replay token the file lacks is dropped in
training, as upstream does; a replay set that the file does not cover at all is refused.

Each replay cut is marked (`cut.custom["zipvoice_replay"]`), so batches carry a per-cut
`batch["replay"]` flag: the trainer logs the replay loss and distils on those cuts.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

from lhotse import CutSet
from lhotse.cut import Cut
from lhotse.dataset import ZipSampler
from lhotse.utils import fastcopy

from zipvoice.dataset.dataset import REPLAY_KEY, CutDataError, cut_tokens

logger = logging.getLogger(__name__)


def _with_tokens(cuts: list[Cut], tokenizer_name: str, lang: str) -> list[Cut]:
    """Cuts whose supervisions lack tokens get them from the replay tokenizer."""
    from zipvoice.tokenizer.tokenizer import get_tokenizer

    missing = [i for i, cut in enumerate(cuts) if cut.supervisions and cut_tokens(cut) is None]
    if not missing:
        return cuts
    logger.info("tokenising %d replay cuts with the %s tokenizer", len(missing), tokenizer_name)
    tokenizer = get_tokenizer(tokenizer_name, lang=lang)
    texts = [cuts[i].supervisions[0].text or "" for i in missing]
    out = list(cuts)
    for i, tokens in zip(missing, tokenizer.texts_to_tokens(texts), strict=True):
        sup = cuts[i].supervisions[0]
        custom = {**(sup.custom or {}), "tokens": list(tokens)}
        out[i] = fastcopy(cuts[i], supervisions=[fastcopy(sup, custom=custom)])
    return out


def _check_coverage(cuts: list[Cut], token2id: Mapping[str, int], manifest: str) -> None:
    """Refuse a replay set whose tokens the run's token file does not know."""
    counts: Counter = Counter()
    unknown: Counter = Counter()
    for cut in cuts:
        for token in cut_tokens(cut) or []:
            counts[token] += 1
            if token not in token2id:
                unknown[token] += 1
    total, missing = sum(counts.values()), sum(unknown.values())
    if total == 0:
        raise CutDataError(f"--replay-manifest {manifest}: its cuts yield no tokens")
    if missing == total:
        raise CutDataError(
            f"--replay-manifest {manifest}: none of its tokens are in the token file; use a "
            "token file that extends the base model's (prepare_token_file --base-token-file), "
            "and --replay-tokenizer of the base model"
        )
    if missing:
        shown = ", ".join(f"{t!r} x{n}" for t, n in unknown.most_common(10))
        logger.warning(
            "%d of %d replay tokens are not in the token file and are dropped: %s",
            missing, total, shown,
        )  # fmt: skip


def load_replay_cuts(args: Any, token2id: Mapping[str, int], check_first_cut) -> CutSet:
    """The replay cuts of `args` (a DataConfig): with tokens, marked, and short enough to
    fit their share of a batch. `check_first_cut` is the data module's manifest check."""
    manifest = str(args.replay_manifest)
    cuts = CutSet.from_file(manifest).to_eager()
    if not len(cuts):
        raise CutDataError(f"--replay-manifest {manifest} holds no cuts")
    longest = min(args.max_len, args.max_duration * args.replay_ratio)
    kept = [cut for cut in cuts if args.min_len <= cut.duration <= longest]
    if len(kept) < len(cuts):
        logger.warning(
            "%s: %d of %d replay cuts are outside [%.2f, %.2f] s (the longest that fits "
            "--replay-ratio x --max-duration) and are left out",
            manifest, len(cuts) - len(kept), len(cuts), args.min_len, longest,
        )  # fmt: skip
    if not kept:
        raise CutDataError(
            f"--replay-manifest {manifest}: no cut is between {args.min_len} and {longest:.2f} s; "
            "raise --replay-ratio or --max-duration"
        )
    kept = _with_tokens(kept, args.replay_tokenizer, args.replay_lang)
    check_first_cut(CutSet.from_cuts(kept), manifest)  # features, and cuts without text
    _check_coverage(kept, token2id, manifest)
    marked = [fastcopy(cut, custom={**(cut.custom or {}), REPLAY_KEY: True}) for cut in kept]
    total = sum(cut.duration for cut in marked)
    logger.info(
        "replay: %d cuts (%.2f h) from %s, %.0f %% of each batch's duration",
        len(marked), total / 3600, manifest, 100 * args.replay_ratio,
    )  # fmt: skip
    return CutSet.from_cuts(marked)


def _mean_duration(cuts: CutSet) -> float | None:
    try:
        count = len(cuts)
    except TypeError:
        return None  # lazy: counting would read the whole manifest
    return sum(cut.duration for cut in cuts) / count if count else None


def batch_caps(args: Any, train_cuts: CutSet, replay_cuts: CutSet) -> tuple[float, float]:
    """(fine-tuning, replay) seconds per batch, summing to --max-duration.

    A sampler fills a batch up to its cap less about half a cut on average (the next cut did
    not fit), which shrinks the smaller (replay) share the most: with 0.5-2.5 s cuts, 20 s
    batches and caps of 16 + 4 s, replay filled 17 % of the frames. The caps are set so that
    the expected fills stand at --replay-ratio (plain r * max_duration for a lazy training
    manifest, whose mean duration is unknown).
    """
    total, ratio = args.max_duration, args.replay_ratio
    mean_train, mean_replay = _mean_duration(train_cuts), _mean_duration(replay_cuts)
    if mean_train is None or mean_replay is None:
        replay_cap = ratio * total
    else:
        filled = total - (mean_train + mean_replay) / 2
        replay_cap = ratio * filled + mean_replay / 2
    replay_cap = min(max(replay_cap, 0.0), total)
    return total - replay_cap, replay_cap


def replay_sampler(
    datamodule: Any, train_sampler: Any, replay_cuts: CutSet, buckets: int, share: float
):
    """ZipSampler(fine-tuning batches, replay batches of `share` seconds) (module docstring)."""
    replay_buckets, _ = datamodule._sampler_plan(replay_cuts, buckets, False, share)
    # The whole replay set sits in the sampler's buffer, so each epoch draws from all of it.
    buffer_size = max(replay_buckets * 7000, 2 * len(replay_cuts))
    sampler = datamodule._sampler(
        replay_cuts.repeat(),
        True,
        False,
        max(replay_buckets, 2),
        datamodule.seed + 1,
        share,
        buffer_size,
    )
    return ZipSampler(train_sampler, sampler)
