"""The model reproduces the reference implementation's outputs on the parity fixtures."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import PARITY
from zipvoice.models.loader import build_model
from zipvoice.tokenizer.token_file import read_token_file
from zipvoice.utils.checkpoint import load_checkpoint_state, load_model_state

ATOL = 1e-4
MODEL_KINDS = ("zipvoice", "distill")


def _parse_keys_file(path: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        key, shape, _dtype = line.split("\t")
        shapes[key] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return shapes


@pytest.fixture(scope="module", params=MODEL_KINDS)
def loaded(request, parity_dir: Path):
    kind = request.param
    token2id = read_token_file(parity_dir / "tokens.txt")
    config = json.loads((parity_dir / kind / "model.json").read_text())
    model = build_model(config, len(token2id), token2id["_"], distill=kind == "distill")
    state = load_checkpoint_state(parity_dir / kind / "model.pt")
    load_model_state(model, state, parity_dir / kind / "model.pt")
    model.eval()
    cases = torch.load(parity_dir / kind / "cases.pt", weights_only=True)
    return kind, model, cases


def _guidance(kind: str, cases: dict, batch: bool) -> dict:
    if kind != "distill":
        return {}
    return {"guidance_scale": cases["guidance_scale_batch"] if batch else torch.tensor(2.0)}


def _speech_condition_from_prompt(cases: dict, num_frames: int) -> torch.Tensor:
    prompt = cases["prompt_features"]
    padded = torch.nn.functional.pad(prompt, (0, 0, 0, num_frames - prompt.shape[1]))
    after_prompt = torch.arange(num_frames)[None, :] >= cases["prompt_features_lens"][:, None]
    return padded.masked_fill(after_prompt[..., None], 0.0)


def test_state_dict_matches_reference_keys_and_shapes(loaded, parity_dir: Path):
    kind, model, _ = loaded
    expected = _parse_keys_file(parity_dir / kind / "state_dict_keys.txt")
    got = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert got == expected


def test_text_embed_and_condition(loaded):
    _, model, cases = loaded
    with torch.no_grad():
        embed, tokens_lens = model.forward_text_embed(cases["tokens"])
        torch.testing.assert_close(embed, cases["text_embed"], atol=ATOL, rtol=0)
        condition, padding_mask = model.forward_text_condition(
            embed, tokens_lens, cases["features_lens"]
        )
        torch.testing.assert_close(condition, cases["text_condition"], atol=ATOL, rtol=0)
        assert torch.equal(padding_mask, cases["padding_mask"])
        # forward_text_train is the same two steps.
        condition2, padding_mask2 = model.forward_text_train(
            cases["tokens"], cases["features_lens"]
        )
        torch.testing.assert_close(condition2, cases["text_condition"], atol=ATOL, rtol=0)
        assert torch.equal(padding_mask2, cases["padding_mask"])


@pytest.mark.parametrize("t_kind", ["batch", "scalar"])
def test_fm_decoder_velocity(loaded, t_kind: str):
    kind, model, cases = loaded
    t = cases["t_batch"] if t_kind == "batch" else torch.tensor(0.3)
    expected = cases["fm_out_t_batch"] if t_kind == "batch" else cases["fm_out_t_scalar"]
    # Grad enabled on purpose: in eval mode the training shapers must be the identity too.
    velocity = model.forward_fm_decoder(
        t=t,
        xt=cases["xt"],
        text_condition=cases["text_condition"],
        speech_condition=cases["speech_condition"],
        padding_mask=cases["padding_mask"],
        **_guidance(kind, cases, batch=t_kind == "batch"),
    )
    torch.testing.assert_close(velocity.detach(), expected, atol=ATOL, rtol=0)


def test_inference_condition_from_prompt_ratio(loaded):
    _, model, cases = loaded
    with torch.no_grad():
        condition, padding_mask = model.forward_text_inference_ratio_duration(
            tokens=cases["tokens"],
            prompt_tokens=cases["prompt_tokens"],
            prompt_features_lens=cases["prompt_features_lens"],
            speed=cases["speed"],
        )
    torch.testing.assert_close(condition, cases["infer_text_condition"], atol=ATOL, rtol=0)
    assert torch.equal(padding_mask, cases["infer_padding_mask"])


def test_euler_sampling(loaded):
    _, model, cases = loaded
    num_frames = cases["x0"].shape[1]
    with torch.no_grad():
        x1 = model.solver.sample(
            x=cases["x0"],
            text_condition=cases["infer_text_condition"],
            speech_condition=_speech_condition_from_prompt(cases, num_frames),
            padding_mask=cases["infer_padding_mask"],
            num_step=cases["sample_num_step"],
            guidance_scale=cases["sample_guidance_scale"],
            t_shift=cases["sample_t_shift"],
        )
    torch.testing.assert_close(x1, cases["x1"], atol=ATOL, rtol=0)


def test_sample_returns_generated_frames_after_the_prompt(loaded):
    _, model, cases = loaded
    prompt_lens = cases["prompt_features_lens"]
    with torch.no_grad():
        generated, generated_lens, prompt_part, prompt_lens_out = model.sample(
            tokens=cases["tokens"],
            prompt_tokens=cases["prompt_tokens"],
            prompt_features=cases["prompt_features"],
            prompt_features_lens=prompt_lens,
            speed=cases["speed"],
            t_shift=cases["sample_t_shift"],
            num_step=cases["sample_num_step"],
            guidance_scale=cases["sample_guidance_scale"],
            x0=cases["x0"],
        )
    total_lens = (~cases["infer_padding_mask"]).sum(-1)
    assert torch.equal(generated_lens, total_lens - prompt_lens)
    assert torch.equal(prompt_lens_out, prompt_lens)
    for i in range(len(prompt_lens)):
        start, length = int(prompt_lens[i]), int(generated_lens[i])
        expected = cases["x1"][i, start : start + length]
        torch.testing.assert_close(generated[i, :length], expected, atol=ATOL, rtol=0)
        assert torch.all(generated[i, length:] == 0)
        torch.testing.assert_close(
            prompt_part[i, :start], cases["x1"][i, :start], atol=ATOL, rtol=0
        )


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_released_configuration_builds_the_published_keys(kind: str):
    config = json.loads((PARITY / kind / "base_model.json").read_text())
    with torch.device("meta"):
        model = build_model(config, vocab_size=360, pad_id=0, distill=kind == "distill")
    expected = _parse_keys_file(PARITY / kind / "base_config_state_dict_keys.txt")
    got = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert got == expected
    if kind == "zipvoice":
        assert sum(p.numel() for p in model.parameters()) == 122_664_804


def test_fm_decoder_traces_with_dynamic_batch_and_time(parity_dir: Path):
    """torch.jit.trace (what the TorchScript ONNX exporter uses) must not bake in the
    example's batch size or length."""
    token2id = read_token_file(parity_dir / "tokens.txt")
    config = json.loads((parity_dir / "zipvoice" / "model.json").read_text())
    model = build_model(config, len(token2id), token2id["_"]).eval()
    load_model_state(model, load_checkpoint_state(parity_dir / "zipvoice" / "model.pt"))

    class Velocity(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, t, xt, text_condition, speech_condition, padding_mask):
            return self.model.forward_fm_decoder(
                t, xt, text_condition, speech_condition, padding_mask
            )

    def inputs(batch: int, frames: int):
        lens = torch.randint(frames // 2, frames + 1, (batch,))
        lens[0] = frames
        feats = [torch.randn(batch, frames, 100) for _ in range(3)]
        mask = torch.arange(frames)[None, :] >= lens[:, None]
        return (torch.rand(batch, 1, 1), *feats, mask)

    torch.manual_seed(0)
    wrapper = Velocity().eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, inputs(2, 37))
        for batch, frames in [(3, 29)]:
            args = inputs(batch, frames)
            torch.testing.assert_close(traced(*args), wrapper(*args), atol=ATOL, rtol=0)
