"""F0 of generated speech against a recording of the same text (the dev set's ground truth).

    python -m zipvoice.eval.accent.f0_match --wav-path GEN_DIR --test-list TSV \\
        --ref-wav-dir GT_DIR [--metric log_f0_corr|f0_rmse_cents|vuv_error]

The reference of utterance `name` is `GT_DIR/name.wav`: the same naming as the generated
folder, so a dev set's ground-truth wavs saved under their test-list names are a reference
folder as they are. Both are aligned by DTW on mel-cepstra (`align`), then along the path:
- log_f0_corr: Pearson correlation of log-F0 on frames voiced in both (1 = same melody; blind
  to a constant transposition and to the pitch range, so it reads the accent contour);
- f0_rmse_cents: RMS difference in cents on those frames (100 = one semitone; includes any
  overall pitch offset from the reference speaker);
- vuv_error: share of path frames where one is voiced and the other is not.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zipvoice.eval.accent.align import align, mel_cepstrum
from zipvoice.eval.accent.f0 import METHODS, SAMPLE_RATE, F0Config, extract_f0, hz_to_cents
from zipvoice.eval.utils import EvalError, TestItem, generated_wav, load_wav, run_metric_cli

METRICS = ("log_f0_corr", "f0_rmse_cents", "vuv_error")


@dataclass(frozen=True)
class F0Match:
    """The three numbers of one comparison (see the module docstring)."""

    log_f0_corr: float
    f0_rmse_cents: float
    vuv_error: float

    def get(self, metric: str) -> float:
        return float(getattr(self, metric))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(np.sum(a * a)) * float(np.sum(b * b)))
    return float(np.sum(a * b)) / denom if denom > 0 else 0.0  # a flat track carries no accent


def compare_tracks(
    f0_a: np.ndarray, f0_b: np.ndarray, path: tuple[np.ndarray, np.ndarray]
) -> F0Match:
    """Metrics of two F0 tracks (Hz, 0 = unvoiced) along an alignment path."""
    a, b = f0_a[path[0]], f0_b[path[1]]
    voiced_a, voiced_b = a > 0, b > 0
    both = voiced_a & voiced_b
    if int(both.sum()) < 2:
        raise ValueError("fewer than 2 aligned frames are voiced in both recordings")
    cents_a, cents_b = hz_to_cents(a[both]), hz_to_cents(b[both])
    rmse = math.sqrt(float(np.mean((cents_a - cents_b) ** 2)))
    vuv = float(np.mean(voiced_a != voiced_b))
    return F0Match(_pearson(cents_a, cents_b), rmse, vuv)


def compare_waves(
    wave: np.ndarray, ref_wave: np.ndarray, config: F0Config | None = None
) -> F0Match:
    """Align `wave` to `ref_wave` (16 kHz mono) on mel-cepstra and compare their F0."""
    path = align(mel_cepstrum(wave), mel_cepstrum(ref_wave))
    n_a, n_b = int(path[0].max()) + 1, int(path[1].max()) + 1
    f0_a = _fit(extract_f0(wave, SAMPLE_RATE, config), n_a)
    f0_b = _fit(extract_f0(ref_wave, SAMPLE_RATE, config), n_b)
    return compare_tracks(f0_a, f0_b, path)


def _fit(track: np.ndarray, frames: int) -> np.ndarray:
    """Trackers may differ from the cepstral grid by a frame at the end; pad or cut."""
    if len(track) >= frames:
        return track[:frames]
    return np.pad(track, (0, frames - len(track)))


class F0MatchScorer:
    """`score(item, wav_dir)`: one of METRICS for the generated `wav_dir/name.wav` against
    `ref_wav_dir/name.wav`; `match` gives all three at once."""

    def __init__(
        self,
        ref_wav_dir: str | Path,
        metric: str = "log_f0_corr",
        f0_config: F0Config | None = None,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown F0 metric {metric!r}; choose from {METRICS}")
        self.ref_wav_dir = Path(ref_wav_dir)
        if not self.ref_wav_dir.is_dir():
            raise EvalError(f"reference wav folder {self.ref_wav_dir} not found")
        self.metric = metric
        self.f0_config = f0_config or F0Config()

    def reference_wav(self, item: TestItem) -> Path:
        path = self.ref_wav_dir / f"{item.name}.wav"
        if not path.is_file():
            raise EvalError(f"reference wav {path} for utterance {item.name!r} not found")
        return path

    def match(self, item: TestItem, wav_dir: str | Path) -> F0Match:
        gen_path, ref_path = generated_wav(wav_dir, item), self.reference_wav(item)
        wave, ref = load_wav(gen_path, SAMPLE_RATE), load_wav(ref_path, SAMPLE_RATE)
        try:
            return compare_waves(wave, ref, self.f0_config)
        except ValueError as err:
            raise EvalError(f"{gen_path} vs {ref_path}: {err}") from None

    def score(self, item: TestItem, wav_dir: str | Path) -> float:
        return self.match(item, wav_dir).get(self.metric)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ref-wav-dir",
        required=True,
        help="Folder of ground-truth recordings of the same texts, named <name>.wav.",
    )
    parser.add_argument("--metric", default="log_f0_corr", choices=METRICS)
    parser.add_argument("--f0-method", default="praat", choices=METHODS)


def main(argv: Sequence[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--metric", default="log_f0_corr")
    metric = pre.parse_known_args(argv)[0].metric

    def make_scorer(args: argparse.Namespace) -> F0MatchScorer:
        return F0MatchScorer(args.ref_wav_dir, args.metric, F0Config(method=args.f0_method))

    return run_metric_cli(argv, metric, make_scorer, __doc__.split("\n")[0], add_args)


if __name__ == "__main__":
    sys.exit(main())
