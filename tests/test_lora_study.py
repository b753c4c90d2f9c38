"""The LoRA/DoRA study's pieces (egs/lora_study, docs/lora-study.md): pseudo-speakers that are
distinct voices by the study's own SIM, the Pareto frontier, and the pipeline at its `--quick`
budget (corpus, data, pre-training, one scored adaptation run) reproducing its numbers."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

STUDY = Path(__file__).resolve().parents[1] / "egs" / "lora_study"
sys.path.insert(0, str(STUDY))

import pseudo_speakers as ps  # noqa: E402
from report import dominance, pareto  # noqa: E402


def test_warp_moves_formants_and_stretch_keeps_pitch():
    bins = np.zeros((3, 101))
    bins[:, 40] = 1.0  # a "formant" at bin 40
    warped = ps.warp_frequency(bins, 1.25)
    assert int(np.argmax(warped[0])) == 50  # S'(f) = S(f / 1.25): the peak moves up 25 %
    features = ps.WorldFeatures(
        f0=np.array([0.0, 100.0, 110.0, 120.0, 0.0] * 4), envelope=np.ones((20, 9)),
        aperiodicity=np.full((20, 9), 0.5), sample_rate=16000,
    )  # fmt: skip
    faster = ps.stretch_frames(features, 2.0)
    assert faster.f0.shape[0] == 10 and faster.envelope.shape == (10, 9)
    assert set(np.unique(faster.f0)) <= {0.0, 100.0, 110.0, 120.0}  # F0 values not scaled
    with pytest.raises(ValueError, match="must not contain '_'"):
        ps.PseudoSpeaker("a_b", "flslt")


def test_sampled_speakers_are_seeded_and_spread_over_bases():
    a = ps.sample_speakers("en", ["x", "y"], 6, seed=3)
    assert a == ps.sample_speakers("en", ["x", "y"], 6, seed=3)
    assert [s.base for s in a] == ["x", "y"] * 3
    assert len({(s.f0_scale, s.warp, s.rate) for s in a}) == 6


@pytest.mark.skipif(shutil.which("flite") is None, reason="needs flite (apt-get install flite)")
def test_pseudo_speakers_are_distinct_voices_by_resemblyzer(tmp_path):
    """Two sentences of one pseudo-speaker are more alike (Resemblyzer cosine) than the same
    sentences said by two pseudo-speakers made from the same base voice."""
    pytest.importorskip("resemblyzer")
    from zipvoice.eval.speaker_similarity.sim import ResemblyzerEncoder
    from zipvoice.utils.audio import load_audio, resample, trim_silence

    texts = ["The children painted a picture of the sea.", "Please close the window before you go."]
    features = []
    for i, text in enumerate(texts):
        raw = tmp_path / f"{i}.wav"
        subprocess.run(["flite", "-voice", "slt", "-t", text, "-o", str(raw)], check=True)
        wave = trim_silence(load_audio(raw, 24000), 24000)
        features.append(ps.analyse(np.asarray(wave, dtype=np.float64).reshape(-1), 24000))
    speakers = [ps.PseudoSpeaker("low", "flslt", 0.75, 0.88, 0.95),
                ps.PseudoSpeaker("mid", "flslt", 1.0, 1.0, 1.0),
                ps.PseudoSpeaker("high", "flslt", 1.35, 1.15, 1.1)]  # fmt: skip
    encoder = ResemblyzerEncoder()
    emb = {}
    for spk in speakers:
        for i, feat in enumerate(features):
            wave = resample(ps.resynthesise(feat, spk), 24000, 16000)
            emb[spk.name, i] = encoder.embed(np.asarray(wave, dtype=np.float32))

    def sim(a: str, b: str) -> float:  # sentence 0 of a against sentence 1 of b
        return float(emb[a, 0] @ emb[b, 1])

    names = [s.name for s in speakers]
    for name in names:  # each voice is closer to itself than to any other, either way round
        others = [max(sim(name, o), sim(o, name)) for o in names if o != name]
        assert sim(name, name) > max(others), (name, sim(name, name), others)


def test_pareto_and_dominance():
    points = [(0.1, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1), (math.nan, 1.0), (0.5, 0.5)]
    front = pareto(points)
    assert set(front) == {0, 1, 3, 5}  # (0.4, 0.4) dominated, NaN left out, ties both kept
    assert [points[i][0] for i in front] == sorted(points[i][0] for i in front)
    rows = [{"method": m, "step": 1, "ja_sim": x, "ja_f0_corr": y}
            for m, (x, y) in [("a", (0.6, 0.6)), ("b", (0.5, 0.5)), ("b", (0.7, 0.1)),
                              ("c", (0.4, 0.4))]]  # fmt: skip
    result = dominance(rows, "a", ["b", "c"])
    assert result["c"] == {"dominated": 1, "of": 1}
    assert result["b"] == {"dominated": 1, "of": 2}  # (0.7, 0.1) has more SIM than any of a's


@pytest.mark.skipif(
    any(shutil.which(p) is None for p in ("flite", "espeak-ng", "festival")),
    reason="needs flite, espeak-ng and festival (egs/lora_study/run.sh installs them)",
)
def test_quick_pipeline_scores_generated_audio_and_reproduces(tmp_path):
    """Every stage up to one adaptation run at the --quick budget: the corpus has its splits
    and eval lists, the run's curve has JA and EN scores at each validation, and running it
    again gives the same numbers."""
    pytest.importorskip("resemblyzer")
    import json
    from dataclasses import replace

    from adapt import Job, run_job
    from corpus import CorpusSizes
    from settings import QUICK, Layout
    from study import ceilings, make_corpus, prepare_data, pretrain

    sizes = CorpusSizes(en_speakers=4, en_utts=2, en_heldout_speakers=1, ja_speakers=2,
                        ja_utts=2, ja_heldout_speakers=2, en_eval_lines=1)  # fmt: skip
    budget = replace(QUICK, sizes=sizes)
    layout = Layout(tmp_path / "work")
    make_corpus(layout, budget, jobs=1)
    marker = json.loads((layout.corpus / "DONE.json").read_text(encoding="utf-8"))
    assert set(marker["tsv"]) == {"en_train", "en_heldout", "ja_train", "ja_dev", "ja_heldout"}
    ja_lines = Path(marker["eval"]["eval_ja"]).read_text(encoding="utf-8").splitlines()
    assert len(ja_lines) == sizes.ja_heldout_speakers
    for line in ja_lines:  # the accent reference is the same speaker saying the target text
        name, _, prompt_wav, _ = line.split("\t")
        assert (Path(marker["eval"]["refs_ja"]) / f"{name}.wav").is_file()
        assert Path(prompt_wav).name.startswith(name.removeprefix("ja_") + "_")
    prepare_data(layout, "cpu")
    pretrain(layout, budget)
    ceil = ceilings(layout)
    assert ceil["ground_truth"]["ja_f0_corr"] == pytest.approx(1.0)
    assert 0 < ceil["griffin_lim"]["ja_sim"] <= 1

    job = Job("dora_r32", 1e-3, score_start=True)
    first = run_job(layout, budget, job, force=False)
    assert set(first["points"]) == {"0", str(budget.adapt_steps)}
    point = first["points"][str(budget.adapt_steps)]
    assert 0 < point["ja_sim"] <= 1 and 0 < point["en_sim"] <= 1
    assert "ja_f0_corr" in point and first["curves"]["valid/loss"]
    again = run_job(layout, budget, job, force=True)
    assert again["points"] == first["points"]
    assert again["curves"] == first["curves"]
