"""Upstream's diagnostic flags: `--inf-check`, `--print-diagnostics`, `--scan-oom`.

`attach_diagnostics(trainer)` runs once the trainer is set up; it registers the hooks and
returns the callbacks that belong to the loop (zipvoice.training.callbacks).
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from zipvoice.training.callbacks import Callback
from zipvoice.training.config import TrainingError

if TYPE_CHECKING:
    from zipvoice.training.trainer import Trainer

logger = logging.getLogger("zipvoice.train")

DIAGNOSTIC_BATCHES = 6  # upstream stops after batch index 5


class ModuleStats:
    """Per-module running statistics of forward outputs and of gradients w.r.t. them."""

    def __init__(self, model: nn.Module) -> None:
        self.values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.handles = [
            module.register_forward_hook(self._forward_hook(name))
            for name, module in model.named_modules()
            if name
        ]

    def _forward_hook(self, name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not isinstance(output, Tensor) or not output.is_floating_point():
                return
            value = output.detach().float()
            stats = self.values[name]
            stats["abs_mean"].append(value.abs().mean().item())
            stats["rms"].append(value.pow(2).mean().sqrt().item())
            stats["min"].append(value.min().item())
            stats["max"].append(value.max().item())
            if output.requires_grad:
                output.register_hook(lambda g: stats["grad_rms"].append(
                    g.detach().float().pow(2).mean().sqrt().item()))  # fmt: skip

        return hook

    def report(self) -> str:
        lines = [f"{'module':60s} {'abs_mean':>10s} {'rms':>10s} {'min':>10s} {'max':>10s} "
                 f"{'grad_rms':>10s}"]  # fmt: skip
        for name, stats in self.values.items():
            cells = []
            for key in ("abs_mean", "rms", "min", "max", "grad_rms"):
                seq = stats.get(key) or []
                cells.append(f"{sum(seq) / len(seq):10.3g}" if seq else f"{'-':>10s}")
            lines.append(f"{name[:60]:60s} " + " ".join(cells))
        return "\n".join(lines)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class PrintDiagnostics(Callback):
    """Collect statistics over the first batches, print them and stop (nothing is saved)."""

    def __init__(self, stats: ModuleStats, batches: int = DIAGNOSTIC_BATCHES) -> None:
        self.stats, self.batches = stats, batches

    def on_step_end(self, trainer: Trainer) -> bool:
        if trainer.state.step < self.batches:
            return False
        logger.info("diagnostics over %d batches:\n%s", trainer.state.step, self.stats.report())
        self.stats.remove()
        return True


def attach_diagnostics(trainer: Trainer) -> list[Callback]:
    """Hooks and loop callbacks for the diagnostic flags that are on."""
    from zipvoice.training.distributed import unwrap_ddp
    from zipvoice.utils.hooks import register_inf_check_hooks

    run, model = trainer.config.run, unwrap_ddp(trainer.model)
    callbacks: list[Callback] = []
    if run.inf_check:
        register_inf_check_hooks(model)
    if run.print_diagnostics:
        callbacks.append(PrintDiagnostics(ModuleStats(model)))
    if run.scan_oom:
        scan_pessimistic_batches(trainer)
    return callbacks


def scan_pessimistic_batches(trainer: Trainer) -> None:
    """Forward + backward on the most demanding batches of the epoch (lhotse's pessimistic
    batches: longest cut, most frames, ...); an out-of-memory names the criterion."""
    from lhotse.dataset import find_pessimistic_batches

    from zipvoice.training.steps import flow_matching_loss, prepare_batch

    config = trainer.config
    sampler = trainer.train_dl.sampler
    # The scan iterates the training sampler itself: a resumed run puts it back where the
    # checkpoint left it (else its first epoch would start over); a fresh one restarts anyway.
    restored = copy.deepcopy(sampler.state_dict()) if trainer.sampler_state is not None else None
    batches, criteria = find_pessimistic_batches(sampler)
    if restored is not None:
        sampler.load_state_dict(restored)
    for criterion, cuts in batches.items():
        raw = trainer.train_dl.dataset[cuts]
        batch = prepare_batch(raw, trainer.tokenizer, config.model.feat_scale, trainer.device)
        try:
            loss = flow_matching_loss(trainer.model, batch, condition_drop_ratio=0.0)
            loss.backward()
        except torch.OutOfMemoryError as err:
            raise TrainingError(
                f"--scan-oom: the batch with the largest {criterion} "
                f"({criteria[criterion]}) runs out of memory; lower --max-duration"
            ) from err
        finally:
            trainer.optimizer.zero_grad(set_to_none=True)
        logger.info("scan-oom: batch with the largest %s (%s) fits", criterion,
                    criteria[criterion])  # fmt: skip
