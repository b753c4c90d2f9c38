#!/usr/bin/env python3
"""Export ZipVoice / ZipVoice-Distill to ONNX, with a trained adapter merged in.

    python -m zipvoice.bin.onnx_export --model-dir exp/zipvoice --checkpoint-name model.pt \
        --lora-path exp/ft/adapter --onnx-model-dir exp/onnx --int8 1 --vocoder-path vocos/

Writes text_encoder.onnx, fm_decoder.onnx (+ *_int8.onnx), optionally vocoder.onnx, and
tokens.txt; run them with `python -m zipvoice.bin.infer_zipvoice_onnx`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from zipvoice.utils.infer import load_model_for_inference, model_kind, str2bool
from zipvoice.utils.onnx_export import EXPORTERS, export_model


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--onnx-model-dir", default="exp", help="Output folder.")
    parser.add_argument(
        "--model-name", default="zipvoice", choices=["zipvoice", "zipvoice_distill"]
    )
    parser.add_argument(
        "--model-dir", default=None, help="Folder with the checkpoint, model.json and tokens.txt."
    )
    parser.add_argument("--checkpoint-name", default="model.pt")
    parser.add_argument("--lora-path", default=None, help="Adapter folder to merge before export.")
    parser.add_argument(
        "--lora-scale",
        type=float,
        default=1.0,
        help="Adapter strength merged into the weights (0 = base).",
    )
    parser.add_argument(
        "--merge-lora",
        type=str2bool,
        default=True,
        help="Must stay 1: an unmerged adapter cannot be exported.",
    )
    parser.add_argument(
        "--int8", type=str2bool, default=False, help="Also write dynamically int8-quantised copies."
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
    parser.add_argument("--exporter", default="torchscript", choices=EXPORTERS)  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    args = get_parser().parse_args(argv)
    try:
        torch.set_grad_enabled(False)
        model, token_file, meta = load_model_for_inference(
            args.model_name,
            args.model_dir,
            args.checkpoint_name,
            lora_path=args.lora_path,
            lora_scale=args.lora_scale,
            merge_lora=args.merge_lora,
        )
        vocoder = None
        if args.vocoder_path is not None:
            from zipvoice.models.vocoder import load_vocoder

            vocoder = load_vocoder(args.vocoder_path)
        metadata = {
            "tokenizer": args.tokenizer or meta.get("tokenizer", "emilia"),
            "lang": args.lang or meta.get("lang", "en-us"),
            "checkpoint": Path(args.checkpoint_name).name,
        }
        if args.lora_path is not None:
            metadata.update(
                {
                    "lora_merged": "1",
                    "lora_scale": str(args.lora_scale),
                    "lora_base_fingerprint": str(meta.get("base_fingerprint", "")),
                    "lora": meta.get("lora", {}),
                }
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
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in written.values():
        print(f"wrote {path}")
    print(f"exported a {model_kind(model)} model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
