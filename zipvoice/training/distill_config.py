"""Settings of a ZipVoice-Distill run (train_zipvoice_distill), apart from the training code
so that the entry point builds its parser without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from zipvoice.dataset.config import DataConfig

STAGES = ("first", "second")


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run; fields are named after the flags of train_zipvoice_distill."""

    teacher_model: str
    distill_stage: str = "first"
    teacher_lora: str | None = None
    model_config: str | None = None
    token_file: str | None = None
    tokenizer: str = "emilia"
    lang: str = "en-us"
    exp_dir: str = "exp/zipvoice_distill"
    base_lr: float = 0.001
    ema_decay: float = 0.9999
    num_iters: int = 0
    num_epochs: int = 1
    save_every_n: int = 1000
    keep_last_k: int = 30
    average_period: int = 200
    feat_scale: float = 0.1
    ref_duration: float = 50.0
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> DistillConfig:
        if self.distill_stage not in STAGES:
            raise ValueError(f"--distill-stage must be one of {STAGES}, got {self.distill_stage}")
        if not Path(self.teacher_model).is_file():
            raise FileNotFoundError(f"--teacher-model {self.teacher_model} not found")
        if self.teacher_lora and not Path(self.teacher_lora).is_dir():
            raise FileNotFoundError(f"--teacher-lora {self.teacher_lora}: no adapter folder")
        if self.distill_stage == "second" and self.teacher_lora:
            raise ValueError("--teacher-lora applies to the first stage (a ZipVoice teacher)")
        if self.base_lr <= 0 or not 0 < self.ema_decay < 1:
            raise ValueError("--base-lr must be positive and --ema-decay in (0, 1)")
        return self
