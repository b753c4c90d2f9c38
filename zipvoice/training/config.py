"""The typed configuration of a training run, grouped as data / model / adapter / optim / run /
eval.

`zipvoice.bin.train_zipvoice` fills it from flags (`TrainingConfig.from_flags`); a recipe, test
or notebook builds it directly:

    config = TrainingConfig(
        data=DataConfig(dataset="custom", train_manifest="train.jsonl.gz", ...),
        model=ModelConfig(checkpoint="model.pt", model_config="model.json", ...),
        adapter=AdapterConfig(use_lora=True, lora=LoraSettings(rank=16)),
        run=RunConfig(exp_dir="exp/ja", num_iters=1000),
    )
    Trainer(config).fit()

Every field is named after its flag (`--max-duration` -> `data.max_duration`); adapter knobs
are `LoraSettings` fields (`--lora-rank` -> `adapter.lora.rank`). The config is never changed
in place: values that depend on others (the optimiser in use, its base lr, warm-up steps) are
properties, and `replace(**flags)` returns a modified copy.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zipvoice.dataset.config import DataConfig
from zipvoice.models.modules.lora_config import LoraSettings

# The released ZipVoice configuration, shipped with the recipe (resolved from this file, so the
# default works from any working directory of a source checkout).
DEFAULT_MODEL_CONFIG = str(
    Path(__file__).resolve().parents[2] / "egs" / "zipvoice" / "conf" / "zipvoice_base.json"
)
# AdamW moves zero-initialised adapters at 1e-3; ScaledAdam's updates are relative to each
# parameter's RMS, so upstream's 0.02 is its scale.
DEFAULT_BASE_LR = {"adamw": 1e-3, "scaledadam": 0.02}
OPTIMIZERS = ("auto", "adamw", "scaledadam")
LR_SCHEDULES = ("cosine", "constant")
KD_REGIONS = ("replay", "prompt", "all")
# One term of --select-metric: [weight*]name (zipvoice.training.selection).
_TERM = re.compile(
    r"(?P<sign>[+-])?(?:(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\*)?(?P<name>[a-z_][a-z0-9_]*)"
)
# Flag destinations of the adapter knobs -> LoraSettings fields.
LORA_FLAGS = {
    "lora_rank": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "use_dora": "use_dora",
    "lora_target_modules": "target_modules",
    "lora_init": "init",
    "use_rslora": "use_rslora",
}


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says why and what to do."""


@dataclass(frozen=True)
class ModelConfig:
    """Which model to build, from which weights and tokens, and how it computes the loss."""

    model_config: str = DEFAULT_MODEL_CONFIG
    checkpoint: str | None = None
    tokenizer: str = "emilia"
    lang: str = "en-us"
    token_file: str = "data/tokens_emilia.txt"
    distill: bool = False
    finetune: bool = False
    train_text_encoder: bool = True
    feat_scale: float = 0.1
    condition_drop_ratio: float = 0.2
    ref_duration: float = 50.0
    # Against forgetting (docs/lora.md): distillation from the start weights, partial freezing.
    kd_weight: float = 0.0
    kd_on: str = "replay"
    trainable_modules: str | None = None
    freeze_modules: str | None = None


