"""Long text in pieces the model was trained on, and the pieces joined back.

The text is punctuated and split at punctuation so that prompt + chunk stays under about 25 s
(the lengths the model was trained on); chunks are batched by length; the generated waves are
cross-faded and their edge silences trimmed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from zipvoice.inference.common import SAMPLING_RATE, InferenceError
from zipvoice.utils.audio import trim_silence

PUNCTUATION = frozenset(";:,.!?；：，。！？、")
# Longest prompt + generated chunk, in seconds, that a chunk is sized for.
MAX_CHUNK_SECONDS = 25.0
CROSS_FADE_SECONDS = 0.1


def add_punctuation(text: str) -> str:
    """End the text with punctuation (a full stop if it has none): the model was trained on
    punctuated sentences and trails off without a final mark."""
    text = text.strip()
    if not text:
        raise InferenceError("empty text: nothing to synthesise")
    if text[-1] not in PUNCTUATION:
        text += "." if text[-1].isascii() else "。"
    return text


def chunk_tokens_punctuation(tokens: Sequence[str], max_tokens: int) -> list[list[str]]:
    """Split a token list after punctuation marks, then greedily merge the sentences into
    chunks of at most ``max_tokens`` (a single longer sentence stays whole).

    A punctuation mark or space that opens a sentence is moved to the end of the previous one.
    """
    sentences: list[list[str]] = []
    current: list[str] = []
    for token in tokens:
        if not current and sentences and (token in PUNCTUATION or token == " "):
            sentences[-1].append(token)
            continue
        current.append(token)
        if token in PUNCTUATION:
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)

    chunks: list[list[str]] = []
    chunk: list[str] = []
    for sentence in sentences:
        if chunk and len(chunk) + len(sentence) > max_tokens:
            chunks.append(chunk)
            chunk = []
        chunk = chunk + sentence
    if chunk:
        chunks.append(chunk)
    return chunks


def batchify_tokens(
    tokens_list: Sequence[Sequence[int]],
    max_duration: float,
    prompt_duration: float,
    token_duration: float,
) -> tuple[list[list[list[int]]], list[int]]:
    """Group chunks, shortest first (less padding), into batches whose prompts + predicted
    speech stay under ``max_duration`` seconds. Returns the batches and, for each position in
    the sorted order, the chunk's original index."""
    order = sorted(range(len(tokens_list)), key=lambda i: len(tokens_list[i]))
    batches: list[list[list[int]]] = []
    batch: list[list[int]] = []
    batch_tokens = 0
    for i in order:
        tokens = list(tokens_list[i])
        cost = (batch_tokens + len(tokens)) * token_duration + (len(batch) + 1) * prompt_duration
        if batch and cost > max_duration:
            batches.append(batch)
            batch, batch_tokens = [], 0
        batch.append(tokens)
        batch_tokens += len(tokens)
    if batch:
        batches.append(batch)
    return batches, order


def cross_fade_concat(
    chunks: Sequence[np.ndarray], fade_seconds: float = CROSS_FADE_SECONDS, sr: int = SAMPLING_RATE
) -> np.ndarray:
    """Join 1-D waves, overlapping consecutive ones by a linear cross-fade so that the
    seams do not click."""
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    fade = int(fade_seconds * sr)
    out = np.asarray(chunks[0], dtype=np.float32)
    for nxt in chunks[1:]:
        nxt = np.asarray(nxt, dtype=np.float32)
        k = min(fade, out.shape[-1], nxt.shape[-1])
        if k <= 0:
            out = np.concatenate([out, nxt])
            continue
        ramp = np.linspace(1.0, 0.0, k, dtype=np.float32)
        mixed = out[-k:] * ramp + nxt[:k] * (1.0 - ramp)
        out = np.concatenate([out[:-k], mixed, nxt[k:]])
    return out


def remove_silence(
    wave: np.ndarray, sr: int = SAMPLING_RATE, only_edge: bool = False, trailing_s: float = 0.0
) -> np.ndarray:
    """Trim edge silence to 0.1 s and, unless ``only_edge``, shorten pauses over 1 s; then
    append ``trailing_s`` of silence."""
    trimmed = trim_silence(
        np.asarray(wave, dtype=np.float32),
        sample_rate=sr,
        edge_keep_s=0.1,
        max_internal_silence_s=(wave.shape[-1] / sr + 1.0) if only_edge else 1.0,
    )
    if trailing_s > 0:
        trimmed = np.concatenate([trimmed, np.zeros(int(trailing_s * sr), dtype=np.float32)])
    return trimmed
