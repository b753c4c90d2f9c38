"""The map-style dataset that turns a sampler's CutSet into a ZipVoice training batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from lhotse import CutSet
from lhotse.cut import Cut
from lhotse.dataset.collation import collate_audio
from lhotse.dataset.input_strategies import BatchIO, OnTheFlyFeatures, PrecomputedFeatures

from zipvoice.utils.feature import N_MELS, SAMPLING_RATE, VocosFbank

WORKER_TRACEBACK = "Original Traceback (most recent call last):"


class CutDataError(ValueError):
    """A cut cannot be used for training; the message names the cut and its manifest.

    Raised in a DataLoader worker, torch re-raises it in the training process as
    `CutDataError("Caught CutDataError in DataLoader worker process N.\nOriginal Traceback
    ...\n<module>.CutDataError: <message>")`; that wrapping is undone here, so the entry point
    still prints the one line that names the cut, not a worker's traceback.
    """

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and WORKER_TRACEBACK in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split("CutDataError: ", 1)[-1]
        super().__init__(message)


def feature_file(cut: Cut) -> Path:
    """The file that holds a cut's precomputed features (one archive for many cuts with
    compute_fbank's lilcom_chunky storage, one file per cut for folder-based storage)."""
    features = cut.features
    path = Path(features.storage_path)
    return path / features.storage_key if path.is_dir() else path


def missing_feature_files(cuts: Iterable[Cut]) -> list[tuple[str, Path]]:
    """(cut id, file) of the first cut per missing feature file; one stat per distinct file."""
    seen: dict[Path, bool] = {}
    missing = []
    for cut in cuts:
        if not cut.has_features:
            continue
        path = feature_file(cut)
        if path not in seen:
            seen[path] = path.is_file()
            if not seen[path]:
                missing.append((cut.id, path))
    return missing


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
    "cut_ids", and "replay" (B,) bool when the batch holds replay cuts}, plus "cut" /
    "audio", "audio_lens" on request.

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
        return_text: bool = True,
        return_tokens: bool = True,
        return_spk_ids: bool = False,
    ) -> None:
        """`return_text`, `return_tokens`, `return_spk_ids` are upstream's keywords: "text",
        "tokens" (on by default here: the trainer reads them), "speakers" in the batch."""
        super().__init__()
        self.return_text, self.return_tokens = return_text, return_tokens
        self.return_spk_ids = return_spk_ids
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

    def _features(self, cuts: CutSet) -> tuple[torch.Tensor, torch.Tensor]:
        """The input strategy's (features, lens); a file that cannot be read (deleted or
        damaged since the manifest was checked) names the cut and the file in one line."""
        try:
            return self.feature_input_strategy(cuts)
        except Exception as err:  # noqa: BLE001 - find the cut, then report it in one line
            failure = err
        for cut in cuts:
            try:
                if self.on_the_fly:
                    cut.load_audio()
                else:
                    cut.load_features()
            except Exception as err:  # noqa: BLE001 - any reader error: a bad file
                what = "audio" if self.on_the_fly else "features"
                source = self._source(cut)
                reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
                raise CutDataError(
                    f"{self._where(cut)}: its {what} in {source} cannot be read ({reason}); "
                    "recompute them (zipvoice.bin.compute_fbank --overwrite true) or restore "
                    "the file"
                ) from None
        raise failure  # no single cut fails alone: not a file problem

    def _source(self, cut: Cut) -> str:
        if not self.on_the_fly:
            return str(feature_file(cut))
        sources = [s.source for s in cut.recording.sources] if cut.has_recording else []
        return ", ".join(map(str, sources)) or "its recording"

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

        features, features_lens = self._features(cuts)
        for transform in self.feature_transforms:
            features = transform(features)
        batch: dict[str, object] = {
            "features": features.float(),
            "features_lens": features_lens.long(),
            "cut_ids": [cut.id for cut in cut_list],
        }
        replay = [is_replay_cut(cut) for cut in cut_list]
        if any(replay):  # which cuts are replay of the pretraining domain (dataset/replay.py)
            batch["replay"] = torch.tensor(replay, dtype=torch.bool)
        if self.return_tokens:
            batch["tokens"] = self._tokens(cut_list)
        if self.return_text:
            batch["text"] = [cut.supervisions[0].text for cut in cut_list]
        if self.return_spk_ids:
            batch["speakers"] = [cut.supervisions[0].speaker for cut in cut_list]
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
