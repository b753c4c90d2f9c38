"""UTMOS (UTokyo-SaruLab MOS predictor, UTMOS22 "strong" learner): a 1-5 naturalness score
from the audio alone, the quality number upstream ZipVoice reports.

UTMOS has no embedded default: its weights must be given with `--model-dir DIR`, either
- upstream's checkpoint `DIR/mos/utmos22_strong_step7459_v1.pt` (k2-fsa/TTS_eval_models), run
  by the model definition in `zipvoice.eval.models.utmos` and loaded as weights only; or
- an ONNX export `DIR/mos/utmos22_strong.onnx` (input: float32 (1, samples) at 16 kHz, with an
  optional second int64 sample-rate input; output: the score), run with onnxruntime.

    python -m zipvoice.eval.mos.utmos --wav-path DIR --test-list TSV --model-dir DIR
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from zipvoice.eval.utils import (
    EvalError,
    TestItem,
    generated_wav,
    load_wav,
    load_weights,
    run_metric_cli,
)

SAMPLE_RATE = 16000
ONNX_MODEL = "mos/utmos22_strong.onnx"
UPSTREAM_CHECKPOINT = "mos/utmos22_strong_step7459_v1.pt"
MODELS_URL = "https://huggingface.co/k2-fsa/TTS_eval_models"


def find_utmos_model(model_dir: str | None) -> Path:
    """Upstream's checkpoint in `model_dir`, else the ONNX export, else an EvalError."""
    if model_dir is None:
        raise EvalError(
            f"UTMOS needs its weights: pass --model-dir holding {UPSTREAM_CHECKPOINT} "
            f"({MODELS_URL}); there is no embedded default (dnsmos is the offline quality score)"
        )
    root = Path(model_dir)
    for rel in (UPSTREAM_CHECKPOINT, ONNX_MODEL):
        if (root / rel).is_file():
            return root / rel
    raise EvalError(f"{root / UPSTREAM_CHECKPOINT} not found (UTMOS models: {MODELS_URL}, mos/)")


def _torch_predictor(path: Path, device: str) -> Callable[[np.ndarray], float]:
    import torch

    from zipvoice.eval.models.utmos import build_utmos_from_state

    try:
        model = build_utmos_from_state(load_weights(path)).to(device)
    except ValueError as err:
        raise EvalError(f"{path}: {err}") from None

    @torch.no_grad()
    def predict(wav: np.ndarray) -> float:
        return float(model(torch.from_numpy(wav).to(device)[None])[0])

    return predict


def _onnx_predictor(path: Path, threads: int) -> Callable[[np.ndarray], float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's own exception types
        raise EvalError(f"cannot load UTMOS model {path}: {err}") from None
    inputs = [i.name for i in session.get_inputs()]
    if len(inputs) not in (1, 2):
        raise EvalError(f"{path}: expected 1 or 2 inputs (wave[, sr]), got {inputs}")

    def predict(wav: np.ndarray) -> float:
        feeds = {inputs[0]: wav.astype(np.float32)[None, :]}
        if len(inputs) == 2:
            feeds[inputs[1]] = np.array(SAMPLE_RATE, dtype=np.int64)
        out = np.asarray(session.run(None, feeds)[0], dtype=np.float64)
        if out.size != 1:
            raise EvalError(f"{path}: expected one score, got shape {out.shape}")
        return float(out.reshape(()))

    return predict


class UTMOS:
    """Scorer: UTMOS of each generated utterance (weights from --model-dir)."""

    metric = "utmos"

    def __init__(self, model_dir: str | None = None, device: str = "cpu", threads: int = 1):
        self.path = find_utmos_model(model_dir)
        if self.path.suffix == ".onnx":
            self._predict = _onnx_predictor(self.path, threads)
        else:
            self._predict = _torch_predictor(self.path, device)

    def score_wav(self, wav: np.ndarray) -> float:
        score = self._predict(wav)
        if not np.isfinite(score):
            raise EvalError(f"{self.path}: non-finite score")
        return score

    def score(self, item: TestItem, wav_dir: Path) -> float:
        return self.score_wav(load_wav(generated_wav(wav_dir, item), SAMPLE_RATE))


def main(argv: Sequence[str] | None = None) -> int:
    def make(args: argparse.Namespace) -> UTMOS:
        return UTMOS(model_dir=args.model_dir, device=args.device)

    return run_metric_cli(argv, "utmos", make, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
