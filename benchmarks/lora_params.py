"""Trainable parameters of rank-32 LoRA/DoRA adapters on the released ZipVoice configuration.

Usage: python benchmarks/lora_params.py [--model-config base_model.json] [--vocab-size 360]

Builds the model on CPU with random weights (counts do not depend on the values) and prints,
for every target preset, the adapter parameters and their share of the whole model, and the
trainable total when the embedding and text encoder also train (the trainer's default).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch

from zipvoice.models.modules.lora_utils import (
    PRESETS,
    apply_lora_to_model,
    count_parameters,
    create_lora_config,
    get_lora_target_modules,
)
from zipvoice.models.zipvoice import ZipVoice

PARITY = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "upstream_parity"
DEFAULT_CONFIG = PARITY / "zipvoice" / "base_model.json"


def build(config: dict, vocab_size: int) -> ZipVoice:
    torch.manual_seed(0)
    return ZipVoice(**config["model"], vocab_size=vocab_size, pad_id=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--vocab-size", type=int, default=360)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    config = json.loads(args.model_config.read_text(encoding="utf-8"))

    base = build(config, args.vocab_size)
    _, total = count_parameters(base)
    decoder_total = sum(p.numel() for p in base.fm_decoder.parameters())
    text_side = sum(p.numel() for p in base.embed.parameters()) + sum(
        p.numel() for p in base.text_encoder.parameters()
    )
    print(f"model: {total:,} parameters ({decoder_total:,} in fm_decoder, {text_side:,} text side)")
    print(f"rank {args.rank}, alpha {2 * args.rank}")
    header = (
        f"{'preset':<18} {'kind':<5} {'modules':>7} {'adapter params':>15} {'% of model':>10}"
        f" {'+ text side':>12} {'% of model':>10}"
    )
    print(header)
    print("-" * len(header))
    for preset in PRESETS:
        for use_dora in (False, True):
            model = copy.deepcopy(base)
            targets = get_lora_target_modules(model, preset)
            lora_config = create_lora_config(
                rank=args.rank, alpha=2 * args.rank, use_dora=use_dora, target_modules=targets
            )
            for param in model.parameters():
                param.requires_grad_(False)
            apply_lora_to_model(model, lora_config)
            adapter, total_with = count_parameters(model)
            with_text = adapter + text_side
            kind = "DoRA" if use_dora else "LoRA"
            print(
                f"{preset:<18} {kind:<5} {len(targets):>7} {adapter:>15,} "
                f"{100 * adapter / total:>9.2f}% {with_text:>12,} {100 * with_text / total:>9.2f}%"
            )


if __name__ == "__main__":
    main()
