#!/usr/bin/env python3
"""Zero-shot TTS with ZipVoice / ZipVoice-Distill in PyTorch, optionally with a trained adapter.

One sentence:
    python -m zipvoice.bin.infer_zipvoice --model-name zipvoice --model-dir exp/zipvoice \
        --prompt-wav prompt.wav --prompt-text "..." --text "..." --res-wav-path out.wav
Many sentences (TSV `name<TAB>prompt_text<TAB>prompt_wav<TAB>text`):
    python -m zipvoice.bin.infer_zipvoice --test-list test.tsv --res-dir results
With an adapter from fine-tuning (base fingerprint checked, merged at no extra cost):
    ... --lora-path exp/ft/adapter --lora-scale 1.0
"""

from __future__ import annotations

import argparse
import sys

from zipvoice.inference.flags import (
    add_generation_arguments,
    add_model_arguments,
    check_io_arguments,
    load_model_from_args,
    resolve_sampling_defaults,
    run_from_args,
    synthesizer_from_args,
)
from zipvoice.utils.cli import exit_on_error, fix_random_seed, setup_logging, str2bool
from zipvoice.utils.validate import resolve_device


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(
        parser, merge_lora_help="Merge the adapter into the weights (no extra inference cost)."
    )
    parser.add_argument(
        "--vocoder-path",
        default=None,
        help="Vocos folder (config.yaml + pytorch_model.bin); downloaded from the hub if omitted; "
        "'griffin-lim' needs no download (offline, lower quality).",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ...; default: best found.")
    parser.add_argument(
        "--compile",
        type=str2bool,
        default=False,
        help="Compile the decoder with torch.compile: the first generation of each length pays "
        "the compilation (minutes on a small CPU), later steps run faster.",
    )
    add_generation_arguments(parser)
    return parser


# Torch raises RuntimeError for inputs it cannot run (sizes, devices): reported, not traced.
@exit_on_error(also=(RuntimeError,))
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_parser().parse_args(argv)
    check_io_arguments(args)
    from zipvoice.inference.torch_backend import model_kind, torch_sampler, torch_vocoder
    from zipvoice.utils.allocator import keep_freed_memory
    from zipvoice.utils.resources import apply_num_threads

    keep_freed_memory()  # generation's large temporaries reuse freed memory
    apply_num_threads(args.num_thread)
    device = resolve_device(args.device)
    model, token_file, meta = load_model_from_args(args)
    model.to(device)
    if args.compile:
        from zipvoice.inference.torch_backend import compile_decoder

        compile_decoder(model)
    resolve_sampling_defaults(args, model_kind(model))
    from zipvoice.models.vocoder import load_vocoder

    vocoder = load_vocoder(args.vocoder_path).to(device)
    sampler = torch_sampler(
        model, args.num_step, args.guidance_scale, args.t_shift, args.speed, device
    )
    synthesizer = synthesizer_from_args(
        args, sampler, torch_vocoder(vocoder, device), token_file, meta
    )
    # Seed after loading: attaching adapters draws random numbers (PEFT initialises them
    # before loading), which must not change the noise the sampler starts from.
    fix_random_seed(args.seed)
    run_from_args(args, synthesizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
