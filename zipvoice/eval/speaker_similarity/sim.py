"""Speaker similarity (SIM-o): cosine similarity between the speaker embedding of each
generated utterance and that of its prompt, the number zero-shot TTS papers report.

Two embedding models:
- default, offline: Resemblyzer's GE2E encoder (3-layer LSTM on 40-band mels, 256-d), whose
  weights ship inside the `resemblyzer` wheel. Scores are not comparable with published SIM-o
  (a different model), but rank systems and track training the same way.
- `--model-dir DIR` holding upstream's evaluation models (k2-fsa/TTS_eval_models):
  `DIR/speaker_similarity/wavlm_large_finetune.pth`, WavLM-large + ECAPA-TDNN, which gives
  upstream-comparable SIM-o. Loaded as weights only (no pickled code is run).

    python -m zipvoice.eval.speaker_similarity.sim --wav-path DIR --test-list TSV \\
        [--model-dir DIR] [--output-file F]
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from zipvoice.eval.utils import (
    EvalError,
    TestItem,
    generated_wav,
    load_wav,
    load_weights,
    run_metric_cli,
)

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
MAX_SECONDS = 120  # upstream's cap on a clip fed to the WavLM model
SV_CHECKPOINT = "speaker_similarity/wavlm_large_finetune.pth"
SV_CHECKPOINT_SAFETENSORS = "speaker_similarity/wavlm_large_finetune.safetensors"
SSL_CHECKPOINT = "speaker_similarity/wavlm_large/wavlm_large.pt"


class ResemblyzerEncoder:
    """GE2E speaker embeddings with the weights bundled in the resemblyzer wheel."""

    name = "resemblyzer-ge2e"

    def __init__(self, device: str = "cpu"):
        try:
            from resemblyzer import VoiceEncoder, preprocess_wav
        except ImportError as err:
            raise ImportError(
                f"speaker similarity needs resemblyzer ({err}); install the eval extra: "
                "pip install -e '.[eval]' && pip install --no-deps resemblyzer==0.1.4"
            ) from None
        # torch >= 2.6 loads the bundled pretrained.pt with weights_only=True by default.
        self._encoder = VoiceEncoder(device=device, verbose=False)
        self._preprocess = preprocess_wav

    def embed(self, wav: np.ndarray) -> np.ndarray:
        """Unit-norm embedding of a 16 kHz clip. Resemblyzer trims pauses with a VAD first;
        a clip the VAD finds no speech in (a tone, noise) is embedded untrimmed."""
        if wav.size == 0 or float(np.max(np.abs(wav))) < 1e-6:
            raise EvalError("the clip is silent: no speaker to embed")
        trimmed = self._preprocess(wav, source_sr=SAMPLE_RATE)
        if trimmed.size < SAMPLE_RATE // 4:
            # resemblyzer 0.1.4's preprocess_wav always trims; do its volume step only.
            from resemblyzer.audio import normalize_volume
            from resemblyzer.hparams import audio_norm_target_dBFS

            trimmed = normalize_volume(wav, audio_norm_target_dBFS, increase_only=True)
        return self._encoder.embed_utterance(trimmed.astype(np.float32))


class WavLMEcapaEncoder:
    """Upstream's SIM-o model (WavLM-large + ECAPA-TDNN) from an evaluation-models folder."""

    name = "wavlm-large-ecapa-tdnn"

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu"):
        from zipvoice.eval.models.ecapa_tdnn_wavlm import WAVLM_PREFIX, build_from_state

        root = Path(model_dir)
        ckpt = next(
            (root / p for p in (SV_CHECKPOINT_SAFETENSORS, SV_CHECKPOINT) if (root / p).is_file()),
            None,
        )
        if ckpt is None:
            raise EvalError(
                f"{root / SV_CHECKPOINT} not found: download the evaluation models from "
                "https://huggingface.co/k2-fsa/TTS_eval_models and pass that folder as --model-dir"
            )
        state = load_weights(ckpt)
        base = root / SSL_CHECKPOINT
        if base.is_file() and not any(k.startswith(WAVLM_PREFIX) for k in state):
            # Only a head in the checkpoint: WavLM comes from the pre-trained file.
            state.update({WAVLM_PREFIX + k: t for k, t in load_weights(base).items()})
        try:
            self._model = build_from_state(state).to(device)
        except ValueError as err:
            raise EvalError(f"{ckpt}: {err}") from None
        self._device = device

    @torch.no_grad()
    def embed(self, wav: np.ndarray) -> np.ndarray:
        clip = torch.from_numpy(wav[: MAX_SECONDS * SAMPLE_RATE]).to(self._device)
        emb = self._model(clip.unsqueeze(0))[0]
        return torch.nn.functional.normalize(emb, dim=0).cpu().numpy()


class SpeakerSimilarity:
    """Scorer: cosine similarity of a generated utterance and its prompt, in [-1, 1].
    Prompt embeddings are cached, since test lists reuse a few prompts many times."""

    metric = "sim"

    def __init__(self, model_dir: str | None = None, device: str = "cpu"):
        if model_dir is None:
            self.encoder: ResemblyzerEncoder | WavLMEcapaEncoder = ResemblyzerEncoder(device)
        else:
            self.encoder = WavLMEcapaEncoder(model_dir, device)
        self._cache: dict[tuple[str, float], np.ndarray] = {}

    def embed_file(self, path: str | os.PathLike) -> np.ndarray:
        path = Path(path)
        key = (str(path.resolve()), path.stat().st_mtime if path.exists() else 0.0)
        if key not in self._cache:
            self._cache[key] = self.encoder.embed(load_wav(path, SAMPLE_RATE))
        return self._cache[key]

    def similarity(self, wav_a: str | os.PathLike, wav_b: str | os.PathLike) -> float:
        a, b = self.embed_file(wav_a), self.embed_file(wav_b)
        return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))

    def score(self, item: TestItem, wav_dir: Path) -> float:
        return self.similarity(generated_wav(wav_dir, item), item.prompt_wav)


def main(argv: Sequence[str] | None = None) -> int:
    def make(args: argparse.Namespace) -> SpeakerSimilarity:
        torch.set_num_threads(1)
        return SpeakerSimilarity(model_dir=args.model_dir, device=args.device)

    return run_metric_cli(argv, "sim", make, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
