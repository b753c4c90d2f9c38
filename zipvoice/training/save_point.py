"""One save point of a run: `checkpoint-{step}.pt` (what resuming needs), then the adapter of
that step (`adapter-{step}/`) or, at the end, the run's product (`adapter/` or `finetuned/`,
zipvoice.training.final_model), and the exp-dir's manifest. Every file is written atomically;
a write that fails for lack of space stops the run with a message naming what is still intact.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from zipvoice.training import checkpoints as ckpt
from zipvoice.training.distributed import gather_objects, is_main, unwrap_ddp
from zipvoice.training.final_model import save_final_product, save_step_adapter
from zipvoice.training.model_setup import module_training_state, trainable_state_dict

if TYPE_CHECKING:
    from zipvoice.training.trainer import Trainer

logger = logging.getLogger("zipvoice.train")


def save(trainer: Trainer, final: bool) -> None:
    """`write_save_point`; a failed write (a full disk) becomes a TrainingError that says
    which checkpoint is still intact to resume from."""
    from zipvoice.utils.resources import write_failure

    try:
        write_save_point(trainer, final)
    except (OSError, RuntimeError) as raw_err:
        # torch.save reports a full disk as a RuntimeError from its zip writer.
        err = write_failure(raw_err, trainer.exp_dir)
        if err is None:
            raise
        raise ckpt.save_failure(trainer.exp_dir, trainer.state.step, err) from raw_err


def write_save_point(trainer: Trainer, final: bool) -> None:
    """Every rank gathers its RNG state to rank 0, which writes (module docstring)."""
    from zipvoice.models.modules.lora_utils import is_lora_model
    from zipvoice.utils.checkpoint import save_checkpoint

    gathered = gather_objects(ckpt.get_rng_state(), trainer.world_size)
    if not is_main(trainer.rank):
        return
    raw, state, exp_dir = unwrap_ddp(trainer.model), trainer.state, trainer.exp_dir
    checkpoint_path = exp_dir / f"checkpoint-{state.step}.pt"
    save_checkpoint(
        {
            "model": trainable_state_dict(raw),
            "model_avg": trainer.model_avg,
            "module_state": module_training_state(raw),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "grad_scaler": trainer.scaler.state_dict() if trainer.use_amp else None,
            # as of the last batch trained on, not the workers' prefetch (dataset/sampler_position)
            "sampler": trainer.sampler_position.state_dict(),
            "rng": gathered,
            "step": state.step,
            "epoch": state.epoch,
            "batches_in_epoch": state.batches_in_epoch,
            "bad_batches": state.bad_batches,
            "best_valid_loss": state.best_valid_loss,
            "identity": trainer.identity,
            "average_period": trainer.config.optim.average_period,
        },
        checkpoint_path,
    )
    ckpt.prune_checkpoints(exp_dir, trainer.config.run.keep_last_k)
    name = "adapter" if final else f"adapter-{state.step}"
    if final:
        save_final_product(trainer, raw)
    elif is_lora_model(raw):
        save_step_adapter(trainer, raw, name)
    ckpt.write_run_manifest(exp_dir, trainer.setup_result.base_fingerprint)
    adapter = f" and {name}/" if is_lora_model(raw) else ""
    logger.info("saved %s%s", checkpoint_path.name, adapter)
