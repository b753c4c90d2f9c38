"""The README's first command, at a tiny size: every stage runs and leaves its artefacts."""

import numpy as np
import onnx
import pytest
import soundfile as sf

from zipvoice.demo.pipeline import MARKER, DemoSettings, run_demo


@pytest.mark.slow
def test_demo_runs_end_to_end_and_leaves_every_artefact(tmp_path):
    out = tmp_path / "demo"
    settings = DemoSettings(
        out_dir=str(out),
        num_speakers=2,
        num_sentences=4,
        pretrain_iters=4,
        lora_iters=3,
        lora_rank=4,
        lora_alpha=8,
        progress=False,
    )
    artefacts = run_demo(settings)

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

    # A second run refuses to clobber the first unless asked, and never touches other folders.
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_demo(settings)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not made by the demo"):
        run_demo(DemoSettings(out_dir=str(foreign), overwrite=True))
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert (out / MARKER).is_file()
