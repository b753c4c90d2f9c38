"""Train or fine-tune ZipVoice, fully or with LoRA/DoRA adapters on the decoder.

LoRA fine-tuning of the pretrained model on a Japanese corpus:

    python -m zipvoice.bin.train_zipvoice --world-size 1 --use-fp16 1 --finetune 1 \\
      --checkpoint download/zipvoice/model.pt --use-lora 1 --lora-rank 32 --lora-alpha 64 \\
      --use-dora 1 --lora-dropout 0.05 --base-lr 0.001 --num-iters 10000 \\
      --valid-interval 500 --save-every-n 2000 --max-duration 280 --lr-hours 3800 \\
      --model-config download/zipvoice/model.json --tokenizer japanese \\
      --token-file data/tokens_japanese_extended.txt --dataset custom \\
      --train-manifest data/fbank/ja_cuts_train.jsonl.gz \\
      --dev-manifest data/fbank/ja_cuts_dev.jsonl.gz \\
      --exp-dir exp/zipvoice_japanese_lora --wandb-project zipvoice-japanese

Rerunning the same command continues from the newest checkpoint in --exp-dir (see --resume).
"""

from __future__ import annotations

import argparse
import logging
import sys

from zipvoice.models.modules.lora_utils import LORA_INITS, PRESETS
from zipvoice.tokenizer.tokenizer import TOKENIZER_NAMES
from zipvoice.utils.cli import exit_on_error, setup_logging, str2bool


def _add(parser: argparse.ArgumentParser, flag: str, **kwargs) -> None:
    """Add an option unless the data module already defines it (shared flags)."""
    if flag in parser._option_string_actions:  # noqa: SLF001 - argparse has no public query
        return
    parser.add_argument(flag, **kwargs)


