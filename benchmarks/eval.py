"""Cost of each evaluation metric: seconds per utterance on this CPU, one thread.

    .venv/bin/python benchmarks/eval.py [--utterances 8] [--metrics sim,dnsmos] [--upstream-models]

Utterances are synthesised with pyopenjtalk (Japanese, 2-6 s each, several pitches); each one's
prompt is another sentence in the same voice. Every metric scores the same list, side by side in
one run, after its model is loaded (load time is reported apart). `--upstream-models` also
times upstream's SIM-o model (WavLM-large + ECAPA-TDNN) and UTMOS22 strong (wav2vec 2.0 base +
BLSTM) at full size with random weights: what the real checkpoints cost, without downloading.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table  # noqa: E402

from zipvoice.eval.registry import METRICS, build_scorer, parse_metrics  # noqa: E402
from zipvoice.eval.utils import TestItem, load_wav  # noqa: E402

SENTENCES = [
    "今日は天気が良いので、公園まで散歩に行きました。",
    "駅の近くに新しいパン屋ができたそうです。",
    "はい。",
    "明日の会議は午後三時から、三階の大きな部屋で行われる予定になっています。",
    "雨が降ってきたので、傘を持って出かけましょう。",
    "この本はとても面白かったです。",
]


def make_items(folder: Path, count: int) -> tuple[list[TestItem], Path, float]:
    """`count` generated/prompt pairs in the inference layout; also the mean clip length."""
    import pyopenjtalk

    gen = folder / "gen"
    gen.mkdir()
    items, seconds = [], []
    for i in range(count):
        half_tone = float(i % 4 - 2)
        text, prompt_text = SENTENCES[i % len(SENTENCES)], SENTENCES[(i + 1) % len(SENTENCES)]
        for path, t in ((gen / f"utt{i}.wav", text), (folder / f"prompt{i}.wav", prompt_text)):
            wave, sr = pyopenjtalk.tts(t, half_tone=half_tone)
            sf.write(path, (wave / 32768.0).astype(np.float32), sr)
        seconds.append(sf.info(gen / f"utt{i}.wav").duration)
        items.append(TestItem(f"utt{i}", prompt_text, folder / f"prompt{i}.wav", text))
    return items, gen, float(np.mean(seconds))


def time_scorer(name: str, make, items: list[TestItem], wav_dir: Path) -> list[str]:
    start = time.perf_counter()
    scorer = make()
    loaded = time.perf_counter() - start
    score = scorer.score if hasattr(scorer, "score") else scorer
    score(items[0], wav_dir)  # warm-up: first-call allocations and lazy initialisation
    start = time.perf_counter()
    for item in items:
        score(item, wav_dir)
    per_utt = (time.perf_counter() - start) / len(items)
    return [name, f"{loaded:.2f}", f"{per_utt:.3f}"]


def wavlm_large_scorer():
    """Upstream's SIM-o architecture at full size, random weights (timing only)."""
    from transformers import WavLMConfig

    from zipvoice.eval.models.ecapa_tdnn_wavlm import EcapaTdnnWavLM

    config = WavLMConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
    )  # fmt: skip
    model = EcapaTdnnWavLM(config).eval()

    @torch.no_grad()
    def score(item: TestItem, wav_dir: Path) -> float:
        embs = [
            model(torch.from_numpy(load_wav(p, 16000))[None])[0]
            for p in (wav_dir / f"{item.name}.wav", item.prompt_wav)
        ]
        return float(torch.nn.functional.cosine_similarity(*embs, dim=0))

    return score


def utmos_scorer():
    """UTMOS22 strong at full size (wav2vec 2.0 base), random weights (timing only)."""
    from transformers import Wav2Vec2Config

    from zipvoice.eval.models.utmos import UTMOS22Strong

    model = UTMOS22Strong(Wav2Vec2Config()).eval()  # the config defaults are wav2vec 2.0 base

    @torch.no_grad()
    def score(item: TestItem, wav_dir: Path) -> float:
        return float(model(torch.from_numpy(load_wav(wav_dir / f"{item.name}.wav", 16000))[None]))

    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--utterances", type=int, default=8)
    parser.add_argument("--metrics", default="sim,dnsmos", help="Offline metrics to time.")
    parser.add_argument(
        "--upstream-models", action="store_true", help="Also time SIM-o's and UTMOS' models."
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        items, wav_dir, mean_seconds = make_items(Path(tmp), args.utterances)
        for name in parse_metrics(args.metrics):
            make = lambda name=name: build_scorer(name)  # noqa: E731
            rows.append(time_scorer(f"{name} ({METRICS[name].cls})", make, items, wav_dir))
        if args.upstream_models:
            for label, make_upstream in (
                ("sim-o (WavLM-large+ECAPA)", wavlm_large_scorer),
                ("utmos (UTMOS22 strong)", utmos_scorer),
            ):
                rows.append(time_scorer(label, make_upstream, items, wav_dir))
    print(f"{args.utterances} utterances, {mean_seconds:.2f} s of audio each on average")
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread")
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}\n")
    print(format_table(["metric", "model load (s)", "s / utterance"], rows))


if __name__ == "__main__":
    main()
