"""PyTorch inference: the CLI pipeline, determinism, and adapters applied at inference."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import PARITY
from tests.helpers import (  # noqa: F401 - make_adapter & co. are also imported from here
    PROMPT_TEXT,
    TEXT,
    expected_samples,
    make_adapter,
    make_inference_workdir,
    make_model_dir,
    write_prompt_wav,
)
from zipvoice.bin import infer_zipvoice
from zipvoice.inference.chunking import (
    add_punctuation,
    batchify_tokens,
    chunk_tokens_punctuation,
    cross_fade_concat,
)
from zipvoice.inference.torch_backend import load_model_for_inference
from zipvoice.models.modules.adapter_folder import AdapterError
from zipvoice.utils.checkpoint import load_checkpoint_state

VOCOS_DIR = PARITY / "vocos"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_inference_workdir(tmp_path_factory.mktemp("infer"), {"lora": (False, 0)})


def run_cli(workdir: Path, out: Path, *extra: str, model: str = "zipvoice") -> int:
    return infer_zipvoice.main(
        [
            "--model-dir", str(workdir / model),
            "--vocoder-path", str(VOCOS_DIR),
            "--tokenizer", "simple",
            "--prompt-wav", str(workdir / "prompt.wav"),
            "--prompt-text", PROMPT_TEXT,
            "--text", TEXT,
            "--res-wav-path", str(out),
            "--num-step", "3",
            *extra,
        ]
    )  # fmt: skip


def read_wav(path: Path) -> np.ndarray:
    data, sr = sf.read(path, dtype="float32")
    assert sr == 24000
    return data


# ------------------------------------------------------------------ text and audio helpers


def test_chunking_splits_at_punctuation_and_respects_the_limit():
    tokens = list("ab, cd. efgh! ij")
    chunks = chunk_tokens_punctuation(tokens, max_tokens=6)
    assert ["".join(c) for c in chunks] == ["ab, ", "cd. ", "efgh! ", "ij"]
    assert sum(len(c) for c in chunks) == len(tokens)
    assert ["".join(c) for c in chunk_tokens_punctuation(tokens, max_tokens=100)] == [
        "ab, cd. efgh! ij"
    ]
    assert add_punctuation(" hi ") == "hi." and add_punctuation("はい") == "はい。"


def test_batches_respect_max_duration_and_keep_the_order_recoverable():
    chunks = [[1] * 5, [2] * 2, [3] * 9, [4] * 1]
    batches, order = batchify_tokens(chunks, max_duration=10, prompt_duration=2, token_duration=1)
    flat = [chunk for batch in batches for chunk in batch]
    assert [chunks[i] for i in order] == flat
    assert [len(c) for c in flat] == sorted(len(c) for c in chunks)
    for batch in batches[:-1]:
        assert sum(map(len, batch)) + 2 * len(batch) <= 10 or len(batch) == 1


def test_cross_fade_overlaps_by_the_fade_length():
    a, b = np.ones(5000, np.float32), np.zeros(4000, np.float32)
    joined = cross_fade_concat([a, b], fade_seconds=0.1, sr=24000)
    assert joined.shape == (5000 + 4000 - 2400,)
    assert joined[0] == 1 and joined[-1] == 0 and 0 < joined[5000 - 1200] < 1


# ------------------------------------------------------------------ end to end


def test_base_inference_writes_expected_length_and_is_deterministic(workdir, capsys):
    first, second, other = workdir / "a.wav", workdir / "b.wav", workdir / "c.wav"
    assert run_cli(workdir, first) == 0
    assert "RTF" in capsys.readouterr().out
    assert run_cli(workdir, second) == 0
    assert run_cli(workdir, other, "--seed", "1") == 0
    wave = read_wav(first)
    assert wave.shape == (expected_samples(workdir),)
    assert np.abs(wave).max() > 1e-3
    np.testing.assert_array_equal(wave, read_wav(second))
    assert not np.array_equal(wave, read_wav(other))


def test_distill_and_speed(workdir):
    out = workdir / "distill.wav"
    assert run_cli(workdir, out, "--speed", "1.5", model="distill") == 0
    assert read_wav(out).shape == (expected_samples(workdir, speed=1.5),)


def test_long_text_is_chunked_and_joined(workdir):
    text = "one two three four five six. " * 8
    out = workdir / "long.wav"
    code = infer_zipvoice.main(
        [
            "--model-dir", str(workdir / "zipvoice"), "--vocoder-path", str(VOCOS_DIR),
            "--tokenizer", "simple", "--prompt-wav", str(workdir / "prompt.wav"),
            "--prompt-text", PROMPT_TEXT, "--text", text, "--res-wav-path", str(out),
            "--num-step", "1", "--max-duration", "40",
        ]
    )  # fmt: skip
    assert code == 0
    # 8 sentences of ~29 tokens at ~0.14 s a token exceed 25 s: several chunks, each cut
    # by one cross-fade when joined, so the total is shorter than one-shot generation.
    one_shot = expected_samples(workdir, text=text)
    samples = read_wav(out).shape[0]
    assert 0.5 * one_shot < samples < one_shot


def test_test_list_writes_one_file_per_line(workdir, capsys):
    listing = workdir / "list.tsv"
    listing.write_text(
        f"first\t{PROMPT_TEXT}\tprompt.wav\t{TEXT}\nsecond\t{PROMPT_TEXT}\tprompt.wav\tyes.\n"
    )
    code = infer_zipvoice.main(
        [
            "--model-dir", str(workdir / "zipvoice"), "--vocoder-path", str(VOCOS_DIR),
            "--tokenizer", "simple", "--test-list", str(listing),
            "--res-dir", str(workdir / "res"), "--num-step", "2",
        ]
    )  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in (workdir / "res").iterdir()) == ["first.wav", "second.wav"]
    assert "Average RTF" in capsys.readouterr().out
    bad = workdir / "bad.tsv"
    bad.write_text("only\ttwo\n")
    bad_args = ["--model-dir", str(workdir / "zipvoice"), "--test-list", str(bad)]
    bad_args += ["--vocoder-path", str(VOCOS_DIR), "--tokenizer", "simple"]
    assert infer_zipvoice.main(bad_args) == 1


# ------------------------------------------------------------------ adapters


def test_lora_scale_zero_is_base_and_one_is_the_trained_adapter(workdir):
    base_out, zero_out = workdir / "base.wav", workdir / "zero.wav"
    merged_out, unmerged_out = workdir / "merged.wav", workdir / "unmerged.wav"
    lora = ["--lora-path", str(workdir / "lora")]
    assert run_cli(workdir, base_out) == 0
    assert run_cli(workdir, zero_out, *lora, "--lora-scale", "0") == 0
    assert run_cli(workdir, merged_out, *lora, "--lora-scale", "1") == 0
    assert run_cli(workdir, unmerged_out, *lora, "--merge-lora", "0") == 0
    base, merged = read_wav(base_out), read_wav(merged_out)
    # Equal weights (checked exactly below); the 16-bit files may differ by one step where
    # float rounding in other kernels lands a sample on the other side of a step.
    np.testing.assert_allclose(read_wav(zero_out), base, rtol=0, atol=2.0 / 32768)
    np.testing.assert_allclose(merged, read_wav(unmerged_out), atol=2e-3)
    assert np.abs(merged - base).max() > 1e-2  # the adapter really changes the voice

    base_model, _, _ = load_model_for_inference(model_dir=workdir / "zipvoice")
    zero_model, _, meta = load_model_for_inference(
        model_dir=workdir / "zipvoice", lora_path=workdir / "lora", lora_scale=0.0
    )
    assert meta["tokenizer"] == "simple"
    for key, value in base_model.state_dict().items():
        torch.testing.assert_close(zero_model.state_dict()[key], value, rtol=0, atol=0)


def test_adapter_for_another_base_is_refused(workdir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    state = load_checkpoint_state(workdir / "zipvoice" / "model.pt")
    state["embed.weight"] = state["embed.weight"] + 0.01
    torch.save({"model": state}, other / "model.pt")
    for name in ("model.json", "tokens.txt"):
        (other / name).symlink_to(workdir / "zipvoice" / name)
    with pytest.raises(AdapterError, match="different base checkpoint"):
        load_model_for_inference(model_dir=other, lora_path=workdir / "lora")


def test_broken_adapter_folder_names_what_is_missing(workdir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in (workdir / "lora").iterdir():
        if path.name != "adapter_model.safetensors":
            os.symlink(path, broken / path.name)
    code = run_cli(workdir, tmp_path / "x.wav", "--lora-path", str(broken))
    assert code == 1
    assert "adapter_model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "x.wav").exists()
    (broken / "zipvoice_adapter.json").unlink()
    (broken / "zipvoice_adapter.json").write_text("{not json")
    (broken / "adapter_model.safetensors").symlink_to(workdir / "lora/adapter_model.safetensors")
    with pytest.raises(AdapterError, match="zipvoice_adapter.json"):
        load_model_for_inference(model_dir=workdir / "zipvoice", lora_path=broken)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model_for_inference(model_dir=workdir / "zipvoice", lora_path=tmp_path / "nowhere")
