"""The built-in end-to-end demo: Japanese LoRA fine-tuning of a tiny ZipVoice, offline.

    python -m zipvoice.bin.demo [--out-dir demo_out]

Interrupted (Ctrl-C), it continues after its last finished stage when run again.

It generates a small Japanese corpus with pyopenjtalk's voice, prepares lhotse manifests, tokens
(with pitch-accent marks) and Vocos features, trains a tiny base model (a stand-in for the
published checkpoint, which cannot be downloaded offline), LoRA/DoRA-fine-tunes it on other
speakers, synthesises a sentence with the adapter merged, exports to ONNX and synthesises again
with onnxruntime. Every stage prints the command that does the same thing by hand.

With a real model folder (`--model-dir download/zipvoice`, holding model.pt, model.json,
tokens.txt) the pre-training stage is skipped and the adapter is trained on that model; pass
`--vocoder-path` with a Vocos folder to hear real speech.
"""

from __future__ import annotations

import argparse
import sys

from zipvoice.demo.pipeline import DemoSettings, run_demo
from zipvoice.utils.cli import HelpFormatter, exit_on_error, setup_logging


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    d = DemoSettings()
    parser.add_argument("--out-dir", default=d.out_dir, help="Everything the demo makes goes here.")
    parser.add_argument(
        "--model-dir",
        default=None,
        help="A pretrained model folder (model.pt, model.json, tokens.txt); skips pre-training.",
    )
    parser.add_argument(
        "--vocoder-path",
        default=d.vocoder_path,
        help="A Vocos folder (config.yaml + pytorch_model.bin); 'griffin-lim' needs no weights.",
    )
    parser.add_argument("--num-speakers", type=int, default=d.num_speakers)
    parser.add_argument("--num-sentences", type=int, default=d.num_sentences)
    parser.add_argument("--pretrain-iters", type=int, default=d.pretrain_iters)
    parser.add_argument("--lora-iters", type=int, default=d.lora_iters)
    parser.add_argument("--lora-rank", type=int, default=d.lora_rank)
    parser.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    parser.add_argument("--use-dora", type=int, default=int(d.use_dora), choices=[0, 1])
    parser.add_argument("--text", default=d.text, help="The sentence to synthesise.")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Start over in an --out-dir that a previous demo run left (never a foreign folder); "
        "without it, a rerun continues after the last finished stage.",
    )
    return parser


# A stage that fails raises RuntimeError naming it (its own error was printed already).
@exit_on_error(also=(RuntimeError,))
def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    setup_logging()
    settings = DemoSettings(
        out_dir=args.out_dir,
        model_dir=args.model_dir,
        vocoder_path=args.vocoder_path,
        num_speakers=args.num_speakers,
        num_sentences=args.num_sentences,
        pretrain_iters=args.pretrain_iters,
        lora_iters=args.lora_iters,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        use_dora=bool(args.use_dora),
        text=args.text,
        overwrite=args.overwrite,
    )
    run_demo(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
