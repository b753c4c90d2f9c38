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
The flags fill a `zipvoice.training.config.TrainingConfig` (one group of flags per part of it);
`zipvoice.training.trainer.Trainer` runs it.
"""

from __future__ import annotations

import argparse
import logging
import sys

from zipvoice.dataset.config import add_data_arguments
from zipvoice.models.modules.lora_config import LORA_INITS, PRESETS
from zipvoice.tokenizer.tokenizer import TOKENIZER_NAMES
from zipvoice.training.config import (
    KD_REGIONS,
    LR_SCHEDULES,
    OPTIMIZERS,
    AdapterConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
)
from zipvoice.utils.cli import exit_on_error, setup_logging, str2bool
from zipvoice.utils.validate import (
    finite_float,
    non_negative_float,
    positive_float,
    positive_int,
)

MODEL, LORA, OPTIM, RUN = ModelConfig(), AdapterConfig().lora, OptimConfig(), RunConfig()
EVAL = EvalConfig()


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model", "What to build, from which weights and tokens.")
    add = group.add_argument
    # fmt: off
    add("--model-config", type=str, default=MODEL.model_config,
        help="model.json of the model; the default is the released configuration, in the recipe")
    add("--checkpoint", type=str, default=MODEL.checkpoint, help="pretrained model.pt")
    add("--tokenizer", type=str, default=MODEL.tokenizer, choices=TOKENIZER_NAMES,
        help="tokenizer the token file was made for")
    add("--lang", type=str, default=MODEL.lang, help="espeak language")
    add("--token-file", type=str, default=MODEL.token_file, help="tokens.txt of the vocabulary")
    add("--distill", type=str2bool, default=MODEL.distill,
        help="the checkpoint is ZipVoice-Distill (trained with the flow-matching loss)")
    add("--finetune", type=str2bool, default=MODEL.finetune,
        help="fine-tuning mode, as upstream: ScaledAdam runs at a constant --base-lr (no Eden "
        "warm-up or decay) and schedules inside the model start at their final values; AdamW "
        "(adapters) keeps its warm-up + --lr-schedule")
    add("--train-text-encoder", type=str2bool, default=MODEL.train_text_encoder,
        help="also train the text encoder (with LoRA the embedding always trains)")
    add("--feat-scale", type=positive_float, default=MODEL.feat_scale,
        help="features are multiplied by it")
    add("--condition-drop-ratio", type=finite_float, default=MODEL.condition_drop_ratio,
        help="probability of dropping an utterance's text condition")
    add("--ref-duration", type=float, default=MODEL.ref_duration,
        help="seconds of audio per batch that the model's internal schedules assume")
    # fmt: on


def _add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "adapter", "LoRA/DoRA on the decoder (zipvoice.models.modules.lora_config.LoraSettings)."
    )
    add = group.add_argument
    # fmt: off
    add("--use-lora", type=str2bool, default=AdapterConfig().use_lora,
        help="train LoRA/DoRA adapters on the decoder; the base decoder stays frozen")
    add("--lora-rank", type=positive_int, default=LORA.rank, help="adapter rank r")
    add("--lora-alpha", type=positive_float, default=LORA.alpha,
        help="adapter scaling numerator alpha")
    add("--use-dora", type=str2bool, default=LORA.use_dora, help="DoRA instead of plain LoRA")
    add("--lora-dropout", type=finite_float, default=LORA.dropout,
        help="dropout on the adapter input")
    add("--lora-target-modules", type=str, default=LORA.target_modules,
        help=f"a preset ({', '.join(PRESETS)}) or comma-separated module suffixes/names")
    add("--lora-init", type=str, default=LORA.init,
        help=f"adapter initialisation: {', '.join(LORA_INITS)} or pissa_niter_<N>")
    add("--use-rslora", type=str2bool, default=LORA.use_rslora,
        help="rank-stabilised scaling alpha/sqrt(rank)")
    # fmt: on


def _add_optim_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation")
    add = group.add_argument
    # fmt: off
    add("--optimizer", type=str, default=OPTIM.optimizer, choices=OPTIMIZERS,
        help="auto: AdamW + warm-up + cosine for adapters (this project's schedule); ScaledAdam "
        "for full training, with upstream's schedules (constant with --finetune 1, else Eden)")
    add("--base-lr", type=positive_float, default=OPTIM.base_lr,
        help="base learning rate (None: 1e-3 with AdamW, i.e. for adapters; 0.02 with "
        "ScaledAdam, i.e. full training as upstream)")
    add("--warmup-steps", type=int, default=OPTIM.warmup_steps,
        help="AdamW linear warm-up steps (-1: 5%% of --num-iters, at most 500)")
    add("--lr-schedule", type=str, default=OPTIM.lr_schedule, choices=LR_SCHEDULES,
        help="AdamW schedule after warm-up (cosine needs --num-iters)")
    add("--weight-decay", type=non_negative_float, default=OPTIM.weight_decay,
        help="AdamW weight decay")
    add("--grad-clip", type=non_negative_float, default=OPTIM.grad_clip,
        help="AdamW gradient-norm clipping (0: off); ScaledAdam clips on its own")
    add("--lr-batches", type=positive_float, default=OPTIM.lr_batches,
        help="Eden: batches of lr decay")
    add("--lr-epochs", type=positive_float, default=OPTIM.lr_epochs,
        help="Eden: epochs of lr decay (stepped at each epoch's start; unused with --lr-hours)")
    add("--lr-hours", type=float, default=OPTIM.lr_hours,
        help="Eden: if > 0, hours of audio of lr decay (replaces --lr-epochs)")
    add("--average-period", type=int, default=OPTIM.average_period,
        help="steps between updates of the running average of the trainable weights")
    # fmt: on


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run", "Where, how long, how many processes, logging.")
    add = group.add_argument
    # fmt: off
    add("--exp-dir", type=str, default=RUN.exp_dir, help="folder of checkpoints, adapters, logs")
    add("--world-size", type=int, default=RUN.world_size, help="number of DDP processes")
    add("--master-port", type=int, default=RUN.master_port, help="DDP master port")
    add("--use-fp16", type=str2bool, default=RUN.use_fp16, help="fp16 autocast (CUDA only)")
    add("--num-iters", type=int, default=RUN.num_iters,
        help="number of optimizer steps; if > 0, --num-epochs is ignored")
    add("--num-epochs", type=int, default=RUN.num_epochs, help="number of epochs")
    add("--start-epoch", type=int, default=RUN.start_epoch,
        help="kept for upstream compatibility; resuming is automatic (see --resume)")
    add("--valid-interval", type=int, default=RUN.valid_interval,
        help="validate every this many steps (-1: every --save-every-n steps, as upstream; "
        "0: only at the end)")
    add("--save-every-n", type=int, default=RUN.save_every_n,
        help="write checkpoint-{step}.pt (and adapter-{step}/) every this many steps")
    add("--keep-last-k", type=int, default=RUN.keep_last_k, help="checkpoints kept on disk")
    add("--seed", type=int, default=RUN.seed, help="random seed of the run")
    add("--resume", type=str, default=RUN.resume,
        help="auto (continue a matching run in exp-dir), never, or a checkpoint path")
    add("--tensorboard", type=str2bool, default=RUN.tensorboard,
        help="log scalars to exp-dir/tensorboard")
    add("--wandb-project", type=str, default=RUN.wandb_project,
        help="log to Weights & Biases (offline unless logged in)")
    add("--log-interval", type=int, default=RUN.log_interval, help="console log every N steps")
    add("--max-bad-batches", type=int, default=RUN.max_bad_batches,
        help="stop after this many batches with a non-finite loss")
    add("--num-threads", type=int, default=RUN.num_threads,
        help="intra-op threads per process (0: cores from the CPU affinity / --world-size, or "
        "OMP_NUM_THREADS when set)")
    # fmt: on


def _add_forgetting_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "against forgetting",
        "Distillation, partial freezing and best-checkpoint selection (docs/lora.md); replay "
        "is with the data flags (--replay-manifest).",
    )
    add = group.add_argument
    # fmt: off
    add("--kd-weight", type=non_negative_float, default=MODEL.kd_weight,
        help="weight of the distillation term: mean squared distance between the trained and "
        "the start model's velocity on the --kd-on region (0: off)")
    add("--kd-on", type=str, default=MODEL.kd_on, choices=KD_REGIONS,
        help="distillation region: replay (replay cuts' generated span), prompt (also the "
        "fine-tuning cuts' prompt frames), all (every frame)")
    add("--trainable-modules", type=str, default=MODEL.trainable_modules,
        help="comma-separated fnmatch patterns over parameter/module names: only matching "
        "parameters train (e.g. 'fm_decoder.encoders.4,embed')")
    add("--freeze-modules", type=str, default=MODEL.freeze_modules,
        help="comma-separated fnmatch patterns over parameter/module names that stay frozen "
        "(e.g. 'fm_decoder')")
    add("--select-metric", type=str, default=RUN.select_metric,
        help="keep exp-dir/best/ at the validation with the lowest weighted sum of valid_loss, "
        "forgetting_loss (needs --forgetting-manifest) and --eval-list metrics, e.g. "
        "'valid_loss+0.5*forgetting_loss-2*sim'")
    # fmt: on


def _add_upstream_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "upstream", "Upstream's diagnostics and averaging (docs/upstream.md)."
    )
    add = group.add_argument
    # fmt: off
    add("--valid-by-epoch", type=str2bool, default=RUN.valid_by_epoch,
        help="validate at the start of every epoch instead of every --valid-interval steps")
    add("--print-diagnostics", type=str2bool, default=RUN.print_diagnostics,
        help="collect per-module statistics of activations and gradients over the first 6 "
        "batches, print them and stop (nothing is saved)")
    add("--scan-oom", type=str2bool, default=RUN.scan_oom,
        help="before training, run forward+backward on the most demanding batches of epoch 1 "
        "(longest, most frames, most tokens) to see whether they fit in memory")
    add("--inf-check", type=str2bool, default=RUN.inf_check,
        help="hooks that name every module whose output or gradient is not finite")
    add("--avg", type=int, default=RUN.avg,
        help="at the end, adapter/ (or finetuned/) holds the running average over the last AVG "
        "save intervals, as generate_averaged_model --iter <last step> --avg AVG (0: last weights)")
    # fmt: on


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "evaluation",
        "Synthesise and score a few sentences at each validation (docs/lora.md).",
    )
    add = group.add_argument
    # fmt: off
    add("--eval-list", type=str, default=EVAL.eval_list,
        help="TSV name<TAB>prompt_text<TAB>prompt_wav<TAB>text (the inference list; include "
        "speakers not in the training set): synthesised at each validation, written to "
        "exp-dir/eval/step-N/ and scored; off when not given")
    add("--eval-num-step", type=int, default=EVAL.eval_num_step,
        help="sampling steps for the eval list")
    add("--eval-guidance-scale", type=float, default=EVAL.eval_guidance_scale,
        help="guidance scale for the eval list (None: 1.0, distill 3.0, as inference)")
    add("--eval-vocoder", type=str, default=EVAL.eval_vocoder,
        help="'griffin-lim' (offline, no weights), a Vocos folder (config.yaml + weights), or "
        "a hub repo id such as charactr/vocos-mel-24khz (downloaded once)")
    add("--eval-ref-dir", type=str, default=EVAL.eval_ref_dir,
        help="folder of ground-truth recordings NAME.wav of the eval texts: adds F0 match "
        "(f0_corr, f0_rmse, vuv_error)")
    add("--eval-metrics", type=str, default=EVAL.eval_metrics,
        help="comma-separated offline metrics (zipvoice.eval.registry), or auto: sim and "
        "dnsmos, accent_probe on probe sentences, F0 match with --eval-ref-dir")
    # fmt: on


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_data_arguments(parser)
    _add_model_arguments(parser)
    _add_adapter_arguments(parser)
    _add_optim_arguments(parser)
    _add_run_arguments(parser)
    _add_forgetting_arguments(parser)
    _add_eval_arguments(parser)
    _add_upstream_arguments(parser)
    return parser


# Reported through the log, so that the reason a run stopped sits beside its progress lines.
@exit_on_error(logger=logging.getLogger("zipvoice.train"))
def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)  # before the heavy imports: --help stays quick
    from zipvoice.training.config import TrainingConfig
    from zipvoice.training.trainer import run_training

    setup_logging()
    run_training(TrainingConfig.from_flags(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
