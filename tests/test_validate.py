"""The validation layer: options, sizes, text files, outputs that would replace inputs, devices.

Each case goes through the real entry point or loader with files the test writes, and checks
both the one-line message and that nothing was damaged.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import PARITY
from tests.helpers import PROMPT_TEXT, TEXT, make_model_dir, write_prompt_wav
from zipvoice.bin import infer_zipvoice
from zipvoice.models.loader import ModelConfigError, load_pretrained
from zipvoice.models.modules.lora_utils import check_lora_rank
from zipvoice.tokenizer.token_file import TokenFileError, read_token_file
from zipvoice.utils.audio import AudioError, load_audio
from zipvoice.utils.validate import (
    ValidationError,
    assert_not_input,
    check_fits_in_memory,
    read_text_lines,
    resolve_device,
)

SHIFT_JIS_TEXT = "こんにちは、世界。"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("validate")
    make_model_dir(root / "zipvoice", "zipvoice")
    write_prompt_wav(root / "prompt.wav")
    return root


def _infer(workdir: Path, *extra: str) -> int:
    return infer_zipvoice.main(
        [
            "--model-dir", str(workdir / "zipvoice"),
            "--vocoder-path", "griffin-lim",
            "--tokenizer", "simple",
            "--num-step", "2",
            *extra,
        ]
    )  # fmt: skip


def _single(workdir: Path, out: Path, *extra: str) -> int:
    return _infer(
        workdir,
        "--prompt-wav", str(workdir / "prompt.wav"),
        "--prompt-text", PROMPT_TEXT,
        "--text", TEXT,
        "--res-wav-path", str(out),
        *extra,
    )  # fmt: skip


@pytest.mark.parametrize("flag", ["--speed", "--guidance-scale", "--t-shift", "--feat-scale"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_naming_the_flag(workdir, capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        _single(workdir, workdir / "never.wav", f"{flag}={value}")
    assert info.value.code == 2
    assert f"argument {flag}: expected a finite number, got '{value}'" in capsys.readouterr().err
    assert not (workdir / "never.wav").exists()


def test_non_positive_speed_and_steps_are_refused(workdir, capsys):
    for flag, value, words in (
        ("--speed", "0", "> 0"),
        ("--num-step", "0", ">= 1"),
        ("--target-rms", "-1", ">= 0"),
    ):
        with pytest.raises(SystemExit):
            _single(workdir, workdir / "never.wav", f"{flag}={value}")
        assert f"argument {flag}: expected" in (err := capsys.readouterr().err) and words in err


def test_output_that_is_the_prompt_is_refused_before_any_work(workdir, tmp_path, capsys):
    prompt = tmp_path / "voice.wav"
    write_prompt_wav(prompt)
    before = prompt.read_bytes()
    link = tmp_path / "link.wav"
    link.symlink_to(prompt)
    for out in (prompt, link, tmp_path / "sub" / ".." / "voice.wav"):
        code = _infer(
            workdir,
            "--prompt-wav", str(prompt),
            "--prompt-text", PROMPT_TEXT,
            "--text", TEXT,
            "--res-wav-path", str(out),
        )  # fmt: skip
        assert code == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --res-wav-path") and "--prompt-wav" in err, err
    assert prompt.read_bytes() == before


def test_test_list_name_resolving_to_its_prompt_is_refused(workdir, tmp_path, capsys):
    write_prompt_wav(tmp_path / "speaker.wav")
    before = (tmp_path / "speaker.wav").read_bytes()
    tsv = tmp_path / "list.tsv"
    tsv.write_text(
        f"ok\t{PROMPT_TEXT}\tspeaker.wav\t{TEXT}\nspeaker\t{PROMPT_TEXT}\tspeaker.wav\t{TEXT}\n"
    )
    assert _infer(workdir, "--test-list", str(tsv), "--res-dir", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "output of 'speaker'" in err and "prompt_wav" in err
    assert (tmp_path / "speaker.wav").read_bytes() == before
    assert not (tmp_path / "ok.wav").exists()  # refused before the first line was generated


def test_test_list_with_a_bom_names_outputs_without_it(workdir, tmp_path):
    tsv = tmp_path / "list.tsv"
    row = f"first\t{PROMPT_TEXT}\t{workdir / 'prompt.wav'}\t{TEXT}\n"
    tsv.write_bytes(b"\xef\xbb\xbf" + row.encode())
    assert _infer(workdir, "--test-list", str(tsv), "--res-dir", str(tmp_path / "out")) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["first.wav"]


@pytest.mark.parametrize(
    "content, expected",
    [
        (f"a\tx\tp.wav\t{SHIFT_JIS_TEXT}\n".encode("shift_jis"), ":1: not UTF-8"),
        (b"a\tx\tp.wav\tok\nb\tx\tp\x00.wav\tok\n", ":2: NUL byte"),
        (b"a\tx\tp.wav\tok\nb\tx\tp.wav\t \n", ":2: empty text"),
    ],
)
def test_bad_test_lists_name_the_file_and_line(workdir, tmp_path, capsys, content, expected):
    tsv = tmp_path / "list.tsv"
    tsv.write_bytes(content)
    assert _infer(workdir, "--test-list", str(tsv), "--res-dir", str(tmp_path / "out")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{tsv}{expected}" in err, err


def test_shift_jis_is_named_with_a_conversion_hint(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(("一行目\n" + SHIFT_JIS_TEXT + "\n").encode("shift_jis"))
    with pytest.raises(ValidationError, match=r"text.txt:1: not UTF-8 .*shift_jis.*iconv"):
        read_text_lines(path)
    path.write_bytes(b"\xef\xbb\xbfline one\r\nline two\n")
    assert read_text_lines(path) == [(1, "line one"), (2, "line two")]


def test_token_files_with_gaps_bom_or_another_encoding(tmp_path):
    gap = tmp_path / "gap.txt"
    gap.write_text("_\t0\na\t1\nb\t3\n")
    with pytest.raises(
        TokenFileError, match=r"gap.txt: ids must run from 0 to 2 .* 2 .*'b' has id 3"
    ):
        read_token_file(gap)
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf_\t0\na\t1\n")
    assert read_token_file(bom) == {"_": 0, "a": 1}
    sjis = tmp_path / "sjis.txt"
    sjis.write_bytes("_\t0\nあ\t1\n".encode("shift_jis"))
    with pytest.raises(TokenFileError, match="sjis.txt:2: not UTF-8"):
        read_token_file(sjis)


def test_wav_header_claiming_one_hertz_is_refused(tmp_path):
    path = tmp_path / "odd.wav"
    sf.write(path, np.zeros(2000, dtype=np.float32), 1)
    with pytest.raises(AudioError, match=r"odd.wav: its header claims a sample rate of 1 Hz"):
        load_audio(path)


def test_cuda_requested_without_cuda_is_named(workdir, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValidationError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValidationError, match="not a device"):
        resolve_device("gpu0")
    assert _single(workdir, workdir / "never.wav", "--device", "cuda") == 1
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert str(resolve_device(None)) == "cpu"


def _model_folder_with(tmp_path: Path, change: dict) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(parents=True)
    config = json.loads((PARITY / "zipvoice" / "model.json").read_text())
    config["model"].update(change)
    (folder / "model.json").write_text(json.dumps(config))
    (folder / "model.pt").symlink_to(PARITY / "zipvoice" / "model.pt")
    (folder / "tokens.txt").symlink_to(PARITY / "tokens.txt")
    return folder


def test_model_json_sizes_are_checked_before_allocating(tmp_path):
    huge = _model_folder_with(tmp_path / "huge", {"fm_decoder_dim": 10**7})
    with pytest.raises(ValidationError, match=r"huge/model/model.json needs about .* available"):
        load_pretrained(model_dir=huge)
    negative = _model_folder_with(tmp_path / "neg", {"fm_decoder_dim": -64})
    with pytest.raises(ModelConfigError, match=r"neg/model/model.json: sizes that cannot make"):
        load_pretrained(model_dir=negative)


def test_nan_weights_name_the_checkpoint(tmp_path):
    folder = tmp_path / "model"
    make_model_dir(folder, "zipvoice")
    state = torch.load(PARITY / "zipvoice" / "model.pt", weights_only=True)["model"]
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    (folder / "model.pt").unlink()
    torch.save({"model": state}, folder / "model.pt")
    with pytest.raises(ValidationError, match=rf"model.pt: non-finite values .*{key}"):
        load_pretrained(model_dir=folder)


def test_lora_rank_is_checked_against_layers_and_memory(workdir):
    from zipvoice.models.modules.lora_utils import get_lora_target_modules

    model, *_ = load_pretrained(model_dir=workdir / "zipvoice")
    targets = get_lora_target_modules(model, "attention")
    check_lora_rank(model, targets, 4)
    with pytest.raises(ValidationError, match="--lora-rank 100000 is larger than"):
        check_lora_rank(model, targets, 100000)
    with pytest.raises(ValidationError, match=r"needs about 1.0 GiB.*512.0 MiB available"):
        check_fits_in_memory(2**30, "a test allocation", available=2**29)


def test_hard_links_count_as_the_same_file(tmp_path):
    original = tmp_path / "a.wav"
    original.write_bytes(b"RIFF")
    os.link(original, tmp_path / "b.wav")
    with pytest.raises(ValidationError, match="is the input --prompt-wav"):
        assert_not_input(tmp_path / "b.wav", {"--prompt-wav": original}, "--res-wav-path")
    assert_not_input(tmp_path / "c.wav", {"--prompt-wav": original, "--other": None})


def test_a_wav_write_that_runs_out_of_space_names_the_file(tmp_path):
    """A file-size limit makes the write fail the way a full disk does (libsndfile says only
    "System error."); the message must name the file and the likely cause, and leave no file."""
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "big.wav"
    code = f"""
