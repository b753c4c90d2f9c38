"""UTMOS (UTokyo-SaruLab MOS predictor, UTMOS22 "strong" learner): a 1-5 naturalness score
from the audio alone, the quality number upstream ZipVoice reports.

UTMOS has no embedded default: its weights must be given with `--model-dir DIR`. This module
runs an ONNX export of the model, `DIR/mos/utmos22_strong.onnx` (input: float32 (1, samples)
waveform at 16 kHz, optionally a second int64 sample-rate input; output: the score), with
onnxruntime. Upstream's PyTorch checkpoint `DIR/mos/utmos22_strong_step7459_v1.pt` needs the
UTMOS22 model definition (wav2vec 2.0 + BLSTM + domain/judge embeddings), which this package
does not implement yet; given only that file, the command says so and stops.

    python -m zipvoice.eval.mos.utmos --wav-path DIR --test-list TSV --model-dir DIR
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from zipvoice.eval.utils import EvalError, TestItem, generated_wav, load_wav, run_metric_cli

SAMPLE_RATE = 16000
ONNX_MODEL = "mos/utmos22_strong.onnx"
UPSTREAM_CHECKPOINT = "mos/utmos22_strong_step7459_v1.pt"
MODELS_URL = "https://huggingface.co/k2-fsa/TTS_eval_models"


def find_utmos_model(model_dir: str | None) -> Path:
    """The ONNX model in `model_dir`, or an EvalError that says what is missing and why."""
    if model_dir is None:
        raise EvalError(
            f"UTMOS needs its weights: pass --model-dir with {ONNX_MODEL} "
            "(there is no embedded default; use dnsmos for an offline quality score)"
        )
    root = Path(model_dir)
    onnx_path = root / ONNX_MODEL
    if onnx_path.is_file():
        return onnx_path
    if (root / UPSTREAM_CHECKPOINT).is_file():
        raise EvalError(
            f"{root / UPSTREAM_CHECKPOINT}: running upstream's PyTorch UTMOS checkpoint needs the "
            f"UTMOS22 model definition, which zipvoice does not implement yet; put an ONNX export "
            f"of it at {onnx_path}"
        )
    raise EvalError(f"{onnx_path} not found (UTMOS models: {MODELS_URL}, folder mos/)")


class UTMOS:
    """Scorer: UTMOS of each generated utterance (ONNX model from --model-dir)."""

    metric = "utmos"

    def __init__(self, model_dir: str | None = None, device: str = "cpu", threads: int = 1):
        import onnxruntime as ort

        path = find_utmos_model(model_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime's own exception types
            raise EvalError(f"cannot load UTMOS model {path}: {err}") from None
        self._inputs = [i.name for i in self._session.get_inputs()]
        if len(self._inputs) not in (1, 2):
            raise EvalError(f"{path}: expected 1 or 2 inputs (wave[, sr]), got {self._inputs}")
        self.path = path

    def score_wav(self, wav: np.ndarray) -> float:
        feeds = {self._inputs[0]: wav.astype(np.float32)[None, :]}
        if len(self._inputs) == 2:
            feeds[self._inputs[1]] = np.array(SAMPLE_RATE, dtype=np.int64)
        out = np.asarray(self._session.run(None, feeds)[0], dtype=np.float64)
        if out.size != 1 or not np.isfinite(out).all():
            raise EvalError(f"{self.path}: expected one finite score, got shape {out.shape}")
        return float(out.reshape(()))

    def score(self, item: TestItem, wav_dir: Path) -> float:
        return self.score_wav(load_wav(generated_wav(wav_dir, item), SAMPLE_RATE))


def main(argv: Sequence[str] | None = None) -> int:
    def make(args: argparse.Namespace) -> UTMOS:
        return UTMOS(model_dir=args.model_dir, device=args.device)

    return run_metric_cli(argv, "utmos", make, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
