"""The map-style dataset that turns a sampler's CutSet into a ZipVoice training batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from lhotse import CutSet
from lhotse.cut import Cut
from lhotse.dataset.collation import collate_audio
from lhotse.dataset.input_strategies import BatchIO, OnTheFlyFeatures, PrecomputedFeatures

from zipvoice.utils.feature import N_MELS, SAMPLING_RATE, VocosFbank


class CutDataError(ValueError):
    """A cut cannot be used for training; the message names the cut and its manifest."""


def cut_tokens(cut: Cut) -> list[str] | None:
    """Tokens stored by prepare_tokens (`supervision.custom["tokens"]`), or None."""
    custom = cut.supervisions[0].custom or {}
    tokens = custom.get("tokens")
    return None if tokens is None else list(tokens)


REPLAY_KEY = "zipvoice_replay"


def is_replay_cut(cut: Cut) -> bool:
    """Marked by zipvoice.dataset.replay when it loads --replay-manifest."""
    return bool((cut.custom or {}).get(REPLAY_KEY))


class SpeechSynthesisDataset(torch.utils.data.Dataset):
    """Collates cuts into {"features" (B, T, 100), "features_lens" (B,), "tokens", "text",
    "cut_ids", "replay" (B,) bool}, plus "cut" / "audio", "audio_lens" on request.

    Args:
      feature_input_strategy: `PrecomputedFeatures()` (default) reads compute_fbank's output;
        `OnTheFlyFeatures(VocosFbank())` computes features from audio, resampling to 24 kHz.
      tokenizer: tokenises the text of cuts that carry no stored tokens; without one such a
        cut is an error (run prepare_tokens).
      manifest: where the cuts came from, for error messages only.
    """

    def __init__(
        self,
        feature_input_strategy: BatchIO | None = None,
        return_cuts: bool = False,
        return_audio: bool = False,
        tokenizer=None,
        manifest: str | None = None,
        cut_transforms: Sequence[Callable[[CutSet], CutSet]] = (),
        feature_transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (),
    ) -> None:
        super().__init__()
        self.feature_input_strategy = (
            PrecomputedFeatures() if feature_input_strategy is None else feature_input_strategy
        )
        self.on_the_fly = isinstance(self.feature_input_strategy, OnTheFlyFeatures)
        self.return_cuts = return_cuts
        self.return_audio = return_audio
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.cut_transforms = list(cut_transforms)
        self.feature_transforms = list(feature_transforms)

    def _where(self, cut: Cut) -> str:
        return f"cut {cut.id}" + (f" (manifest {self.manifest})" if self.manifest else "")

    def _check_cut(self, cut: Cut) -> None:
        if len(cut.supervisions) != 1:
            raise CutDataError(
                f"{self._where(cut)} has {len(cut.supervisions)} supervisions; ZipVoice trains "
                "on cuts with exactly one (prepare_dataset makes one per tsv row)"
            )
        if self.on_the_fly:
            if not cut.has_recording:
                raise CutDataError(f"{self._where(cut)} has no audio to compute features from")
            return
        if not cut.has_features:
            raise CutDataError(
                f"{self._where(cut)} has no precomputed features: run "
                "zipvoice.bin.compute_fbank on the manifest, or use on-the-fly features "
                "(--on-the-fly-feats true)"
            )
        feats = cut.features
        if feats.num_features != N_MELS or feats.sampling_rate != SAMPLING_RATE:
            raise CutDataError(
                f"{self._where(cut)} has {feats.type} features with {feats.num_features} dims "
                f"at {feats.sampling_rate} Hz; ZipVoice needs VocosFbank features "
                f"({N_MELS} dims at {SAMPLING_RATE} Hz): recompute them with "
                "zipvoice.bin.compute_fbank"
            )

    def _tokens(self, cuts: list[Cut]) -> list[list[str]]:
        tokens = [cut_tokens(cut) for cut in cuts]
        missing = [i for i, t in enumerate(tokens) if t is None]
        if missing:
            if self.tokenizer is None:
                raise CutDataError(
                    f"{self._where(cuts[missing[0]])} has no tokens: run "
                    "zipvoice.bin.prepare_tokens on the manifest first"
                )
            texts = [cuts[i].supervisions[0].text or "" for i in missing]
            for i, toks in zip(missing, self.tokenizer.texts_to_tokens(texts), strict=True):
                tokens[i] = list(toks)
        return tokens

    def __getitem__(self, cuts: CutSet) -> dict[str, object]:
        for cut in cuts:
            self._check_cut(cut)
        for transform in self.cut_transforms:
            cuts = transform(cuts)
        if self.on_the_fly:
            cuts = CutSet.from_cuts(
                c.resample(SAMPLING_RATE) if c.sampling_rate != SAMPLING_RATE else c for c in cuts
            )
        cut_list = list(cuts)

        features, features_lens = self.feature_input_strategy(cuts)
        for transform in self.feature_transforms:
            features = transform(features)
        batch: dict[str, object] = {
            "features": features.float(),
            "features_lens": features_lens.long(),
            "tokens": self._tokens(cut_list),
            "text": [cut.supervisions[0].text for cut in cut_list],
            "cut_ids": [cut.id for cut in cut_list],
            # Which cuts are replay of the pretraining domain (zipvoice.dataset.replay).
            "replay": torch.tensor([is_replay_cut(cut) for cut in cut_list], dtype=torch.bool),
        }
        if self.return_audio:
            audio, audio_lens = collate_audio(cuts)
            batch["audio"] = audio
            batch["audio_lens"] = audio_lens
        if self.return_cuts:
            batch["cut"] = cut_list
        return batch


def on_the_fly_features() -> OnTheFlyFeatures:
    """The input strategy that computes VocosFbank features from audio in the data loader."""
    return OnTheFlyFeatures(VocosFbank())
