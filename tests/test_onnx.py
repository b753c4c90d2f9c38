"""ONNX export with adapters merged, and inference on ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import soundfile as sf
import torch

from tests.conftest import PARITY
from tests.helpers import PROMPT_TEXT, TEXT, expected_samples, make_inference_workdir
from zipvoice.bin import infer_zipvoice_onnx, onnx_export
from zipvoice.inference.torch_backend import load_model_for_inference
from zipvoice.models.modules.lora_utils import apply_lora_to_model, create_lora_config
from zipvoice.onnx.export import OnnxExportError, export_model, read_metadata
from zipvoice.onnx.runtime import OnnxZipVoice

VOCOS_DIR = PARITY / "vocos"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    adapters = {"lora": (False, 1), "dora": (True, 2)}
    return make_inference_workdir(tmp_path_factory.mktemp("onnx"), adapters)


def export_cli(workdir: Path, out: Path, *extra: str, model: str = "zipvoice") -> int:
    return onnx_export.main(
        ["--model-dir", str(workdir / model), "--onnx-model-dir", str(out), *extra]
    )


def decoder_inputs(seed: int, batch: int = 2, frames: int = 45) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (batch, frames, 100)
    mask = np.zeros((batch, frames), dtype=bool)
    mask[0, frames - 7 :] = True
    return {
        "t": rng.uniform(size=batch).astype(np.float32),
        "x": rng.standard_normal(shape).astype(np.float32),
        "text_condition": rng.standard_normal(shape).astype(np.float32),
        "speech_condition": rng.standard_normal(shape).astype(np.float32),
        "padding_mask": mask,
    }


def torch_velocity(model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model.forward_fm_decoder(
            t=torch.from_numpy(feeds["t"]).reshape(-1, 1, 1),
            xt=torch.from_numpy(feeds["x"]),
            text_condition=torch.from_numpy(feeds["text_condition"]),
            speech_condition=torch.from_numpy(feeds["speech_condition"]),
            padding_mask=torch.from_numpy(feeds["padding_mask"]),
        ).numpy()


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_merged_adapter_exports_plain_weights_matching_torch(workdir, adapter):
    out = workdir / f"onnx_{adapter}"
    assert export_cli(workdir, out, "--lora-path", str(workdir / adapter)) == 0
    for name in ("text_encoder.onnx", "fm_decoder.onnx"):
        graph = onnx.load(str(out / name)).graph
        names = [n.name for n in graph.node] + [i.name for i in graph.initializer]
        names += [o for n in graph.node for o in list(n.input) + list(n.output)]
        assert not [n for n in names if "lora" in n.lower()], name
    meta = read_metadata(out / "fm_decoder.onnx")
    assert meta["model_type"] == "zipvoice" and meta["lora_merged"] == "1"
    assert meta["tokenizer"] == "simple" and meta["feat_dim"] == "100"

    merged, _, _ = load_model_for_inference(
        model_dir=workdir / "zipvoice", lora_path=workdir / adapter
    )
    base, _, _ = load_model_for_inference(model_dir=workdir / "zipvoice")
    session = ort.InferenceSession(str(out / "fm_decoder.onnx"))
    for seed, frames in ((0, 45), (1, 13)):
        feeds = decoder_inputs(seed, frames=frames)
        v_onnx = session.run(None, feeds)[0]
        expected = torch_velocity(merged, feeds)
        valid = ~feeds["padding_mask"]
        np.testing.assert_allclose(v_onnx[valid], expected[valid], atol=1e-3, rtol=0)
        assert np.abs(expected - torch_velocity(base, feeds)).max() > 1e-2  # merge is real

    text_encoder = ort.InferenceSession(str(out / "text_encoder.onnx"))
    tokens, prompt = [[5, 6, 7, 8, 9, 10, 11]], [[1, 2, 3]]
    (condition,) = text_encoder.run(
        None,
        {
            "tokens": np.array(tokens),
            "prompt_tokens": np.array(prompt),
            "prompt_features_len": np.array(31),
            "speed": np.array(1.2, dtype=np.float32),
        },
    )
    with torch.no_grad():
        expected, _ = merged.forward_text_inference_ratio_duration(
            tokens, prompt, torch.tensor([31]), 1.2
        )
    assert condition.shape == tuple(expected.shape)
    np.testing.assert_allclose(condition, expected.numpy(), atol=1e-4)


def test_unmerged_adapters_are_refused(workdir, tmp_path, capsys):
    model, _, _ = load_model_for_inference(model_dir=workdir / "zipvoice")
    apply_lora_to_model(model, create_lora_config(rank=2, alpha=4, use_dora=False))
    with pytest.raises(OnnxExportError, match="unmerged"):
        export_model(model, tmp_path / "x", workdir / "zipvoice" / "tokens.txt")
    code = export_cli(
        workdir, tmp_path / "y", "--lora-path", str(workdir / "lora"), "--merge-lora", "0"
    )
    assert code == 1 and "unmerged" in capsys.readouterr().err
    assert not (tmp_path / "y" / "fm_decoder.onnx").exists()


def test_onnx_sampling_matches_torch_with_guidance(workdir):
    """Euler + CFG in numpy against model.sample from the same starting noise."""
    out = workdir / "onnx_base"
    assert export_cli(workdir, out, "--int8", "1") == 0
    model, _, _ = load_model_for_inference(model_dir=workdir / "zipvoice")
    onnx_model = OnnxZipVoice(out)
    rng = np.random.default_rng(0)
    prompt_features = (rng.standard_normal((30, 100)) * 0.3).astype(np.float32)
    tokens, prompt_tokens = [5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4]
    frames = 30 + int(np.ceil(30 / 4 * 8))
    x0 = rng.standard_normal((1, frames, 100)).astype(np.float32)
    (mel,) = onnx_model.sample(
        [tokens], prompt_tokens, prompt_features, num_step=4, guidance_scale=1.0, x0=x0
    )
    with torch.no_grad():
        expected, lens, _, _ = model.sample(
            [tokens], [prompt_tokens], torch.from_numpy(prompt_features)[None], torch.tensor([30]),
            num_step=4, guidance_scale=1.0, t_shift=0.5, x0=torch.from_numpy(x0),
        )  # fmt: skip
    assert mel.shape == (100, int(lens[0]))
    np.testing.assert_allclose(mel, expected[0].numpy().T, atol=1e-3)

    int8 = OnnxZipVoice(out, int8=True)
    assert read_metadata(out / "fm_decoder_int8.onnx")["quantization"] == "int8-dynamic"
    (mel_int8,) = int8.sample(
        [tokens], prompt_tokens, prompt_features, num_step=4, guidance_scale=1.0, x0=x0
    )
    assert mel_int8.shape == mel.shape and np.isfinite(mel_int8).all()
    assert np.abs(mel_int8 - mel).mean() < 0.5 * np.abs(mel).mean()


def test_onnx_end_to_end_writes_wav_of_expected_length(workdir, capsys):
    out = workdir / "onnx_distill"
    assert export_cli(workdir, out, "--vocoder-path", str(VOCOS_DIR), "--tokenizer", "simple",
                      model="distill") == 0  # fmt: skip
    assert (out / "vocoder.onnx").is_file()
    wav_a, wav_b = workdir / "onnx_a.wav", workdir / "onnx_b.wav"
    for wav in (wav_a, wav_b):
        code = infer_zipvoice_onnx.main(
            [
                "--onnx-model-dir", str(out), "--prompt-wav", str(workdir / "prompt.wav"),
                "--prompt-text", PROMPT_TEXT, "--text", TEXT, "--res-wav-path", str(wav),
            ]
        )  # fmt: skip
        assert code == 0
    assert "RTF" in capsys.readouterr().out
    wave, sr = sf.read(wav_a, dtype="float32")
    assert sr == 24000 and wave.shape == (expected_samples(workdir),)
    np.testing.assert_array_equal(wave, sf.read(wav_b, dtype="float32")[0])
    missing = infer_zipvoice_onnx.main(
        ["--onnx-model-dir", str(out), "--onnx-int8", "1", "--test-list", "x.tsv"]
    )
    assert missing == 1
    assert "lacks text_encoder_int8.onnx" in capsys.readouterr().err