def get_parser() -> argparse.ArgumentParser:
    from zipvoice.dataset.datamodule import TtsDataModule

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    TtsDataModule.add_arguments(parser)
    # Upstream's flags.
    _add(parser, "--world-size", type=int, default=1, help="number of DDP processes")
    _add(parser, "--master-port", type=int, default=12356, help="DDP master port")
    _add(parser, "--use-fp16", type=str2bool, default=True, help="fp16 autocast (CUDA only)")
    _add(
        parser,
        "--finetune",
        type=str2bool,
        default=False,
        help="fine-tuning mode: schedules inside the model start at their final values",
    )
    _add(parser, "--checkpoint", type=str, default=None, help="pretrained model.pt to start from")
    _add(
        parser,
        "--base-lr",
        type=float,
        default=None,
        help="base learning rate (default: 1e-3 with AdamW, i.e. for adapters; 0.02 with "
        "ScaledAdam, i.e. full training as upstream)",
    )
    _add(
        parser,
        "--num-iters",
        type=int,
        default=0,
        help="number of optimizer steps; if > 0, --num-epochs is ignored",
    )
    _add(parser, "--num-epochs", type=int, default=11, help="number of epochs")
    _add(
        parser,
        "--start-epoch",
        type=int,
        default=1,
        help="kept for upstream compatibility; resuming is automatic (see --resume)",
    )
    _add(
        parser,
        "--valid-interval",
        type=int,
        default=5000,
        help="validate every this many steps (0: only at the end)",
    )
    _add(
        parser,
        "--save-every-n",
        type=int,
        default=5000,
        help="write checkpoint-{step}.pt (and adapter-{step}/) every this many steps",
    )
    _add(parser, "--keep-last-k", type=int, default=30, help="checkpoints kept on disk")
    _add(
        parser,
        "--average-period",
        type=int,
        default=200,
        help="update the running average of the trainable weights every this many steps",
    )
    _add(parser, "--lr-batches", type=float, default=7500, help="Eden: batches of lr decay")
    _add(parser, "--lr-epochs", type=float, default=10, help="Eden: epochs of lr decay")
    _add(
        parser,
        "--lr-hours",
        type=float,
        default=0,
        help="Eden: if > 0, hours of audio of lr decay (replaces --lr-epochs)",
    )
    _add(
        parser,
        "--ref-duration",
        type=float,
        default=50,
        help="seconds of audio per batch that the model's internal schedules assume",
    )
    _add(parser, "--model-config", type=str, default="conf/zipvoice_base.json")
    _add(
        parser,
        "--tokenizer",
        type=str,
        default="emilia",
        choices=TOKENIZER_NAMES,
    )
    _add(parser, "--lang", type=str, default="en-us", help="espeak language")
    _add(parser, "--token-file", type=str, default="data/tokens_emilia.txt")
    _add(parser, "--dataset", type=str, default="custom", choices=["emilia", "libritts", "custom"])
    _add(parser, "--train-manifest", type=str, default=None, help="training cuts (fbank)")
    _add(parser, "--dev-manifest", type=str, default=None, help="validation cuts (fbank)")
    _add(parser, "--exp-dir", type=str, default="exp/zipvoice")
    _add(parser, "--seed", type=int, default=42)
    _add(
        parser,
        "--condition-drop-ratio",
        type=float,
        default=0.2,
        help="probability of dropping an utterance's text condition",
    )
    _add(parser, "--feat-scale", type=float, default=0.1, help="features are multiplied by it")
    _add(parser, "--min-len", type=float, default=1.0, help="shortest utterance (s) to train on")
    _add(parser, "--max-len", type=float, default=30.0, help="longest utterance (s) to train on")
    _add(parser, "--tensorboard", type=str2bool, default=True)
    # Adapters.
    _add(
        parser,
        "--use-lora",
        type=str2bool,
        default=False,
        help="train LoRA/DoRA adapters on the decoder; the base decoder stays frozen",
    )
    _add(parser, "--lora-rank", type=int, default=32)
    _add(parser, "--lora-alpha", type=float, default=64)
    _add(parser, "--use-dora", type=str2bool, default=True, help="DoRA instead of plain LoRA")
    _add(parser, "--lora-dropout", type=float, default=0.05)
    _add(
        parser,
        "--lora-target-modules",
        type=str,
        default="attention",
        help=f"a preset ({', '.join(PRESETS)}) or comma-separated module suffixes/names",
    )
    _add(
        parser,
        "--lora-init",
        type=str,
        default="default",
        help=f"adapter initialisation: {', '.join(LORA_INITS)} or pissa_niter_<N>",
    )
    _add(
        parser,
        "--use-rslora",
        type=str2bool,
        default=False,
        help="rank-stabilised scaling alpha/sqrt(rank)",
    )
    _add(
        parser,
        "--train-text-encoder",
        type=str2bool,
        default=True,
        help="with LoRA, also train the text encoder (the embedding always trains)",
    )
    # Optimisation.
    _add(
        parser,
        "--optimizer",
        type=str,
        default="auto",
        choices=["auto", "adamw", "scaledadam"],
        help="auto: AdamW for adapters, ScaledAdam + Eden for full training",
    )
    _add(
        parser,
        "--warmup-steps",
        type=int,
        default=-1,
        help="AdamW linear warm-up steps (-1: 5%% of --num-iters, at most 500)",
    )
    _add(
        parser,
        "--lr-schedule",
        type=str,
        default="cosine",
        choices=["cosine", "constant"],
        help="AdamW schedule after warm-up (cosine needs --num-iters)",
    )
    _add(parser, "--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    _add(
        parser,
        "--grad-clip",
        type=float,
        default=1.0,
        help="AdamW gradient-norm clipping (0: off); ScaledAdam clips on its own",
    )
    # Run control and logging.
    _add(
        parser,
        "--resume",
        type=str,
        default="auto",
        help="auto (continue a matching run in exp-dir), never, or a checkpoint path",
    )
    _add(
        parser,
        "--forgetting-manifest",
        type=str,
        default=None,
        help="cuts of the pretraining domain: logs a second dev loss to watch forgetting",
    )
    _add(
        parser,
        "--wandb-project",
        type=str,
        default=None,
        help="log to Weights & Biases (offline unless logged in)",
    )
    _add(parser, "--log-interval", type=int, default=50, help="console log every N steps")
    _add(
        parser,
        "--max-bad-batches",
        type=int,
        default=10,
        help="stop after this many batches with a non-finite loss",
    )
    _add(
        parser,
        "--distill",
        type=str2bool,
        default=False,
        help="the checkpoint is ZipVoice-Distill (trained with the flow-matching loss)",
    )
    return parser


# Reported through the log, so that the reason a run stopped sits beside its progress lines.
@exit_on_error(logger=logging.getLogger("zipvoice.train"))
def main(argv: list[str] | None = None, *, stop_after_step: int | None = None) -> int:
    from zipvoice.utils.trainer import run_training

    setup_logging()
    args = get_parser().parse_args(argv)
    run_training(args, stop_after_step=stop_after_step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
