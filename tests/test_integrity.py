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
from zipvoice.bin import onnx_export, train_zipvoice
from zipvoice.bin import verify_folder as verify_cli
from zipvoice.models.loader import load_pretrained
from zipvoice.models.modules.adapter_folder import read_adapter_meta
from zipvoice.onnx.export import export_model
from zipvoice.onnx.runtime import OnnxZipVoice
from zipvoice.tokenizer.coverage import TokenCoverageError, check_token_coverage
from zipvoice.tokenizer.token_file import extend_token_file, read_token_file, write_token_file
from zipvoice.tokenizer.tokenizer import JAPANESE_MARKS, get_tokenizer
from zipvoice.utils.folders import OutputInsideInputError, refuse_output_inside_inputs
from zipvoice.utils.lock import LOCK_FILE, FolderLock, FolderLockedError
from zipvoice.utils.manifest import (
    MANIFEST_FILE,
    ManifestError,
    read_manifest,
    verify_folder,
    write_manifest,
)
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
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def tensor_data_offset(model_pt: Path) -> int:
    """An offset inside the bytes of the largest tensor stored in a torch zip checkpoint."""
    with zipfile.ZipFile(model_pt) as archive:
        info = max(
            (i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size
        )
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
    assert verify_folder(folder).hashed == 2
    assert verify_folder(folder).cached == 2  # the first successful check is remembered

    (folder / "text_encoder_int8.onnx").write_bytes(b"stale")
    with pytest.raises(ManifestError, match=r"text_encoder_int8\.onnx .*\(not listed"):
        verify_folder(folder)
    (folder / "text_encoder_int8.onnx").unlink()
    (folder / "result.wav").write_bytes(b"RIFF")  # the user's output, not part of a model
    assert verify_folder(folder) is not None
    (folder / "sub" / "b.txt").write_text("hello!")
    with pytest.raises(ManifestError, match=r"sub/b\.txt .*does not belong to this export"):
        verify_folder(folder, hashes=False)  # sizes are always compared
    (folder / "sub" / "b.txt").write_text("jello")  # same size, other bytes
    assert verify_folder(folder, hashes=False) is not None
    with pytest.raises(ManifestError, match=r"sub/b\.txt .*sha256"):
        verify_folder(folder)  # changed mtime: the cache entry no longer applies
    (folder / "a.bin").unlink()
    with pytest.raises(ManifestError, match=r"lacks a\.bin"):
        verify_folder(folder, only=["a.bin"])


def test_folder_without_manifest_loads_and_exp_dir_allows_unlisted_files(tmp_path):
    plain = copy_model_dir(tmp_path / "hub")
    assert verify_folder(plain) is None
    model, *_ = load_pretrained("zipvoice", plain)  # a hub download: no manifest, no error
    assert model is not None
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "checkpoint-2.pt").write_bytes(b"x" * 10)
    write_manifest(exp, "exp-dir", files=[exp / "checkpoint-2.pt"])
    (exp / "checkpoint-4.pt").write_bytes(b"y" * 10)  # a save after the manifest
    (exp / "log").mkdir()
    (exp / "log" / "log-train.txt").write_text("step 1")
    assert verify_folder(exp).hashed == 1


