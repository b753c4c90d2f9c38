"""Small defects found by trying the tools as a user would (issue 18, item 8), one test each."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import make_model_dir
from zipvoice.tokenizer.tokenizer import (
    OPENJTALK_MAX_CHARS,
    japanese_text_to_tokens,
    normalize_japanese,
    split_for_openjtalk,
)

SENTENCE = "今日は良い天気ですね。"


# ----------------------------------------------------------------------------- Japanese


def test_texts_over_openjtalks_limit_are_read_whole():
    text = SENTENCE * 600  # 6600 characters: OpenJTalk alone refuses it and nothing comes out
    pieces = split_for_openjtalk(text)
    assert len(pieces) == 2 and "".join(pieces) == text
    assert all(len(p) <= OPENJTALK_MAX_CHARS and p.endswith("。") for p in pieces)
    tokens = japanese_text_to_tokens(text)
    one = japanese_text_to_tokens(SENTENCE)
    phonemes = [t for t in one if t.isalpha()]
    assert sum(t.isalpha() for t in tokens) == 600 * len(phonemes)
    assert tokens[0] == "^" and tokens[-1] == "$"
    assert tokens.count("^") == 1 and tokens.count("$") == 1  # one utterance, pieces joined


def test_text_without_punctuation_is_cut_at_the_limit():
    text = "あ" * 9000
    pieces = split_for_openjtalk(text)
    assert [len(p) for p in pieces] == [4000, 4000, 1000]
    assert japanese_text_to_tokens(text).count("a") == 9000


@pytest.mark.parametrize(
    "text, expected",
    [
        ("比率は2:30", "比率は2対30"),  # a ratio word before it: not a time
        ("スコアは3:15で勝った", "スコアは3対15で勝った"),
        ("16:9の画面", "16対9の画面"),  # cannot be a time
        ("2:30に会う", "2時30分に会う"),
        ("10:05:30に出発", "10時5分30秒に出発"),
        (
            "比率は高い。2:30に会う",
            "比率は高い。2時30分に会う",
        ),  # the ratio word is in another sentence
    ],
)
def test_digit_colon_digit_is_a_time_only_where_it_can_be_one(text, expected):
    assert normalize_japanese(text) == expected


def test_a_ratio_is_read_with_tai():
    assert japanese_text_to_tokens("比率は2:30") == japanese_text_to_tokens("比率は2対30")
    assert japanese_text_to_tokens("比率は2:30") != japanese_text_to_tokens("比率は2時30分")


# ----------------------------------------------------------------------------- ONNX int8


def test_int8_quantisation_does_not_flood_the_log(tmp_path, caplog):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from zipvoice.onnx.export import quantize_int8

    weights = [
        numpy_helper.from_array(np.random.default_rng(i).random((32, 32), np.float32), f"w{i}")
        for i in range(8)
    ]
    nodes = [
        helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"x{i + 1}"]) for i in range(len(weights))
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("x8", TensorProto.FLOAT, [1, 32])],
        weights,
    )
    src = tmp_path / "chain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    with caplog.at_level(logging.DEBUG):
        quantize_int8(src, tmp_path / "chain_int8.onnx")
        logging.getLogger().info("the root logger still logs")  # the filter is gone again
    assert onnx.load(str(tmp_path / "chain_int8.onnx")).graph.node
    ort_info = [r for r in caplog.records if "onnxruntime" in r.pathname]
    assert all(r.levelno >= logging.WARNING for r in ort_info), ort_info[:3]
    assert "the root logger still logs" in caplog.text


# ----------------------------------------------------------------------------- LoRA targets


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from zipvoice.models.loader import load_pretrained

    folder = make_model_dir(tmp_path_factory.mktemp("robust") / "zipvoice", "zipvoice")
    return load_pretrained(model_dir=folder)[0]


def test_presets_and_names_mix_in_the_target_list(model):
    from zipvoice.models.modules.lora_utils import get_lora_target_modules

    attention = get_lora_target_modules(model, "attention")
    ff1 = get_lora_target_modules(model, "feed_forward1.in_proj")
    mixed = get_lora_target_modules(model, "attention, feed_forward1.in_proj")
    assert set(mixed) == set(attention) | set(ff1) and len(mixed) == len(attention) + len(ff1)
    assert get_lora_target_modules(model, "attention,all_linear") == get_lora_target_modules(
        model, "all_linear"
    )
    with pytest.raises(ValueError, match="'atention' matches no module"):
        get_lora_target_modules(model, "atention,feed_forward1.in_proj")


def test_adapter_meta_records_the_real_init_and_language(model, tmp_path):
    from tests.conftest import PARITY
    from zipvoice.models.modules.adapter_folder import save_adapter
    from zipvoice.models.modules.lora_utils import (
        apply_lora_to_model,
        create_lora_config,
        get_lora_target_modules,
    )

    targets = get_lora_target_modules(model, "attention")
    for init, tokenizer, lang, expected in (
        ("default", "japanese", "en-us", ("default", "ja")),
        ("gaussian", "espeak", "de", ("gaussian", "de")),
    ):
        copy = type(model)(**_constructor_args(model))
        copy.load_state_dict(model.state_dict())
        config = create_lora_config(rank=2, alpha=4, target_modules=targets, init=init)
        apply_lora_to_model(copy, config)
        out = save_adapter(
            copy,
            tmp_path / f"adapter-{init}",
            base_fingerprint="x",
            token_file=PARITY / "tokens.txt",
            model_config=PARITY / "zipvoice" / "model.json",
            extra={"tokenizer": tokenizer, "lang": lang},
        )
        meta = json.loads((out / "zipvoice_adapter.json").read_text())
        assert (meta["lora"]["init"], meta["lang"]) == expected
        mode = stat.S_IMODE((out / "adapter_model.safetensors").stat().st_mode)
        assert mode == 0o666 & ~_umask()  # like every other file, not safetensors' 0600


def _constructor_args(model) -> dict:
    from tests.conftest import PARITY

    config = json.loads((PARITY / "zipvoice" / "model.json").read_text())["model"]
    return {**config, "vocab_size": model.embed.weight.shape[0], "pad_id": 0}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_safetensors_files_get_the_usual_permissions(tmp_path):
    from zipvoice.utils.checkpoint import save_safetensors_atomic

    old = os.umask(0o022)
    try:
        save_safetensors_atomic({"w": torch.zeros(3)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644


# ----------------------------------------------------------------------------- help


def test_help_keeps_the_examples_line_breaks(capsys):
    from zipvoice.bin import demo

    with pytest.raises(SystemExit):
        demo.get_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "\n    python -m zipvoice.bin.demo [--out-dir demo_out]\n" in out
    assert "(default:" in out  # defaults still shown


def test_all_help_texts_render(capsys):
    """Every entry point's --help runs (a formatter or % in a help string would break it)."""
    import importlib

    for name in ("demo", "infer_zipvoice", "infer_zipvoice_onnx", "compute_fbank"):
        module = importlib.import_module(f"zipvoice.bin.{name}")
        with pytest.raises(SystemExit) as info:
            module.get_parser().parse_args(["--help"])
        assert info.value.code == 0
    assert "griffin-lim" in capsys.readouterr().out
    assert Path  # used in type hints above


# ----------------------------------------------------------------------------- packaging


def test_dev_tools_are_a_default_uv_group_and_a_pip_extra():
    """uv installs the `dev` dependency group by default (a plain `uv run` keeps pytest and
    ruff); scripts/setup.sh installs the `dev` extra with pip. Both must list the same tools."""
    import tomllib

    from tests.conftest import REPO

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    group = project["dependency-groups"]["dev"]
    assert group == project["project"]["optional-dependencies"]["dev"]
    assert any(req.startswith("pytest") for req in group) and "ruff" in group
    ignored = (REPO / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert "uv.lock" in ignored  # not committed: see README, installation notes
    setup = (REPO / "scripts" / "setup.sh").read_text(encoding="utf-8")
    assert re.search(r'"\.\[dev[],]', setup), "setup.sh must install the dev extra"