import resource, signal, numpy as np
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
from zipvoice.utils.audio import save_wav
try:
    save_wav({str(out)!r}, np.zeros(48000, dtype=np.float32))
except Exception as err:
    print(type(err).__name__, err)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.stdout.startswith(f"AudioError cannot write {out}:"), result
    assert "is the disk full?" in result.stdout
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_a_transcript_that_cannot_be_the_prompts_is_warned_about(workdir, tmp_path, caplog):
    out = tmp_path / "short.wav"
    with caplog.at_level(logging.WARNING):
        code = _infer(
            workdir,
            "--prompt-wav", str(workdir / "prompt.wav"),
            "--prompt-text", PROMPT_TEXT * 40,
            "--text", TEXT,
            "--res-wav-path", str(out),
        )  # fmt: skip
    assert code == 0
    assert "does --prompt-text say exactly what the prompt audio says?" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _single(workdir, tmp_path / "fine.wav") == 0
    assert "--prompt-text" not in caplog.text


def test_an_adapter_of_another_peft_type_is_refused(workdir, tmp_path, capsys):
    from tests.helpers import make_adapter

    adapter = make_adapter(workdir / "zipvoice", tmp_path / "adapter", use_dora=False)
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["peft_type"] = "IA3"
    config_path.write_text(json.dumps(config))
    assert _single(workdir, tmp_path / "out.wav", "--lora-path", str(adapter)) == 1
    err = capsys.readouterr().err
    assert "peft_type 'IA3' is not a LoRA/DoRA adapter" in err and str(config_path) in err
    assert not (tmp_path / "out.wav").exists()


