"""Accent minimal-pair probe: does the F0 at a word move the way its OpenJTalk accent says?

    python -m zipvoice.eval.accent.probe_list --output probes.tsv --prompt-wav P.wav \\
        --prompt-text "..."          # the probe sentences, as an inference test list
    (generate them with the model)
    python -m zipvoice.eval.accent.probe --wav-path GEN_DIR --test-list probes.tsv

Each probe sentence is 「これは＿です。」 around one member of a group of words that read the same
and differ only in accent (箸/橋/端 hashi, 雨/飴 ame, ...). For a generated utterance:
1. Every member of the word's group is put in the same carrier and rendered by pyopenjtalk
   (mei voice); OpenJTalk's analysis must give the members the same morae and different
   accents (checked). The HTS voice's duration model (`hts_duration`) says where the word's
   accent phrase (word + です) lies in each rendering.
2. The generated audio is DTW-aligned to each rendering on mel-cepstra of the whole sentence
   (pitch-free features; the carrier anchors the path), and its log-F0 over the phrase is
   correlated with the rendering's.
3. The probe passes (1.0) when the word's own member correlates best, else 0.0 (also when the
   phrase is too unvoiced to measure). The mean is the share of words whose pitch movement
   carries the intended accent; guessing scores about 0.47 on this set (2- and 3-way groups).

Why renderings and not textbook high/low templates: real and HTS speech both put the F0 peak
late (for 箸 HL the peak sits at the start of し and the fall runs through し/で), so a 0/1
per-mora template classified only 7-11 of pyopenjtalk's 15 own renderings; the renderings carry
that timing, and classify 58 of 60 pitch/speed-varied renderings (docs/evaluation-accent.md).
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zipvoice.eval.accent.align import align, mel_cepstrum
from zipvoice.eval.accent.f0 import FRAME_PERIOD_MS, SAMPLE_RATE, F0Config, extract_f0, hz_to_cents
from zipvoice.eval.accent.hts_duration import load_duration_model, phoneme_frames
from zipvoice.eval.accent.moras import Mora, accent_phrase, label_moras, pitch_pattern
from zipvoice.eval.utils import EvalError, TestItem, generated_wav, load_wav, run_metric_cli
from zipvoice.utils.audio import resample

logger = logging.getLogger(__name__)

CARRIER = "これは{}です。"


@dataclass(frozen=True)
class ProbeWord:
    """One member of a minimal-pair group (`name` is its test-list name)."""

    name: str
    word: str
    group: str


PROBE_WORDS: tuple[ProbeWord, ...] = (
    ProbeWord("hashi_chopsticks", "箸", "hashi"),
    ProbeWord("hashi_bridge", "橋", "hashi"),
    ProbeWord("hashi_edge", "端", "hashi"),
    ProbeWord("ame_rain", "雨", "ame"),
    ProbeWord("ame_candy", "飴", "ame"),
    ProbeWord("kaki_persimmon", "柿", "kaki"),
    ProbeWord("kaki_oyster", "牡蠣", "kaki"),
    ProbeWord("hana_flower", "花", "hana"),
    ProbeWord("hana_nose", "鼻", "hana"),
    ProbeWord("sake_alcohol", "酒", "sake"),
    ProbeWord("sake_salmon", "鮭", "sake"),
    ProbeWord("kami_god", "神", "kami"),
    ProbeWord("kami_paper", "紙", "kami"),
    ProbeWord("ima_now", "今", "ima"),
    ProbeWord("ima_living_room", "居間", "ima"),
)


def probe_sentence(probe: ProbeWord) -> str:
    return CARRIER.format(probe.word)


def find_probe(text: str) -> ProbeWord:
    """The probe word a sentence tests: a word of OpenJTalk's analysis that is in the table
    (so 今 is not found inside 今日); exactly one must be present."""
    import pyopenjtalk

    by_word = {p.word: p for p in PROBE_WORDS}
    found = [by_word[f["string"]] for f in pyopenjtalk.run_frontend(text) if f["string"] in by_word]
    if len(found) != 1:
        what = "none of the probe words" if not found else f"{len(found)} probe words"
        raise EvalError(
            f"text {text!r} holds {what} (make the list with "
            "python -m zipvoice.eval.accent.probe_list)"
        )
    return found[0]


@dataclass(frozen=True)
class Rendering:
    """pyopenjtalk's rendering of one member's sentence, and where its accent phrase is."""

    pattern: tuple[int, ...]  # Tokyo high/low of the phrase's morae (1 = high)
    span: tuple[int, int]  # the word's accent phrase, 10 ms frames
    cepstra: np.ndarray
    f0: np.ndarray


@dataclass(frozen=True)
class ProbeSpec:
    """What scoring one probe sentence needs, computed once per text."""

    probe: ProbeWord
    renderings: dict[str, Rendering]  # member name -> its rendering


def _phrase_of_word(text: str, word: str) -> tuple[list[str], list[Mora]]:
    """(labels, the morae of the accent phrase holding `word`) of `text`."""
    import pyopenjtalk

    features = pyopenjtalk.run_frontend(text)
    labels = pyopenjtalk.make_label(features)
    moras = label_moras(labels)
    if sum(int(f["mora_size"]) for f in features) != len(moras):
        raise EvalError(f"OpenJTalk's words and labels disagree on the morae of {text!r}")
    offset = 0
    for feature in features:
        if feature["string"] == word:
            return labels, accent_phrase(moras, offset)
        offset += int(feature["mora_size"])
    raise EvalError(f"OpenJTalk does not read {word!r} as one word in {text!r}")


def render_member(text: str, word: str, config: F0Config) -> Rendering:
    """Render `text` with pyopenjtalk and locate `word`'s accent phrase in it."""
    import pyopenjtalk

    labels, phrase = _phrase_of_word(text, word)
    wave, sr = pyopenjtalk.synthesize(labels)
    frames = phoneme_frames(labels, num_samples=len(wave))
    starts = np.concatenate([[0], np.cumsum(frames)])
    model = load_duration_model()
    to_grid = model.frame_period / model.sample_rate / (FRAME_PERIOD_MS / 1000.0)
    span = (
        int(round(starts[phrase[0].first] * to_grid)),
        int(round(starts[phrase[-1].last + 1] * to_grid)),
    )
    audio = resample((wave / 32768.0).astype(np.float32), sr, SAMPLE_RATE)
    return Rendering(
        pitch_pattern(phrase), span, mel_cepstrum(audio), extract_f0(audio, SAMPLE_RATE, config)
    )


