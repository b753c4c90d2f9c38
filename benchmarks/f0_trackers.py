"""F0 trackers compared on speech with a known pitch relation and on pure tones.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/f0_trackers.py [--shifts -7 -4 3]

OpenJTalk renders each sentence at `half_tone` 0 and at each shift; HTS adds the shift to log-F0
without changing durations, so frame for frame the true F0 ratio is exactly 2**(shift/12).
A tracker is scored on frames voiced in both renderings: median |error| in cents, gross errors
(> 50 cents: octave jumps, wrong harmonic), and whether the voiced/unvoiced decision is stable
under the shift. Pure tones give absolute accuracy. Speed is seconds of CPU per second of audio,
all trackers measured side by side in this run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from zipvoice.eval.accent.f0 import SAMPLE_RATE, F0Config, extract_f0, hz_to_cents
from zipvoice.utils.audio import resample

SENTENCES = [
    "これは箸です。",
    "明日は雨が降るそうですが、傘を持っていきますか？",
    "東京の友達が新しいコンピューターを買いました。",
    "子供たちは公園で遅くまで遊んでいた。",
]
METHODS = ["harvest", "dio", "praat"]


def render(text: str, half_tone: float) -> np.ndarray:
    import pyopenjtalk

    wave, sr = pyopenjtalk.tts(text, half_tone=half_tone)
    return resample((wave / 32768.0).astype(np.float32), sr, SAMPLE_RATE)


def shift_errors(method: str, shifts: list[float]) -> tuple[np.ndarray, float, float]:
    """(all cent errors, V/UV disagreement share, seconds per audio second)."""
    config = F0Config(method=method)
    errors, disagree, total, seconds, audio = [], 0, 0, 0.0, 0.0
    for text in SENTENCES:
        waves = {s: render(text, s) for s in [0.0, *shifts]}
        start = time.process_time()
        tracks = {s: extract_f0(w, SAMPLE_RATE, config) for s, w in waves.items()}
        seconds += time.process_time() - start
        audio += sum(len(w) for w in waves.values()) / SAMPLE_RATE
        base = tracks[0.0]
        for shift in shifts:
            other = tracks[shift]
            n = min(len(base), len(other))
            both = (base[:n] > 0) & (other[:n] > 0)
            disagree += int(np.sum((base[:n] > 0) != (other[:n] > 0)))
            total += n
            diff = hz_to_cents(other[:n][both]) - hz_to_cents(base[:n][both])
            errors.append(diff - 100.0 * shift)
    return np.concatenate(errors), disagree / total, seconds / audio


def tone_error(method: str, freqs: tuple[float, ...] = (90.0, 150.0, 240.0, 400.0)) -> float:
    """Worst median |cents| error over pure tones at known frequencies."""
    worst = 0.0
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    for freq in freqs:
        tone = 0.5 * np.sin(2 * np.pi * freq * t)
        f0 = extract_f0(tone, SAMPLE_RATE, F0Config(method=method))[20:-20]
        voiced = f0[f0 > 0]
        if voiced.size == 0:
            return float("nan")  # the tracker called the tone unvoiced
        err = np.median(np.abs(hz_to_cents(voiced) - hz_to_cents(np.array([freq]))))
        worst = max(worst, float(err))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shifts", type=float, nargs="+", default=[-7.0, -4.0, 3.0])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    args = parser.parse_args()
    print(f"{len(SENTENCES)} sentences x shifts {args.shifts} (OpenJTalk mei, {SAMPLE_RATE} Hz)")
    header = "method   | median |err| c | gross >50c | V/UV flips | tone err c | s per audio s"
    print(header)
    print("-" * len(header))
    for method in args.methods:
        errors, flips, rtf = shift_errors(method, args.shifts)
        median = float(np.median(np.abs(errors)))
        tone_cents = tone_error(method)
        tone = "unvoiced" if np.isnan(tone_cents) else f"{tone_cents:.2f}"
        gross = float(np.mean(np.abs(errors) > 50.0))
        print(
            f"{method:8s} | {median:14.2f} | {100 * gross:9.2f}% | {100 * flips:9.2f}% "
            f"| {tone:>10s} | {rtf:.4f}"
        )


if __name__ == "__main__":
    main()
