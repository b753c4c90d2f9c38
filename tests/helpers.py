"""Builders shared by several test modules: model folders linking the parity fixtures, prompt
wavs, adapters with non-trivial weights."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from tests.conftest import PARITY
from zipvoice.models.modules.adapter_folder import fingerprint_state_dict, save_adapter
from zipvoice.models.modules.lora_utils import (
    apply_lora_to_model,
    create_lora_config,
    get_lora_target_modules,
)
from zipvoice.utils.checkpoint import load_checkpoint_state

PROMPT_TEXT = "hello there"
TEXT = "how are you today, my friend?"
# What an adapter folder written by save_adapter (and by training) holds.
ADAPTER_FILES = frozenset(
    {
        "adapter_config.json",
        "adapter_model.safetensors",
        "text_side.safetensors",
        "tokens.txt",
        "model.json",
        "zipvoice_adapter.json",
    }
)


def make_model_dir(folder: Path, variant: str) -> Path:
    """A released-style model folder (model.pt, model.json, tokens.txt) linking the fixtures."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("model.pt", "model.json"):
        (folder / name).symlink_to(PARITY / variant / name)
    (folder / "tokens.txt").symlink_to(PARITY / "tokens.txt")
    return folder


def write_prompt_wav(path: Path, seconds: float = 1.5, sr: int = 16000) -> Path:
    """A voiced-like tone at 16 kHz (the pipeline resamples it to 24 kHz)."""
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.05 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    sf.write(path, wave.astype(np.float32), sr)
    return path


def perturb_adapters(model: torch.nn.Module, seed: int = 0, strength: float = 1.0) -> None:
    """Give the adapters non-trivial values (lora_B starts at zero, the DoRA magnitude at
    ||W||), so that merging changes the weights: B ~ N(0, 0.05 strength), magnitudes scaled by
    up to 1 + 0.1 strength."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05 * strength)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * strength * torch.rand(param.shape, generator=generator))


def make_adapter(model_dir: Path, out_dir: Path, use_dora: bool, seed: int = 0) -> Path:
    """An adapter folder as training writes it, for the checkpoint in model_dir."""
    from zipvoice.models.loader import load_pretrained

    model, _, token_file, checkpoint = load_pretrained("zipvoice", model_dir)
    targets = get_lora_target_modules(model, "attention_ff_conv")
    config = create_lora_config(rank=4, alpha=8, use_dora=use_dora, target_modules=targets)
    apply_lora_to_model(model, config)
    perturb_adapters(model, seed, strength=2.0)
    return save_adapter(
        model,
        out_dir,
        base_fingerprint=fingerprint_state_dict(load_checkpoint_state(checkpoint)),
        token_file=token_file,
        model_config=model_dir / "model.json",
        extra={"tokenizer": "simple", "lang": "en-us"},
    )


def make_inference_workdir(root: Path, adapters: dict[str, tuple[bool, int]]) -> Path:
    """`root` with zipvoice/ and distill/ model folders, prompt.wav, and one adapter folder
    per `adapters` entry (name -> (use_dora, seed)) trained on zipvoice/."""
    make_model_dir(root / "zipvoice", "zipvoice")
    make_model_dir(root / "distill", "distill")
    write_prompt_wav(root / "prompt.wav")
    for name, (use_dora, seed) in adapters.items():
        make_adapter(root / "zipvoice", root / name, use_dora=use_dora, seed=seed)
    return root


def expected_samples(workdir: Path, text: str = TEXT, speed: float = 1.0) -> int:
    """prompt_frames / prompt_tokens * text_tokens / speed frames of 256 samples (one chunk)."""
    from zipvoice.inference.chunking import add_punctuation
    from zipvoice.inference.prompt import prepare_prompt
    from zipvoice.tokenizer.tokenizer import get_tokenizer

    tokenizer = get_tokenizer("simple", PARITY / "tokens.txt")
    to_tokens = lambda s: tokenizer.texts_to_tokens([s])[0]  # noqa: E731
    prompt = prepare_prompt(workdir / "prompt.wav", PROMPT_TEXT, to_tokens)
    frames = prompt.features.shape[0]
    text_tokens = len(tokenizer.texts_to_token_ids([add_punctuation(text)])[0])
    prompt_tokens = len(tokenizer.texts_to_token_ids([add_punctuation(PROMPT_TEXT)])[0])
    return math.ceil(frames / prompt_tokens * text_tokens / speed) * 256


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now (for a
    test's torchrun rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
