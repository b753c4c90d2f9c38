#!/usr/bin/env python3
"""Export ZipVoice / ZipVoice-Distill to ONNX in upstream's file contract, a trained adapter
merged in.

    python -m zipvoice.bin.onnx_export --model-dir exp/zipvoice --checkpoint-name model.pt \
        --lora-path exp/ft/adapter --onnx-model-dir exp/onnx

Writes text_encoder.onnx, fm_decoder.onnx, their *_int8.onnx copies, model.json and
tokens.txt, which upstream's ONNX inference and sherpa-onnx read as they are; with
--lora-t-range also fm_decoder_base.onnx (the decoder without the adapter, for time gating),
with --vocoder-path also vocoder.onnx. Run them with `python -m zipvoice.bin.infer_zipvoice_onnx`.
"""

from __future__ import annotations

import argparse
import sys

from zipvoice.inference.flags import add_model_arguments, load_model_from_args, text_frontend
from zipvoice.onnx import EXPORTERS
from zipvoice.utils.cli import exit_on_error, setup_logging, str2bool
from zipvoice.utils.folders import refuse_output_inside_inputs


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--onnx-model-dir", default="exp", help="Output folder.")
    add_model_arguments(
        parser, merge_lora_help="Must stay 1: an unmerged adapter cannot be exported."
    )
    parser.add_argument(
        "--int8",
        type=str2bool,
        default=True,
        help="Also write the dynamically int8-quantised copies *_int8.onnx (as upstream does).",
    )
    parser.add_argument(
        "--vocoder-path", default=None, help="Vocos folder to export as vocoder.onnx as well."
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="Recorded in the metadata; default: the adapter's, else emilia.",
    )
    parser.add_argument("--lang", default=None, help="Recorded in the metadata.")
    parser.add_argument("--exporter", default="torchscript", choices=EXPORTERS)
    return parser


# The exporters raise RuntimeError for graphs they cannot export: reported, not traced.
@exit_on_error(also=(RuntimeError,))
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_parser().parse_args(argv)
    inputs = {
        "--model-dir": args.model_dir,
        "--lora-path": args.lora_path,
        "--vocoder-path": args.vocoder_path,
    }
    refuse_output_inside_inputs("--onnx-model-dir", args.onnx_model_dir, inputs)
    import torch  # after parsing: --help stays quick

    from zipvoice.inference.torch_backend import model_kind
    from zipvoice.onnx.export import export_metadata, export_model

    # Gradients off for this call only: main() also runs in-process (the demo, tests).
    with torch.no_grad():
        model, token_file, meta = load_model_from_args(args)
        vocoder = None
        if args.vocoder_path is not None:
            from zipvoice.models.vocoder import load_vocoder

            vocoder = load_vocoder(args.vocoder_path)
        tokenizer_name, lang = text_frontend(args, meta)
        metadata = export_metadata(
            tokenizer_name, lang, args.checkpoint_name, args.lora_path, args.lora_scale, meta
        )
        written = export_model(
            model,
            args.onnx_model_dir,
            token_file,
            metadata=metadata,
            int8=args.int8,
            vocoder=vocoder,
            exporter=args.exporter,
        )
    for path in written.values():
        print(f"wrote {path}")
    print(f"exported a {model_kind(model)} model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
