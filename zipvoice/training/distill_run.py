"""The distillation loop (zipvoice.training.distill): what `train_zipvoice_distill` runs.

Files in `exp_dir`, in upstream's layout so that `generate_averaged_model --model-name
zipvoice_distill` averages them: `checkpoint-{step}.pt` (`model`, `model_avg`,
`batch_idx_train`, `average_period`, optimiser), `model.json`, `tokens.txt`, and at the end
`distilled/` (model.pt, model.json, tokens.txt) with the last student weights. Single process;
a run starts from its teacher (no resuming).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zipvoice.training.distill import (
    DistillConfig,
    build_student,
    distillation_loss,
    ema_update,
    load_teacher,
    second_stage_teacher,
)

logger = logging.getLogger("zipvoice.train")


class DistillRun:
    """Teacher, student, optimiser and data of one run; `fit()` trains and saves."""

    def __init__(self, config: DistillConfig) -> None:
        from zipvoice.tokenizer.tokenizer import get_tokenizer
        from zipvoice.utils.optim import FixedLRScheduler, ScaledAdam

        self.config = config.validate()
        self.exp_dir = Path(config.exp_dir)
        teacher, self.token_file, self.model_config = load_teacher(config)
        self.tokenizer = get_tokenizer(config.tokenizer, self.token_file, config.lang)
        if config.distill_stage == "first":
            self.student = build_student(
                teacher, self.model_config, self.tokenizer.vocab_size, self.tokenizer.pad_id
            )
            self.teacher = teacher
        else:  # the teacher file is a ZipVoice-Distill model: it becomes the student
            self.student = teacher
            for param in self.student.parameters():
                param.requires_grad_(True)
            self.teacher = second_stage_teacher(self.student)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = ScaledAdam(self.params, lr=config.base_lr, clipping_scale=2.0)
        self.scheduler = FixedLRScheduler(self.optimizer)
        self.model_avg = {k: v.detach().double().clone()
                          for k, v in self.student.state_dict().items()}  # fmt: skip
        self.step, self.losses = 0, []
        self.rng = random.Random(config.seed)

    def loader(self) -> Any:
        from zipvoice.dataset.datamodule import TtsDataModule

        data = TtsDataModule(self.config.data, tokenizer=self.tokenizer, seed=self.config.seed)
        return data.train_dataloaders(data.train_cuts())

    def train_step(self, raw_batch: dict[str, Any]) -> float:
        from zipvoice.training.steps import adjusted_batch_count, prepare_batch, set_batch_count

        config = self.config
        batch = prepare_batch(raw_batch, self.tokenizer, config.feat_scale, torch.device("cpu"))
        set_batch_count(self.student, adjusted_batch_count(
            self.step, config.data.max_duration, 1, config.ref_duration))  # fmt: skip
        self.scheduler.step_batch(self.step)
        loss = distillation_loss(self.student, self.teacher, batch, config.distill_stage, self.rng)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if config.distill_stage == "second":
            ema_update(self.teacher, self.student, config.ema_decay)
        self._update_average()
        return float(loss.detach())

    def _update_average(self) -> None:
        period = self.config.average_period
        if self.step % period:
            return
        weight = period / self.step
        with torch.no_grad():
            for key, value in self.student.state_dict().items():
                if torch.is_floating_point(value):
                    self.model_avg[key].mul_(1 - weight).add_(value.double(), alpha=weight)

    def save(self) -> None:
        from zipvoice.utils.checkpoint import remove_checkpoints, save_object

        save_object(
            {
                "model": self.student.state_dict(),
                "model_avg": {k: v.float() for k, v in self.model_avg.items()},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "batch_idx_train": self.step,
                "average_period": self.config.average_period,
                "distill_stage": self.config.distill_stage,
            },
            self.exp_dir / f"checkpoint-{self.step}.pt",
        )
        remove_checkpoints(self.exp_dir, max(1, self.config.keep_last_k))

    def fit(self) -> nn.Module:
        """Train for --num-iters steps (or --num-epochs), saving every --save-every-n."""
        from zipvoice.training import checkpoints as ckpt
        from zipvoice.utils.fileio import atomic_copy, atomic_write_json
        from zipvoice.utils.lock import FolderLock

        self.exp_dir.mkdir(parents=True, exist_ok=True)
        with FolderLock(self.exp_dir, "distillation run"):
            atomic_write_json(self.exp_dir / "model.json", dict(self.model_config))
            atomic_copy(self.token_file, self.exp_dir / "tokens.txt")
            self.student.train()
            self._loop(self.loader())
            self.save()
            ckpt.save_full_model(
                self.student, self.exp_dir / "distilled", str(self.token_file), self.model_config
            )
        logger.info("distillation finished at step %d: %s/distilled", self.step, self.exp_dir)
        return self.student

    def _loop(self, train_dl: Any) -> None:
        config = self.config
        epochs = config.num_epochs if config.num_iters <= 0 else 1_000_000
        for epoch in range(1, epochs + 1):
            train_dl.sampler.set_epoch(epoch - 1)
            for raw_batch in train_dl:
                self.losses.append(self.train_step(raw_batch))
                logger.info("epoch %d step %d | distillation loss %.5f", epoch, self.step,
                            self.losses[-1])  # fmt: skip
                if config.save_every_n > 0 and self.step % config.save_every_n == 0:
                    self.save()
                if 0 < config.num_iters <= self.step:
                    return


def run_distillation(config: DistillConfig) -> nn.Module:
    """`DistillRun(config).fit()`: the distilled student."""
    return DistillRun(config).fit()
