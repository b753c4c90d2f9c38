"""Checkpoint reading/writing and model loading: safety, clear errors, embedding extension."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from zipvoice.models import loader
from zipvoice.models.loader import ModelConfigError, build_model, load_pretrained
from zipvoice.tokenizer.token_file import read_token_file
from zipvoice.utils.checkpoint import (
    CheckpointError,
    load_checkpoint_state,
    load_model_state,
    save_checkpoint,
    save_safetensors_atomic,
)


@pytest.fixture(scope="module")
def small_config(parity_dir: Path) -> dict:
    return json.loads((parity_dir / "zipvoice" / "model.json").read_text())


@pytest.fixture(scope="module")
def reference_state(parity_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint_state(parity_dir / "zipvoice" / "model.pt")


def _model_folder(tmp_path: Path, parity_dir: Path, kind: str = "zipvoice") -> Path:
    """A released-model layout (model.pt, model.json, tokens.txt) made of links."""
    folder = tmp_path / kind
    folder.mkdir()
    (folder / "model.pt").symlink_to(parity_dir / kind / "model.pt")
    (folder / "model.json").symlink_to(parity_dir / kind / "model.json")
    (folder / "tokens.txt").symlink_to(parity_dir / "tokens.txt")
    return folder


class _RunsShellOnLoad:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "model.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _RunsShellOnLoad(marker)}, bad)
    with pytest.raises(CheckpointError, match="refused") as info:
        load_checkpoint_state(bad)
    assert str(bad) in str(info.value)
    assert not marker.exists()


def test_missing_and_garbage_files_give_clear_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint_state(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_checkpoint_state(garbage)
    no_tensors = tmp_path / "meta.pt"
    torch.save({"model": {"step": 3}}, no_tensors)
    with pytest.raises(CheckpointError, match="not tensors"):
        load_checkpoint_state(no_tensors)


def test_module_prefix_and_bare_state_dicts(tmp_path: Path, reference_state):
    ddp = tmp_path / "ddp.pt"
    torch.save({"model": {f"module.{k}": v for k, v in reference_state.items()}}, ddp)
    bare = tmp_path / "bare.pt"
    torch.save(reference_state, bare)
    for path in (ddp, bare):
        loaded = load_checkpoint_state(path)
        assert list(loaded) == list(reference_state)
        assert all(torch.equal(loaded[k], reference_state[k]) for k in reference_state)


def test_training_checkpoint_with_extra_entries_loads_the_model(tmp_path: Path, reference_state):
    path = tmp_path / "checkpoint-10.pt"
    save_checkpoint(
        {"model": reference_state, "optimizer": {"state": {}}, "rng": [(1, 2.5)], "step": 10},
        path,
    )
    assert set(load_checkpoint_state(path)) == set(reference_state)


def test_safetensors_round_trip_with_metadata(tmp_path: Path, reference_state):
    path = tmp_path / "model.safetensors"
    save_safetensors_atomic(reference_state, path, metadata={"base": "zipvoice", "step": 5})
    loaded = load_checkpoint_state(path)
    assert set(loaded) == set(reference_state)
    assert all(torch.equal(loaded[k], reference_state[k]) for k in reference_state)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"base": "zipvoice", "step": "5"}
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_save_is_atomic_and_keeps_the_old_file_on_failure(tmp_path: Path):
    path = tmp_path / "model.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}}, path)
    with pytest.raises(Exception):  # noqa: B017 - any pickling error will do
        save_checkpoint({"model": {"w": torch.zeros(2)}, "bad": lambda: None}, path)
    assert torch.equal(load_checkpoint_state(path)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_mismatched_config_names_the_first_bad_keys(small_config, reference_state):
    wider = dict(small_config["model"], text_encoder_dim=48)
    model = build_model(wider, vocab_size=38, pad_id=0)
    with pytest.raises(CheckpointError) as info:
        load_model_state(model, reference_state, "ckpt/model.pt")
    message = str(info.value)
    assert "ckpt/model.pt" in message and "model.json" in message
    assert "shape mismatch" in message and "text_encoder.in_proj.weight" in message

    distill_model = build_model(small_config, vocab_size=38, pad_id=0, distill=True)
    with pytest.raises(CheckpointError, match="fm_decoder.guidance_scale_embed.weight"):
        load_model_state(distill_model, reference_state, "model.pt")

    fewer_layers = dict(small_config["model"], text_encoder_num_layers=1)
    model = build_model(fewer_layers, vocab_size=38, pad_id=0)
    with pytest.raises(CheckpointError, match=r"unexpected.*text_encoder\.encoders\.0\.layers\.1"):
        load_model_state(model, reference_state, "model.pt")


def test_extended_vocabulary_keeps_old_rows_and_starts_new_rows_at_the_mean(
    small_config, reference_state
):
    model = build_model(small_config, vocab_size=41, pad_id=0)
    load_model_state(model, reference_state, "model.pt", extend_embed=True)
    old = reference_state["embed.weight"]
    weight = model.embed.weight.detach()
    assert torch.equal(weight[:38], old)
    torch.testing.assert_close(weight[38:], old.mean(dim=0).expand(3, -1))
    # Everything else loaded untouched.
    assert torch.equal(
        model.fm_decoder.in_proj.weight.detach(), reference_state["fm_decoder.in_proj.weight"]
    )

    strict = build_model(small_config, vocab_size=41, pad_id=0)
    with pytest.raises(CheckpointError, match="embed.weight"):
        load_model_state(strict, reference_state, "model.pt", extend_embed=False)

    smaller = build_model(small_config, vocab_size=30, pad_id=0)
    with pytest.raises(CheckpointError, match="38 tokens but the model only 30"):
        load_model_state(smaller, reference_state, "model.pt")


def test_build_model_rejects_bad_model_json(small_config):
    with pytest.raises(ModelConfigError, match=r"model\.json.*unknown keys \['bogus'\]"):
        build_model(dict(small_config["model"], bogus=1), vocab_size=38, pad_id=0)
    without = {k: v for k, v in small_config["model"].items() if k != "pos_dim"}
    with pytest.raises(ModelConfigError, match=r"missing keys \['pos_dim'\]"):
        build_model({"model": without}, vocab_size=38, pad_id=0)
    not_u_shaped = dict(small_config["model"], fm_decoder_downsampling_factor=[1, 2, 2, 2, 1])
    with pytest.raises(ModelConfigError, match="U-shaped"):
        build_model(not_u_shaped, vocab_size=38, pad_id=0)


@pytest.mark.parametrize("kind", ["zipvoice", "distill"])
def test_load_pretrained_from_a_local_folder(tmp_path: Path, parity_dir: Path, kind: str):
    folder = _model_folder(tmp_path, parity_dir, kind)
    model, config, token_path, checkpoint_path = load_pretrained(model_dir=folder)
    assert not model.training
    assert (model.fm_decoder.guidance_scale_embed is not None) == (kind == "distill")
    assert config["feature"]["type"] == "vocos"
    assert token_path == folder / "tokens.txt" and checkpoint_path == folder / "model.pt"
    cases = torch.load(parity_dir / kind / "cases.pt", weights_only=True)
    with torch.no_grad():
        embed, _ = model.forward_text_embed(cases["tokens"])
    torch.testing.assert_close(embed, cases["text_embed"], atol=1e-4, rtol=0)


def test_load_pretrained_with_an_extended_token_file(tmp_path: Path, parity_dir: Path):
    folder = _model_folder(tmp_path, parity_dir)
    token2id = read_token_file(parity_dir / "tokens.txt")
    extended = tmp_path / "tokens_ext.txt"
    lines = [f"{t}\t{i}" for t, i in token2id.items()] + ["ー\t38", "ッ\t39"]
    extended.write_text("\n".join(lines) + "\n", encoding="utf-8")
    model, _, token_path, _ = load_pretrained(model_dir=folder, token_file=extended)
    assert token_path == extended
    assert model.embed.weight.shape[0] == 40


@pytest.mark.parametrize("missing", ["model.pt", "model.json", "tokens.txt"])
def test_local_folder_missing_a_file_names_it(tmp_path: Path, parity_dir: Path, missing: str):
    folder = _model_folder(tmp_path, parity_dir)
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_pretrained(model_dir=folder)


def test_hub_download_requests_the_published_files(
    tmp_path: Path, parity_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    import huggingface_hub

    cache = tmp_path / "hub"
    cache.mkdir()
    _model_folder(cache, parity_dir, "distill").rename(cache / "zipvoice_distill")
    calls = []

    def fake_download(repo_id: str, filename: str, **kwargs) -> str:
        calls.append((repo_id, filename))
        return str(cache / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    folder = loader.resolve_model_dir("zipvoice_distill")
    assert folder == cache / "zipvoice_distill"
    assert sorted(calls) == sorted(
        ("k2-fsa/ZipVoice", f"zipvoice_distill/{name}")
        for name in ("model.pt", "model.json", "tokens.txt")
    )
    model, *_ = load_pretrained("zipvoice_distill")
    assert model.fm_decoder.guidance_scale_embed is not None

    with pytest.raises(ValueError, match="model_name"):
        loader.resolve_model_dir("zipvoice_huge")