@functools.lru_cache(maxsize=64)
def prepare_probe(text: str, config: F0Config | None = None) -> ProbeSpec:
    """Render every member of the text's group in the text's carrier (same reading, so the
    renderings differ only in accent) and check OpenJTalk gives each a different accent."""
    config = config or F0Config()
    probe = find_probe(text)
    members = [p for p in PROBE_WORDS if p.group == probe.group]
    renderings = {
        m.name: render_member(text.replace(probe.word, m.word), m.word, config) for m in members
    }
    patterns = [r.pattern for r in renderings.values()]
    if len(set(patterns)) != len(patterns) or len({len(p) for p in patterns}) != 1:
        raise EvalError(f"the members of {probe.group!r} do not differ only in accent in {text!r}")
    return ProbeSpec(probe, renderings)


@dataclass(frozen=True)
class ProbeResult:
    """Which member's rendering the generated pitch matched best (None: not measurable)."""

    expected: str
    predicted: str | None
    correlations: dict[str, float]

    @property
    def correct(self) -> bool:
        return self.predicted == self.expected


def phrase_correlation(
    cepstra: np.ndarray, f0: np.ndarray, rendering: Rendering, min_frames: int = 5
) -> float:
    """Log-F0 correlation with `rendering` over its accent phrase, after DTW on mel-cepstra of
    the whole utterances (the carrier anchors the alignment); NaN if too little is voiced."""
    path_gen, path_ref = align(cepstra, rendering.cepstra)
    start, end = rendering.span
    inside = (path_ref >= start) & (path_ref < end) & (path_gen < len(f0))
    inside &= path_ref < len(rendering.f0)
    gen, ref = f0[path_gen[inside]], rendering.f0[path_ref[inside]]
    both = (gen > 0) & (ref > 0)
    if int(both.sum()) < min_frames:
        return math.nan
    return _pearson(hz_to_cents(gen[both]), hz_to_cents(ref[both]))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(np.sum(a * a)) * float(np.sum(b * b)))
    return float(np.sum(a * b)) / denom if denom > 0 else math.nan


def classify(wave: np.ndarray, spec: ProbeSpec, config: F0Config | None = None) -> ProbeResult:
    """The member whose rendering's F0 over the word's phrase correlates best (ties lose)."""
    cepstra, f0 = mel_cepstrum(wave), extract_f0(wave, SAMPLE_RATE, config)
    correlations = {
        name: phrase_correlation(cepstra, f0, rendering)
        for name, rendering in spec.renderings.items()
    }
    valid = {k: v for k, v in correlations.items() if math.isfinite(v)}
    predicted = None
    if len(valid) == len(correlations):
        best = max(valid.values())
        winners = [k for k, v in valid.items() if v == best]
        predicted = winners[0] if len(winners) == 1 else None
    return ProbeResult(spec.probe.name, predicted, correlations)


class AccentProbeScorer:
    """`score(item, wav_dir)`: 1.0 when the generated word's pitch matches its own accent
    better than its minimal-pair partners', else 0.0 (the mean is the probe accuracy)."""

    def __init__(self, f0_config: F0Config | None = None) -> None:
        self.f0_config = f0_config or F0Config()

    def result(self, item: TestItem, wav_dir: str | Path) -> ProbeResult:
        spec = prepare_probe(item.text, self.f0_config)
        wave = load_wav(generated_wav(wav_dir, item), SAMPLE_RATE)
        result = classify(wave, spec, self.f0_config)
        logger.debug("%s: %s", item.name, result)
        return result

    def score(self, item: TestItem, wav_dir: str | Path) -> float:
        return float(self.result(item, wav_dir).correct)


def main(argv: Sequence[str] | None = None) -> int:
    return run_metric_cli(
        argv, "accent_probe", lambda args: AccentProbeScorer(), __doc__.split("\n")[0]
    )


if __name__ == "__main__":
    sys.exit(main())
