#!/usr/bin/env python3
"""Zero-shot TTS with an exported ZipVoice on ONNX Runtime (CPU).

    python -m zipvoice.bin.infer_zipvoice_onnx --onnx-model-dir exp/onnx \
        --prompt-wav prompt.wav --prompt-text "..." --text "..." --res-wav-path out.wav

The vocoder is `vocoder.onnx` from the export folder when present, else the Vocos folder
given by --vocoder-path (PyTorch). Adapters were merged at export time.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from zipvoice.utils.infer import (
    Synthesizer,
    add_generation_arguments,
    check_io_arguments,
    fix_random_seed,
    make_text_functions,
    resolve_sampling_defaults,
    run_from_args,
    str2bool,
    torch_vocoder,
)
from zipvoice.utils.infer_onnx import OnnxZipVoice


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--onnx-model-dir", required=True, help="Folder written by zipvoice.bin.onnx_export."
    )
    parser.add_argument(
        "--onnx-int8", type=str2bool, default=False, help="Use the int8-quantised models."
    )
    parser.add_argument(
        "--vocoder-path",
        default=None,
        help="Vocos folder, used when the export has no vocoder.onnx.",
    )
    add_generation_arguments(parser)  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    args = get_parser().parse_args(argv)
    try:
        check_io_arguments(args)
        fix_random_seed(args.seed)
        model = OnnxZipVoice(args.onnx_model_dir, int8=args.onnx_int8, num_thread=args.num_thread)
        resolve_sampling_defaults(args, model.model_type)
        if args.vocoder_path is None and model.vocoder is not None:
            vocode = model.vocode
        else:
            import torch

            from zipvoice.models.vocoder import load_vocoder

            torch.set_num_threads(args.num_thread)
            vocode = torch_vocoder(load_vocoder(args.vocoder_path))
        rng = np.random.default_rng(args.seed)

        def sample(batch: list[list[int]], prompt_ids: list[int], prompt_features: np.ndarray):
            return model.sample(
                batch,
                prompt_ids,
                prompt_features,
                num_step=args.num_step,
                guidance_scale=args.guidance_scale,
                t_shift=args.t_shift,
                speed=args.speed,
                rng=rng,
            )

        text_to_tokens, tokens_to_ids = make_text_functions(
            args.tokenizer or model.metadata.get("tokenizer", "emilia"),
            model.token_file,
            args.lang or model.metadata.get("lang", "en-us"),
        )
        synthesizer = Synthesizer(
            text_to_tokens,
            tokens_to_ids,
            sample,
            vocode,
            feat_scale=args.feat_scale,
            target_rms=args.target_rms,
            speed=args.speed,
            max_duration=args.max_duration,
            remove_long_sil=args.remove_long_sil,
        )
        run_from_args(args, synthesizer)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
