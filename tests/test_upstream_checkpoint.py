"""Upstream ZipVoice training checkpoints (epoch-N.pt, checkpoint-N.pt) load safely.

The test writes one the way upstream's `save_checkpoint` lays it out: the state dicts plus the
run's parameters as top-level entries, `exp_dir` and other flags as pathlib paths.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import PARITY
from tests.data_fixtures import *  # noqa: F403 - session fixtures
from zipvoice.models.modules.adapter_folder import fingerprint_state_dict
from zipvoice.utils.checkpoint import CheckpointError, load_checkpoint_state, safe_torch_load

MODEL_DIR = PARITY / "zipvoice"


def _upstream_checkpoint(folder: Path, name: str = "epoch-11.pt") -> tuple[Path, dict]:
    """An upstream-layout training checkpoint of the parity model, and its model state."""
    state = torch.load(MODEL_DIR / "model.pt", weights_only=True)["model"]
    model = torch.nn.Linear(2, 2)  # stands in for the optimiser's parameter groups
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    checkpoint = {
        "model": state,
        "model_avg": {k: v.float().clone() for k, v in state.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": {"base_lrs": [0.02], "epoch": 11, "batch": 4000},
        "grad_scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 3},
        "sampler": {"epoch": 11, "drop_last": True, "world_size": 1, "rank": 0, "seed": 0},
        "exp_dir": pathlib.PosixPath("exp/zipvoice"),
        "manifest_dir": pathlib.PurePosixPath("data/fbank"),
        "token_file": "data/tokens_emilia.txt",
        "batch_idx_train": 4000,
        "best_valid_loss": 0.123,
        "env_info": {"torch-version": "2.3.0", "hostname": "node-1"},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    torch.save(checkpoint, path)
    (folder / "tokens.txt").symlink_to(PARITY / "tokens.txt")
    (folder / "model.json").symlink_to(MODEL_DIR / "model.json")
    return path, state


def _rename_global(path: Path, old: bytes, new: bytes) -> None:
    """Rewrite the pickle's class reference, as a checkpoint saved elsewhere would name it."""
    with zipfile.ZipFile(path) as src:
        entries = [(info, src.read(info)) for info in src.infolist()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as dst:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new)
            dst.writestr(info, data)
    path.write_bytes(buffer.getvalue())


def test_upstream_checkpoint_loads_its_model_weights(tmp_path: Path):
    path, state = _upstream_checkpoint(tmp_path)
    loaded = load_checkpoint_state(path)
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    everything = safe_torch_load(path)
    assert everything["exp_dir"] == pathlib.PosixPath("exp/zipvoice")
    assert everything["batch_idx_train"] == 4000 and everything["optimizer"]["state"]


def test_paths_named_by_other_pythons_and_systems_load(tmp_path: Path):
    path, _ = _upstream_checkpoint(tmp_path)
    # Python 3.13 pickles paths from pathlib._local; a Windows run pickles WindowsPath.
    _rename_global(path, b"cpathlib\nPosixPath\n", b"cpathlib._local\nWindowsPath\n")
    loaded = safe_torch_load(path)
    assert str(loaded["exp_dir"]).replace("\\", "/") == "exp/zipvoice"
    expected = pathlib.WindowsPath if os.name == "nt" else pathlib.PureWindowsPath
    assert type(loaded["exp_dir"]) is expected


class _RunsShellOnLoad:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_beside_the_allowed_paths_is_still_refused(tmp_path: Path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "epoch-1.pt"
    payload = _RunsShellOnLoad(marker)
    torch.save({"model": {"w": torch.zeros(1)}, "exp_dir": pathlib.Path("x"), "p": payload}, bad)
    with pytest.raises(CheckpointError, match="refused") as info:
        load_checkpoint_state(bad)
    assert "system" in str(info.value) and str(bad) in str(info.value)
    assert not marker.exists()


def test_fine_tuning_starts_from_an_upstream_checkpoint(
    japanese_fbank_manifests, tmp_path: Path, caplog
):
    from zipvoice.bin.train_zipvoice import main

    path, state = _upstream_checkpoint(tmp_path / "upstream_exp")
    data = japanese_fbank_manifests
    exp_dir = tmp_path / "ft"
    flags = {
        "checkpoint": path,
        "model-config": MODEL_DIR / "model.json",
        "finetune": 1,
        "use-lora": 1,
        "lora-rank": 4,
        "lora-alpha": 8,
        "num-iters": 2,
        "save-every-n": 2,
        "valid-interval": 2,
        "max-duration": 6,
        "tokenizer": "japanese",
        "token-file": data["token_file"],
        "dataset": "custom",
        "train-manifest": data["train_cuts"],
        "dev-manifest": data["dev_cuts"],
        "exp-dir": exp_dir,
        "num-workers": 0,
        "tensorboard": 0,
    }
    argv = [part for key, value in flags.items() for part in (f"--{key}", str(value))]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    assert "DoRA on 30 decoder projections" in caplog.text  # --use-dora defaults to 1
    meta = json.loads((exp_dir / "adapter" / "zipvoice_adapter.json").read_text())
    assert meta["base_fingerprint"] == fingerprint_state_dict(state)
    assert meta["base_checkpoint"] == str(path)
