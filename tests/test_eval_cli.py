"""The evaluation commands end to end on synthesised speech: each prints mean, 95% interval
and count, writes the tsv it is asked for (and nothing it is not), and reports a user's
mistake as one line; plus the summary arithmetic and the library entry the trainer uses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy import stats

pytest.importorskip("resemblyzer", reason="the evaluation commands need the eval extra")

from tests.conftest import REPO  # noqa: E402
from tests.eval_audio import make_voices, write_test_list  # noqa: E402
from zipvoice.bin import evaluate  # noqa: E402
from zipvoice.eval.offline import Evaluator, score_folder  # noqa: E402
from zipvoice.eval.speaker_similarity import sim  # noqa: E402
from zipvoice.eval.utils import EvalError, read_scores, read_test_list, summarize  # noqa: E402

SUMMARY = re.compile(r"sim: mean (-?[\d.]+) 95% CI \[(-?[\d.]+), (-?[\d.]+)\] n=(\d+)")


@pytest.fixture(scope="module")
def result_folder(tmp_path_factory) -> tuple[Path, Path]:
    """A 'result folder' as inference writes it: prompts are sentence a of a voice, the
    'generated' wavs sentence b of the same voice (good) or of another voice (bad)."""
    root = tmp_path_factory.mktemp("results")
    voices = make_voices(root / "voices", ("flite_slt", "flite_awb", "ojt_mei"))
    gen = root / "gen"
    gen.mkdir()
    rows = []
    for name, prompt_voice, gen_voice in [
        ("same_slt", "flite_slt", "flite_slt"),
        ("same_mei", "ojt_mei", "ojt_mei"),
        ("other_awb", "flite_slt", "flite_awb"),
    ]:
        # 4.7 s: DNSMOS doubles it once to one 9 s window (longer clips cost more windows).
        wave, sr = sf.read(voices[gen_voice][1], dtype="float32")
        sf.write(gen / f"{name}.wav", np.resize(wave, int(4.7 * sr)), sr)
        # Prompt paths relative to the list's folder, as inference lists often are.
        rows.append((name, "prompt text", voices[prompt_voice][0].relative_to(root), "text"))
    return gen, write_test_list(root / "test.tsv", rows)


def test_sim_command_prints_summary_and_writes_tsv(result_folder, tmp_path, capsys):
    gen, test_list = result_folder
    out = tmp_path / "sim.tsv"
    args = ["--wav-path", str(gen), "--test-list", str(test_list), "--output-file", str(out)]
    assert sim.main(args) == 0
    mean, lo, hi, n = SUMMARY.search(capsys.readouterr().out).groups()
    scores = read_scores(out)
    assert list(scores) == ["same_slt", "same_mei", "other_awb"] and int(n) == 3
    assert scores["other_awb"] < min(scores["same_slt"], scores["same_mei"])
    assert float(mean) == pytest.approx(np.mean(list(scores.values())), abs=1e-4)
    assert float(lo) < float(mean) < float(hi)
    text = out.read_text(encoding="utf-8")
    written = dict(line[2:].split("\t", 1) for line in text.splitlines() if line.startswith("# "))
    assert written["n"] == "3" and float(written["mean"]) == pytest.approx(float(mean), abs=1e-4)
    assert [float(x) for x in written["ci95"].split("\t")] == pytest.approx(
        [float(lo), float(hi)], abs=1e-4
    )
    # An existing output is not replaced unless asked, and nothing is scored first.
    before = out.read_bytes()
    assert sim.main(args) == 1
    assert "exists (pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert sim.main([*args, "--overwrite"]) == 0


def test_bad_inputs_are_one_line_errors(result_folder, tmp_path, capsys):
    gen, test_list = result_folder
    bad = tmp_path / "bad.tsv"
    bad.write_text("ok\ta\tb.wav\tc\nbroken line without tabs\n", encoding="utf-8")
    assert sim.main(["--wav-path", str(gen), "--test-list", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {bad}:2: expected 4 tab-separated fields " + (
        "(name, prompt_text, prompt_wav, text), got 1"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sim.main(["--wav-path", str(empty), "--test-list", str(test_list)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: generated wav") and "same_slt.wav" in err and "\n" not in err
    latin = tmp_path / "latin1.tsv"
    latin.write_bytes("n\tcafé\tp.wav\tt\n".encode("latin-1"))
    with pytest.raises(EvalError, match="not UTF-8"):
        read_test_list(latin)
    assert evaluate.main(["--wav-path", str(gen), "--test-list", str(test_list), "--metrics", "x"])
    assert "unknown metric 'x'" in capsys.readouterr().err


def test_evaluate_prints_one_table_and_writes_per_metric_tsv(result_folder, tmp_path, capsys):
    gen, test_list = result_folder
    out = tmp_path / "scores"
    argv = ["--wav-path", str(gen), "--test-list", str(test_list), "--metrics", "sim,dnsmos"]
    assert evaluate.main([*argv, "--output-dir", str(out)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].split() == ["metric", "mean", "95%", "CI", "n", "better"]
    rows = {line.split()[0]: line for line in table[2:]}
    assert set(rows) == {"sim", "dnsmos"}
    assert re.search(r"\[-?[\d.]+, -?[\d.]+\]\s+3\s+higher$", rows["dnsmos"])
    summary = (out / "summary.tsv").read_text(encoding="utf-8").splitlines()
    assert summary[0] == "metric\tmean\tci95_low\tci95_high\tn" and len(summary) == 3
    dnsmos = read_scores(out / "dnsmos.tsv")
    assert len(dnsmos) == 3 and all(1.0 <= v <= 5.0 for v in dnsmos.values())
    assert float(summary[2].split("\t")[1]) == pytest.approx(np.mean(list(dnsmos.values())))


def test_summary_interval_is_the_t_interval():
    values = [0.61, 0.72, 0.55, 0.80, 0.67]
    s = summarize("sim", values)
    half = stats.t.ppf(0.975, 4) * np.std(values, ddof=1) / np.sqrt(5)
    assert s.mean == pytest.approx(np.mean(values))
    assert s.ci95 == pytest.approx((s.mean - half, s.mean + half))
    assert summarize("sim", [0.5]).ci95 == (0.5, 0.5)
    with pytest.raises(EvalError, match="no scores"):
        summarize("sim", [])


def test_library_entry_scores_offline_and_refuses_metrics_needing_weights(result_folder):
    gen, test_list = result_folder
    items = read_test_list(test_list)
    summaries = score_folder(gen, items, metrics=("sim",))
    assert summaries["sim"].count == 3 and -1.0 < summaries["sim"].mean < 1.0
    with pytest.raises(EvalError, match="need downloaded models"):
        Evaluator(["sim", "utmos"], offline_only=True)


def test_run_eval_recipe_scores_a_folder(result_folder, tmp_path):
    gen, test_list = result_folder
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = ["bash", str(REPO / "egs" / "zipvoice" / "run_eval.sh"), "--python", sys.executable,
           "--test-list", str(test_list), "--res-dir", str(gen), "--metrics", "sim",
           "--score-dir", str(tmp_path / "scores")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^sim\s+-?[\d.]+\s+\[", proc.stdout, re.MULTILINE), proc.stdout
    assert len(read_scores(tmp_path / "scores" / "sim.tsv")) == 3


def test_every_registered_metric_names_a_real_scorer_class():
    """The registry is how evaluate and the trainer find scorers: a renamed module or class
    would otherwise surface only when someone asks for that metric."""
    import importlib
    import inspect

    from zipvoice.eval.registry import METRICS

    for name, spec in METRICS.items():
        cls = getattr(importlib.import_module(spec.module), spec.cls, None)
        assert inspect.isclass(cls) and callable(getattr(cls, "score", None)), name
        params = inspect.signature(cls).parameters
        for key, _ in spec.fixed:
            assert key in params, (name, key)
