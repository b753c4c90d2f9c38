"""LoRA/DoRA adapters on the decoder: target selection, freezing, merging, saving, loading,
and the optimisers' behaviour. Tiny reference-format model from the parity fixtures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from tests.conftest import PARITY
from tests.helpers import ADAPTER_FILES, perturb_adapters
from zipvoice.models.modules.adapter_folder import (
    AdapterError,
    fingerprint_state_dict,
    load_adapter,
    save_adapter,
)
from zipvoice.models.modules.lora_utils import (
    ATTENTION_SUFFIXES,
    FF_CONV_SUFFIXES,
    apply_lora_to_model,
    count_parameters,
    create_lora_config,
    get_lora_target_modules,
    is_lora_model,
    lora_layers,
    merge_lora_weights,
    unwrap_decoder,
)
from zipvoice.models.zipvoice import ZipVoice
from zipvoice.tokenizer.token_file import write_token_file
from zipvoice.utils.optim import Eden, ScaledAdam, WarmupCosine

MODEL_DIR = PARITY / "zipvoice"
NUM_DECODER_LAYERS = 6  # fixture config: fm_decoder_num_layers [1, 1, 2, 1, 1]


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    return torch.load(MODEL_DIR / "model.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def model_config() -> dict:
    return json.loads((MODEL_DIR / "model.json").read_text())


@pytest.fixture(scope="module")
def cases() -> dict:
    return torch.load(MODEL_DIR / "cases.pt", weights_only=True)


def make_model(config: dict, state: dict, vocab_size: int | None = None) -> ZipVoice:
    base_vocab = state["embed.weight"].shape[0]
    model = ZipVoice(**config["model"], vocab_size=base_vocab, pad_id=0)
    model.load_state_dict(state)
    if vocab_size is not None and vocab_size > base_vocab:
        old = model.embed.weight.data
        model.embed = nn.Embedding(vocab_size, old.shape[1])
        with torch.no_grad():
            model.embed.weight[:base_vocab] = old
    return model.eval()


def decoder_output(model: nn.Module, cases: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_fm_decoder(
            t=cases["t_batch"],
            xt=cases["xt"],
            text_condition=cases["text_condition"],
            speech_condition=cases["speech_condition"],
            padding_mask=cases["padding_mask"],
        )


def save_to(
    folder: Path, model: nn.Module, config: dict, base_state: dict, **kwargs
) -> tuple[Path, str]:
    """`save_adapter` into folder/adapter, with a placeholder token file (`_`, t1, t2, ...)
    of the model's vocabulary; returns (adapter folder, base fingerprint)."""
    vocab_size = model.embed.weight.shape[0]
    token_file = folder / "tokens.txt"
    write_token_file(token_file, {"_": 0, **{f"t{i}": i for i in range(1, vocab_size)}})
    fingerprint = fingerprint_state_dict(base_state)
    out = save_adapter(
        model,
        folder / "adapter",
        base_fingerprint=fingerprint,
        token_file=token_file,
        model_config=config,
        **kwargs,
    )
    return out, fingerprint


def with_adapters(config, state, use_dora=True, preset="attention", rank=4, vocab_size=None):
    model = make_model(config, state, vocab_size)
    targets = get_lora_target_modules(model, preset)
    lora_config = create_lora_config(
        rank=rank, alpha=2 * rank, use_dora=use_dora, target_modules=targets
    )
    return apply_lora_to_model(model, lora_config), targets


# ------------------------------------------------------------------ target selection


