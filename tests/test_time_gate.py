"""Time-gated adapters (--lora-t-range) and adapter scaling (--lora-scale) in PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import PARITY
from tests.helpers import PROMPT_TEXT, TEXT, make_inference_workdir
from zipvoice.bin import infer_zipvoice
from zipvoice.inference.torch_backend import load_model_for_inference
from zipvoice.models.modules.solver import get_time_steps
from zipvoice.models.modules.time_gate import TimeGateError, parse_t_range

TOKENS, PROMPT_TOKENS, PROMPT_FRAMES = [5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4], 30
NUM_STEP, T_SHIFT = 4, 0.5  # start times 0, 0.143, 0.333, 0.6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_inference_workdir(
        tmp_path_factory.mktemp("tgate"), {"dora": (True, 2), "lora": (False, 1)}
    )


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    frames = PROMPT_FRAMES + int(np.ceil(PROMPT_FRAMES / 4 * 8))
    return {
        "prompt": torch.randn(1, PROMPT_FRAMES, 100, generator=gen) * 0.3,
        "x0": torch.randn(1, frames, 100, generator=gen),
    }


_LOADED: dict[tuple, torch.nn.Module] = {}


def load(workdir: Path, adapter: str | None = "dora", **kwargs) -> torch.nn.Module:
    """A model loaded once per test module for each set of arguments, except gated ones
    (their gates count switches)."""
    key = (str(workdir), adapter, tuple(sorted(kwargs.items())))
    if key in _LOADED:
        return _LOADED[key]
    lora = None if adapter is None else workdir / adapter
    model, _, _ = load_model_for_inference(model_dir=workdir / "zipvoice", lora_path=lora, **kwargs)
    if "lora_t_range" not in kwargs:
        _LOADED[key] = model
    return model


@torch.no_grad()
def sample(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    features, _, _, _ = model.sample(
        [TOKENS], [PROMPT_TOKENS], inputs["prompt"], torch.tensor([PROMPT_FRAMES]),
        num_step=NUM_STEP, guidance_scale=1.0, t_shift=T_SHIFT, x0=inputs["x0"],
    )  # fmt: skip
    return features


@torch.no_grad()
def composed(model, inputs, weights_for) -> torch.Tensor:
    """The Euler loop written out; each step's velocity runs inside `weights_for(t)`."""
    text_condition, padding_mask = model.forward_text_inference_ratio_duration(
        [TOKENS], [PROMPT_TOKENS], torch.tensor([PROMPT_FRAMES]), 1.0
    )
    frames = text_condition.shape[1]
    speech = torch.nn.functional.pad(inputs["prompt"], (0, 0, 0, frames - PROMPT_FRAMES))
    x = inputs["x0"]
    steps = get_time_steps(0.0, 1.0, NUM_STEP, T_SHIFT)
    for k in range(NUM_STEP):
        with weights_for(float(steps[k])):
            v = model.solver.model(
                t=steps[k], x=x, text_condition=text_condition, speech_condition=speech,
                padding_mask=padding_mask, guidance_scale=1.0,
            )  # fmt: skip
        x = x + v * (steps[k + 1] - steps[k])
    return x[:, PROMPT_FRAMES:]


def assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Two model instances holding bit-identical weights can still differ by ~1e-7: CPU BLAS
    kernels depend on the weights' memory alignment. Exactness is checked on one instance."""
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("adapter", ["dora", "lora"])
def test_full_range_is_the_adapter_and_empty_range_the_base_exactly(workdir, inputs, adapter):
    merged_model, base_model = load(workdir, adapter), load(workdir, None)
    merged, base = sample(merged_model, inputs), sample(base_model, inputs)
    assert (merged - base).abs().max() > 1e-3  # the adapter is real
    full = load(workdir, adapter, lora_t_range=(0.0, 1.0))
    assert_same_weights(full, merged_model)
    with full.time_gate.hold(True):
        expected = sample(full, inputs)
    assert torch.equal(sample(full, inputs), expected) and full.time_gate.switches == 0
    close(expected, merged)
    for empty in ((0.0, 0.0), (0.5, 0.5), (1.0, 1.0)):
        gated = load(workdir, adapter, lora_t_range=empty)
        result = sample(gated, inputs)  # every step on the base weights
        with gated.time_gate.hold(False):
            assert_same_weights(gated, base_model)  # the swapped-in weights are the base's bits
            assert torch.equal(result, sample(gated, inputs))
        close(result, base)


