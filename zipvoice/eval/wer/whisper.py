"""CER/WER of generated speech transcribed by Whisper (transformers), like upstream's
`zipvoice/eval/wer/` scripts.

    python -m zipvoice.eval.wer.whisper --wav-path GEN_DIR --test-list TSV \\
        --model-dir whisper-large-v3 [--lang ja|en]

`--model-dir` is a local folder saved by `save_pretrained` (config, safetensors weights,
tokenizer and preprocessor files), or a hub name such as `openai/whisper-large-v3` where the
hub can be reached. Decoding is greedy; the language is forced (`--lang ja` transcribes as
Japanese even when the audio is unclear), the task is transcription. Japanese gives CER over
katakana readings, English WER (see `normalize`). Weights load from safetensors only."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from zipvoice.eval.utils import EvalError, TestItem, generated_wav, load_wav, run_metric_cli
from zipvoice.eval.wer.normalize import LANGUAGES, error_rate

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000  # Whisper's input rate
DEFAULT_MODEL = "openai/whisper-large-v3"


class WhisperASR:
    """Greedy Whisper transcription with a forced language."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        device: str = "cpu",
        language: str = "ja",
        max_new_tokens: int = 128,
    ) -> None:
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        source = str(model_dir) if model_dir is not None else DEFAULT_MODEL
        local = Path(source).exists()
        if model_dir is not None and not local and Path(source).is_absolute():
            raise EvalError(f"Whisper model folder {source} not found")
        try:
            self.processor = WhisperProcessor.from_pretrained(source)
            self.model = WhisperForConditionalGeneration.from_pretrained(
                source, use_safetensors=True
            )
        except OSError as err:
            where = "folder" if local else "hub model"
            raise EvalError(f"cannot load Whisper {where} {source}: {err}") from None
        self.model.to(torch.device(device)).eval()
        self.device = torch.device(device)
        self.language = language
        # The decoder prompt (start, language, task, no-timestamps) shares the position budget.
        limit = int(getattr(self.model.config, "max_target_positions", 448)) - 8
        self.max_new_tokens = max(1, min(max_new_tokens, limit))
        lang_to_id = getattr(self.model.generation_config, "lang_to_id", None) or {}
        if lang_to_id and f"<|{language}|>" not in lang_to_id:
            raise EvalError(f"Whisper model {source} has no language token <|{language}|>")
        if not lang_to_id and language != "en":
            raise EvalError(f"Whisper model {source} is English-only; cannot force {language!r}")
        self._force_language = bool(lang_to_id)

    def generate_ids(self, wave: np.ndarray) -> torch.Tensor:
        """Greedy token ids (decoder prompt included) of one 16 kHz mono waveform, up to
        Whisper's 30 s window."""
        import torch

        features = self.processor(
            wave, sampling_rate=SAMPLE_RATE, return_tensors="pt"
        ).input_features.to(self.device, self.model.dtype)
        kwargs = {"language": self.language, "task": "transcribe"} if self._force_language else {}
        with torch.inference_mode():
            return self.model.generate(
                features,
                num_beams=1,
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                **kwargs,
            )

    def transcribe(self, wave: np.ndarray) -> str:
        """Text of one 16 kHz mono waveform, special tokens removed."""
        ids = self.generate_ids(wave)
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


class WhisperErrorRate:
    """`score(item, wav_dir)`: CER (ja) or WER (en) of Whisper's transcript of the generated
    `wav_dir/name.wav` against `item.text`. `last_transcripts` keeps what was heard."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        device: str = "cpu",
        language: str = "ja",
        asr: WhisperASR | None = None,
    ) -> None:
        if language not in LANGUAGES:
            raise EvalError(f"unsupported language {language!r}; choose from {LANGUAGES}")
        self.language = language
        self.asr = asr or WhisperASR(model_dir, device, language)
        self.last_transcripts: dict[str, str] = {}

    def score(self, item: TestItem, wav_dir: str | Path) -> float:
        path = generated_wav(wav_dir, item)
        hypothesis = self.asr.transcribe(load_wav(path, SAMPLE_RATE))
        self.last_transcripts[item.name] = hypothesis
        logger.debug("%s: %r -> %r", item.name, item.text, hypothesis)
        try:
            return error_rate(item.text, hypothesis, self.language)
        except ValueError as err:
            raise EvalError(f"utterance {item.name!r}: {err}") from None


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lang", default="ja", choices=LANGUAGES, help="ja: kana CER; en: WER.")


def main(argv: Sequence[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--lang", default="ja")
    metric = "cer" if pre.parse_known_args(argv)[0].lang == "ja" else "wer"

    def make_scorer(args: argparse.Namespace) -> WhisperErrorRate:
        return WhisperErrorRate(args.model_dir, args.device, args.lang)

    return run_metric_cli(argv, metric, make_scorer, __doc__.split("\n")[0], add_args)


if __name__ == "__main__":
    sys.exit(main())
