"""How well the accent metrics separate accents, on pyopenjtalk speech (no model needed).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/accent_probe.py

1. The minimal-pair probe on pyopenjtalk's own renderings of every probe sentence, each at
   several pitch/speed settings (a different pitch and tempo than the templates); and, for
   comparison, textbook 0/1 high-low templates per mora tried on the renderings themselves.
2. F0 match of 「これは箸です。」 against takes of the same text (faster, higher) and against its
   minimal-pair partners.
Seconds per utterance are CPU seconds in this run.
"""

from __future__ import annotations

import time

import numpy as np

from zipvoice.eval.accent import probe
from zipvoice.eval.accent.f0 import SAMPLE_RATE
from zipvoice.eval.accent.f0_match import compare_waves
from zipvoice.eval.accent.hts_duration import phoneme_frames
from zipvoice.eval.accent.moras import accent_phrase, label_moras
from zipvoice.utils.audio import resample

VARIANTS = [
    {},
    {"half_tone": -5.0, "speed": 0.85},
    {"half_tone": 4.0, "speed": 1.2},
    {"half_tone": -9.0},
]


def speech(text: str, **options: float) -> np.ndarray:
    import pyopenjtalk

    wave, sr = pyopenjtalk.tts(text, **options)
    return resample((wave / 32768.0).astype(np.float32), sr, SAMPLE_RATE)


def template_correct(text: str, member: probe.ProbeWord) -> bool:
    """Textbook classifier on the rendering itself: per-mora median log-F0 of the word's accent
    phrase correlated with each member's 0/1 pattern; does the word's own pattern win?"""
    import pyopenjtalk

    spec = probe.prepare_probe(text)
    labels = pyopenjtalk.extract_fullcontext(text)
    phrase = accent_phrase(label_moras(labels), 3)  # 「これは」 is morae 0-2
    starts = np.concatenate([[0], np.cumsum(phoneme_frames(labels))]) / 2  # 5 ms -> 10 ms
    f0 = spec.renderings[member.name].f0
    cents = []
    for mora in phrase:
        seg = f0[int(starts[mora.first]) : int(starts[mora.last + 1])]
        cents.append(np.median(np.log2(seg[seg > 0])) if np.sum(seg > 0) >= 2 else np.nan)
    cents = np.asarray(cents)
    ok = np.isfinite(cents)
    scores = {
        name: float(np.corrcoef(cents[ok], np.asarray(r.pattern, dtype=float)[ok])[0, 1])
        for name, r in spec.renderings.items()
    }
    return max(scores, key=scores.get) == member.name


def main() -> None:
    correct = total = 0
    seconds = 0.0
    for member in probe.PROBE_WORDS:
        text = probe.probe_sentence(member)
        spec = probe.prepare_probe(text)
        for variant in VARIANTS:
            wave = speech(text, **variant)
            start = time.process_time()
            result = probe.classify(wave, spec)
            seconds += time.process_time() - start
            total += 1
            correct += result.correct
            if not result.correct:
                print(f"  miss: {member.name} {variant} -> {result.predicted}")
    print(
        f"probe (rendering templates): {correct}/{total} correct, "
        f"{seconds / total:.3f} s per utterance"
    )
    textbook = sum(template_correct(probe.probe_sentence(m), m) for m in probe.PROBE_WORDS)
    print(f"textbook 0/1 templates on the renderings themselves: {textbook}/15 correct")
    reference = speech("これは箸です。")
    print("F0 match vs 「これは箸です。」 | log-F0 corr | RMSE cents | V/UV error")
    takes = {
        "same take": reference,
        "same text, speed 1.2": speech("これは箸です。", speed=1.2),
        "same text, +2 semitones": speech("これは箸です。", half_tone=2.0),
        "橋 (LH)": speech("これは橋です。"),
        "端 (LH0)": speech("これは端です。"),
    }
    for name, wave in takes.items():
        m = compare_waves(wave, reference)
        print(f"{name:26s} | {m.log_f0_corr:11.3f} | {m.f0_rmse_cents:10.1f} | {m.vuv_error:.3f}")


if __name__ == "__main__":
    main()