def test_presets_name_the_real_decoder_linears(model_config, base_state):
    model = make_model(model_config, base_state)
    attention = get_lora_target_modules(model)
    assert len(attention) == 5 * NUM_DECODER_LAYERS
    assert {name.rsplit(".", 2)[-2] for name in attention} == {
        suffix.split(".")[0] for suffix in ATTENTION_SUFFIXES
    }
    decoder_modules = dict(unwrap_decoder(model).named_modules())
    assert all(isinstance(decoder_modules[n], nn.Linear) for n in attention)

    with_ff_conv = get_lora_target_modules(model, "attention_ff_conv")
    assert len(with_ff_conv) == 10 * NUM_DECODER_LAYERS
    assert any(n.endswith(FF_CONV_SUFFIXES[0]) for n in with_ff_conv)
    # The feed-forward output projections are not nn.Linear: never selected.
    assert not any(n.endswith("feed_forward1.out_proj") for n in with_ff_conv)

    all_linear = get_lora_target_modules(model, "all_linear")
    linear_count = sum(isinstance(m, nn.Linear) for m in model.fm_decoder.modules())
    assert len(all_linear) == linear_count and "in_proj" in all_linear

    explicit = get_lora_target_modules(
        model, "fm_decoder.encoders.0.layers.0.self_attn1.in_proj, nonlin_attention.out_proj"
    )
    assert explicit[0] == "encoders.0.layers.0.self_attn1.in_proj"
    assert len(explicit) == 1 + NUM_DECODER_LAYERS

    with pytest.raises(ValueError, match="not an nn.Linear"):
        get_lora_target_modules(model, "feed_forward1.out_proj")
    with pytest.raises(ValueError, match="matches no module"):
        get_lora_target_modules(model, "self_atn1.in_proj")


def test_adapters_land_exactly_on_the_named_modules_and_base_is_frozen(model_config, base_state):
    model = make_model(model_config, base_state)
    # The top-level "in_proj" is also a suffix of every layer's in_proj: only it may be adapted.
    config = create_lora_config(rank=4, alpha=8, target_modules=["in_proj"])
    apply_lora_to_model(model, config)
    assert [name for name, _ in lora_layers(model)] == ["in_proj"]

    model, targets = with_adapters(model_config, base_state, preset="attention_ff_conv")
    assert is_lora_model(model)
    assert sorted(name for name, _ in lora_layers(model)) == sorted(targets)
    for name, param in model.fm_decoder.named_parameters():
        assert param.requires_grad == ("lora_" in name), name
    trainable, total = count_parameters(model)
    decoder_adapter = sum(p.numel() for n, p in model.fm_decoder.named_parameters() if "lora_" in n)
    text_side = sum(p.numel() for p in model.embed.parameters()) + sum(
        p.numel() for p in model.text_encoder.parameters()
    )
    assert trainable == decoder_adapter + text_side  # apply_lora leaves the text side alone
    assert total == sum(t.numel() for t in base_state.values()) + decoder_adapter


def test_config_validation():
    with pytest.raises(ValueError, match="unknown LoRA init"):
        create_lora_config(init="magic")
    with pytest.raises(ValueError, match="DoRA"):
        create_lora_config(init="pissa", use_dora=True)
    with pytest.raises(ValueError, match="rank"):
        create_lora_config(rank=0)
    config = create_lora_config(init="gaussian", use_dora=False, use_rslora=True)
    assert config.init_lora_weights == "gaussian" and config.use_rslora


# ------------------------------------------------------------------ merging


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merged_decoder_matches_unmerged(model_config, base_state, cases, use_dora):
    model, _ = with_adapters(model_config, base_state, use_dora=use_dora)
    perturb_adapters(model)
    unmerged = decoder_output(model, cases)
    base = decoder_output(make_model(model_config, base_state), cases)
    assert (unmerged - base).abs().max() > 1e-3  # the adapters do something
    merge_lora_weights(model)
    assert not is_lora_model(model)
    assert not any("lora" in key for key in model.state_dict())
    merged = decoder_output(model, cases)
    assert (merged - unmerged).abs().max() < 1e-5


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_scale_zero_is_the_base_and_half_is_between(
    model_config, base_state, cases, use_dora
):
    model, _ = with_adapters(model_config, base_state, use_dora=use_dora)
    perturb_adapters(model)
    half = make_model(model_config, base_state)
    half_peft = apply_lora_to_model(half, model.fm_decoder.peft_config["default"])
    half_peft.fm_decoder.load_state_dict(model.fm_decoder.state_dict())
    merge_lora_weights(model, scale=0.0)
    for key, value in model.fm_decoder.state_dict().items():
        assert torch.equal(value, base_state[f"fm_decoder.{key}"]), key
    if not use_dora:
        # For plain LoRA, scale s is the same as PEFT's scaling times s, unmerged.
        expected = make_model(model_config, base_state)
        apply_lora_to_model(expected, half_peft.fm_decoder.peft_config["default"])
        expected.fm_decoder.load_state_dict(half_peft.fm_decoder.state_dict())
        for _, layer in lora_layers(expected):
            layer.scale_layer(0.5)
        merge_lora_weights(half_peft, scale=0.5)
        assert (
            decoder_output(half_peft, cases) - decoder_output(expected, cases)
        ).abs().max() < 1e-5


