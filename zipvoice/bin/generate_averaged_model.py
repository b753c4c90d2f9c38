#!/usr/bin/env python3
"""Average a run's checkpoints into one model, as upstream recipes do before inference.

    python3 -m zipvoice.bin.generate_averaged_model --iter 10000 --avg 2 \\
        --model-name zipvoice --exp-dir exp/zipvoice_finetune

writes exp/zipvoice_finetune/iter-10000-avg-2.pt (`--epoch 11 --avg 4`: epoch-11-avg-4.pt from
upstream's epoch-N.pt files). For a LoRA run of this project the result is an adapter folder,
exp-dir/iter-10000-avg-2/, used like adapter/. By default the running average each checkpoint
carries gives the mean over every --average-period step of the range (upstream's way);
`--use-averaged-model 0` takes the plain mean of the --avg checkpoints instead.
"""

from __future__ import annotations

import argparse
import sys

from zipvoice.utils.cli import exit_on_error, setup_logging, str2bool

MODEL_NAMES = ("zipvoice", "zipvoice_distill")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    # fmt: off
    add("--epoch", type=int, default=11,
        help="average up to exp-dir/epoch-EPOCH.pt (upstream's per-epoch checkpoints)")
    add("--iter", type=int, default=0,
        help="if > 0, average up to exp-dir/checkpoint-ITER.pt instead (--epoch is ignored)")
    add("--avg", type=int, default=4,
        help="number of checkpoints (save intervals) to average, ending at --epoch or --iter")
    add("--exp-dir", type=str, default="exp/zipvoice", help="the run's experiment folder")
    add("--model-name", type=str, default="zipvoice", choices=MODEL_NAMES,
        help="model type of the checkpoints")
    add("--use-averaged-model", type=str2bool, default=True,
        help="use the checkpoints' running averages (every --average-period step of the "
        "range); 0: the plain mean of the --avg checkpoints")
    # fmt: on
    return parser


@exit_on_error(system_exit=True)
def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    from zipvoice.training.average_run import generate_averaged_model

    setup_logging()
    generate_averaged_model(
        args.exp_dir,
        epoch=args.epoch,
        iteration=args.iter,
        avg=args.avg,
        model_name=args.model_name,
        use_averaged_model=args.use_averaged_model,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
