"""A run's files belong together: manifests, folder locks, outputs kept out of inputs,
token-file coverage, and clear errors for a full disk and a busy DDP port.

Everything here uses real files: the parity fixtures' tiny models copied into temporary model
folders, real ONNX exports, a real second process holding a lock, a real tmpfs, a real socket.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import PARITY
from tests.helpers import make_adapter
from zipvoice.bin import onnx_export, verify_folder
from zipvoice.bin import train_zipvoice
from zipvoice.models.loader import load_pretrained
from zipvoice.tokenizer.coverage import TokenCoverageError, check_token_coverage
from zipvoice.tokenizer.token_file import extend_token_file, read_token_file, write_token_file
from zipvoice.tokenizer.tokenizer import JAPANESE_MARKS, get_tokenizer
from zipvoice.utils.adapter_io import read_adapter_meta
from zipvoice.utils.folders import OutputInsideInputError, refuse_output_inside_inputs
from zipvoice.utils.infer_onnx import OnnxZipVoice
from zipvoice.utils.lock import LOCK_FILE, FolderLock, FolderLockedError
from zipvoice.utils.manifest import (
    MANIFEST_FILE,
    ManifestError,
    read_manifest,
    verify_folder as verify,
    write_manifest,
)
from zipvoice.utils.onnx_export import export_model
from zipvoice.utils.resources import PortInUseError, check_port_free, write_failure

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test starts with an empty verification cache of its own."""
    monkeypatch.setenv("ZIPVOICE_VERIFY_CACHE", str(tmp_path / "cache" / "verified.json"))
    monkeypatch.delenv("ZIPVOICE_VERIFY", raising=False)


def copy_model_dir(folder: Path, variant: str = "zipvoice") -> Path:
    """A released-style model folder with real copies (not links) of the fixture files."""
    folder.mkdir(parents=True)
    shutil.copyfile(PARITY / variant / "model.pt", folder / "model.pt")
    shutil.copyfile(PARITY / variant / "model.json", folder / "model.json")
    shutil.copyfile(PARITY / "tokens.txt", folder / "tokens.txt")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def tensor_data_offset(model_pt: Path) -> int:
    """An offset inside the bytes of the largest tensor stored in a torch zip checkpoint."""
    with zipfile.ZipFile(model_pt) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    with open(model_pt, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


# ------------------------------------------------------------------ manifests


def test_manifest_lists_files_and_readers_name_the_odd_one(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"\1" * 100)
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text("hello")
    write_manifest(folder, "onnx", base_fingerprint="f" * 64, command="test")
    manifest = read_manifest(folder)
    assert sorted(manifest["files"]) == ["a.bin", "sub/b.txt"]
    assert manifest["files"]["a.bin"]["size"] == 100
    assert manifest["base_model"]["state_dict_sha256"] == "f" * 64
    assert manifest["producer"]["command"] == "test"
    assert verify(folder).hashed == 2
    assert verify(folder).cached == 2  # the first successful check is remembered

    (folder / "text_encoder_int8.onnx").write_bytes(b"stale")
    with pytest.raises(ManifestError, match=r"text_encoder_int8\.onnx in .*\(not listed"):
        verify(folder)
    (folder / "text_encoder_int8.onnx").unlink()
    (folder / "sub" / "b.txt").write_text("hello!")
    with pytest.raises(ManifestError, match=r"sub/b\.txt in .*does not belong to this export"):
        verify(folder, hashes=False)  # sizes are always compared
    (folder / "sub" / "b.txt").write_text("jello")  # same size, other bytes
    assert verify(folder, hashes=False) is not None
    with pytest.raises(ManifestError, match=r"sub/b\.txt .*sha256"):
        verify(folder)  # changed mtime: the cache entry no longer applies
    (folder / "a.bin").unlink()
    with pytest.raises(ManifestError, match=r"lacks a\.bin"):
        verify(folder, only=["a.bin"])


def test_folder_without_manifest_loads_and_exp_dir_allows_unlisted_files(tmp_path):
    plain = copy_model_dir(tmp_path / "hub")
    assert verify(plain) is None
    model, *_ = load_pretrained("zipvoice", plain)  # a hub download: no manifest, no error
    assert model is not None
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "checkpoint-2.pt").write_bytes(b"x" * 10)
    write_manifest(exp, "exp-dir", files=[exp / "checkpoint-2.pt"])
    (exp / "checkpoint-4.pt").write_bytes(b"y" * 10)  # a save after the manifest
    (exp / "log").mkdir()
    (exp / "log" / "log-train.txt").write_text("step 1")
    assert verify(exp).hashed == 1


