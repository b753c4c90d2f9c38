#!/usr/bin/env python3
"""Zero-shot TTS with an ONNX ZipVoice on ONNX Runtime (CPU), upstream's flags.

    python -m zipvoice.bin.infer_zipvoice_onnx --model-name zipvoice --model-dir exp/onnx \
        --prompt-wav prompt.wav --prompt-text "..." --text "..." --res-wav-path out.wav

--model-dir is a folder written by `zipvoice.bin.onnx_export` or any folder in upstream's ONNX
contract; without it the published ONNX files of --model-name are downloaded from the hub
(as upstream does). The vocoder is `vocoder.onnx` from the folder when present, else the Vocos
folder given by --vocoder-path (PyTorch; hub if omitted). Adapters were merged at export time;
an export with --lora-t-range runs its base decoder outside the range.
"""

from __future__ import annotations

import argparse
import sys

from zipvoice.inference.flags import (
    add_generation_arguments,
    add_t_range_argument,
    check_io_arguments,
    resolve_sampling_defaults,
    run_from_args,
    synthesizer_from_args,
)
from zipvoice.utils.cli import exit_on_error, fix_random_seed, setup_logging, str2bool


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--onnx-int8", type=str2bool, default=False, help="Use the int8-quantised models."
    )
    parser.add_argument(
        "--model-name",
        default="zipvoice",
        choices=["zipvoice", "zipvoice_distill"],
        help="Which published model to download, and the model type when the files do not "
        "record it (it picks the default --num-step and --guidance-scale).",
    )
    parser.add_argument(
        "--model-dir",
        "--onnx-model-dir",
        dest="model_dir",
        default=None,
        help="Folder with the ONNX files, tokens.txt and model.json (an onnx_export folder or "
        "upstream's); downloaded from the hub if omitted. --onnx-model-dir is an older name.",
    )
    parser.add_argument(
        "--vocoder-path",
        default=None,
        help="Vocos folder, used when the export has no vocoder.onnx ('griffin-lim' needs no "
        "download).",
    )
    add_t_range_argument(parser)
    add_generation_arguments(parser)
    return parser


# ONNX Runtime and torch raise RuntimeError for inputs they cannot run: reported, not traced.
@exit_on_error(also=(RuntimeError,))
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_parser().parse_args(argv)
    check_io_arguments(args)
    from zipvoice.inference.torch_backend import torch_vocoder  # here: --help stays light
    from zipvoice.onnx.runtime import OnnxZipVoice
    from zipvoice.utils.resources import choose_num_threads

    fix_random_seed(args.seed)
    args.num_thread = choose_num_threads(args.num_thread)
    model_dir = args.model_dir
    if model_dir is None:
        from zipvoice.onnx.hub import download_onnx_model

        model_dir = download_onnx_model(args.model_name, int8=args.onnx_int8)
    model = OnnxZipVoice(
        model_dir,
        int8=args.onnx_int8,
        num_thread=args.num_thread,
        model_name=args.model_name,
        lora_t_range=args.lora_t_range,
    )
    resolve_sampling_defaults(args, model.model_type)
    if args.vocoder_path is None and model.vocoder is not None:
        vocode = model.vocode
    else:
        import torch

        from zipvoice.models.vocoder import load_vocoder

        torch.set_num_threads(args.num_thread)
        vocode = torch_vocoder(load_vocoder(args.vocoder_path))
    sample = model.sampler(
        args.num_step, args.guidance_scale, args.t_shift, args.speed, seed=args.seed
    )
    synthesizer = synthesizer_from_args(args, sample, vocode, model.token_file, model.metadata)
    run_from_args(args, synthesizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