@pytest.mark.parametrize("file", ["adapter_model.safetensors", "text_side.safetensors"])
def test_nan_in_an_adapter_names_the_file(workdir, tmp_path, capsys, file):
    from safetensors.torch import load_file, save_file

    from tests.helpers import make_adapter

    adapter = make_adapter(workdir / "zipvoice", tmp_path / "adapter", use_dora=True)
    state = load_file(adapter / file)
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    save_file(state, adapter / file)
    # A consistent folder (manifest rewritten) whose weights are non-finite, as a diverged run
    # would save them: the NaN check, not the manifest, must name the file.
    from zipvoice.utils.manifest import write_manifest

    write_manifest(adapter, "adapter")
    assert _single(workdir, tmp_path / "out.wav", "--lora-path", str(adapter)) == 1
    err = capsys.readouterr().err
    assert f"{adapter / file}: non-finite values" in err and key in err, err


def test_an_adapter_with_non_finite_weights_is_not_written(workdir, tmp_path):
    from zipvoice.models.modules.adapter_folder import save_adapter
    from zipvoice.models.modules.lora_utils import (
        apply_lora_to_model,
        create_lora_config,
        get_lora_target_modules,
    )

    model, _, token_file, _ = load_pretrained(model_dir=workdir / "zipvoice")
    config = create_lora_config(rank=2, alpha=4, target_modules=get_lora_target_modules(model))
    apply_lora_to_model(model, config)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("inf"))
    with pytest.raises(ValidationError, match="refusing to write the adapter .*lora_B.*diverged"):
        save_adapter(
            model,
            tmp_path / "adapter",
            base_fingerprint="x",
            token_file=token_file,
            model_config=workdir / "zipvoice" / "model.json",
        )
    assert not (tmp_path / "adapter").exists()


