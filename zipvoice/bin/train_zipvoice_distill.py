#!/usr/bin/env python3
"""Distil ZipVoice into ZipVoice-Distill (few-step sampling), also from a LoRA-adapted teacher.

First stage, the fixed teacher (here a Japanese adapter merged into the base):

    python3 -m zipvoice.bin.train_zipvoice_distill --num-iters 60000 --max-duration 500 \\
      --base-lr 0.0005 --teacher-model download/zipvoice/model.pt \\
      --teacher-lora exp/zipvoice_japanese_lora/adapter --tokenizer japanese \\
      --dataset custom --train-manifest data/fbank/ja_cuts_train.jsonl.gz \\
      --dev-manifest data/fbank/ja_cuts_dev.jsonl.gz --distill-stage first \\
      --exp-dir exp/zipvoice_distill_1stage

Second stage, an EMA of the student as the teacher:

    python3 -m zipvoice.bin.train_zipvoice_distill --num-iters 2000 --save-every-n 1000 \\
      --base-lr 0.0001 --teacher-model exp/zipvoice_distill_1stage/distilled/model.pt \\
      --distill-stage second --exp-dir exp/zipvoice_distill ...

The flags are upstream's (docs/upstream.md) plus --teacher-lora; `zipvoice.training.distill`
describes the method.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from zipvoice.dataset.config import DataConfig, add_data_arguments
from zipvoice.tokenizer.tokenizer import TOKENIZER_NAMES
from zipvoice.training.distill_config import STAGES, DistillConfig
from zipvoice.utils.cli import exit_on_error, setup_logging, str2bool

NOT_RUN = ("print_diagnostics", "scan_oom", "inf_check")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_data_arguments(parser)
    add = parser.add_argument
    # fmt: off
    add("--world-size", type=int, default=1, help="processes (only 1 here)")
    add("--master-port", type=int, default=12356, help="unused (single process)")
    add("--tensorboard", type=str2bool, default=True, help="accepted; progress goes to the log")
    add("--num-epochs", type=int, default=1, help="epochs (if --num-iters is 0)")
    add("--num-iters", type=int, default=0, help="optimizer steps; if > 0 --num-epochs is ignored")
    add("--start-epoch", type=int, default=1, help="accepted; a run starts from its teacher")
    add("--teacher-model", type=str, required=True,
        help="teacher model.pt (first stage: ZipVoice; second: the first stage's ZipVoice-Distill)"
        "; model.json and tokens.txt are read beside it")
    add("--teacher-lora", type=str, default=None,
        help="adapter folder merged into the first-stage teacher (its tokens.txt is used)")
    add("--exp-dir", type=str, default="exp/zipvoice_distill", help="output folder")
    add("--base-lr", type=float, default=0.001, help="constant ScaledAdam learning rate")
    add("--ref-duration", type=float, default=50.0,
        help="seconds per batch that the model's internal schedules assume")
    add("--seed", type=int, default=42, help="random seed")
    add("--print-diagnostics", type=str2bool, default=False, help="accepted; not run here")
    add("--scan-oom", type=str2bool, default=False, help="accepted; not run here")
    add("--inf-check", type=str2bool, default=False, help="accepted; not run here")
    add("--save-every-n", type=int, default=1000, help="write checkpoint-{step}.pt this often")
    add("--keep-last-k", type=int, default=30, help="checkpoints kept")
    add("--average-period", type=int, default=200, help="steps between running-average updates")
    add("--use-fp16", type=str2bool, default=True, help="accepted; CPU float32 here")
    add("--feat-scale", type=float, default=0.1, help="features are multiplied by it")
    add("--ema-decay", type=float, default=0.9999, help="second stage: EMA decay of the teacher")
    add("--distill-stage", type=str, choices=STAGES, required=True, help="distillation stage")
    add("--model-config", type=str, default=None,
        help="model.json (default: the one beside --teacher-model)")
    add("--tokenizer", type=str, default="emilia", choices=TOKENIZER_NAMES, help="tokenizer")
    add("--lang", type=str, default="en-us", help="espeak language")
    add("--token-file", type=str, default=None,
        help="tokens.txt (default: the adapter's, else the one beside --teacher-model)")
    # fmt: on
    return parser


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    data = DataConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DataConfig)})
    names = {f.name for f in dataclasses.fields(DistillConfig)} - {"data"}
    return DistillConfig(data=data, **{name: getattr(args, name) for name in names})


@exit_on_error(logger=logging.getLogger("zipvoice.train"))
def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    from zipvoice.training.distill_run import run_distillation

    setup_logging()
    if args.world_size != 1:
        raise ValueError("train_zipvoice_distill runs on one process here: use --world-size 1")
    for name in NOT_RUN:
        if getattr(args, name):
            flag = name.replace("_", "-")
            logging.getLogger("zipvoice.train").info("--%s is not run by distillation", flag)
    run_distillation(config_from_args(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
