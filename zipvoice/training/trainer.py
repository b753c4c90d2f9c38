"""The training loop: full fine-tuning, or LoRA/DoRA adapters on the decoder.

    Trainer(config, trainable=None, callbacks=[...]).fit()

`config` is a `TrainingConfig` (zipvoice.training.config); `trainable(name)` narrows which
parameters train (see zipvoice.training.model_setup); callbacks observe or stop the run
(zipvoice.training.callbacks). `fit()` (zipvoice.training.launch) runs one process, spawns
`run.world_size` DDP processes (then the Trainer, its predicate and callbacks must be
picklable), or under torchrun runs this process's rank.

The named steps, in order: `setup` (model, resume, optimiser, data, outputs), then per batch
`train_step`, every `valid_interval` steps `validate`, every `save_every_n` steps `save`, and at
the end a last `validate` and `save(final=True)`.

Files in `run.exp_dir`:
- `run_config.json`: the settings that define this run (see `RUN_IDENTITY_KEYS`) and all flags;
- `checkpoint-{step}.pt`: trainable weights only, optimizer, scheduler, grad scaler, sampler
  and RNG states, and the step; written atomically, the newest `keep_last_k` kept;
- `adapter-{step}/` and the final `adapter/` (LoRA runs, see
  `zipvoice.models.modules.adapter_folder`), or `finetuned/` (`model.pt`, `model.json`,
  `tokens.txt`) for full fine-tuning;
- `log/`, `tensorboard/`, `wandb/`.

Resuming (`run.resume`: auto, never, or a checkpoint path) is described in
`zipvoice.training.checkpoints`.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zipvoice.dataset.sampler_position import SamplerPosition
from zipvoice.training import checkpoints as ckpt
from zipvoice.training import forgetting
from zipvoice.training.callbacks import Callback
from zipvoice.training.config import TrainingConfig, TrainingError
from zipvoice.training.distributed import (
    all_ranks_agree,
    broadcast_object,
    is_main,
    setup_distributed,
    teardown_distributed,
    unwrap_ddp,
)
from zipvoice.training.eval_hook import make_eval_hook, validation_scores
from zipvoice.training.experiment_log import (
    ExperimentLog,
    log_model_summary,
    log_progress,
    setup_run_logging,
)
from zipvoice.training.interrupt import (
    StopRequest,
    TrainingInterrupted,
    interrupted_message,
    seed_step,
)
from zipvoice.training.model_setup import (
    ModelSetup,
    TrainablePredicate,
    load_module_training_state,
    load_trainable_state,
    save_initial_adapter,
    setup_model,
)
from zipvoice.training.optimizer import setup_optimizer
from zipvoice.training.steps import (
    adjusted_batch_count,
    backward_and_step,
    compute_validation_loss,
    flow_matching_loss,
    prepare_batch,
    set_batch_count,
)
from zipvoice.utils.allocator import keep_freed_memory
from zipvoice.utils.cli import fix_random_seed
from zipvoice.utils.resources import apply_num_threads

logger = logging.getLogger("zipvoice.train")


def run_training(
    config: TrainingConfig,
    *,
    trainable: TrainablePredicate | None = None,
    callbacks: Sequence[Callback] = (),
) -> nn.Module | None:
    """`Trainer(config, ...).fit()`: the trained model (adapters unmerged), None for DDP."""
    return Trainer(config, trainable=trainable, callbacks=callbacks).fit()


class Trainer:
    """One training run (module docstring); public attributes are set by `setup`."""

    def __init__(
        self,
        config: TrainingConfig,
        *,
        trainable: TrainablePredicate | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.config = config.validate()
        self.trainable = forgetting.trainable_predicate(config, trainable)
        self.callbacks = list(callbacks) + forgetting.selection_callbacks(config)
        self.exp_dir = Path(config.run.exp_dir)
        self.state = ckpt.TrainState()
        self.last_loss = float("nan")
        self.last_terms: dict[str, float] = {}  # replay/distillation scalars of the last step
        self.experiment: ExperimentLog | None = None
        self.stop_request = StopRequest()  # replaced by an installed one during fit_rank
        self.eval_scores: dict[str, float] = {}  # {metric: mean} of the last --eval-list run

    # ------------------------------------------------------------------ running

    def fit(self) -> nn.Module | None:
        """Train on one process, or spawn `world_size` DDP processes (returns None then);
        under torchrun, this process's rank (zipvoice.training.launch)."""
        from zipvoice.training.launch import fit

        return fit(self)

    def fit_rank(self, rank: int, world_size: int) -> nn.Module:
        """The whole run on this rank: set up, loop, final validation and save."""
        self.exp_dir.mkdir(parents=True, exist_ok=True)
        handler = setup_run_logging(self.exp_dir, rank)
        apply_num_threads(self.config.run.num_threads, world_size)
        # Gradients and activations are freed and allocated again every step: kept in the
        # process, they cost no page faults (a released-size full fine-tuning step on the CPU
        # took ~37,000 faults and 0.07 s of kernel time without this, none with it).
        keep_freed_memory()
        device = setup_distributed(rank, world_size, self.config.run.master_port)
        try:
            with StopRequest("rank" if world_size > 1 else "single") as self.stop_request:
                self.setup(rank, world_size, device)
                if self._loop():
                    every = self.config.valid_interval
                    if every <= 0 or self.state.step % every != 0:
                        self.validate()
                    self.save(final=True)
                    logger.info("training finished at step %d", self.state.step)
            return unwrap_ddp(self.model)
        except TrainingInterrupted:
            if world_size > 1:
                return unwrap_ddp(self.model)  # the parent process reports the interruption
            raise
        finally:
            if self.experiment is not None:
                self.experiment.close()
            if world_size > 1 and hasattr(self, "model"):
                self.model = unwrap_ddp(self.model)  # free the DDP reducer before the group
            teardown_distributed(world_size)
            if handler is not None:
                logger.removeHandler(handler)
                handler.close()

    # ------------------------------------------------------------------ set-up

    def setup(self, rank: int, world_size: int, device: torch.device) -> None:
        """Model, resume point, optimiser, data and output files for this rank."""
        self.rank, self.world_size, self.device = rank, world_size, device
        fix_random_seed(self.config.run.seed)
        checkpoint = self._setup_model()
        setup_optimizer(self, checkpoint)  # model on its device (DDP), optimiser, schedule
        self._setup_data(checkpoint)
        self._setup_outputs()
        self.eval_hook = make_eval_hook(
            self.config, self.exp_dir, rank, self.tokenizer, device, self.experiment
        )
        from zipvoice.training.diagnostics import attach_diagnostics

        self.callbacks += attach_diagnostics(self)
        rng_states = checkpoint.get("rng") or [] if checkpoint is not None else None
        self._rng_to_restore = None
        seed = self.config.run.seed
        if rng_states is None:
            fix_random_seed(seed + 1000 * rank)
        elif len(rng_states) == world_size:
            self._rng_to_restore = rng_states[rank]
        else:
            fix_random_seed(seed + 1000 * rank + self.state.step)

    def _setup_model(self) -> dict[str, Any] | None:
        """Build the model and restore it from the resume checkpoint; return that checkpoint."""
        from zipvoice.models.loader import load_model_config
        from zipvoice.tokenizer.coverage import check_token_coverage
        from zipvoice.tokenizer.tokenizer import get_tokenizer

        config = self.config
        self.model_config = load_model_config(config.model.model_config)
        self.tokenizer = get_tokenizer(
            config.model.tokenizer, config.model.token_file, config.model.lang
        )
        check_token_coverage(self.tokenizer, config.model.tokenizer, config.model.token_file)
        self.setup_result: ModelSetup = setup_model(
            config,
            self.tokenizer.vocab_size,
            self.tokenizer.pad_id,
            self.model_config,
            trainable=self.trainable,
        )
        self.model: nn.Module = self.setup_result.model
        # Before the resume checkpoint is loaded: the teacher is the run's start.
        self.objective = forgetting.setup_forgetting(self)
        adapter = self.config.adapter
        self.param_counts = log_model_summary(
            self.model, self.setup_result, adapter.use_lora, adapter.lora.use_dora
        )
        self.identity = ckpt.run_identity(
            config, self.setup_result.base_fingerprint, self.setup_result.lora_targets,
            self.model_config,
        )  # fmt: skip
        resume_path = None
        if is_main(self.rank):
            resume_path = ckpt.choose_resume_checkpoint(
                config.run.resume, self.exp_dir, self.identity
            )
            ckpt.remove_unfinished_saves(self.exp_dir)
        resume_path = broadcast_object(resume_path, self.world_size)
        checkpoint = ckpt.load_training_checkpoint(resume_path) if resume_path else None
        self.initial_adapter_dir = None
        if config.adapter.use_lora and config.adapter.lora.mutates_base_weights:
            self.initial_adapter_dir = save_initial_adapter(
                self.model, self.exp_dir, write=is_main(self.rank) and checkpoint is None
            )
        if checkpoint is not None:
            load_trainable_state(self.model, checkpoint["model"], str(resume_path))
            load_module_training_state(self.model, checkpoint.get("module_state") or {})
            self.state = ckpt.TrainState.from_checkpoint(checkpoint)
            logger.info("resuming from %s at step %d", resume_path, self.state.step)
            forgetting.resume_selection(self)
        self._setup_average(checkpoint)
        return checkpoint

    def _setup_average(self, checkpoint: dict[str, Any] | None) -> None:
        """Rank 0 keeps a float64 running average of the trainable weights."""
        self.model_avg: dict[str, Tensor] | None = None
        if not is_main(self.rank):
            return
        if checkpoint is not None and checkpoint.get("model_avg") is not None:
            self.model_avg = {k: v.clone() for k, v in checkpoint["model_avg"].items()}
        else:
            self.model_avg = {
                n: p.detach().to("cpu", torch.float64).clone()
                for n, p in self.model.named_parameters()
                if p.requires_grad
            }

    def _setup_data(self, checkpoint: dict[str, Any] | None) -> None:
        from zipvoice.dataset.datamodule import TtsDataModule

        data = self.config.data
        datamodule = TtsDataModule(
            data, tokenizer=self.tokenizer, seed=self.config.run.seed, processes=self.world_size
        )
        train_cuts, dev_cuts = datamodule.train_cuts(), datamodule.dev_cuts()
        logger.info(
            "%d intra-op thread(s), %d data-loader worker(s) per process (--num-threads, "
            "--num-workers)", torch.get_num_threads(), datamodule.num_workers,
        )  # fmt: skip
        self.sampler_state = checkpoint.get("sampler") if checkpoint is not None else None
        self.train_dl = datamodule.train_dataloaders(
            train_cuts,
            sampler_state_dict=self.sampler_state,
            replay_cuts=forgetting.replay_cuts(datamodule, self.tokenizer),
        )
        # Workers prefetch: checkpoints save the sampler as of the last batch trained on.
        self.sampler_position = SamplerPosition(self.train_dl.sampler)
        self.dev_dl = datamodule.dev_dataloaders(dev_cuts)
        self.forgetting_dl = None
        if data.forgetting_manifest:
            from lhotse import CutSet

            cuts = CutSet.from_file(data.forgetting_manifest)
            datamodule.check_first_cut(cuts, data.forgetting_manifest)
            self.forgetting_dl = datamodule.dev_dataloaders(cuts)

    def _setup_outputs(self) -> None:
        """run_config.json, model.json and tokens.txt beside the checkpoints; the scalar log."""
        from zipvoice.utils.fileio import atomic_copy, atomic_write_json

        config, exp_dir = self.config, self.exp_dir
        settings = {**config.flags(), "base_lr": config.base_lr}
        if is_main(self.rank):
            atomic_write_json(
                exp_dir / ckpt.RUN_CONFIG_FILE, {"identity": self.identity, "args": settings}
            )
            atomic_copy(config.model.model_config, exp_dir / "model.json")
            atomic_copy(config.model.token_file, exp_dir / "tokens.txt")
        run_id = hashlib.sha1(str(exp_dir.resolve()).encode()).hexdigest()[:12]
        self.experiment = ExperimentLog(
            exp_dir,
            self.rank,
            run_id,
            tensorboard=bool(config.run.tensorboard),
            wandb_project=config.run.wandb_project,
            settings=settings,
        )
        trainable, total = self.param_counts
        if is_main(self.rank) and trainable:
            self.experiment.scalars(
                {"params/trainable": trainable, "params/total": total}, self.state.step
            )

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> bool:
        """Epochs until the step or epoch budget is spent; False when a callback stopped it."""
        run = self.config.run
        total_steps = run.num_iters if run.num_iters > 0 else None
        num_epochs = run.num_epochs if run.num_iters <= 0 else sys.maxsize
        self.model.train()
        self._start = (time.monotonic(), self.state.step)
        self._running_loss: float | None = None
        if self.state.step == 0 and self.config.valid_interval > 0:
            self.validate()
        restored_mid_epoch = self.sampler_state is not None
        while not self._finished(total_steps) and self.state.epoch <= num_epochs:
            if not restored_mid_epoch:
                # lhotse counts epochs from 0; a restored sampler already sits in its epoch.
                self.train_dl.sampler.set_epoch(self.state.epoch - 1)
                self.state.batches_in_epoch = 0
            # A checkpoint saved on an epoch's last batch restores a sampler with nothing left.
            may_be_empty, restored_mid_epoch = restored_mid_epoch, False
            self._start_epoch()
            outcome = self._run_epoch(total_steps)
            if outcome == "stopped":
                return False
            if outcome == "empty" and not may_be_empty:
                raise TrainingError("the training set yielded no batches (check --max-duration)")
            if not self._finished(total_steps):
                self.state.epoch += 1
        return True

    def _start_epoch(self) -> None:
        """Upstream's per-epoch steps: Eden's epoch decay (--lr-epochs, unless --lr-hours
        drives it per batch) and, with --valid-by-epoch 1, a validation."""
        if self.optimizer_kind == "scaledadam" and self.config.optim.lr_hours <= 0:
            self.scheduler.step_epoch(self.state.epoch - 1)
        if self.config.run.valid_by_epoch:
            self.validate()

    def _finished(self, total_steps: int | None) -> bool:
        return total_steps is not None and self.state.step >= total_steps

    def _run_epoch(self, total_steps: int | None) -> str:
        """One pass over the sampler: "done", "empty" (no batch) or "stopped" (a callback)."""
        run = self.config.run
        saw_batch = False
        self.sampler_position.restart()
        batches = iter(self.train_dl)
        if self._rng_to_restore is not None:
            # Starting the DataLoader draws from the global RNG; the saved state was taken
            # after that draw, so restore it only now.
            ckpt.set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        for raw_batch in batches:
            saw_batch = True
            self.sampler_position.consumed()
            self.state.batches_in_epoch += 1
            if not self.train_step(raw_batch):
                continue
            step = self.state.step
            if step % run.log_interval == 0 or step == total_steps:
                log_progress(self, total_steps)
            every = self.config.valid_interval
            if every > 0 and step % every == 0:
                self.validate()
            finished = self._finished(total_steps)
            if run.save_every_n > 0 and step % run.save_every_n == 0 and not finished:
                self.save(final=False)
            if any([callback.on_step_end(self) for callback in self.callbacks]):
                return "stopped"
            self._stop_if_interrupted(saved=run.save_every_n > 0 and step % run.save_every_n == 0)
            if finished:
                break
        return "done" if saw_batch else "empty"

    def train_step(self, raw_batch: dict[str, Any]) -> bool:
        """Schedules, forward, backward, optimiser update; False if the batch was skipped
        because its loss was not finite on some rank."""
        config, state = self.config, self.state
        seed_step(config.run.seed, self.rank, state.step)
        batch = prepare_batch(raw_batch, self.tokenizer, config.model.feat_scale, self.device)
        count = adjusted_batch_count(
            state.step, config.data.max_duration, self.world_size, config.model.ref_duration
        )
        set_batch_count(self.model, count + (100000 if config.model.finetune else 0))
        self.scheduler.step_batch(state.step)
        if self.optimizer_kind == "scaledadam" and config.optim.lr_hours > 0:
            hours = state.step * config.data.max_duration * self.world_size / 3600
            self.scheduler.step_epoch(hours)
        with torch.autocast(
            device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp
        ):
            if self.objective is None:
                loss = flow_matching_loss(
                    self.model, batch, condition_drop_ratio=config.model.condition_drop_ratio
                )
            else:
                loss, self.last_terms = self.objective(
                    self.model, batch, config.model.condition_drop_ratio
                )
        if not all_ranks_agree(bool(torch.isfinite(loss)), self.world_size, self.device):
            self._skip_bad_batch(float(loss.detach()), batch.cut_ids)
            return False
        backward_and_step(
            loss, self.scaler, self.optimizer, self.optimizer_kind, self.trainable_params,
            config.optim.grad_clip,
        )  # fmt: skip
        state.step += 1
        self.last_loss = float(loss.detach())
        previous = self._running_loss
        self._running_loss = (
            self.last_loss if previous is None else 0.9 * previous + 0.1 * self.last_loss
        )
        period = config.optim.average_period
        if self.model_avg is not None and state.step % period == 0:
            ckpt.update_average(self.model_avg, unwrap_ddp(self.model), state.step, period)
        return True

    def _stop_if_interrupted(self, saved: bool) -> None:
        """After a step: if a signal arrived on any rank, save (unless this step just was) and
        raise TrainingInterrupted on every rank (zipvoice.training.interrupt)."""
        requested = self.stop_request.requested
        if self.world_size > 1:
            requested = not all_ranks_agree(not requested, self.world_size, self.device)
        if not requested or self._finished(self.config.run.num_iters or None):
            return  # on the last step the final save follows anyway
        if not saved:
            self.save(final=False)
        checkpoint = self.exp_dir / f"checkpoint-{self.state.step}.pt"
        signum = self.stop_request.signum or signal.SIGINT
        raise TrainingInterrupted(
            signum, interrupted_message(self.state.step, str(checkpoint), signum)
        )

    def _skip_bad_batch(self, loss: float, cut_ids: list[str]) -> None:
        state, limit = self.state, self.config.run.max_bad_batches
        state.bad_batches += 1
        logger.warning(
            "non-finite loss (%s) at step %d, skipping batch; cuts: %s (%d/%d bad)",
            loss, state.step, ", ".join(cut_ids) or "?", state.bad_batches, limit,
        )  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        if state.bad_batches > limit:
            raise TrainingError(
                f"stopping: {state.bad_batches} batches with non-finite loss exceed "
                f"--max-bad-batches {limit}; the last checkpoint in {self.exp_dir} is intact"
            )

    # ------------------------------------------------------------------ validate and save

    def validate(self) -> dict[str, float]:
        """Deterministic dev loss (and forgetting-set loss), and with --eval-list the eval
        scores as eval/<metric>; logged, passed to callbacks."""
        values = {"valid/loss": self._dev_loss(self.dev_dl)}
        self.state.best_valid_loss = min(self.state.best_valid_loss, values["valid/loss"])
        message = f"step {self.state.step}: validation loss {values['valid/loss']:.5f}"
        if self.forgetting_dl is not None:
            values["valid/forgetting_loss"] = self._dev_loss(self.forgetting_dl)
            message += f", forgetting-set loss {values['valid/forgetting_loss']:.5f}"
        logger.info(message)
        if self.config.eval.eval_list:  # zipvoice.training.eval_hook: rank 0 synthesises
            raw, step = unwrap_ddp(self.model), self.state.step
            self.eval_scores = validation_scores(self.eval_hook, raw, step, self.world_size)
            values.update({f"eval/{name}": mean for name, mean in self.eval_scores.items()})
        if is_main(self.rank):
            self.experiment.scalars(values, self.state.step)
        for callback in self.callbacks:
            callback.on_validation(self, values)
        return values

    def _dev_loss(self, loader: Any) -> float:
        return compute_validation_loss(
            self.model,
            loader,
            tokenizer=self.tokenizer,
            feat_scale=self.config.model.feat_scale,
            device=self.device,
            seed=self.config.run.seed,
            world_size=self.world_size,
        )

    def save(self, final: bool) -> None:
        """Checkpoint + adapter (or full model) at this step (zipvoice.training.save_point);
        a failed write (a full disk) stops the run naming the checkpoint still intact."""
        from zipvoice.training.save_point import save

        save(self, final)