def test_verify_folder_command_reports_damage_naming_the_file(tmp_path, capsys):
    folder = copy_model_dir(tmp_path / "model")
    write_manifest(folder, "model")
    assert verify_cli.main([str(folder), str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ok (model, 3 files" in out and "no manifest" in out
    flip_byte(folder / "model.pt", tensor_data_offset(folder / "model.pt"))
    assert verify_cli.main([str(folder)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.pt does not belong" in err and "sha256" in err
    assert verify_cli.main(["--require-manifest", "1", str(tmp_path)]) == 1


def test_bit_flip_in_a_model_weight_is_detected_on_first_use(tmp_path):
    folder = copy_model_dir(tmp_path / "model")
    write_manifest(folder, "model")
    load_pretrained("zipvoice", folder)
    offset = tensor_data_offset(folder / "model.pt")
    flip_byte(folder / "model.pt", offset)
    torch.load(folder / "model.pt", weights_only=True)  # torch itself does not notice
    with pytest.raises(ManifestError, match=r"model\.pt .*this model folder.*sha256"):
        load_pretrained("zipvoice", folder)


def test_bit_flip_in_adapter_weights_is_detected(tmp_path):
    model_dir = copy_model_dir(tmp_path / "model")
    adapter = make_adapter(model_dir, tmp_path / "adapter", use_dora=False)
    assert MANIFEST_FILE in {p.name for p in adapter.iterdir()}
    read_adapter_meta(adapter)
    weights = adapter / "adapter_model.safetensors"
    flip_byte(weights, weights.stat().st_size - 3)  # inside the last tensor's bytes
    with pytest.raises(ManifestError, match=r"adapter_model\.safetensors .*this adapter"):
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
        "model.json",
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
    with pytest.raises(
        ManifestError, match=r"mixed/fm_decoder\.onnx does not belong to this export"
    ):
        OnnxZipVoice(mixed)


def test_export_over_another_models_export_leaves_a_folder_that_is_refused(exports, tmp_path):
    """The issue's case: a second export replaces the text encoder and decoder but leaves the
    first one's *_int8.onnx; the reader must not run them together."""
    folder = tmp_path / "onnx"
    shutil.copytree(exports["zipvoice"], folder)
    model, _, token_file, _ = load_pretrained("zipvoice", copy_model_dir(tmp_path / "d", "distill"))
    with torch.no_grad():
        export_model(model, folder, token_file, int8=False)
    with pytest.raises(ManifestError, match=r"_int8\.onnx.* \(not listed"):
        OnnxZipVoice(folder, int8=True)


def test_bit_flip_in_an_onnx_weight_is_detected(exports, tmp_path):
    folder = tmp_path / "onnx"
    shutil.copytree(exports["distill"], folder)
    OnnxZipVoice(folder)
    path = folder / "fm_decoder.onnx"
    flip_byte(path, path.stat().st_size // 2)
    with pytest.raises(ManifestError, match=r"fm_decoder\.onnx .*sha256"):
        OnnxZipVoice(folder)


# ------------------------------------------------------------------ outputs vs inputs


def train_argv(exp_dir: Path, checkpoint: Path, **overrides: object) -> list[str]:
    """A small training command; the refusals tested here come before any data is read."""
    flags: dict[str, object] = {
        "world-size": 1,
        "checkpoint": checkpoint,
        "model-config": checkpoint.parent / "model.json",
        "token-file": checkpoint.parent / "tokens.txt",
        "tokenizer": "simple",
        "use-lora": 1,
        "num-iters": 2,
        "train-manifest": exp_dir.parent / "missing_cuts_train.jsonl.gz",
        "dev-manifest": exp_dir.parent / "missing_cuts_dev.jsonl.gz",
        "exp-dir": exp_dir,
        "num-workers": 0,
        "tensorboard": 0,
    }
    flags.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return [arg for key, value in flags.items() for arg in (f"--{key}", str(value))]


def test_train_into_the_pretrained_model_folder_is_refused_unchanged(tmp_path, caplog):
    base = copy_model_dir(tmp_path / "zipvoice")
    (tmp_path / "tokens_ja.txt").write_text("_\t0\na\t1\n")
    before = snapshot(base)
    argv = train_argv(base, base / "model.pt", token_file=tmp_path / "tokens_ja.txt")
    assert train_zipvoice.main(argv) == 1
    assert "--exp-dir" in caplog.text and "is the input folder" in caplog.text
    assert snapshot(base) == before
    assert sorted(p.name for p in base.iterdir()) == ["model.json", "model.pt", "tokens.txt"]


def test_onnx_export_into_the_model_folder_is_refused_unchanged(tmp_path, capsys):
    base = copy_model_dir(tmp_path / "zipvoice")
    before = snapshot(base)
    for out in (base, base / "onnx"):
        assert onnx_export.main(["--model-dir", str(base), "--onnx-model-dir", str(out)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --onnx-model-dir") and "\n" not in err
        assert snapshot(base) == before
    assert not (base / "onnx").exists()


def test_output_folder_rule(tmp_path):
    model = copy_model_dir(tmp_path / "model")
    (tmp_path / "link").symlink_to(model)
    refuse_output_inside_inputs("--exp-dir", tmp_path / "exp", {"--checkpoint": model / "model.pt"})
    refuse_output_inside_inputs("--exp-dir", tmp_path, {"--checkpoint": model / "model.pt"})
    refuse_output_inside_inputs("--exp-dir", model / "ft", {"--checkpoint": model / "model.pt"})
    with pytest.raises(OutputInsideInputError, match="is the input folder"):
        refuse_output_inside_inputs("--exp-dir", model, {"--checkpoint": model / "model.pt"})
    refuse_output_inside_inputs("--exp-dir", model, {"--lora-path": None})
    with pytest.raises(OutputInsideInputError, match="--exp-dir .* is the input folder"):
        refuse_output_inside_inputs("--exp-dir", tmp_path / "link", {"--model-dir": model})
    with pytest.raises(OutputInsideInputError, match="lies inside the input folder"):
        refuse_output_inside_inputs("--out", model / "a" / "b", {"--model-dir": tmp_path / "link"})


# ------------------------------------------------------------------ one run per folder

HOLD_LOCK = (
    "import sys; from zipvoice.utils.lock import FolderLock; "
    "FolderLock(sys.argv[1], 'training run').acquire(); print('locked', flush=True); "
    "sys.stdin.readline()"
)


def test_second_run_names_the_first_and_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    exp = tmp_path / "exp"
    base = copy_model_dir(tmp_path / "zipvoice")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(exp)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert first.stdout.readline().strip() == "locked"
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "zipvoice.bin.train_zipvoice",
                *train_argv(exp, base / "model.pt"),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert second.returncode == 1
        errors = [line for line in second.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1, second.stderr
        assert f"is in use by another training run: PID {first.pid} on " in errors[0]
        assert "started 20" in errors[0]
        assert not list(exp.glob("checkpoint-*")) and not (exp / "log").exists()
        with pytest.raises(FolderLockedError, match=f"PID {first.pid}"):
            FolderLock(exp).acquire()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with caplog.at_level("WARNING"), FolderLock(exp, "training run") as lock:
        assert json.loads((exp / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert lock.path == exp / LOCK_FILE
    assert f"taking over the lock of a run that ended without releasing it (PID {first.pid}" in (
        caplog.text
    )
    assert (exp / LOCK_FILE).read_text() == ""  # released cleanly: nothing to take over
    with FolderLock(exp):
        pass


# ------------------------------------------------------------------ token-file coverage


def test_token_file_missing_accent_marks_is_refused_listing_them(tmp_path):
    english = PARITY / "tokens.txt"
    tokenizer = get_tokenizer("japanese", english)
    with pytest.raises(TokenCoverageError) as caught:
        check_token_coverage(tokenizer, "japanese", english)
    message = str(caught.value)
    listed = message.split("emits: ", 1)[1].split(";", 1)[0].split()
    missing_marks = [m for m in JAPANESE_MARKS if m not in read_token_file(english)]
    assert missing_marks and set(missing_marks) <= set(listed)
    assert "prepare_token_file --tokenizer japanese" in message
    covering = tmp_path / "tokens_ja.txt"
    write_token_file(covering, extend_token_file(read_token_file(english), tokenizer.symbols()))
    assert check_token_coverage(get_tokenizer("japanese", covering), "japanese", covering) == []
    assert check_token_coverage(get_tokenizer("simple", english), "simple", english) == []


def test_training_with_an_uncovering_token_file_stops_before_any_step(tmp_path, caplog):
    base = copy_model_dir(tmp_path / "zipvoice")
    exp = tmp_path / "exp"
    assert train_zipvoice.main(train_argv(exp, base / "model.pt", tokenizer="japanese")) == 1
    assert "lacks" in caplog.text and " [ ] " in caplog.text.replace("#", " ")
    assert not list(exp.glob("checkpoint-*"))


# ------------------------------------------------------------------ disk and port


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB tmpfs (root only), unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        # Lazy: torch's writer may still hold the deleted temp file open via the traceback.
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_torch_save_on_a_full_disk_becomes_a_disk_full_error(tiny_disk):
    from zipvoice.utils.checkpoint import save_checkpoint

    (tiny_disk / "exp").mkdir()
    target = tiny_disk / "exp" / "checkpoint-2.pt"
    with pytest.raises((RuntimeError, OSError)) as caught:
        save_checkpoint({"model": {"w": torch.zeros(1 << 19)}}, target)  # 2 MiB
    failure = write_failure(caught.value, target.parent)
    assert isinstance(failure, OSError) and failure.errno == errno.ENOSPC
    assert "no space left" in str(failure).lower() and str(target.parent) in str(failure)
    assert "\n" not in str(failure)
    assert list((tiny_disk / "exp").iterdir()) == []  # no half-written checkpoint
    assert write_failure(RuntimeError("a bug"), target.parent) is None


def test_busy_master_port_is_one_line_naming_it(tmp_path, caplog):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"--master-port {port} is in use"):
            check_port_free(port, "127.0.0.1")
        base = copy_model_dir(tmp_path / "zipvoice")
        argv = train_argv(tmp_path / "exp", base / "model.pt", world_size=2, master_port=port)
        assert train_zipvoice.main(argv) == 1
        assert f"error: --master-port {port} is in use" in caplog.text
    check_port_free(port, "127.0.0.1")