def test_verify_folder_command_reports_damage_naming_the_file(tmp_path, capsys):
    folder = copy_model_dir(tmp_path / "model")
    write_manifest(folder, "model")
    assert verify_folder.main([str(folder), str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ok (model, 3 files" in out and "no manifest" in out
    flip_byte(folder / "model.pt", tensor_data_offset(folder / "model.pt"))
    assert verify_folder.main([str(folder)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.pt in" in err and "sha256" in err
    assert verify_folder.main(["--require-manifest", "1", str(tmp_path)]) == 1


def test_bit_flip_in_a_model_weight_is_detected_on_first_use(tmp_path):
    folder = copy_model_dir(tmp_path / "model")
    write_manifest(folder, "model")
    load_pretrained("zipvoice", folder)
    offset = tensor_data_offset(folder / "model.pt")
    flip_byte(folder / "model.pt", offset)
    torch.load(folder / "model.pt", weights_only=True)  # torch itself does not notice
    with pytest.raises(ManifestError, match=r"model\.pt in .*this model folder.*sha256"):
        load_pretrained("zipvoice", folder)


def test_bit_flip_in_adapter_weights_is_detected(tmp_path):
    model_dir = copy_model_dir(tmp_path / "model")
    adapter = make_adapter(model_dir, tmp_path / "adapter", use_dora=False)
    assert MANIFEST_FILE in {p.name for p in adapter.iterdir()}
    read_adapter_meta(adapter)
    weights = adapter / "adapter_model.safetensors"
    flip_byte(weights, weights.stat().st_size - 3)  # inside the last tensor's bytes
    with pytest.raises(ManifestError, match=r"adapter_model\.safetensors in .*this adapter"):
        read_adapter_meta(adapter)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """Two real exports of different models: zipvoice with int8 copies, and distill."""
    root = tmp_path_factory.mktemp("exports")
    folders = {}
    for variant, int8 in (("zipvoice", True), ("distill", False)):
        model_dir = copy_model_dir(root / f"model-{variant}", variant)
        model, _, token_file, _ = load_pretrained("zipvoice", model_dir)
        with torch.no_grad():
            export_model(model, root / variant, token_file, int8=int8)
        folders[variant] = root / variant
    return folders


def test_onnx_export_manifest_lists_what_it_wrote(exports, tmp_path):
    manifest = read_manifest(exports["zipvoice"])
    assert manifest["kind"] == "onnx"
    assert sorted(manifest["files"]) == [
        "fm_decoder.onnx",
        "fm_decoder_int8.onnx",
        "text_encoder.onnx",
        "text_encoder_int8.onnx",
        "tokens.txt",
    ]
    assert len(manifest["base_model"]["state_dict_sha256"]) == 64
    OnnxZipVoice(exports["zipvoice"])


def test_onnx_folder_with_a_file_of_another_export_is_refused(exports, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(exports["zipvoice"], mixed)
    shutil.copyfile(exports["distill"] / "fm_decoder.onnx", mixed / "fm_decoder.onnx")
    with pytest.raises(ManifestError, match=r"fm_decoder\.onnx in .* does not belong to this "
                       r"export \(its size"):
        OnnxZipVoice(mixed)


def test_export_over_another_models_export_leaves_a_folder_that_is_refused(exports, tmp_path):
    """The issue's case: a second export replaces the text encoder and decoder but leaves the
    first one's *_int8.onnx; the reader must not run them together."""
    folder = tmp_path / "onnx"
    shutil.copytree(exports["zipvoice"], folder)
    model, _, token_file, _ = load_pretrained("zipvoice", copy_model_dir(tmp_path / "d", "distill"))
    with torch.no_grad():
        export_model(model, folder, token_file, int8=False)
    with pytest.raises(ManifestError, match=r"_int8\.onnx.* in .*\(not listed"):
        OnnxZipVoice(folder, int8=True)


def test_bit_flip_in_an_onnx_weight_is_detected(exports, tmp_path):
    folder = tmp_path / "onnx"
    shutil.copytree(exports["distill"], folder)
    OnnxZipVoice(folder)
    path = folder / "fm_decoder.onnx"
    flip_byte(path, path.stat().st_size // 2)
    with pytest.raises(ManifestError, match=r"fm_decoder\.onnx in .*sha256"):
        OnnxZipVoice(folder)
