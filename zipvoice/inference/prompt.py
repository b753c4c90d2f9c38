"""The voice prompt: loaded, trimmed, RMS-normalised, featurised and tokenised once."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from zipvoice.inference.chunking import add_punctuation, remove_silence
from zipvoice.inference.common import SAMPLING_RATE, InferenceError
from zipvoice.utils.audio import check_not_silent, load_audio, rms_normalize
from zipvoice.utils.feature import compute_vocos_mel

logger = logging.getLogger(__name__)

# Silence appended to the prompt so that its last phone does not leak into the generation.
PROMPT_TRAILING_SILENCE_S = 0.2
# Prompt length limits. Upstream only warns above 20 s (kept); past 60 s a prompt leaves no room
# in the 25 s chunks (every sentence becomes its own chunk) and its features alone fill memory,
# so it is refused. Under 0.1 s there is no voice to clone.
MIN_PROMPT_SECONDS = 0.1
MAX_PROMPT_SECONDS = 60.0


@dataclass
class Prompt:
    """A prepared voice prompt: features already scaled for the model."""

    features: np.ndarray  # (T, feat_dim), times feat_scale
    tokens: list[str]
    duration: float  # seconds, after trimming
    rms_scale: float  # generated audio is divided by this to return to the prompt's level


def prepare_prompt(
    wav_path: str | os.PathLike,
    prompt_text: str,
    text_to_tokens: Callable[[str], list[str]],
    target_rms: float = 0.1,
    feat_scale: float = 0.1,
    sr: int = SAMPLING_RATE,
    raw: bool = False,
) -> Prompt:
    """Load, resample, trim, RMS-normalise and featurise a prompt; tokenise its text. `raw`
    (upstream's --raw-evaluation) keeps the wave and text as given: no silence removal, no
    added trailing silence or punctuation, only the RMS normalisation."""
    wave = load_audio(wav_path, target_sr=sr).numpy()
    if wave.shape[-1] < MIN_PROMPT_SECONDS * sr:
        raise InferenceError(
            f"prompt {wav_path} is too short ({wave.shape[-1] / sr:.3f} s); give at least "
            f"{MIN_PROMPT_SECONDS} s of speech (1-10 s works best)"
        )
    check_not_silent(wave, wav_path)
    if not raw:
        wave = remove_silence(wave, sr, only_edge=False, trailing_s=0.0)
    if wave.shape[-1] > MAX_PROMPT_SECONDS * sr:
        raise InferenceError(
            f"prompt {wav_path} is too long ({wave.shape[-1] / sr:.1f} s without its silences); "
            f"at most {MAX_PROMPT_SECONDS:.0f} s is accepted and 1-10 s works best: cut a "
            "shorter piece and give its transcript"
        )
    if not raw:
        wave = np.concatenate([wave, np.zeros(int(PROMPT_TRAILING_SILENCE_S * sr), np.float32)])
    scale = 1.0
    if target_rms > 0:
        wave, scale = rms_normalize(wave, target_rms)
    duration = wave.shape[-1] / sr
    if duration > 20:
        logger.warning("prompt %s is %.1f s long; 1-10 s works best", wav_path, duration)
    features = compute_vocos_mel(torch.from_numpy(np.ascontiguousarray(wave))[None])[0].numpy()
    tokens = text_to_tokens(prompt_text if raw else add_punctuation(prompt_text))
    if not tokens:
        raise InferenceError(f"prompt text {prompt_text!r} gives no tokens")
    return Prompt(features * feat_scale, tokens, duration, float(scale))
