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
import logging
import sys

import torch

from zipvoice.utils.infer import (
    Synthesizer,
    add_generation_arguments,
    check_io_arguments,
    fix_random_seed,
    load_model_for_inference,
    make_text_functions,
    model_kind,
    resolve_sampling_defaults,
    run_from_args,
    str2bool,
    torch_sampler,
    torch_vocoder,
)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-name", default="zipvoice", choices=["zipvoice", "zipvoice_distill"]
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help="Folder with the checkpoint, model.json and tokens.txt; "
        "downloaded from the hub if omitted.",
    )
    parser.add_argument("--checkpoint-name", default="model.pt")
    parser.add_argument(
        "--vocoder-path", default=None, help="Vocos folder (config.yaml + weights); hub if omitted."
    )
    parser.add_argument(
        "--lora-path",
        default=None,
        help="Adapter folder written by training (merged into the model).",
    )
    parser.add_argument(
        "--lora-scale",
        type=float,
        default=1.0,
        help="Adapter strength: 0 = base model, 1 = as trained.",
    )
    parser.add_argument(
        "--merge-lora",
        type=str2bool,
        default=True,
        help="Merge the adapter into the weights (no extra inference cost).",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ...; default: best found.")
    add_generation_arguments(parser)  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    args = get_parser().parse_args(argv)
    try:
        check_io_arguments(args)
        torch.set_num_threads(args.num_thread)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, token_file, meta = load_model_for_inference(
            args.model_name,
            args.model_dir,
            args.checkpoint_name,
            lora_path=args.lora_path,
            lora_scale=args.lora_scale,
            merge_lora=args.merge_lora,
        )
        model.to(device)
        resolve_sampling_defaults(args, model_kind(model))
        from zipvoice.models.vocoder import load_vocoder

        vocoder = load_vocoder(args.vocoder_path).to(device)
        text_to_tokens, tokens_to_ids = make_text_functions(
            args.tokenizer or meta.get("tokenizer", "emilia"),
            token_file,
            args.lang or meta.get("lang", "en-us"),
        )
        synthesizer = Synthesizer(
            text_to_tokens,
            tokens_to_ids,
            torch_sampler(
                model, args.num_step, args.guidance_scale, args.t_shift, args.speed, device
            ),
            torch_vocoder(vocoder, device),
            feat_scale=args.feat_scale,
            target_rms=args.target_rms,
            speed=args.speed,
            max_duration=args.max_duration,
            remove_long_sil=args.remove_long_sil,
        )
        # Seed after loading: attaching adapters draws random numbers (PEFT initialises them
        # before loading), which must not change the noise the sampler starts from.
        fix_random_seed(args.seed)
        run_from_args(args, synthesizer)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
