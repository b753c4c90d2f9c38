"""The README's first command, at a tiny size: every stage runs and leaves its artefacts; a
Ctrl-C'd run continues from its last finished stage."""

import os
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest
import soundfile as sf

from tests.conftest import REPO
from zipvoice.demo.pipeline import MARKER, DemoSettings, run_demo

TINY = dict(
    num_speakers=2, num_sentences=4, pretrain_iters=4, lora_iters=3, lora_rank=4, lora_alpha=8
)


def _interrupt_demo_at_stage(out, stage: str) -> tuple[int, str]:
    """`python -m zipvoice.bin.demo` at the TINY size; Ctrl-C (SIGINT to its process group,
    as a terminal sends it) when it prints `stage`."""
    argv = [sys.executable, "-m", "zipvoice.bin.demo", "--out-dir", str(out)]
    for key, value in TINY.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if stage in line:
            os.killpg(process.pid, signal.SIGINT)
            break
    rest, _ = process.communicate(timeout=600)
    return process.wait(), "".join(lines) + (rest or "")


@pytest.mark.slow
def test_demo_runs_end_to_end_and_leaves_every_artefact(tmp_path, capsys):
    out = tmp_path / "demo"
    code, output = _interrupt_demo_at_stage(out, "== 5.")
    assert code == 130, output[-3000:]
    assert "Traceback" not in output
    assert len([line for line in output.splitlines() if "interrupted:" in line]) == 1
    settings = DemoSettings(out_dir=str(out), progress=False, **TINY)
    artefacts = run_demo(settings)  # no --overwrite: continues after the finished stages
    printed = capsys.readouterr().out
    for stage in ("corpus", "features", "pre-training"):
        assert f"== {stage}: finished in an earlier run" in printed, stage

    adapter = artefacts["adapter"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "zipvoice_adapter.json"):
        assert (adapter / name).is_file(), name
    for key in ("speech (PyTorch, adapter merged)", "speech (onnxruntime)"):
        wave, sr = sf.read(artefacts[key])
        assert sr == 24000
        assert wave.size > 0.5 * sr and np.isfinite(wave).all() and np.abs(wave).max() > 1e-3
        assert np.abs(wave).max() <= 0.99 + 1 / 32768, key  # peak-limited, never clipped
    decoder = onnx.load(str(artefacts["ONNX models"] / "fm_decoder.onnx"))
    names = [n.name for n in decoder.graph.node] + [i.name for i in decoder.graph.initializer]
    assert not any("lora" in n.lower() for n in names)

    # A finished folder reruns nothing; other settings in it are refused unless --overwrite;
    # a folder the demo did not make is never touched.
    wav = artefacts["speech (PyTorch, adapter merged)"]
    written = wav.stat().st_mtime_ns
    assert run_demo(settings) == artefacts
    assert wav.stat().st_mtime_ns == written
    with pytest.raises(FileExistsError, match="other settings.*lora_rank.*--overwrite"):
        run_demo(DemoSettings(out_dir=str(out), progress=False, **{**TINY, "lora_rank": 8}))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not made by the demo"):
        run_demo(DemoSettings(out_dir=str(foreign), overwrite=True))
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert (out / MARKER).is_file()