@dataclass(frozen=True)
class AdapterConfig:
    """LoRA/DoRA on the decoder (`use_lora`), with its settings."""

    use_lora: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule; `optimizer="auto"` picks AdamW for adapters, else ScaledAdam."""

    optimizer: str = "auto"
    base_lr: float | None = None
    warmup_steps: int = -1
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lr_batches: float = 7500.0
    lr_epochs: float = 10.0
    lr_hours: float = 0.0
    average_period: int = 200


@dataclass(frozen=True)
class RunConfig:
    """Where, how long, on how many processes, and how verbosely."""

    exp_dir: str = "exp/zipvoice"
    world_size: int = 1
    master_port: int = 12356
    use_fp16: bool = True
    num_iters: int = 0
    num_epochs: int = 11
    start_epoch: int = 1
    valid_interval: int = -1
    save_every_n: int = 5000
    keep_last_k: int = 30
    seed: int = 42
    resume: str = "auto"
    tensorboard: bool = True
    wandb_project: str | None = None
    log_interval: int = 50
    max_bad_batches: int = 10
    num_threads: int = 0  # intra-op threads per process; 0: cores / world_size
    select_metric: str | None = None
    # Upstream's flags (docs/upstream.md): validation per epoch, diagnostics, averaging.
    valid_by_epoch: bool = False
    print_diagnostics: bool = False
    scan_oom: bool = False
    inf_check: bool = False
    avg: int = 2


@dataclass(frozen=True)
class EvalConfig:
    """Listening to the run: `eval_list` (the inference test-list format) is synthesised with
    the current weights at each validation and scored (zipvoice.training.eval_hook)."""

    eval_list: str | None = None
    eval_num_step: int = 16
    eval_guidance_scale: float | None = None
    eval_vocoder: str = "griffin-lim"
    eval_ref_dir: str | None = None
    eval_metrics: str = "auto"

    def validate(self) -> None:
        """Flag values, the list and its prompt files, before any model is read (a typo must
        not surface at the first validation, hours into the run)."""
        if not self.eval_list:
            return
        import math

        from zipvoice.eval.registry import METRICS, parse_metrics
        from zipvoice.eval.utils import read_test_list

        if self.eval_num_step < 1:
            raise ValueError(f"--eval-num-step must be at least 1, got {self.eval_num_step}")
        scale = self.eval_guidance_scale
        if scale is not None and not math.isfinite(scale):
            raise ValueError(f"--eval-guidance-scale must be a finite number, got {scale}")
        if self.eval_ref_dir and not Path(self.eval_ref_dir).is_dir():
            raise FileNotFoundError(f"--eval-ref-dir {self.eval_ref_dir} is not a folder")
        for item in read_test_list(self.eval_list):
            if not item.prompt_wav.is_file():
                raise FileNotFoundError(
                    f"--eval-list {self.eval_list}: prompt wav {item.prompt_wav} of "
                    f"{item.name!r} not found"
                )
        if self.eval_metrics != "auto":
            for name in parse_metrics(self.eval_metrics):
                if not METRICS[name].offline:
                    raise ValueError(f"--eval-metrics: {name} needs downloaded models")
                if METRICS[name].module.endswith(".f0_match") and not self.eval_ref_dir:
                    raise ValueError(f"--eval-metrics: {name} needs --eval-ref-dir")


GROUPS = ("data", "model", "adapter", "optim", "run", "eval")


@dataclass(frozen=True)
class TrainingConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ------------------------------------------------------------------ derived values

    @property
    def optimizer_kind(self) -> str:
        if self.optim.optimizer != "auto":
            return self.optim.optimizer
        return "adamw" if self.adapter.use_lora else "scaledadam"

    @property
    def base_lr(self) -> float:
        """--base-lr when given, else the sane value for the optimiser in use."""
        if self.optim.base_lr is not None:
            return self.optim.base_lr
        return DEFAULT_BASE_LR[self.optimizer_kind]

    @property
    def warmup_steps(self) -> int:
        if self.optim.warmup_steps >= 0:
            return self.optim.warmup_steps
        if self.run.num_iters > 0:
            return min(500, self.run.num_iters // 20)
        return 500

    @property
    def valid_interval(self) -> int:
        """Steps between validations: --valid-interval, or (-1) every --save-every-n steps as
        upstream; 0 with --valid-by-epoch 1, which validates at each epoch's start instead."""
        if self.run.valid_by_epoch:
            return 0
        if self.run.valid_interval >= 0:
            return self.run.valid_interval
        return self.run.save_every_n

    # ------------------------------------------------------------------ flags <-> config

    @classmethod
    def from_flags(cls, flags: Any) -> TrainingConfig:
        """From parsed flags (an argparse Namespace or a mapping of flag destinations)."""
        values = dict(vars(flags) if not isinstance(flags, dict) else flags)
        return cls().replace(**values)

    def replace(self, **flags: Any) -> TrainingConfig:
        """A copy with fields changed, named by their flag destinations (`num_iters=6`,
        `lora_rank=16`); an unknown name raises TypeError."""
        groups: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
        lora: dict[str, Any] = {}
        for key, value in flags.items():
            if key in LORA_FLAGS:
                lora[LORA_FLAGS[key]] = value
                continue
            group = _group_of(key)
            if group is None:
                raise TypeError(f"unknown training setting {key!r}")
            groups[group][key] = value
        if lora:
            groups["adapter"]["lora"] = dataclasses.replace(self.adapter.lora, **lora)
        return dataclasses.replace(
            self,
            **{
                name: dataclasses.replace(getattr(self, name), **changes)
                for name, changes in groups.items()
                if changes
            },
        )

    def flags(self) -> dict[str, Any]:
        """Every setting by its flag destination: what run_config.json records as "args"."""
        out: dict[str, Any] = {}
        for name in GROUPS:
            for item in dataclasses.fields(getattr(self, name)):
                value = getattr(getattr(self, name), item.name)
                if item.name == "lora":
                    for flag, attr in LORA_FLAGS.items():
                        out[flag] = getattr(value, attr)
                    continue
                out[item.name] = str(value) if isinstance(value, Path) else value
        return out

    # ------------------------------------------------------------------ validation

    def validate(self) -> TrainingConfig:
        """Check values and input files once, before any checkpoint or data is read."""
        if self.base_lr <= 0:
            raise ValueError(f"--base-lr must be positive, got {self.base_lr}")
        if self.run.world_size < 1:
            raise ValueError(f"--world-size must be at least 1, got {self.run.world_size}")
        if self.run.num_threads < 0 or self.data.num_workers < -1:
            raise ValueError(
                "--num-threads must be >= 0 (0: automatic) and --num-workers >= -1 (-1: "
                f"automatic), got {self.run.num_threads} and {self.data.num_workers}"
            )
        if self.run.num_iters <= 0 and self.run.num_epochs <= 0:
            raise ValueError("give a positive --num-iters or --num-epochs")
        if self.run.avg < 0:
            raise ValueError(f"--avg must not be negative, got {self.run.avg}")
        if self.run.max_bad_batches < 0:
            raise ValueError("--max-bad-batches must not be negative")
        if self.adapter.use_lora:
            self.adapter.lora.validate()
            if not self.model.checkpoint:
                raise TrainingError(
                    "--use-lora 1 needs the pretrained base model: pass --checkpoint"
                )
        for name in ("model_config", "token_file", "checkpoint"):
            value = getattr(self.model, name)
            if name == "checkpoint" and not value:
                continue
            flag = f"--{name.replace('_', '-')}"
            if value and Path(value).is_dir():
                raise FileNotFoundError(f"{flag} {value} is a directory, expected a file")
            if not value or not Path(value).is_file():
                raise FileNotFoundError(f"{flag} {value} not found")
        # Train/dev manifests may be relative to --manifest-dir: the data module checks them.
        forgetting = self.data.forgetting_manifest
        if forgetting and not Path(forgetting).is_file():
            raise FileNotFoundError(f"--forgetting-manifest {forgetting} not found")
        self._validate_files()
        self._validate_forgetting()
        self.eval.validate()
        return self

    def _validate_forgetting(self) -> None:
        """Replay, distillation, freezing and selection settings (docs/lora.md)."""
        data, model = self.data, self.model
        if data.replay_manifest:
            if not 0.0 < data.replay_ratio < 1.0:
                raise ValueError(f"--replay-ratio must be in (0, 1), got {data.replay_ratio}")
            if not Path(data.replay_manifest).is_file():
                raise FileNotFoundError(f"--replay-manifest {data.replay_manifest} not found")
        if model.kd_on not in KD_REGIONS:
            raise ValueError(f"--kd-on must be one of {', '.join(KD_REGIONS)}, got {model.kd_on!r}")
        if model.kd_weight < 0:
            raise ValueError(f"--kd-weight must not be negative, got {model.kd_weight}")
        if model.kd_weight > 0 and model.kd_on == "replay" and not data.replay_manifest:
            raise TrainingError(
                "--kd-weight with --kd-on replay distils on replay cuts: pass --replay-manifest, "
                "or --kd-on prompt/all"
            )
        if self.run.select_metric:
            names = parse_select_metric(self.run.select_metric)
            if "forgetting_loss" in names and not data.forgetting_manifest:
                raise TrainingError(
                    f"--select-metric {self.run.select_metric!r} uses forgetting_loss: pass "
                    "--forgetting-manifest"
                )

    def _validate_files(self) -> None:
        """The exp-dir is never inside an input folder, and a manifest-carrying checkpoint is
        the one its folder lists (docs/integrity.md)."""
        from zipvoice.utils.folders import refuse_output_inside_inputs
        from zipvoice.utils.manifest import verify_file

        checkpoint = self.model.checkpoint
        refuse_output_inside_inputs("--exp-dir", self.run.exp_dir, {"--checkpoint": checkpoint})
        if checkpoint:
            verify_file(checkpoint)


def _group_of(key: str) -> str | None:
    for name, group_cls in zip(
        GROUPS,
        (DataConfig, ModelConfig, AdapterConfig, OptimConfig, RunConfig, EvalConfig),
        strict=True,
    ):
        if key in {f.name for f in dataclasses.fields(group_cls)} and key != "lora":
            return name
    return None


def parse_select_metric(metric: str) -> dict[str, float]:
    """`"valid_loss+0.5*forgetting_loss-0.2*sim"` -> {"valid_loss": 1.0, "forgetting_loss":
    0.5, "sim": -0.2}: lower is better, so a higher-is-better metric takes a minus sign."""
    weights: dict[str, float] = {}
    text, position = metric.replace(" ", ""), 0
    while position < len(text) or not weights:
        match = _TERM.match(text, position)
        if match is None or (position > 0 and not match["sign"]):
            raise ValueError(
                f"--select-metric {metric!r}: cannot read it from {text[position:]!r}; write a "
                "sum of [weight*]name terms, e.g. valid_loss+0.5*forgetting_loss"
            )
        sign = -1.0 if match["sign"] == "-" else 1.0
        name = match["name"]
        weights[name] = weights.get(name, 0.0) + sign * float(match["weight"] or 1.0)
        position = match.end()
    return weights