# ------------------------------------------------------------------ saving and loading


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapter_folder_round_trip(model_config, base_state, cases, tmp_path, use_dora):
    extended_vocab = base_state["embed.weight"].shape[0] + 7
    model, _ = with_adapters(model_config, base_state, use_dora=use_dora, vocab_size=extended_vocab)
    perturb_adapters(model)
    with torch.no_grad():
        model.embed.weight[-7:].normal_()
    extra = {"step": 3, "tokenizer": "japanese"}
    out, fingerprint = save_to(tmp_path, model, model_config, base_state, extra=extra)
    assert ADAPTER_FILES <= {p.name for p in out.iterdir()}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folders left
    meta = json.loads((out / "zipvoice_adapter.json").read_text())
    assert meta["base_fingerprint"] == fingerprint and meta["vocab_size"] == extended_vocab
    assert meta["step"] == 3 and meta["lora"]["use_dora"] == use_dora

    merge_lora_weights(model)
    expected = decoder_output(model, cases)
    loaded = load_adapter(
        make_model(model_config, base_state), out, base_state_dict_fingerprint=fingerprint
    )
    assert loaded.embed.weight.shape[0] == extended_vocab
    assert torch.equal(loaded.embed.weight, model.embed.weight)
    assert (decoder_output(loaded, cases) - expected).abs().max() < 1e-6

    unmerged = load_adapter(
        make_model(model_config, base_state),
        out,
        base_state_dict_fingerprint=fingerprint,
        merge=False,
    )
    assert is_lora_model(unmerged)
    assert (decoder_output(unmerged, cases) - expected).abs().max() < 1e-5

    base_again = load_adapter(
        make_model(model_config, base_state), out, base_state_dict_fingerprint=fingerprint, scale=0
    )
    for key, value in base_again.fm_decoder.state_dict().items():
        assert torch.equal(value, base_state[f"fm_decoder.{key}"]), key


def test_adapter_refuses_other_base_and_broken_folders(model_config, base_state, tmp_path):
    model, _ = with_adapters(model_config, base_state, use_dora=False)
    out, fingerprint = save_to(tmp_path, model, model_config, base_state)

    other_state = dict(base_state)
    other_state["fm_decoder.in_proj.bias"] = other_state["fm_decoder.in_proj.bias"] + 1e-3
    other = fingerprint_state_dict(other_state)
    assert other != fingerprint
    assert fingerprint_state_dict({f"module.{k}": v for k, v in base_state.items()}) == fingerprint
    with pytest.raises(
        AdapterError, match=f"different base checkpoint: expected sha256 {fingerprint}"
    ):
        load_adapter(make_model(model_config, other_state), out, base_state_dict_fingerprint=other)

    (out / "text_side.safetensors").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="text_side.safetensors"):
        load_adapter(
            make_model(model_config, base_state), out, base_state_dict_fingerprint=fingerprint
        )
    (tmp_path / "moved").rename(out / "text_side.safetensors")
    (out / "zipvoice_adapter.json").write_text("{not json")
    with pytest.raises(AdapterError, match="zipvoice_adapter.json is not valid JSON"):
        load_adapter(
            make_model(model_config, base_state), out, base_state_dict_fingerprint=fingerprint
        )
    with pytest.raises(FileNotFoundError, match="not found"):
        load_adapter(
            make_model(model_config, base_state),
            tmp_path / "nowhere",
            base_state_dict_fingerprint=fingerprint,
        )


