"""Inference pipeline shared by the PyTorch and ONNX Runtime front ends.

The reference tool does more than call ``model.sample``: it trims and normalises the prompt,
punctuates the text, splits long text at punctuation so that prompt + chunk stays under about
25 s (the lengths the model was trained on), batches the chunks, and cross-fades the pieces.
That pipeline lives here once; a backend only supplies ``sample_features`` (tokens -> mel).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zipvoice.tokenizer.tokenizer import TOKENIZER_NAMES
from zipvoice.utils.audio import (
    check_not_silent,
    load_audio,
    normalize_loudness,
    rms_normalize,
    save_wav,
    trim_silence,
)
from zipvoice.utils.cli import str2bool
from zipvoice.utils.feature import compute_vocos_mel
from zipvoice.utils.validate import (
    assert_not_input,
    check_fields_not_empty,
    check_tokens_fit_embedding,
    finite_float,
    non_negative_float,
    positive_float,
    positive_int,
    read_text_lines,
    warn_if_transcript_mismatch,
)

logger = logging.getLogger(__name__)

SAMPLING_RATE = 24000
PUNCTUATION = frozenset(";:,.!?；：，。！？、")
# Longest prompt + generated chunk, in seconds, that a chunk is sized for.
MAX_CHUNK_SECONDS = 25.0
CROSS_FADE_SECONDS = 0.1
# Silence appended to the prompt so that its last phone does not leak into the generation.
PROMPT_TRAILING_SILENCE_S = 0.2
# Prompt length limits. Upstream only warns above 20 s (kept); past 60 s a prompt leaves no room
# in the 25 s chunks (every sentence becomes its own chunk) and its features alone fill memory,
# so it is refused. Under 0.1 s there is no voice to clone.
MIN_PROMPT_SECONDS = 0.1
MAX_PROMPT_SECONDS = 60.0
MODEL_DEFAULTS: dict[str, dict[str, float | int]] = {
    "zipvoice": {"num_step": 16, "guidance_scale": 1.0},
    "zipvoice_distill": {"num_step": 8, "guidance_scale": 3.0},
}


class InferenceError(ValueError):
    """Inputs the pipeline cannot turn into speech (empty text, bad test list, ...)."""


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
) -> Prompt:
    """Load, resample, trim, RMS-normalise and featurise a prompt; tokenise its text."""
    wave = load_audio(wav_path, target_sr=sr).numpy()
    if wave.shape[-1] < MIN_PROMPT_SECONDS * sr:
        raise InferenceError(
            f"prompt {wav_path} is too short ({wave.shape[-1] / sr:.3f} s); give at least "
            f"{MIN_PROMPT_SECONDS} s of speech (1-10 s works best)"
        )
    check_not_silent(wave, wav_path)
    wave = remove_silence(wave, sr, only_edge=False, trailing_s=0.0)
    if wave.shape[-1] > MAX_PROMPT_SECONDS * sr:
        raise InferenceError(
            f"prompt {wav_path} is too long ({wave.shape[-1] / sr:.1f} s without its silences); "
            f"at most {MAX_PROMPT_SECONDS:.0f} s is accepted and 1-10 s works best: cut a "
            "shorter piece and give its transcript"
        )
    wave = np.concatenate([wave, np.zeros(int(PROMPT_TRAILING_SILENCE_S * sr), np.float32)])
    scale = 1.0
    if target_rms > 0:
        wave, scale = rms_normalize(wave, target_rms)
    duration = wave.shape[-1] / sr
    if duration > 20:
        logger.warning("prompt %s is %.1f s long; 1-10 s works best", wav_path, duration)
    features = compute_vocos_mel(torch.from_numpy(np.ascontiguousarray(wave))[None])[0].numpy()
    tokens = text_to_tokens(add_punctuation(prompt_text))
    if not tokens:
        raise InferenceError(f"prompt text {prompt_text!r} gives no tokens")
    return Prompt(features * feat_scale, tokens, duration, float(scale))


# (token ids per chunk, prompt token ids, prompt features (T, F)) -> mel (F, T_i) per chunk
SampleFn = Callable[[list[list[int]], list[int], np.ndarray], list[np.ndarray]]
VocodeFn = Callable[[np.ndarray], np.ndarray]  # mel (F, T) -> wave (samples,)


@dataclass
class GenerationStats:
    seconds_model: float = 0.0
    seconds_vocoder: float = 0.0
    seconds_audio: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rtf(self) -> float:
        total = self.seconds_model + self.seconds_vocoder
        return total / self.seconds_audio if self.seconds_audio > 0 else float("nan")

    def add(self, other: GenerationStats) -> None:
        self.seconds_model += other.seconds_model
        self.seconds_vocoder += other.seconds_vocoder
        self.seconds_audio += other.seconds_audio


def generate_wave(
    text: str,
    prompt: Prompt,
    text_to_tokens: Callable[[str], list[str]],
    tokens_to_ids: Callable[[list[list[str]]], list[list[int]]],
    sample_features: SampleFn,
    vocode: VocodeFn,
    speed: float = 1.0,
    feat_scale: float = 0.1,
    max_duration: float = 100.0,
    remove_long_sil: bool = False,
    sr: int = SAMPLING_RATE,
    target_rms: float = 0.1,
) -> tuple[np.ndarray, GenerationStats]:
    """Synthesise ``text`` in the prompt's voice: chunk, batch, sample, vocode, join.

    The result is at ``target_rms`` (at a quieter prompt's own level, as the reference tool
    returns it; 0: the model's level), peak-limited below full scale instead of clipped."""
    if speed <= 0:
        raise InferenceError(f"speed must be positive, got {speed}")
    tokens = text_to_tokens(add_punctuation(text))
    if not tokens:
        raise InferenceError(f"text {text!r} gives no tokens")
    token_duration = prompt.duration / (len(prompt.tokens) * speed)
    warn_if_transcript_mismatch(prompt.duration, len(prompt.tokens))
    max_tokens = max(1, int((MAX_CHUNK_SECONDS - prompt.duration) / token_duration))
    chunks = chunk_tokens_punctuation(tokens, max_tokens=max_tokens)
    chunk_ids = tokens_to_ids(chunks)
    prompt_ids = tokens_to_ids([prompt.tokens])[0]
    if not prompt_ids:
        raise InferenceError("no prompt token is in the token file")
    if any(not ids for ids in chunk_ids):
        raise InferenceError(f"text {text!r}: a chunk has no token in the token file")
    batches, order = batchify_tokens(chunk_ids, max_duration, prompt.duration, token_duration)

    stats = GenerationStats()
    waves_sorted: list[np.ndarray] = []
    for batch in batches:
        start = time.perf_counter()
        mels = sample_features(batch, prompt_ids, prompt.features)
        stats.seconds_model += time.perf_counter() - start
        start = time.perf_counter()
        for mel in mels:
            waves_sorted.append(vocode(mel / feat_scale))
        stats.seconds_vocoder += time.perf_counter() - start
    waves: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(waves_sorted)
    for position, original in enumerate(order):
        waves[original] = waves_sorted[position]
    wave = cross_fade_concat(waves, sr=sr)
    wave = remove_silence(wave, sr, only_edge=not remove_long_sil)
    wave = normalize_loudness(wave, target_rms / prompt.rms_scale, sr=sr)
    stats.seconds_audio = wave.shape[-1] / sr
    return wave, stats


@dataclass
class TestItem:
    name: str
    prompt_text: str
    prompt_wav: str
    text: str


def read_test_list(path: str | os.PathLike) -> list[TestItem]:
    """``name<TAB>prompt_text<TAB>prompt_wav<TAB>text`` per line; blank lines are skipped.
    A relative prompt_wav is taken relative to the list's folder."""
    path = Path(path)
    items = []
    for number, line in read_text_lines(path, what="test list"):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            raise InferenceError(
                f"{path}:{number}: expected 4 tab-separated fields "
                f"(name, prompt_text, prompt_wav, text), got {len(fields)}"
            )
        name, prompt_text, prompt_wav, text = fields
        check_fields_not_empty(
            path, number, {"prompt_text": prompt_text, "prompt_wav": prompt_wav, "text": text}
        )
        if not name or "/" in name or name in (".", ".."):
            raise InferenceError(f"{path}:{number}: bad output name {name!r}")
        wav = Path(prompt_wav)
        if not wav.is_absolute() and not wav.exists():
            wav = path.parent / wav
        items.append(TestItem(name, prompt_text, str(wav), text))
    return items


class Synthesizer:
    """Ties a backend (sample + vocode functions) to the file-level pipeline."""

    def __init__(
        self,
        text_to_tokens: Callable[[str], list[str]],
        tokens_to_ids: Callable[[list[list[str]]], list[list[int]]],
        sample_features: SampleFn,
        vocode: VocodeFn,
        feat_scale: float = 0.1,
        target_rms: float = 0.1,
        speed: float = 1.0,
        max_duration: float = 100.0,
        remove_long_sil: bool = False,
    ) -> None:
        self.text_to_tokens = text_to_tokens
        self.tokens_to_ids = tokens_to_ids
        self.sample_features = sample_features
        self.vocode = vocode
        self.feat_scale = feat_scale
        self.target_rms = target_rms
        self.speed = speed
        self.max_duration = max_duration
        self.remove_long_sil = remove_long_sil

    def synthesize(
        self, text: str, prompt_wav: str | os.PathLike, prompt_text: str
    ) -> tuple[np.ndarray, GenerationStats]:
        prompt = prepare_prompt(
            prompt_wav, prompt_text, self.text_to_tokens, self.target_rms, self.feat_scale
        )
        return generate_wave(
            text,
            prompt,
            self.text_to_tokens,
            self.tokens_to_ids,
            self.sample_features,
            self.vocode,
            speed=self.speed,
            feat_scale=self.feat_scale,
            max_duration=self.max_duration,
            remove_long_sil=self.remove_long_sil,
            target_rms=self.target_rms,
        )

    def synthesize_to_file(
        self, text: str, prompt_wav: str | os.PathLike, prompt_text: str, out_path: str | Path
    ) -> GenerationStats:
        """Generate and write a WAV atomically (the folder is created if needed)."""
        wave, stats = self.synthesize(text, prompt_wav, prompt_text)
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        save_wav(out_path, wave, sr=SAMPLING_RATE)
        return stats

    def run_test_list(self, test_list: str | os.PathLike, res_dir: str | Path) -> GenerationStats:
        """Write ``res_dir/{name}.wav`` for each line; prints each and the average RTF."""
        items = read_test_list(test_list)
        names = [item.name for item in items]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InferenceError(f"{test_list}: duplicate names {duplicates}")
        prompts = {f"prompt_wav of {item.name!r}": item.prompt_wav for item in items}
        for item in items:
            out = Path(res_dir) / f"{item.name}.wav"
            assert_not_input(out, {**prompts, "--test-list": test_list}, f"output of {item.name!r}")
        total = GenerationStats()
        for index, item in enumerate(items):
            stats = self.synthesize_to_file(
                item.text, item.prompt_wav, item.prompt_text, Path(res_dir) / f"{item.name}.wav"
            )
            print(f"[{index}] {item.name}: RTF {stats.rtf:.4f}")
            total.add(stats)
        print(f"Average RTF: {total.rtf:.4f} ({total.seconds_audio:.2f} s of audio)")
        return total


# ---------------------------------------------------------------------------------------------
# PyTorch backend
# ---------------------------------------------------------------------------------------------


def model_kind(model: nn.Module) -> str:
    from zipvoice.models.zipvoice_distill import ZipVoiceDistill

    return "zipvoice_distill" if isinstance(model, ZipVoiceDistill) else "zipvoice"


def load_model_for_inference(
    model_name: str = "zipvoice",
    model_dir: str | Path | None = None,
    checkpoint_name: str = "model.pt",
    lora_path: str | Path | None = None,
    lora_scale: float = 1.0,
    merge_lora: bool = True,
    token_file: str | Path | None = None,
) -> tuple[nn.Module, Path, dict[str, Any]]:
    """Load a released model, optionally apply an adapter folder (fingerprint-checked).

    Returns (eval-mode model, token file to use, adapter metadata or {}). With an adapter the
    adapter's own tokens.txt is used (it may extend the vocabulary), unless ``token_file`` is
    given.
    """
    from zipvoice.models.loader import load_pretrained
    from zipvoice.utils.adapter_io import (
        TOKENS_FILE,
        fingerprint_state_dict,
        load_adapter,
        read_adapter_meta,
    )
    from zipvoice.utils.checkpoint import load_checkpoint_state

    meta: dict[str, Any] = {}
    if lora_path is not None:
        meta = read_adapter_meta(lora_path)  # fail on a broken folder before the big load
        if token_file is None and (Path(lora_path) / TOKENS_FILE).is_file():
            token_file = Path(lora_path) / TOKENS_FILE
    # With an adapter the base loads with its own vocabulary; the adapter grows the embedding.
    model, _config, token_path, checkpoint_path = load_pretrained(
        model_name, model_dir, checkpoint_name, token_file=None if lora_path else token_file
    )
    if model_kind(model) != model_name:
        logger.warning(
            "--model-name is %s but %s holds a %s model; using the checkpoint's",
            model_name,
            checkpoint_path,
            model_kind(model),
        )
    if lora_path is not None:
        fingerprint = fingerprint_state_dict(load_checkpoint_state(checkpoint_path))
        model = load_adapter(
            model,
            lora_path,
            base_state_dict_fingerprint=fingerprint,
            scale=lora_scale,
            merge=merge_lora,
        )
        if token_file is not None:
            token_path = Path(token_file)
    source = lora_path if lora_path is not None else checkpoint_path
    check_tokens_fit_embedding(token_path, int(model.embed.weight.shape[0]), source)
    model.eval()
    return model, token_path, meta


def torch_sampler(
    model: nn.Module,
    num_step: int,
    guidance_scale: float,
    t_shift: float = 0.5,
    speed: float = 1.0,
    device: torch.device | str = "cpu",
) -> SampleFn:
    """A SampleFn running ``model.sample`` on one batch of chunks sharing one prompt."""

    @torch.inference_mode()
    def sample(batch: list[list[int]], prompt_ids: list[int], prompt_features: np.ndarray):
        n = len(batch)
        features = torch.from_numpy(prompt_features).to(device).unsqueeze(0).repeat(n, 1, 1)
        lens = torch.full((n,), features.size(1), dtype=torch.int64, device=device)
        pred, pred_lens, _, _ = model.sample(
            tokens=batch,
            prompt_tokens=[list(prompt_ids)] * n,
            prompt_features=features,
            prompt_features_lens=lens,
            speed=speed,
            t_shift=t_shift,
            duration="predict",
            num_step=num_step,
            guidance_scale=guidance_scale,
        )
        return [pred[i, : int(pred_lens[i])].T.float().cpu().numpy() for i in range(n)]

    return sample


def torch_vocoder(vocoder: nn.Module, device: torch.device | str = "cpu") -> VocodeFn:
    @torch.inference_mode()
    def vocode(mel: np.ndarray) -> np.ndarray:
        wave = vocoder.decode(torch.from_numpy(np.ascontiguousarray(mel)).to(device)[None])
        return wave[0].float().cpu().numpy()

    return vocode


# ---------------------------------------------------------------------------------------------
# Command-line helpers shared by infer_zipvoice and infer_zipvoice_onnx
# ---------------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser, merge_lora_help: str) -> None:
    """Which model to load and which adapter to apply, for PyTorch inference and ONNX export."""
    parser.add_argument(
        "--model-name", default="zipvoice", choices=["zipvoice", "zipvoice_distill"]
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help="Folder with the checkpoint, model.json and tokens.txt; "
        "downloaded from the hub if omitted.",
    )
    parser.add_argument("--checkpoint-name", default="model.pt")
    parser.add_argument(
        "--lora-path", default=None, help="Adapter folder written by training, to merge in."
    )
    parser.add_argument(
        "--lora-scale",
        type=finite_float,
        default=1.0,
        help="Adapter strength: 0 = base model, 1 = as trained.",
    )
    parser.add_argument("--merge-lora", type=str2bool, default=True, help=merge_lora_help)


def load_model_from_args(args: argparse.Namespace) -> tuple[nn.Module, Path, dict[str, Any]]:
    """`load_model_for_inference` with the flags of `add_model_arguments`."""
    return load_model_for_inference(
        args.model_name,
        args.model_dir,
        args.checkpoint_name,
        lora_path=args.lora_path,
        lora_scale=args.lora_scale,
        merge_lora=args.merge_lora,
    )


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Inputs, outputs and sampling flags, with upstream's names and defaults."""
    parser.add_argument(
        "--tokenizer",
        default=None,
        choices=TOKENIZER_NAMES,
        help="Text front end; default: the adapter's, else emilia.",
    )
    parser.add_argument(
        "--lang",
        default=None,
        help="espeak voice for --tokenizer espeak; default: the adapter's, else en-us.",
    )
    parser.add_argument(
        "--test-list", default=None, help="TSV lines: name<TAB>prompt_text<TAB>prompt_wav<TAB>text."
    )
    parser.add_argument("--prompt-wav", default=None, help="The prompt wav to mimic.")
    parser.add_argument("--prompt-text", default=None, help="The transcription of the prompt.")
    parser.add_argument("--text", default=None, help="The text to synthesise.")
    parser.add_argument(
        "--res-dir", default="results", help="Output folder for --test-list ({name}.wav each)."
    )
    parser.add_argument(
        "--res-wav-path",
        default="result.wav",
        help="Output wav for a single sentence (replaced atomically).",
    )
    parser.add_argument(
        "--guidance-scale",
        type=finite_float,
        default=None,
        help="Classifier-free guidance scale; default 1.0, distill 3.0.",
    )
    parser.add_argument(
        "--num-step", type=positive_int, default=None, help="Sampling steps; default 16, distill 8."
    )
    parser.add_argument(
        "--feat-scale",
        type=positive_float,
        default=0.1,
        help="Scale of the log-mel features the model sees.",
    )
    parser.add_argument(
        "--speed", type=positive_float, default=1.0, help="Speech speed; > 1 speeds up."
    )
    parser.add_argument(
        "--t-shift",
        type=positive_float,
        default=0.5,
        help="Shift the time points to smaller t if < 1.",
    )
    parser.add_argument(
        "--target-rms",
        type=non_negative_float,
        default=0.1,
        help="Raise quieter prompts to this RMS; the output comes at this RMS (a quieter "
        "prompt's own level), peak-limited, never clipped (0: no level change).",
    )
    parser.add_argument("--seed", type=int, default=666, help="Random seed.")
    parser.add_argument("--num-thread", type=positive_int, default=1, help="CPU threads.")
    parser.add_argument(
        "--max-duration",
        type=positive_float,
        default=100.0,
        help="Seconds of prompt + speech per batch of chunks.",
    )
    parser.add_argument("--remove-long-sil", type=str2bool, default=False,
                        help="Also shorten long pauses inside the generated speech.")  # fmt: skip


def check_io_arguments(args: argparse.Namespace) -> None:
    """Exactly one of --test-list or (--prompt-wav, --prompt-text, --text)."""
    single = (args.prompt_wav, args.prompt_text, args.text)
    if args.test_list is not None:
        if any(v is not None for v in single):
            raise InferenceError("give either --test-list or --prompt-wav/--prompt-text/--text")
        return
    if any(v is None for v in single):
        raise InferenceError(
            "give --prompt-wav, --prompt-text and --text (or --test-list for many sentences)"
        )
    assert_not_input(args.res_wav_path, {"--prompt-wav": args.prompt_wav}, "--res-wav-path")
    for name in ("num_step", "num_thread"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise InferenceError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def resolve_sampling_defaults(args: argparse.Namespace, kind: str) -> None:
    for key, value in MODEL_DEFAULTS[kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.num_step < 1:
        raise InferenceError(f"--num-step must be >= 1, got {args.num_step}")


def text_frontend(args: argparse.Namespace, metadata: Mapping[str, Any]) -> tuple[str, str]:
    """(tokenizer, lang): the flags if given, else what the adapter or export recorded, else
    the pretrained model's front end."""
    return (
        args.tokenizer or metadata.get("tokenizer", "emilia"),
        args.lang or metadata.get("lang", "en-us"),
    )


def make_text_functions(
    tokenizer_name: str, token_file: str | Path, lang: str
) -> tuple[Callable[[str], list[str]], Callable[[list[list[str]]], list[list[int]]]]:
    from zipvoice.tokenizer.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(tokenizer_name, token_file=token_file, lang=lang)
    return (lambda text: tokenizer.texts_to_tokens([text])[0]), tokenizer.tokens_to_token_ids


def synthesizer_from_args(
    args: argparse.Namespace,
    sample_features: SampleFn,
    vocode: VocodeFn,
    token_file: str | Path,
    metadata: Mapping[str, Any],
) -> Synthesizer:
    """A Synthesizer for a backend, configured by the flags of `add_generation_arguments`."""
    tokenizer_name, lang = text_frontend(args, metadata)
    text_to_tokens, tokens_to_ids = make_text_functions(tokenizer_name, token_file, lang)
    return Synthesizer(
        text_to_tokens,
        tokens_to_ids,
        sample_features,
        vocode,
        feat_scale=args.feat_scale,
        target_rms=args.target_rms,
        speed=args.speed,
        max_duration=args.max_duration,
        remove_long_sil=args.remove_long_sil,
    )


def run_from_args(args: argparse.Namespace, synthesizer: Synthesizer) -> GenerationStats:
    if args.test_list is not None:
        return synthesizer.run_test_list(args.test_list, args.res_dir)
    stats = synthesizer.synthesize_to_file(
        args.text, args.prompt_wav, args.prompt_text, args.res_wav_path
    )
    print(f"Saved {args.res_wav_path} ({stats.seconds_audio:.2f} s); RTF {stats.rtf:.4f}")
    return stats
