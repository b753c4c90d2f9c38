"""Bad input at every entry point: a clear error naming the file and the problem, no code from a
downloaded file ever runs, and nothing half-written is left behind.

Users run these tools for hours on rented GPUs with files from the internet, so each test feeds
one kind of broken or hostile input through the entry point's `main(argv)` (and a few through
`python -m` itself) and checks the message the user would read.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import PARITY, REPO
from tests.data_fixtures import *  # noqa: F403 - session fixtures
from tests.test_infer import make_adapter, make_model_dir, write_prompt_wav
from tests.test_train import user_flags
from zipvoice.bin import (
    compute_fbank,
    demo,
    generate_japanese_corpus,
    infer_zipvoice,
    infer_zipvoice_onnx,
    onnx_export,
    prepare_dataset,
    prepare_token_file,
    prepare_tokens,
    train_zipvoice,
)
from zipvoice.utils.manifest import write_manifest

VOCOS_DIR = PARITY / "vocos"
BASE_DIR = PARITY / "zipvoice"


# ------------------------------------------------------------------ helpers


class CodeInPickle:
    """Unpickling this creates `marker`: proof that code hidden in the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_malicious_checkpoint(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A model.pt whose unpickling would create `marker` (torch zip format or a bare pickle)."""
    payload = {"model": {"embed.weight": CodeInPickle(marker)}}
    if legacy:
        with open(path, "wb") as f:  # protocol 2, as torch's legacy (pre-zip) format
            pickle.dump(payload, f, protocol=2)
    else:
        torch.save(payload, path)
    return path


def test_the_malicious_pickle_really_runs_code_when_loaded_unsafely(tmp_path):
    """Control for the tests below: the payload is live, so 'marker absent' means refused."""
    marker = tmp_path / "pwned"
    path = write_malicious_checkpoint(tmp_path / "model.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def exit_message(call: Callable[[], object], capsys: pytest.CaptureFixture) -> str:
    """Run an entry point expected to fail; return its error report: stderr from the last line
    that starts with `error:` (a multi-line report lists the bad rows after it)."""
    try:
        code = call()
    except SystemExit as exc:  # data-preparation commands exit with the message itself
        code = exc.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
    err = capsys.readouterr().err
    assert code not in (0, None), f"expected a failure, got exit code {code!r}"
    lines = err.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(("error:", "demo failed:"))]
    assert starts, f"no error line in stderr:\n{err}"
    return "\n".join(lines[starts[-1] :])


def no_temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name or ".old-" in p.name]


# ------------------------------------------------------------------ data preparation


def test_generate_japanese_corpus_bad_inputs(tmp_path, capsys):
    out = tmp_path / "corpus"
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    msg = exit_message(
        lambda: generate_japanese_corpus.main(
            ["--output-dir", str(out), "--sentences-file", str(a_dir)]
        ),
        capsys,
    )
    assert str(a_dir) in msg and "directory" in msg
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n")
    msg = exit_message(
        lambda: generate_japanese_corpus.main(
            ["--output-dir", str(out), "--sentences-file", str(empty)]
        ),
        capsys,
    )
    assert str(empty) in msg and "no sentences" in msg
    msg = exit_message(
        lambda: generate_japanese_corpus.main(["--output-dir", str(out), "--num-speakers", "0"]),
        capsys,
    )
    assert "num_speakers" in msg.replace("-", "_")
    assert not out.exists()


def test_prepare_dataset_bad_inputs(tmp_path, capsys):
    out = tmp_path / "manifests"
    msg = exit_message(
        lambda: prepare_dataset.main(["--tsv-path", str(tmp_path), "--output-dir", str(out)]),
        capsys,
    )
    assert str(tmp_path) in msg and "directory" in msg
    tsv = tmp_path / "train.tsv"
    wav = write_prompt_wav(tmp_path / "ok.wav", seconds=1.0)
    tsv.write_text(f"utt1\tこんにちは\t{wav}\nutt2\tさようなら\t{tmp_path / 'missing.wav'}\n")
    text = exit_message(
        lambda: prepare_dataset.main(["--tsv-path", str(tsv), "--output-dir", str(out)]), capsys
    )
    assert "line 2" in text and "missing.wav" in text
    assert not list(out.glob("*.jsonl.gz"))  # --on-error fail writes no manifest


def test_prepare_tokens_and_compute_fbank_bad_inputs(japanese_fbank_manifests, tmp_path, capsys):
    raw_dir = japanese_fbank_manifests["raw_manifest_dir"]
    out = tmp_path / "cuts.jsonl.gz"
    msg = exit_message(
        lambda: prepare_tokens.main(
            ["--input-file", str(tmp_path), "--output-file", str(out), "--tokenizer", "japanese"]
        ),
        capsys,
    )
    assert str(tmp_path) in msg
    # A cut whose text is only punctuation: no tokens, reported by id, nothing written.
    from lhotse import CutSet

    cuts = CutSet.from_file(raw_dir / "japanese_cuts_raw_train.jsonl.gz").to_eager()
    first = cuts[0]
    first.supervisions[0].text = "！？…"
    bad_input = tmp_path / "raw.jsonl.gz"
    CutSet.from_cuts([first, *list(cuts)[1:]]).to_file(bad_input)
    text = exit_message(
        lambda: prepare_tokens.main(
            [
                "--input-file",
                str(bad_input),
                "--output-file",
                str(out),
                "--num-jobs",
                "1",
                "--tokenizer",
                "japanese",
            ]  # fmt: skip
        ),
        capsys,
    )
    assert first.id in text and "cannot be tokenised" in text
    assert not out.exists()

    msg = exit_message(
        lambda: compute_fbank.main(
            ["--source-dir", str(tmp_path / "nowhere"), "--dest-dir", str(tmp_path / "fbank")]
        ),
        capsys,
    )
    assert "custom_cuts_train.jsonl.gz" in msg
    assert not (tmp_path / "fbank").exists()


def test_prepare_token_file_bad_inputs(tmp_path, capsys):
    out = tmp_path / "tokens.txt"
    msg = exit_message(
        lambda: prepare_token_file.main(["--base-token-file", str(tmp_path), "--output", str(out)]),
        capsys,
    )
    assert str(tmp_path) in msg and "directory" in msg
    broken = tmp_path / "base.txt"
    broken.write_text("_\t0\na 1\n")
    msg = exit_message(
        lambda: prepare_token_file.main(["--base-token-file", str(broken), "--output", str(out)]),
        capsys,
    )
    assert f"{broken}:2" in msg
    assert not out.exists()


# ------------------------------------------------------------------ models, adapters, inference


@pytest.fixture(scope="module")
def infer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad_infer")
    make_model_dir(root / "zipvoice", "zipvoice")
    write_prompt_wav(root / "prompt.wav")
    make_adapter(root / "zipvoice", root / "lora", use_dora=True)
    return root


def model_dir_with(root: Path, **replace: Callable[[Path], None]) -> Path:
    """A copy of the base model folder where each named file is written by `replace[name]`."""
    folder = root / "model"
    folder.mkdir()
    for name in ("model.pt", "model.json", "tokens.txt"):
        key = name.replace(".", "_")
        if key in replace:
            replace[key](folder / name)
        else:
            (folder / name).symlink_to(
                PARITY / ("tokens.txt" if name == "tokens.txt" else f"zipvoice/{name}")
            )
    return folder


def infer(model_dir: Path, out: Path, *extra: str, prompt: Path | None = None,
          text: str = "how are you?") -> int:  # fmt: skip
    argv = [
        "--model-dir", str(model_dir), "--vocoder-path", str(VOCOS_DIR),
        "--tokenizer", "simple", "--prompt-text", "hello there", "--text", text,
        "--res-wav-path", str(out), "--num-step", "1",
    ]  # fmt: skip
    if prompt is not None:
        argv += ["--prompt-wav", str(prompt)]
    return infer_zipvoice.main(argv + list(extra))


def adapter_copy(infer_dir: Path, dest: Path) -> Path:
    shutil.copytree(infer_dir / "lora", dest)
    return dest


@pytest.mark.parametrize(
    "case",
    [
        "missing_dir",
        "checkpoint_is_dir",
        "random_bytes",
        "truncated",
        "pickle_zip",
        "pickle_legacy",
    ],
)
def test_inference_refuses_unreadable_or_hostile_checkpoints(infer_dir, tmp_path, capsys, case):
    marker = tmp_path / "pwned"
    real = (BASE_DIR / "model.pt").read_bytes()
    writers: dict[str, Callable[[Path], None]] = {
        "checkpoint_is_dir": lambda p: p.mkdir(),
        "random_bytes": lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
        "truncated": lambda p: p.write_bytes(real[: len(real) // 2]),
        "pickle_zip": lambda p: write_malicious_checkpoint(p, marker),
        "pickle_legacy": lambda p: write_malicious_checkpoint(p, marker, legacy=True),
    }
    if case == "missing_dir":
        model_dir = tmp_path / "nowhere"
    else:
        model_dir = model_dir_with(tmp_path, model_pt=writers[case])
    out = tmp_path / "out.wav"
    msg = exit_message(lambda: infer(model_dir, out, prompt=infer_dir / "prompt.wav"), capsys)
    expected = {
        "missing_dir": "model folder not found",
        "checkpoint_is_dir": "model.pt is a directory",
        "random_bytes": "not a readable PyTorch checkpoint",
        "truncated": "not a readable PyTorch checkpoint",
        "pickle_zip": "refused to load",
        "pickle_legacy": "refused to load",
    }[case]
    assert expected in msg and str(model_dir) in msg and "\n" not in msg, msg
    assert not marker.exists()
    assert not out.exists()


def test_model_json_that_does_not_match_the_checkpoint_names_the_keys(tmp_path, capsys, infer_dir):
    config = json.loads((BASE_DIR / "model.json").read_text())
    config["model"]["fm_decoder_num_layers"] = [
        n + 1 for n in config["model"]["fm_decoder_num_layers"]
    ]
    model_dir = model_dir_with(tmp_path, model_json=lambda p: p.write_text(json.dumps(config)))
    msg = exit_message(
        lambda: infer(model_dir, tmp_path / "o.wav", prompt=infer_dir / "prompt.wav"), capsys
    )
    assert "does not fit the model" in msg and "model.json" in msg
    assert "missing: ['fm_decoder." in msg  # the first mismatching keys are named


def test_token_file_smaller_than_the_checkpoint_vocabulary(tmp_path, capsys, infer_dir):
    lines = (PARITY / "tokens.txt").read_text().splitlines()[:20]
    model_dir = model_dir_with(tmp_path, tokens_txt=lambda p: p.write_text("\n".join(lines) + "\n"))
    msg = exit_message(
        lambda: infer(model_dir, tmp_path / "o.wav", prompt=infer_dir / "prompt.wav"), capsys
    )
    assert "38 tokens but the model only 20" in msg


def test_adapter_for_another_base_model_is_refused(infer_dir, tmp_path, capsys):
    state = torch.load(BASE_DIR / "model.pt", weights_only=True)["model"]
    state["embed.weight"] = state["embed.weight"] + 0.01

    model_dir = model_dir_with(tmp_path, model_pt=lambda p: torch.save({"model": state}, p))
    out = tmp_path / "o.wav"
    msg = exit_message(
        lambda: infer(model_dir, out, "--lora-path", str(infer_dir / "lora"),
                      prompt=infer_dir / "prompt.wav"),
        capsys,
    )  # fmt: skip
    assert "different base checkpoint" in msg and str(infer_dir / "lora") in msg
    assert not out.exists()


def _retarget(config: dict) -> None:
    """Drop the conv modules from the regex of targets."""
    parts = [p for p in config["target_modules"].split("|") if "conv_module" not in p]
    config["target_modules"] = "|".join(parts)


@pytest.mark.parametrize(
    "tamper, expected",
    [
        (lambda c: c.update(r=8), "rank 8"),
        (_retarget, "conv_module"),
        (lambda c: c.update(use_dora=False), "use_dora"),
    ],
    ids=["rank", "targets", "dora"],
)
def test_adapter_config_that_does_not_match_its_weights(
    infer_dir, tmp_path, capsys, tamper, expected
):
    lora = adapter_copy(infer_dir, tmp_path / "lora")
    config = json.loads((lora / "adapter_config.json").read_text())
    tamper(config)
    (lora / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "o.wav"
    msg = exit_message(
        lambda: infer(infer_dir / "zipvoice", out, "--lora-path", str(lora),
                      prompt=infer_dir / "prompt.wav"),
        capsys,
    )  # fmt: skip
    assert "adapter_config.json" in msg and expected in msg, msg
    assert not out.exists()


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "text_side.safetensors"])
@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_corrupt_adapter_weights_are_named(infer_dir, tmp_path, capsys, name, damage):
    lora = adapter_copy(infer_dir, tmp_path / "lora")
    data = (lora / name).read_bytes()
    if damage == "truncated":
        (lora / name).write_bytes(data[: len(data) // 2])
    else:
        (lora / name).write_bytes(np.random.default_rng(1).bytes(len(data)))
    out = tmp_path / "o.wav"
    msg = exit_message(
        lambda: infer(infer_dir / "zipvoice", out, "--lora-path", str(lora),
                      prompt=infer_dir / "prompt.wav"),
        capsys,
    )  # fmt: skip
    assert str(lora / name) in msg and "safetensors" in msg, msg
    assert not out.exists()


def test_vocoder_weights_with_code_in_the_pickle_are_refused(infer_dir, tmp_path, capsys):
    marker = tmp_path / "pwned"
    vocoder = tmp_path / "vocos"
    vocoder.mkdir()
    (vocoder / "config.yaml").symlink_to(VOCOS_DIR / "config.yaml")
    write_malicious_checkpoint(vocoder / "pytorch_model.bin", marker)
    out = tmp_path / "o.wav"
    msg = exit_message(
        lambda: infer(infer_dir / "zipvoice", out, "--vocoder-path", str(vocoder),
                      prompt=infer_dir / "prompt.wav"),
        capsys,
    )  # fmt: skip
    assert str(vocoder / "pytorch_model.bin") in msg
    assert not marker.exists() and not out.exists()


def _sine(path: Path, seconds: float, sr: int = 24000, channels: int = 1, amp: float = 0.1):
    t = np.arange(int(seconds * sr)) / sr
    wave = amp * np.sin(2 * np.pi * 200 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    sf.write(path, np.stack([wave] * channels, axis=1).astype(np.float32), sr)
    return path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty_text", "empty text"),
        ("blank_text", "empty text"),
        ("untokenisable_text", "no token in the token file"),
        ("silent", "is silent"),
        ("too_short", "too short"),
        ("too_long", "too long"),
        ("prompt_is_dir", "is not a file"),
        ("missing_prompt", "does not exist"),
        ("not_audio", "cannot read audio file"),
    ],
)
def test_bad_text_and_prompts(infer_dir, tmp_path, capsys, case, expected):
    prompt, text = infer_dir / "prompt.wav", "how are you?"
    if case == "empty_text":
        text = ""
    elif case == "blank_text":
        text = "  \t "
    elif case == "untokenisable_text":
        text = "😀😀"
    elif case == "silent":
        prompt = tmp_path / "silent.wav"
        sf.write(prompt, np.zeros(24000, np.float32), 24000)
    elif case == "too_short":
        prompt = _sine(tmp_path / "short.wav", 0.05)
    elif case == "too_long":
        prompt = _sine(tmp_path / "long.wav", 65.0, sr=8000)
    elif case == "prompt_is_dir":
        prompt = tmp_path
    elif case == "missing_prompt":
        prompt = tmp_path / "missing.wav"
    elif case == "not_audio":
        prompt = tmp_path / "fake.wav"
        prompt.write_bytes(b"RIFF not really a wave file" * 10)
    out = tmp_path / "out" / "o.wav"
    msg = exit_message(lambda: infer(infer_dir / "zipvoice", out, prompt=prompt, text=text), capsys)
    assert expected in msg, msg
    if case not in ("empty_text", "blank_text", "untokenisable_text"):
        assert str(prompt) in msg
    assert not out.exists()
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_prompt_at_another_sample_rate_is_resampled(infer_dir, tmp_path):
    prompt = _sine(tmp_path / "stereo44k.wav", 1.5, sr=44100, channels=2)
    out = tmp_path / "o.wav"
    assert infer(infer_dir / "zipvoice", out, prompt=prompt) == 0
    wave, sr = sf.read(out)
    assert sr == 24000 and wave.ndim == 1 and len(wave) > 2400


# ------------------------------------------------------------------ ONNX


def test_onnx_export_bad_inputs(infer_dir, tmp_path, capsys):
    marker = tmp_path / "pwned"
    model_dir = model_dir_with(tmp_path, model_pt=lambda p: write_malicious_checkpoint(p, marker))
    onnx_dir = tmp_path / "onnx"
    msg = exit_message(
        lambda: onnx_export.main(
            ["--model-dir", str(model_dir), "--onnx-model-dir", str(onnx_dir)]
        ),
        capsys,
    )
    assert "refused to load" in msg and not marker.exists()
    lora = adapter_copy(infer_dir, tmp_path / "lora")
    meta = json.loads((lora / "zipvoice_adapter.json").read_text())
    meta["base_fingerprint"] = "0" * 64
    (lora / "zipvoice_adapter.json").write_text(json.dumps(meta))
    write_manifest(lora, "adapter")  # a consistent adapter folder made for another base
    msg = exit_message(
        lambda: onnx_export.main(
            ["--model-dir", str(infer_dir / "zipvoice"), "--lora-path", str(lora),
             "--onnx-model-dir", str(onnx_dir)]
        ),
        capsys,
    )  # fmt: skip
    assert "different base checkpoint" in msg
    assert not onnx_dir.exists()


def test_onnx_inference_bad_model_folders(infer_dir, tmp_path, capsys):
    def run(folder: Path) -> str:
        argv = [
            "--onnx-model-dir", str(folder), "--vocoder-path", str(VOCOS_DIR),
            "--tokenizer", "simple", "--prompt-wav", str(infer_dir / "prompt.wav"),
            "--prompt-text", "hello", "--text", "hi", "--res-wav-path", str(tmp_path / "o.wav"),
        ]  # fmt: skip
        return exit_message(lambda: infer_zipvoice_onnx.main(argv), capsys)

    assert "not found" in run(tmp_path / "nowhere")
    folder = tmp_path / "onnx"
    folder.mkdir()
    (folder / "tokens.txt").symlink_to(PARITY / "tokens.txt")
    (folder / "text_encoder.onnx").write_bytes(np.random.default_rng(2).bytes(2048))
    assert "lacks fm_decoder.onnx" in run(folder)
    (folder / "fm_decoder.onnx").write_bytes(np.random.default_rng(3).bytes(2048))
    msg = run(folder)
    assert str(folder / "text_encoder.onnx") in msg and "not a readable ONNX model" in msg
    assert not (tmp_path / "o.wav").exists()


# ------------------------------------------------------------------ demo


def test_demo_bad_inputs(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    msg = exit_message(lambda: demo.main(["--out-dir", str(a_file)]), capsys)
    assert str(a_file) in msg and "not a folder" in msg
    assert a_file.read_text() == "mine"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    msg = exit_message(lambda: demo.main(["--out-dir", str(foreign)]), capsys)
    assert "was not made by the demo" in msg
    assert (foreign / "thesis.tex").read_text() == "precious"
    out = tmp_path / "demo"
    msg = exit_message(
        lambda: demo.main(["--out-dir", str(out), "--model-dir", str(tmp_path / "nowhere")]),
        capsys,
    )
    assert "model folder not found" in msg and str(tmp_path / "nowhere") in msg
    assert not (out / "corpus").exists()  # refused before any work


# ------------------------------------------------------------------ training


def train_fails(argv: list[str], caplog: pytest.LogCaptureFixture) -> str:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="zipvoice.train"):
        assert train_zipvoice.main(argv) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors, "no error was logged"
    return errors[-1]


def test_training_refuses_bad_models_and_token_files(japanese_fbank_manifests, tmp_path, caplog):
    data = japanese_fbank_manifests
    exp = tmp_path / "exp"
    marker = tmp_path / "pwned"
    evil = write_malicious_checkpoint(tmp_path / "evil.pt", marker)
    msg = train_fails(user_flags(data, exp, checkpoint=evil), caplog)
    assert "refused to load" in msg and str(evil) in msg and not marker.exists()

    msg = train_fails(user_flags(data, exp, checkpoint=tmp_path), caplog)
    assert str(tmp_path) in msg and "directory" in msg

    config = json.loads((BASE_DIR / "model.json").read_text())
    config["model"]["text_encoder_dim"] += 4
    bad_config = tmp_path / "model.json"
    bad_config.write_text(json.dumps(config))
    msg = train_fails(user_flags(data, exp, model_config=bad_config), caplog)
    assert "does not fit the model" in msg and "text_encoder" in msg

    short_tokens = tmp_path / "short_tokens.txt"
    short_tokens.write_text("\n".join((PARITY / "tokens.txt").read_text().splitlines()[:20]))
    msg = train_fails(user_flags(data, exp, token_file=short_tokens, tokenizer="simple"), caplog)
    assert "38 tokens but the model only 20" in msg

    # A token file made without --base-token-file: same tokens, other ids. The released model
    # folder (model.pt beside tokens.txt) tells which ids the embedding rows belong to.
    base_folder = make_model_dir(tmp_path / "base", "zipvoice")
    lines = (PARITY / "tokens.txt").read_text().splitlines()
    tokens = [line.rsplit("\t", 1)[0] for line in lines]
    tokens[1], tokens[2] = tokens[2], tokens[1]
    swapped = tmp_path / "swapped_tokens.txt"
    swapped.write_text("".join(f"{t}\t{i}\n" for i, t in enumerate(tokens)))
    argv = user_flags(
        data, exp, checkpoint=base_folder / "model.pt", token_file=swapped, tokenizer="simple"
    )
    msg = train_fails(argv, caplog)
    assert str(swapped) in msg and "id 1" in msg and str(base_folder / "tokens.txt") in msg
    assert not list(exp.glob("checkpoint-*.pt"))


def test_training_refuses_cuts_without_features(japanese_fbank_manifests, tmp_path, caplog):
    from lhotse import CutSet

    data = japanese_fbank_manifests
    cuts = list(CutSet.from_file(data["train_cuts"]))
    stripped = cuts[-1].drop_features()
    manifest = tmp_path / "cuts.jsonl.gz"
    CutSet.from_cuts([*cuts[:-1], stripped]).to_file(manifest)
    msg = train_fails(user_flags(data, tmp_path / "exp", train_manifest=manifest), caplog)
    assert stripped.id in msg and "no precomputed features" in msg and str(manifest) in msg


def test_exp_dir_of_a_different_run_is_refused(japanese_fbank_manifests, tmp_path, caplog):
    data = japanese_fbank_manifests
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "run_config.json").write_text(json.dumps({"identity": {"lora_rank": 8}}))
    (exp / "checkpoint-2.pt").write_bytes(b"a checkpoint of another run")
    msg = train_fails(user_flags(data, exp), caplog)
    assert "holds a different run" in msg and "lora_rank: 8 -> 32" in msg
    assert (exp / "checkpoint-2.pt").read_bytes() == b"a checkpoint of another run"


def test_disk_full_keeps_the_previous_checkpoint_and_resume_skips_a_torn_one(
    japanese_fbank_manifests, tmp_path, caplog
):
    data = japanese_fbank_manifests
    exp = tmp_path / "exp"
    flags = dict(num_iters=4, save_every_n=2, valid_interval=0, use_dora=0, lora_rank=4)
    real_save = torch.save
    calls = {"n": 0}

    def save_then_fill_the_disk(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            return real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "save", save_then_fill_the_disk)
        msg = train_fails(user_flags(data, exp, **flags), caplog)
    assert "No space left on device" in msg and "checkpoint-4.pt" in msg
    assert "checkpoint-2.pt" in msg  # says what is still intact
    assert sorted(p.name for p in exp.glob("checkpoint-*.pt")) == ["checkpoint-2.pt"]
    assert torch.load(exp / "checkpoint-2.pt", weights_only=True)["step"] == 2
    assert (exp / "adapter-2" / "adapter_model.safetensors").is_file()
    assert not no_temp_files(exp) and not (exp / "adapter").exists()

    # A torn newest checkpoint (say, copied by hand): resuming warns and takes the previous one.
    (exp / "checkpoint-4.pt").write_bytes((exp / "checkpoint-2.pt").read_bytes()[:1000])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="zipvoice.train"):
        assert train_zipvoice.main(user_flags(data, exp, **flags)) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint-4.pt" in w and "skipping" in w for w in warnings), warnings
    assert "resuming from" in caplog.text and "checkpoint-2.pt at step 2" in caplog.text
    assert torch.load(exp / "checkpoint-4.pt", weights_only=True)["step"] == 4
    assert (exp / "adapter" / "adapter_model.safetensors").is_file()


def test_disk_full_while_saving_an_adapter_keeps_the_previous_one(infer_dir, tmp_path):
    from zipvoice.models.loader import load_pretrained
    from zipvoice.models.modules.adapter_folder import save_adapter
    from zipvoice.models.modules.lora_utils import (
        apply_lora_to_model,
        create_lora_config,
        get_lora_target_modules,
    )

    lora = adapter_copy(infer_dir, tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in lora.iterdir()}
    model, _, token_file, _ = load_pretrained("zipvoice", infer_dir / "zipvoice")
    targets = get_lora_target_modules(model, "attention")
    apply_lora_to_model(model, create_lora_config(rank=2, alpha=4, target_modules=targets))

    def disk_full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("zipvoice.models.modules.adapter_folder.save_file", disk_full)
        with pytest.raises(OSError, match="No space left"):
            save_adapter(
                model,
                lora,
                base_fingerprint="x",
                token_file=token_file,
                model_config=infer_dir / "zipvoice" / "model.json",
            )
    assert {p.name: p.read_bytes() for p in lora.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_save_checkpoint_disk_full_leaves_the_old_file(tmp_path):
    from zipvoice.utils.checkpoint import save_checkpoint

    target = tmp_path / "model.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}}, target)
    real_save = torch.save

    def half_then_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:
            handle.truncate(10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "save", half_then_full)
        with pytest.raises(OSError, match="No space left"):
            save_checkpoint({"model": {"w": torch.zeros(3)}}, target)
    assert torch.equal(torch.load(target, weights_only=True)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


# ------------------------------------------------------------------ through `python -m`


@pytest.mark.parametrize(
    "module, argv, expected",
    [
        ("prepare_token_file", ["--base-token-file", "{tmp}", "--output", "{tmp}/t.txt"],
         "directory"),
        ("infer_zipvoice", ["--model-dir", "{tmp}/nowhere", "--prompt-wav", "p.wav",
                            "--prompt-text", "a", "--text", "b"], "model folder not found"),
    ],
    ids=["prepare_token_file", "infer_zipvoice"],
)  # fmt: skip
def test_cli_prints_one_error_line_and_no_traceback(tmp_path, module, argv, expected):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    result = subprocess.run(
        [sys.executable, "-m", f"zipvoice.bin.{module}", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and expected in last, result.stderr
