"""DNSMOS (Microsoft's non-intrusive speech-quality predictor, P.835 SIG/BAK/OVRL and P.808):
a MOS-like 1-5 score from the audio alone, no reference needed. Offline: the ONNX models ship
in the `speechmos` wheel and run with onnxruntime. The default score is OVRL (overall quality).

    python -m zipvoice.eval.mos.dnsmos --wav-path DIR --test-list TSV [--field ovrl|sig|bak|p808]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from zipvoice.eval.utils import EvalError, TestItem, generated_wav, load_wav, run_metric_cli

SAMPLE_RATE = 16000
FIELDS = {"ovrl": "ovrl_mos", "sig": "sig_mos", "bak": "bak_mos", "p808": "p808_mos"}


def _make_dnsmos(threads: int):
    """speechmos' DNSMOS with its two ONNX sessions limited to `threads` threads (it would
    otherwise take every core, which starves a shared machine for no gain on one clip)."""
    try:
        import onnxruntime as ort
        from speechmos import dnsmos as sm
    except ImportError as err:
        raise ImportError(
            f"DNSMOS needs speechmos ({err}); install the eval extra: pip install -e '.[eval]'"
        ) from None
    models = Path(sm.__file__).parent
    primary = models / "dnsmos_models" / "sig_bak_ovr.onnx"
    p808 = models / "dnsmos_models" / "model_v8.onnx"
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    model = sm.DNSMOS.__new__(sm.DNSMOS)
    model.primary_model_path = str(primary)
    providers = ["CPUExecutionProvider"]
    model.onnx_sess = ort.InferenceSession(str(primary), options, providers=providers)
    model.p808_onnx_sess = ort.InferenceSession(str(p808), options, providers=providers)
    return model


class DNSMOS:
    """Scorer: DNSMOS `field` (ovrl, sig, bak or p808) of each generated utterance."""

    def __init__(
        self,
        model_dir: str | None = None,
        device: str = "cpu",
        field: str = "ovrl",
        threads: int = 1,
    ):
        if field not in FIELDS:
            raise EvalError(f"unknown DNSMOS field {field!r}; choose from {sorted(FIELDS)}")
        if model_dir is not None:
            raise EvalError("DNSMOS uses the models inside the speechmos wheel; drop --model-dir")
        self.field = field
        self.metric = "dnsmos" if field == "ovrl" else f"dnsmos_{field}"
        self._model = _make_dnsmos(threads)

    def scores(self, wav: np.ndarray) -> dict[str, float]:
        """All four DNSMOS numbers for a 16 kHz clip (clips under 9 s are looped, as the
        reference implementation does)."""
        if wav.size == 0:
            raise EvalError("DNSMOS: empty clip")
        result = self._model(np.clip(wav, -1.0, 1.0), SAMPLE_RATE, False)
        return {name: float(result[key]) for name, key in FIELDS.items()}

    def score_wav(self, wav: np.ndarray) -> float:
        return self.scores(wav)[self.field]

    def score(self, item: TestItem, wav_dir: Path) -> float:
        return self.score_wav(load_wav(generated_wav(wav_dir, item), SAMPLE_RATE))


def main(argv: Sequence[str] | None = None) -> int:
    def add_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--field", default="ovrl", choices=sorted(FIELDS))

    def make(args: argparse.Namespace) -> DNSMOS:
        return DNSMOS(model_dir=args.model_dir, device=args.device, field=args.field)

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--field", default="ovrl")
    field = pre.parse_known_args(argv)[0].field
    name = "dnsmos" if field == "ovrl" else f"dnsmos_{field}"
    return run_metric_cli(argv, name, make, __doc__.split("\n\n")[0], add_args)


if __name__ == "__main__":
    raise SystemExit(main())
