"""The adaptation methods the study compares, each with its learning-rate sweep.

Every method is a set of TrainingConfig changes (flag destinations, see TrainingConfig.replace)
and a tuple of learning rates; a run is (method, lr, seed). All runs start from the same
pre-trained model, see the same batches (seed) and validate at the same steps, so each (method,
lr) is a curve of validation points. Inference-time variants (`--lora-scale`, `--lora-t-range`)
are not trained: they re-score a trained adapter (`POSTHOC`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The partial fine-tune: the last two decoder stacks and the output projection (and the text
# side, which every method trains: the new Japanese tokens need it).
PARTIAL = "fm_decoder.encoders.3,fm_decoder.encoders.4,fm_decoder.out_proj,embed,text_encoder"


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    settings: Mapping[str, Any]
    lrs: tuple[float, ...]
    needs_replay: bool = False


def _adamw(**extra: Any) -> dict[str, Any]:
    return {"use_lora": False, "optimizer": "adamw", **extra}


def _adapter(rank: int, dora: bool, targets: str = "attention", **extra: Any) -> dict[str, Any]:
    return {
        "use_lora": True, "use_dora": dora, "lora_rank": rank, "lora_alpha": 2 * rank,
        "lora_target_modules": targets, "lora_dropout": 0.05, "optimizer": "adamw", **extra,
    }  # fmt: skip


ADAMW_LRS = (3e-4, 1e-3, 3e-3)
ADAPTER_LRS = (1e-3, 3e-3, 1e-2)

METHODS: tuple[Method, ...] = (
    Method("frozen_decoder", "decoder frozen; embedding + text encoder train",
           _adamw(freeze_modules="fm_decoder"), (1e-3, 3e-3, 1e-2)),
    Method("partial", "last two decoder stacks + out_proj (+ text side)",
           _adamw(trainable_modules=PARTIAL), ADAMW_LRS),
    Method("full", "full fine-tuning, AdamW", _adamw(), ADAMW_LRS),
    Method("full_scaledadam", "full fine-tuning, ScaledAdam (upstream)",
           {"use_lora": False, "optimizer": "scaledadam", "lr_batches": 100000},
           (1e-3, 3e-3, 1e-2)),
    Method("lora_r32", "LoRA r32/a64, attention", _adapter(32, False), ADAPTER_LRS),
    Method("dora_r32", "DoRA r32/a64, attention (the recipe's default)", _adapter(32, True),
           ADAPTER_LRS),
    Method("dora_r8", "DoRA r8/a16, attention", _adapter(8, True), ADAPTER_LRS),
    Method("dora_r32_ffconv", "DoRA r32/a64, attention + feed-forward + conv",
           _adapter(32, True, "attention_ff_conv"), ADAPTER_LRS),
    Method("dora_r32_replay", "DoRA r32 + 30% English replay",
           _adapter(32, True, replay_ratio=0.3), ADAPTER_LRS, needs_replay=True),
    Method("dora_r32_replay_kd", "DoRA r32 + replay + distillation from the start weights "
           "(kd 1.0 on replay and prompt frames: --kd-on all)",
           _adapter(32, True, replay_ratio=0.3, kd_weight=1.0, kd_on="all"), ADAPTER_LRS,
           needs_replay=True),
)  # fmt: skip

BY_NAME = {m.name: m for m in METHODS}


@dataclass(frozen=True)
class Posthoc:
    """An inference-time variant of a trained adapter: no training, a re-scoring."""

    name: str
    source: str  # the method whose adapters it re-scores (every lr of it)
    lora_scale: float = 1.0
    lora_t_range: tuple[float, float] | None = None


POSTHOC: tuple[Posthoc, ...] = (
    *(Posthoc(f"dora_r32_scale{s:g}", "dora_r32", lora_scale=s) for s in (0.25, 0.5, 0.75)),
    Posthoc("dora_r32_gate_early", "dora_r32", lora_t_range=(0.0, 0.5)),
    Posthoc("dora_r32_gate_late", "dora_r32", lora_t_range=(0.5, 1.0)),
)


def run_name(method: str, lr: float, seed: int, main_seed: int) -> str:
    """Folder name of a run: `full_lr0.001`, `full_lr0.001_seed7`."""
    name = f"{method}_lr{lr:g}"
    return name if seed == main_seed else f"{name}_seed{seed}"