def test_a_token_file_larger_than_the_adapters_embedding_is_named(workdir, tmp_path, capsys):
    from tests.helpers import make_adapter

    adapter = make_adapter(workdir / "zipvoice", tmp_path / "adapter", use_dora=False)
    tokens = adapter / "tokens.txt"
    count = len(read_token_file(tokens))
    tokens.write_text(tokens.read_text() + f"zz\t{count}\n")
    from zipvoice.utils.manifest import write_manifest

    write_manifest(adapter, "adapter")  # consistent folder, inconsistent sizes: that check names it
    assert _single(workdir, tmp_path / "out.wav", "--lora-path", str(adapter)) == 1
    err = capsys.readouterr().err
    assert f"{tokens} has ids up to {count} but {adapter} embeds only {count} tokens" in err, err


def test_other_text_inputs_name_file_and_line(tmp_path):
    from zipvoice.dataset.manifests import read_tsv_rows
    from zipvoice.dataset.synthetic import load_sentences
    from zipvoice.tokenizer.prepare import prepare_token_file

    sentences = tmp_path / "sentences.txt"
    first, second = "一つ目。\n".encode(), "二つ目。\n".encode("shift_jis")
    sentences.write_bytes(b"\xef\xbb\xbf" + first + second)
    with pytest.raises(ValidationError, match=r"sentences.txt:2: not UTF-8"):
        load_sentences(sentences)
    sentences.write_bytes(b"\xef\xbb\xbf" + "一つ目。\n".encode())
    assert load_sentences(sentences) == ["一つ目。"]  # the BOM is not part of the sentence

    tsv = tmp_path / "data.tsv"
    tsv.write_bytes(b"a\tok\ta.wav\nb\tbad\x00\tb.wav\n")
    rows, rejected = read_tsv_rows(tsv)
    assert [r.line for r in rejected] == [2] and "NUL byte" in rejected[0].reason

    texts = tmp_path / "texts.txt"
    texts.write_bytes("あ\n".encode("shift_jis"))
    with pytest.raises(ValidationError, match=r"texts.txt:1: not UTF-8"):
        prepare_token_file("simple", tmp_path / "tokens.txt", text_file=texts)