def test_mid_range_adapts_exactly_the_steps_inside_it(workdir, inputs):
    # 4 steps start at 0, 0.143, 0.333, 0.6: [0, 0.5) swaps to the base once, before the last
    # step; [0.5, 1) swaps to the base at the first step and back for the last.
    cases = (((0.0, 0.5), lambda t: t < 0.5, 1), ((0.5, 1.0), lambda t: t >= 0.5, 2))
    for t_range, inside, switches in cases:
        gated = load(workdir, lora_t_range=t_range)
        result = sample(gated, inputs)
        assert gated.time_gate.switches == switches
        gate = gated.time_gate
        assert torch.equal(
            result, composed(gated, inputs, lambda t, g=gate, f=inside: g.hold(f(t)))
        )
        for other in (sample(load(workdir), inputs), sample(load(workdir, None), inputs)):
            assert (result - other).abs().max() > 1e-4


def test_gate_on_an_unmerged_adapter(workdir, inputs):
    base, merged = sample(load(workdir, None), inputs), sample(load(workdir), inputs)
    full = sample(load(workdir, merge_lora=False, lora_t_range=(0.0, 1.0)), inputs)
    close(full, merged)
    empty = load(workdir, merge_lora=False, lora_t_range=(0.3, 0.3))
    result = sample(empty, inputs)
    with empty.fm_decoder.disable_adapter():
        assert torch.equal(result, sample(empty, inputs))
    close(result, base)


def test_gate_refuses_a_batch_of_mixed_times(workdir):
    model = load(workdir, lora_t_range=(0.0, 0.5))
    x = torch.zeros(2, 9, 100)
    with pytest.raises(TimeGateError, match="one flow time"):
        model.forward_fm_decoder(torch.tensor([0.1, 0.7]).reshape(2, 1, 1), x, x, x)


@pytest.mark.parametrize(
    ("text", "message"),
    [("0.6,0.2", "A <= B"), ("0,1.5", "A <= B <= 1"), ("a,b", "two numbers"), ("0.5", "two")],
)
def test_bad_t_ranges_are_refused(text, message):
    with pytest.raises(TimeGateError, match=message):
        parse_t_range(text)


def test_t_range_without_adapter_is_refused(workdir):
    with pytest.raises(ValueError, match="--lora-path"):
        load(workdir, None, lora_t_range=(0.0, 0.5))


@pytest.mark.parametrize("adapter", ["dora", "lora"])
def test_unmerged_scale_means_the_merged_interpolation(workdir, inputs, adapter):
    """W_s = W0 + s (W_merged - W0) whether merged or not; s = 0 is the base exactly."""
    base = sample(load(workdir, None), inputs)
    zero = load(workdir, adapter, merge_lora=False, lora_scale=0.0)
    result = sample(zero, inputs)
    with zero.fm_decoder.disable_adapter():
        assert torch.equal(result, sample(zero, inputs))
    close(result, base)
    for scale in (1.0, 0.5):
        unmerged = sample(load(workdir, adapter, merge_lora=False, lora_scale=scale), inputs)
        merged = sample(load(workdir, adapter, lora_scale=scale), inputs)
        torch.testing.assert_close(unmerged, merged, atol=2e-5, rtol=0)
        assert (unmerged - base).abs().max() > 1e-3
    half = sample(load(workdir, adapter, lora_scale=0.5), inputs)
    full = sample(load(workdir, adapter), inputs)
    assert (half - full).abs().max() > 1e-4


def test_cli_empty_range_writes_the_base_models_wave(workdir, tmp_path):
    def run(out: Path, *extra: str) -> np.ndarray:
        code = infer_zipvoice.main(
            [
                "--model-dir", str(workdir / "zipvoice"), "--vocoder-path", str(PARITY / "vocos"),
                "--tokenizer", "simple", "--prompt-wav", str(workdir / "prompt.wav"),
                "--prompt-text", PROMPT_TEXT, "--text", TEXT, "--num-step", "3",
                "--res-wav-path", str(out), *extra,
            ]
        )  # fmt: skip
        assert code == 0
        return sf.read(out, dtype="float32")[0]

    base = run(tmp_path / "base.wav")
    lora = ["--lora-path", str(workdir / "dora")]
    empty = run(tmp_path / "e.wav", *lora, "--lora-t-range", "0,0")
    np.testing.assert_allclose(empty, base, atol=1e-4, rtol=0)
    gated = run(tmp_path / "g.wav", *lora, "--lora-t-range", "0,0.5")
    assert gated.shape == base.shape and np.abs(gated - base).max() > 1e-4
