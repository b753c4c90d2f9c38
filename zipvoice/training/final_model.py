"""What a run leaves for inference and export: `adapter/` (LoRA) or `finetuned/` (full).

As upstream recipes average checkpoints before inference, the final folder holds the running
average over the last `--avg` save intervals (zipvoice.utils.averaging.final_average); the last
raw weights stay in the final checkpoint and, for LoRA runs, in `adapter-{step}/`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from torch import nn

from zipvoice.training import checkpoints as ckpt

if TYPE_CHECKING:
    from zipvoice.training.trainer import Trainer

logger = logging.getLogger("zipvoice.train")


def save_step_adapter(trainer: Trainer, raw: nn.Module, name: str) -> None:
    """The run's adapter folder `exp-dir/name` from the model's current weights."""
    ckpt.save_run_adapter(
        raw, trainer.exp_dir / name, trainer.config, trainer.setup_result, trainer.model_config,
        step=trainer.state.step, initial_adapter_dir=trainer.initial_adapter_dir,
    )  # fmt: skip


def save_final_product(trainer: Trainer, raw: nn.Module) -> None:
    """`adapter/` or `finetuned/` from the averaged weights (the last ones when there is no
    average yet or --avg is 0); the model keeps its last weights afterwards."""
    from zipvoice.models.modules.lora_utils import is_lora_model
    from zipvoice.utils.averaging import final_average, swapped_weights

    config, step = trainer.config, trainer.state.step
    averaged, what = final_average(
        trainer.exp_dir, trainer.model_avg, step, config.optim.average_period, config.run.avg,
        config.run.save_every_n,
    )  # fmt: skip
    lora = is_lora_model(raw)
    if averaged is not None and lora:
        save_step_adapter(trainer, raw, f"adapter-{step}")
    with swapped_weights(raw, averaged):
        if lora:
            save_step_adapter(trainer, raw, "adapter")
        else:
            ckpt.save_full_model(
                raw, trainer.exp_dir / "finetuned", config.model.token_file, trainer.model_config
            )
    logger.info("%s holds %s", "adapter/" if lora else "finetuned/", what)
