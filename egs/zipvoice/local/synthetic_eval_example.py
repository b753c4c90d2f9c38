"""The example table of docs/evaluation.md: the offline metrics on synthetic "systems" whose
flaws are known, so each column can be read against what was done to the audio.

    .venv/bin/python egs/zipvoice/local/synthetic_eval_example.py [--out-dir eval_example]
        [--metrics sim,dnsmos]

Every system answers the same test list: six prompts in pyopenjtalk's voice (at four
pitches), each to be "cloned" saying another sentence. The systems are
  reference   the prompt's own voice, pitch and vocal tract (a perfect clone)
  noisy       the reference with white noise at 10 dB SNR
  pitch+5     the reference five semitones higher (same vocal tract)
  formant1.2  the reference with a 1.2x shorter vocal tract (same pitch): another "speaker"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from zipvoice.eval.offline import Evaluator, format_table
from zipvoice.eval.utils import read_test_list

SENTENCES = [
    "今日は天気が良いので、公園まで散歩に行きました。",
    "駅の近くに新しいパン屋ができたそうです。",
    "明日の会議は午後三時から始まります。",
    "雨が降ってきたので、傘を持って出かけましょう。",
    "この本はとても面白かったです。",
    "来週の土曜日に友達と映画を見に行きます。",
]
SYSTEMS = {  # name -> (extra semitones, formant factor, SNR in dB or None)
    "reference": (0.0, 1.0, None),
    "noisy": (0.0, 1.0, 10.0),
    "pitch+5": (5.0, 1.0, None),
    "formant1.2": (0.0, 1.2, None),
}


def speak(text: str, half_tone: float, formant: float) -> tuple[np.ndarray, int]:
    """pyopenjtalk's voice; formant > 1 shortens the vocal tract at the same pitch."""
    import pyopenjtalk

    wave, sr = pyopenjtalk.tts(text, speed=1 / formant, half_tone=half_tone - 12 * np.log2(formant))
    wave = (wave / 32768.0).astype(np.float32)
    if formant != 1.0:
        wave = soxr.resample(wave, sr * formant, sr).astype(np.float32)
    return wave, sr


def with_noise(wave: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, np.sqrt(np.mean(wave**2) / 10 ** (snr_db / 10)), wave.shape)
    mixed = wave + noise
    return (mixed / max(1.0, np.abs(mixed).max() / 0.99)).astype(np.float32)


def build(out: Path) -> Path:
    """Prompts, the test list, and one folder of generated wavs per system."""
    (out / "prompts").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, prompt_text in enumerate(SENTENCES):
        wave, sr = speak(prompt_text, float(i % 4 - 2), 1.0)
        sf.write(out / "prompts" / f"p{i}.wav", wave, sr)
        text = SENTENCES[(i + 1) % len(SENTENCES)]
        rows.append(f"utt{i}\t{prompt_text}\tprompts/p{i}.wav\t{text}")
        for system, (shift, formant, snr) in SYSTEMS.items():
            (out / system).mkdir(exist_ok=True)
            wave, sr = speak(text, float(i % 4 - 2) + shift, formant)
            if snr is not None:
                wave = with_noise(wave, snr, seed=i)
            sf.write(out / system / f"utt{i}.wav", wave, sr)
    test_list = out / "test.tsv"
    test_list.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return test_list


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="eval_example")
    parser.add_argument("--metrics", default="sim,dnsmos")
    args = parser.parse_args()
    out = Path(args.out_dir)
    items = read_test_list(build(out))
    evaluator = Evaluator(args.metrics)
    results = {system: evaluator.score_folder(out / system, items) for system in SYSTEMS}
    for system, result in results.items():
        print(f"\n{system}\n{format_table(result)}")
    # One Markdown table: a row per system, "mean [95% interval]" per metric.
    print("\n| system | " + " | ".join(evaluator.metrics) + " |")
    print("|---" * (1 + len(evaluator.metrics)) + "|")
    for system, result in results.items():
        cells = [
            f"{s.mean:.3f} [{s.ci95[0]:.3f}, {s.ci95[1]:.3f}]" for s in result.summaries.values()
        ]
        print(f"| {system} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
