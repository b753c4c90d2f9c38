"""Vocos-compatible vocoder: reference parity, loading paths, ONNX export."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from zipvoice.models import vocoder as vocoder_module
from zipvoice.models.vocoder import ISTFTHead, VocoderLoadError, Vocos, load_vocoder


@pytest.fixture(scope="module")
def decode_case(parity_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(parity_dir / "vocos" / "decode_case.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference_vocoder(parity_dir: Path) -> Vocos:
    return load_vocoder(parity_dir / "vocos")


def _copy_folder(parity_dir: Path, dest: Path, names: tuple[str, ...]) -> Path:
    dest.mkdir()
    for name in names:
        shutil.copyfile(parity_dir / "vocos" / name, dest / name)
    return dest


def test_decode_matches_reference(reference_vocoder: Vocos, decode_case: dict) -> None:
    assert not reference_vocoder.training
    with torch.no_grad():
        wave = reference_vocoder.decode(decode_case["mel"])
        via_forward = reference_vocoder(decode_case["mel"])
    assert wave.shape == decode_case["wave"].shape == (1, decode_case["mel"].shape[-1] * 256)
    torch.testing.assert_close(wave, decode_case["wave"], atol=1e-4, rtol=0)
    torch.testing.assert_close(via_forward, wave)


def test_inverse_stft_matches_torch_istft() -> None:
    """The matmul/overlap-add formulation equals torch's istft ('same' trimming aside)."""
    torch.manual_seed(0)
    head = ISTFTHead(dim=8, n_fft=64, hop_length=16)
    frames = 12
    spec = torch.randn(2, 33, frames, dtype=torch.complex64)
    ours = head.inverse_stft(torch.cat([spec.real, spec.imag], dim=1))
    window = torch.hann_window(64)
    full = torch.istft(spec, 64, 16, window=window, center=True)  # trims n_fft/2 each side
    # 'same' trims (64-16)/2 = 24 instead of 32, so ours is 8 samples longer at each end
    torch.testing.assert_close(ours[:, 8 : 8 + full.shape[-1]], full, atol=1e-5, rtol=0)
    assert ours.shape == (2, frames * 16)


def test_folder_missing_files_are_named(parity_dir: Path, tmp_path: Path) -> None:
    no_weights = _copy_folder(parity_dir, tmp_path / "a", ("config.yaml",))
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        load_vocoder(no_weights)
    no_config = _copy_folder(parity_dir, tmp_path / "b", ("pytorch_model.bin",))
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_vocoder(no_config)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vocoder(tmp_path / "nowhere")


def test_mismatched_or_corrupt_weights_are_refused(parity_dir: Path, tmp_path: Path) -> None:
    folder = _copy_folder(parity_dir, tmp_path / "v", ("config.yaml", "pytorch_model.bin"))
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del state["backbone.convnext.1.gamma"]
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(VocoderLoadError, match=r"missing keys \['backbone.convnext.1.gamma'\]"):
        load_vocoder(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(VocoderLoadError, match="cannot read vocoder weights .*pytorch_model.bin"):
        load_vocoder(folder)
    config = (parity_dir / "vocos" / "config.yaml").read_text()
    (folder / "config.yaml").write_text(config.replace("num_layers: 2", "num_layers: 3"))
    shutil.copyfile(parity_dir / "vocos" / "pytorch_model.bin", folder / "pytorch_model.bin")
    with pytest.raises(VocoderLoadError, match="missing keys"):
        load_vocoder(folder)


def test_safetensors_folder(
    parity_dir: Path, tmp_path: Path, reference_vocoder: Vocos, decode_case: dict
) -> None:
    from safetensors.torch import save_file

    folder = _copy_folder(parity_dir, tmp_path / "st", ("config.yaml",))
    state = torch.load(parity_dir / "vocos" / "pytorch_model.bin", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    vocoder = load_vocoder(folder)
    with torch.no_grad():
        wave = vocoder.decode(decode_case["mel"])
    torch.testing.assert_close(wave, decode_case["wave"], atol=1e-4, rtol=0)


def test_download_path_uses_hub(
    parity_dir: Path, monkeypatch: pytest.MonkeyPatch, decode_case: dict
) -> None:
    import huggingface_hub

    requested: list[tuple[str, str]] = []

    def fake_download(repo_id: str, filename: str, **kwargs: object) -> str:
        requested.append((repo_id, filename))
        return str(parity_dir / "vocos" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    vocoder = load_vocoder(None)
    assert requested == [
        ("charactr/vocos-mel-24khz", "config.yaml"),
        ("charactr/vocos-mel-24khz", "pytorch_model.bin"),
    ]
    assert vocoder_module.HUB_REPO == "charactr/vocos-mel-24khz"
    with torch.no_grad():
        wave = vocoder.decode(decode_case["mel"])
    torch.testing.assert_close(wave, decode_case["wave"], atol=1e-4, rtol=0)


def test_onnx_export_dynamic_frames(reference_vocoder: Vocos, tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    path = tmp_path / "vocos.onnx"
    example = torch.randn(1, 100, 20)
    torch.onnx.export(
        reference_vocoder,
        (example,),
        str(path),
        input_names=["mel"],
        output_names=["wave"],
        dynamic_shapes={"mel": {0: torch.export.Dim("batch"), 2: torch.export.Dim("frames")}},
        dynamo=True,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    torch.manual_seed(1)
    for batch, frames in ((1, 7), (2, 57)):
        mel = torch.randn(batch, 100, frames) - 2.0
        (onnx_wave,) = session.run(None, {"mel": mel.numpy()})
        with torch.no_grad():
            torch_wave = reference_vocoder.decode(mel).numpy()
        assert onnx_wave.shape == (batch, frames * 256)
        np.testing.assert_allclose(onnx_wave, torch_wave, atol=1e-3, rtol=0)