def test_pissa_adapter_is_converted_to_apply_on_the_original_base(
    model_config, base_state, cases, tmp_path
):
    model = make_model(model_config, base_state)
    config = create_lora_config(
        rank=4, alpha=4, use_dora=False, init="pissa", target_modules=get_lora_target_modules(model)
    )
    apply_lora_to_model(model, config)
    init_dir = tmp_path / "adapter-init"
    model.fm_decoder.save_pretrained(str(init_dir))
    perturb_adapters(model)  # "training"
    out, fingerprint = save_to(
        tmp_path, model, model_config, base_state, initial_adapter_dir=init_dir
    )
    expected = decoder_output(model, cases)
    loaded = load_adapter(
        make_model(model_config, base_state), out, base_state_dict_fingerprint=fingerprint
    )
    assert (decoder_output(loaded, cases) - expected).abs().max() < 1e-4


def test_a_converted_pissa_adapter_records_the_rank_it_was_saved_with(
    model_config, base_state, tmp_path
):
    model = make_model(model_config, base_state)
    config = create_lora_config(
        rank=4, alpha=4, use_dora=False, init="pissa", target_modules=get_lora_target_modules(model)
    )
    apply_lora_to_model(model, config)
    init_dir = tmp_path / "adapter-init"
    model.fm_decoder.save_pretrained(str(init_dir))
    perturb_adapters(model)
    out, _ = save_to(tmp_path, model, model_config, base_state, initial_adapter_dir=init_dir)
    peft_config = json.loads((out / "adapter_config.json").read_text())
    meta = json.loads((out / "zipvoice_adapter.json").read_text())
    # PEFT converts a PiSSA adapter into plain LoRA of twice the rank: both files say so.
    assert peft_config["r"] == 8
    assert meta["lora"]["rank"] == peft_config["r"] and meta["lora"]["init"] == "pissa"


# ------------------------------------------------------------------ optimisers


def test_scaled_adam_moves_each_tensor_by_its_own_scale():
    torch.manual_seed(0)
    big = nn.Parameter(torch.randn(32, 32))
    small = nn.Parameter(torch.randn(32, 32) * 1e-3)
    zero = nn.Parameter(torch.zeros(32, 32))
    optimizer = ScaledAdam([big, small, zero], lr=0.01)
    before = [p.detach().clone() for p in (big, small, zero)]
    for _ in range(3):
        loss = sum((p * torch.randn_like(p)).sum() for p in (big, small, zero))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    relative = [
        ((p - b).norm() / b.norm()).item() for p, b in zip((big, small), before[:2], strict=True)
    ]
    assert relative[0] == pytest.approx(relative[1], rel=0.2)
    # A zero-initialised tensor (LoRA's B) moves at the rms floor 1e-5: practically not at all.
    assert (zero - before[2]).abs().max() < 1e-5
    state = optimizer.state_dict()
    fresh = ScaledAdam([big, small, zero], lr=0.01)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["clipping"]["num_steps"] == 3


def test_schedules():
    param = nn.Parameter(torch.zeros(2))
    eden = Eden(torch.optim.SGD([param], lr=1.0), lr_batches=7500, lr_epochs=3.5)
    assert eden.get_last_lr()[0] == pytest.approx(0.5)  # warm-up starts at half
    eden.step_batch(7500)
    eden.step_epoch(3.5)
    assert eden.get_last_lr()[0] == pytest.approx(2**-0.25 * 2**-0.25)
    cosine = WarmupCosine(torch.optim.SGD([param], lr=1.0), warmup_steps=9, total_steps=109)
    assert cosine.get_last_lr()[0] == pytest.approx(0.1)
    cosine.step_batch(9)
    assert cosine.get_last_lr()[0] == pytest.approx(1.0)
    cosine.step_batch(59)
    assert cosine.get_last_lr()[0] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    cosine.step_batch(1000)
    assert cosine.get_last_lr()[0] == pytest.approx(0.1)
    restored = WarmupCosine(torch.optim.SGD([param], lr=1.0), warmup_steps=9, total_steps=109)
    restored.load_state_dict(cosine.state_dict())
    assert restored.get_last_lr() == cosine.get_last_lr()


def test_lora_layers_are_peft_layers(model_config, base_state):
    model, targets = with_adapters(model_config, base_state)
    assert all(isinstance(layer, LoraLayer) for _, layer in lora_layers(model))
    assert len(lora_layers(model)) == len(targets)
