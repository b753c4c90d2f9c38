"""ONNX export with adapters merged, and inference on ONNX Runtime."""

from __future__ import annotations

import json
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
from zipvoice.onnx.runtime import OnnxModelError, OnnxZipVoice
from zipvoice.utils.manifest import read_manifest

VOCOS_DIR = PARITY / "vocos"
EXPORT_FILES = (
    "text_encoder.onnx", "fm_decoder.onnx", "text_encoder_int8.onnx", "fm_decoder_int8.onnx",
    "model.json", "tokens.txt",
)  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    adapters = {"lora": (False, 1), "dora": (True, 2)}
    return make_inference_workdir(tmp_path_factory.mktemp("onnx"), adapters)


def export_cli(workdir: Path, out: Path, *extra: str, model: str = "zipvoice") -> int:
    return onnx_export.main(
        ["--model-dir", str(workdir / model), "--onnx-model-dir", str(out), *extra]
    )


def decoder_inputs(seed: int, t: float, batch: int = 2, frames: int = 45) -> dict[str, np.ndarray]:
    """Feeds in upstream's decoder contract: scalar t and guidance scale, no padding mask."""
    rng = np.random.default_rng(seed)
    shape = (batch, frames, 100)
    return {
        "t": np.asarray(t, dtype=np.float32),
        "x": rng.standard_normal(shape).astype(np.float32),
        "text_condition": rng.standard_normal(shape).astype(np.float32),
        "speech_condition": rng.standard_normal(shape).astype(np.float32),
        "guidance_scale": np.asarray(1.0, dtype=np.float32),
    }


