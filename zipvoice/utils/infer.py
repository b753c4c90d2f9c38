"""Upstream's `zipvoice.utils.infer` helpers, with upstream's signatures and torch tensors.

The pipeline itself uses the numpy versions in `zipvoice.inference.chunking` (and
`zipvoice.utils.audio`); these wrap them for scripts written against upstream: waves are
(channels, samples) float tensors, silences are in milliseconds, the fade in seconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "add_punctuation", "batchify_tokens", "chunk_tokens_punctuation", "cross_fade_concat",
    "load_prompt_wav", "remove_silence", "rms_norm",
]  # fmt: skip


def add_punctuation(text: str) -> str:
    from zipvoice.inference.chunking import add_punctuation as add

    return add(text)


def chunk_tokens_punctuation(tokens_list: Sequence[str], max_tokens: int = 100) -> list[list[str]]:
    from zipvoice.inference.chunking import chunk_tokens_punctuation as chunk

    return chunk(tokens_list, max_tokens)


def batchify_tokens(
    tokens_list: Sequence[Sequence[int]],
    max_duration: float,
    prompt_duration: float,
    token_duration: float,
) -> tuple[list[list[list[int]]], list[int]]:
    from zipvoice.inference.chunking import batchify_tokens as batchify

    return batchify([list(t) for t in tokens_list], max_duration, prompt_duration, token_duration)


def cross_fade_concat(
    chunks: Sequence[Tensor], fade_duration: float = 0.1, sample_rate: int = 24000
) -> Tensor:
    """Join (C, T) chunks with a linear cross-fade of `fade_duration` seconds."""
    from zipvoice.inference.chunking import cross_fade_concat as join

    if not chunks:
        return torch.tensor([])
    channels = [
        join([c[ch].detach().cpu().numpy() for c in chunks], fade_duration, sample_rate)
        for ch in range(chunks[0].shape[0])
    ]
    return torch.from_numpy(np.stack(channels))


def load_prompt_wav(prompt_wav: str, sampling_rate: int) -> Tensor:
    """The prompt as a (1, T) float tensor at `sampling_rate` (mono)."""
    from zipvoice.utils.audio import load_audio

    return load_audio(prompt_wav, target_sr=sampling_rate)[None]


def rms_norm(prompt_wav: Tensor, target_rms: float) -> tuple[Tensor, Tensor]:
    """Raise a quieter prompt to `target_rms`; returns (wave, the prompt's original RMS)."""
    prompt_rms = torch.sqrt(torch.mean(torch.square(prompt_wav)))
    if prompt_rms < target_rms:
        prompt_wav = prompt_wav * target_rms / prompt_rms
    return prompt_wav, prompt_rms


def remove_silence(
    audio: Tensor, sampling_rate: int, only_edge: bool = False, trail_sil: float = 100
) -> Tensor:
    """Drop edge silences (and, unless `only_edge`, shorten long inner ones) of a (C, T) wave,
    then append `trail_sil` milliseconds of silence."""
    from zipvoice.inference.chunking import remove_silence as trim

    waves = [
        trim(channel.detach().cpu().numpy(), sampling_rate, only_edge, trail_sil / 1000.0)
        for channel in audio
    ]
    return torch.from_numpy(np.stack(waves))