def torch_velocity(model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """PyTorch's guided velocity (the solver's classifier-free guidance) for the same feeds."""
    with torch.no_grad():
        return model.solver.model(
            t=torch.from_numpy(feeds["t"]),
            x=torch.from_numpy(feeds["x"]),
            text_condition=torch.from_numpy(feeds["text_condition"]),
            speech_condition=torch.from_numpy(feeds["speech_condition"]),
            guidance_scale=float(feeds["guidance_scale"]),
        ).numpy()


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


# Upstream's contract (docs/lora.md, "ONNX"; reference specification): name -> (elem type, dims).
# Symbolic dims are given as "sym"; the feature width is fixed at 100.
INT64, FLOAT = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
CONTRACT = {
    "text_encoder.onnx": (
        {"tokens": (INT64, ["sym", "sym"]), "prompt_tokens": (INT64, ["sym", "sym"]),
         "prompt_features_len": (INT64, []), "speed": (FLOAT, [])},
        {"text_condition": (FLOAT, ["sym", "sym", 100])},
    ),
    "fm_decoder.onnx": (
        {"t": (FLOAT, []), "x": (FLOAT, ["sym", "sym", 100]),
         "text_condition": (FLOAT, ["sym", "sym", 100]),
         "speech_condition": (FLOAT, ["sym", "sym", 100]), "guidance_scale": (FLOAT, [])},
        {"v": (FLOAT, ["sym", "sym", 100])},
    ),
}  # fmt: skip
TEXT_META = ("version", "model_author", "comment", "use_espeak", "use_pinyin")
DECODER_META = ("version", "model_author", "comment", "feat_dim", "sample_rate", "n_fft",
                "hop_length", "window_length", "num_mels")  # fmt: skip


def check_contract(folder: Path) -> None:
    for name, (inputs, outputs) in CONTRACT.items():
        for file in (name, name.replace(".onnx", "_int8.onnx")):
            model = onnx.load(str(folder / file))
            graph = model.graph
            for found, expected in ((graph.input, inputs), (graph.output, outputs)):
                assert [v.name for v in found] == list(expected), file
                for value in found:
                    elem, shape = expected[value.name]
                    assert value.type.tensor_type.elem_type == elem, (file, value.name)
                    got = ["sym" if isinstance(d, str) else d for d in dims(value)]
                    assert got == shape, (file, value.name, dims(value))
            if file == name:
                assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [
                    13
                ]
        meta = read_metadata(folder / name)
        keys = TEXT_META if name.startswith("text") else DECODER_META
        assert all(k in meta for k in keys), (name, sorted(meta))
        assert meta["version"] == "1"
    decoder = read_metadata(folder / "fm_decoder.onnx")
    assert (decoder["feat_dim"], decoder["sample_rate"], decoder["num_mels"]) == (
        "100",
        "24000",
        "100",
    )
    config = json.loads((folder / "model.json").read_text())
    assert config["feature"] == {"sampling_rate": 24000, "type": "vocos"}
    assert config["model"] == json.loads((PARITY / "zipvoice" / "model.json").read_text())["model"]
    assert (folder / "tokens.txt").read_text() == (PARITY / "tokens.txt").read_text()


def contract_sample(
    folder: Path,
    tokens,
    prompt_tokens,
    prompt_features,
    num_step,
    x0,
    decoder_file: str = "fm_decoder.onnx",
) -> np.ndarray:
    """Upstream's ONNX inference, written from the contract alone (not this project's runtime):
    text condition, Euler on the shifted schedule with the graph's guided velocity, frames
    after the prompt."""
    text = ort.InferenceSession(str(folder / "text_encoder.onnx"))
    decoder = ort.InferenceSession(str(folder / decoder_file))
    (condition,) = text.run(
        None,
        {
            "tokens": np.array([tokens]),
            "prompt_tokens": np.array([prompt_tokens]),
            "prompt_features_len": np.array(len(prompt_features)),
            "speed": np.array(1.0, dtype=np.float32),
        },
    )
    speech = np.zeros_like(condition)
    speech[0, : len(prompt_features)] = prompt_features
    t = np.linspace(0, 1, num_step + 1, dtype=np.float32)
    t = 0.5 * t / (1 - 0.5 * t)
    x = x0
    for k in range(num_step):
        (v,) = decoder.run(
            None,
            {
                "t": np.array(t[k], dtype=np.float32),
                "x": x,
                "text_condition": condition,
                "speech_condition": speech,
                "guidance_scale": np.array(1.0, dtype=np.float32),
            },
        )
        x = x + v * (t[k + 1] - t[k])
    return x[0, len(prompt_features):].T  # fmt: skip


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_merged_adapter_exports_upstreams_contract_matching_torch(workdir, adapter):
    out = workdir / f"onnx_{adapter}"
    assert export_cli(workdir, out, "--lora-path", str(workdir / adapter)) == 0
    check_contract(out)
    for name in ("text_encoder.onnx", "fm_decoder.onnx"):
        graph = onnx.load(str(out / name)).graph
        names = [n.name for n in graph.node] + [i.name for i in graph.initializer]
        names += [o for n in graph.node for o in list(n.input) + list(n.output)]
        assert not [n for n in names if "lora" in n.lower()], name
    meta = read_metadata(out / "fm_decoder.onnx")
    assert meta["model_type"] == "zipvoice" and meta["lora_merged"] == "1"
    assert meta["tokenizer"] == "simple" and meta["feat_dim"] == "100"
    assert sorted(read_manifest(out)["files"]) == sorted(EXPORT_FILES)

    merged, _, _ = load_model_for_inference(
        model_dir=workdir / "zipvoice", lora_path=workdir / adapter
    )
    base, _, _ = load_model_for_inference(model_dir=workdir / "zipvoice")
    session = ort.InferenceSession(str(out / "fm_decoder.onnx"))
    for seed, frames, t in ((0, 45, 0.3), (1, 13, 0.7), (2, 20, 0.5)):  # both guidance branches
        feeds = decoder_inputs(seed, t, batch=1 + seed % 2, frames=frames)
        expected = torch_velocity(merged, feeds)
        np.testing.assert_allclose(session.run(None, feeds)[0], expected, atol=1e-4, rtol=0)
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
    frames = int(np.ceil(31 / 3 * 10 / 1.2))  # upstream: prompt rate over all tokens, / speed
    with torch.no_grad():
        embed, lens = merged.forward_text_embed([prompt[0] + tokens[0]])
        expected, _ = merged.forward_text_condition(embed, lens, torch.tensor([frames]))
    assert condition.shape == (1, frames, 100)
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


def prompt_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    prompt_features = (rng.standard_normal((30, 100)) * 0.3).astype(np.float32)
    tokens, prompt_tokens = [5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4]
    frames = 30 + int(np.ceil(30 / 4 * 8))  # speed 1: upstream's ONNX and PyTorch agree
    x0 = rng.standard_normal((1, frames, 100)).astype(np.float32)
    return tokens, prompt_tokens, prompt_features, x0


def torch_sample(model, tokens, prompt_tokens, prompt_features, x0, num_step=4) -> np.ndarray:
    with torch.no_grad():
        expected, lens, _, _ = model.sample(
            [tokens], [prompt_tokens], torch.from_numpy(prompt_features)[None], torch.tensor([30]),
            num_step=num_step, guidance_scale=1.0, t_shift=0.5, x0=torch.from_numpy(x0),
        )  # fmt: skip
    return expected[0, : int(lens[0])].numpy().T


def test_onnx_sampling_matches_torch_with_guidance(workdir, capsys):
    """Upstream's inference loop (written from the contract) and this project's runtime,
    against model.sample from the same starting noise; int8 runs too."""
    out = workdir / "onnx_base"
    assert export_cli(workdir, out) == 0
    model, _, _ = load_model_for_inference(model_dir=workdir / "zipvoice")
    tokens, prompt_tokens, prompt_features, x0 = prompt_case()
    expected = torch_sample(model, tokens, prompt_tokens, prompt_features, x0)
    reference = contract_sample(out, tokens, prompt_tokens, prompt_features, 4, x0)
    assert reference.shape == expected.shape
    np.testing.assert_allclose(reference, expected, atol=1e-4, rtol=0)
    runtime = OnnxZipVoice(out)
    mel = runtime.sample_one(tokens, prompt_tokens, prompt_features, 4, 1.0, x0=x0)
    np.testing.assert_allclose(mel, expected, atol=1e-4, rtol=0)

    int8 = OnnxZipVoice(out, int8=True)
    assert read_metadata(out / "fm_decoder_int8.onnx")["quantization"] == "int8-dynamic"
    mel_int8 = int8.sample_one(tokens, prompt_tokens, prompt_features, 4, 1.0, x0=x0)
    assert mel_int8.shape == mel.shape and np.isfinite(mel_int8).all()
    distance = np.abs(mel_int8 - mel).mean()
    assert 0 < distance < 0.5 * np.abs(mel).mean()


def test_time_gated_export_runs_both_decoders(workdir):
    """fm_decoder.onnx holds the adapter (what upstream's tools run), fm_decoder_base.onnx the
    base; the runtime picks one per step. Full and empty ranges match PyTorch within 1e-4."""
    out = workdir / "onnx_gated"
    lora = ["--lora-path", str(workdir / "dora")]
    assert export_cli(workdir, out, *lora, "--lora-t-range", "0,0.5", "--int8", "0") == 0
    check = read_manifest(out)["files"]
    assert {"fm_decoder.onnx", "fm_decoder_base.onnx", "model.json"} <= set(check)
    assert read_metadata(out / "fm_decoder.onnx")["lora_t_range"] == "0,0.5"
    case = prompt_case(1)
    tokens, prompt_tokens, prompt_features, x0 = case

    def torch_run(**kwargs) -> np.ndarray:
        model, _, _ = load_model_for_inference(model_dir=workdir / "zipvoice", **kwargs)
        return torch_sample(model, *case)

    def onnx_run(t_range=None) -> np.ndarray:
        runtime = OnnxZipVoice(out, lora_t_range=t_range)
        return runtime.sample_one(tokens, prompt_tokens, prompt_features, 4, 1.0, x0=x0)

    adapted = torch_run(lora_path=workdir / "dora")
    base = torch_run()
    gated = torch_run(lora_path=workdir / "dora", lora_t_range=(0.0, 0.5))
    np.testing.assert_allclose(onnx_run((0.0, 1.0)), adapted, atol=1e-4, rtol=0)
    np.testing.assert_allclose(onnx_run((0.5, 0.5)), base, atol=1e-4, rtol=0)
    mid = onnx_run()  # the range the export recorded
    np.testing.assert_allclose(mid, gated, atol=1e-4, rtol=0)
    assert min(np.abs(mid - adapted).max(), np.abs(mid - base).max()) > 1e-3
    # Upstream's loop on fm_decoder.onnx alone is the full adapter.
    full = contract_sample(out, tokens, prompt_tokens, prompt_features, 4, x0)
    np.testing.assert_allclose(full, adapted, atol=1e-4, rtol=0)
    with pytest.raises(OnnxModelError, match="fm_decoder_base.onnx"):
        OnnxZipVoice(workdir / "onnx_base", lora_t_range=(0.0, 0.5))


def test_onnx_end_to_end_writes_wav_of_expected_length(workdir, capsys):
    out = workdir / "onnx_distill"
    assert export_cli(workdir, out, "--vocoder-path", str(VOCOS_DIR), "--tokenizer", "simple",
                      "--int8", "0", model="distill") == 0  # fmt: skip
    assert (out / "vocoder.onnx").is_file()
    wav_a, wav_b = workdir / "onnx_a.wav", workdir / "onnx_b.wav"
    for wav, flag in ((wav_a, "--model-dir"), (wav_b, "--onnx-model-dir")):
        code = infer_zipvoice_onnx.main(
            [
                flag, str(out), "--prompt-wav", str(workdir / "prompt.wav"),
                "--prompt-text", PROMPT_TEXT, "--text", TEXT, "--res-wav-path", str(wav),
            ]
        )  # fmt: skip
        assert code == 0
    assert "RTF" in capsys.readouterr().out
    wave, sr = sf.read(wav_a, dtype="float32")
    assert sr == 24000 and wave.shape == (expected_samples(workdir),)
    np.testing.assert_array_equal(wave, sf.read(wav_b, dtype="float32")[0])
    missing = infer_zipvoice_onnx.main(
        ["--model-dir", str(out), "--onnx-int8", "1", "--test-list", "x.tsv"]
    )
    assert missing == 1
    assert "lacks text_encoder_int8.onnx" in capsys.readouterr().err


def test_hub_download_of_the_published_onnx_files(workdir, tmp_path, monkeypatch, capsys):
    """Without --model-dir the published files of --model-name come from the hub through its
    cache (here filled in the layout huggingface_hub writes, snapshots/<commit>/ + refs/main,
    with no network: HF_HUB_OFFLINE); offline without a cache, one clear line."""
    import shutil

    from zipvoice.onnx import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    published = workdir / "onnx_base"  # upstream's file names, exported above
    commit = "0" * 40
    repo_dir = tmp_path / "cache" / "models--k2-fsa--ZipVoice"
    snapshot = repo_dir / "snapshots" / commit / "zipvoice"
    snapshot.mkdir(parents=True)
    for name in hub.onnx_file_names(True):
        shutil.copyfile(published / name, snapshot / name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    folder = hub.download_onnx_model("zipvoice", int8=True)
    assert folder == snapshot
    assert OnnxZipVoice(folder, int8=True).feat_dim == 100

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    code = infer_zipvoice_onnx.main(
        ["--model-name", "zipvoice_distill", "--prompt-wav", str(workdir / "prompt.wav"),
         "--prompt-text", PROMPT_TEXT, "--text", TEXT, "--res-wav-path", str(tmp_path / "o.wav")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "zipvoice_distill/text_encoder.onnx" in err and "--model-dir" in err
    assert err.count("\n") == 1 and not (tmp_path / "o.wav").exists()
