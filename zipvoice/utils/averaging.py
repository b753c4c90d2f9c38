"""Checkpoint averaging, as upstream recipes do before inference and export.

Two ways, both upstream's:

- the running average (`model_avg`): the trainer updates it every `--average-period` steps so
  that at step s it is the mean of the weights at steps period, 2*period, ..., s. The mean over
  a range (start, end] follows from the two end points' averages:
  avg = (avg_end * end - avg_start * start) / (end - start) (`range_average`);
- the plain mean of N checkpoints' weights (`mean_state_dict`).

The trainer ends with the range average over its last `--avg` save intervals in `adapter/`
(or `finetuned/`); `zipvoice.bin.generate_averaged_model` averages any range of a run's
checkpoints afterwards, for this project's runs and for upstream's (`epoch-N.pt`,
`checkpoint-N.pt` with `batch_idx_train` and the full `model_avg`).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger("zipvoice.train")


class AveragingError(ValueError):
    """The checkpoints asked for cannot be averaged; the message says which and why."""


def mean_state_dict(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The element-wise mean of floating-point entries (summed in float64, returned in each
    entry's dtype); other entries (counters) are taken from the last state."""
    if not states:
        raise AveragingError("no checkpoints to average")
    keys = set(states[-1])
    for index, state in enumerate(states):
        if set(state) != keys:
            raise AveragingError(f"checkpoint {index} holds other weights than the last one")
    out: dict[str, Tensor] = {}
    for key, last in states[-1].items():
        if not torch.is_floating_point(last):
            out[key] = last.clone()
            continue
        total = torch.zeros(last.shape, dtype=torch.float64)
        for state in states:
            total += state[key].detach().to("cpu", torch.float64)
        out[key] = (total / len(states)).to(last.dtype)
    return out


def range_average(
    avg_start: Mapping[str, Tensor] | None,
    step_start: int,
    avg_end: Mapping[str, Tensor],
    step_end: int,
    period: int,
) -> dict[str, Tensor]:
    """The mean of the weights over steps (start, end] from the running averages at both ends.

    Steps are rounded down to a multiple of `period` (the average only changes there). A start
    at step 0 (or without an average) gives the end's average itself.
    """
    start = (step_start // period) * period
    end = (step_end // period) * period
    if end <= start:
        raise AveragingError(
            f"no average-period boundary between steps {step_start} and {step_end} "
            f"(--average-period {period})"
        )
    weight_end = end / (end - start)
    weight_start = 1.0 - weight_end
    out: dict[str, Tensor] = {}
    for key, value in avg_end.items():
        value64 = value.detach().to("cpu", torch.float64)
        if start > 0 and avg_start is not None and torch.is_floating_point(value):
            value64 = value64 * weight_end + avg_start[key].to("cpu", torch.float64) * weight_start
        out[key] = value64
    return out


def checkpoint_step(checkpoint: Mapping[str, Any]) -> int:
    """Optimiser steps behind a checkpoint: this project's `step`, upstream's
    `batch_idx_train`."""
    for key in ("step", "batch_idx_train"):
        if key in checkpoint:
            return int(checkpoint[key])
    raise AveragingError("checkpoint records neither 'step' nor 'batch_idx_train'")


CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)\.pt$")


def iteration_checkpoints(exp_dir: Path, iteration: int, count: int) -> list[Path]:
    """The `count` newest `checkpoint-N.pt` with N <= iteration, oldest first."""
    found = sorted(
        (int(m.group(1)), path)
        for path in exp_dir.glob("checkpoint-*.pt")
        if (m := CHECKPOINT_NAME.search(path.name)) and int(m.group(1)) <= iteration
    )
    if not found or found[-1][0] != iteration:
        raise AveragingError(f"{exp_dir}/checkpoint-{iteration}.pt not found")
    if len(found) < count:
        raise AveragingError(
            f"--iter {iteration} needs {count} checkpoints up to it in {exp_dir}, "
            f"found {len(found)}: {', '.join(p.name for _, p in found)}"
        )
    return [path for _, path in found[-count:]]


def epoch_checkpoints(exp_dir: Path, epoch: int, count: int) -> list[Path]:
    """`epoch-(epoch-count+1).pt` ... `epoch-{epoch}.pt` (upstream's per-epoch files)."""
    first = epoch - count + 1
    if first < 1:
        raise AveragingError(f"--epoch {epoch} with this --avg starts before epoch 1")
    paths = [exp_dir / f"epoch-{e}.pt" for e in range(first, epoch + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise AveragingError(f"not found in {exp_dir}: {', '.join(missing)}")
    return paths


def average_checkpoints(
    checkpoints: Sequence[Mapping[str, Any]], use_averaged_model: bool
) -> dict[str, Tensor]:
    """Average loaded checkpoints (oldest first): with `use_averaged_model`, the range average
    of `model_avg` between the first (excluded) and the last; else the mean of all their
    `model` weights."""
    if not use_averaged_model:
        return mean_state_dict([c["model"] for c in checkpoints])
    first, last = checkpoints[0], checkpoints[-1]
    if last.get("model_avg") is None:
        raise AveragingError("the checkpoints hold no running average (use_averaged_model 0)")
    period = int(last.get("average_period") or 0) or _period_of(last)
    averaged = range_average(
        first.get("model_avg"), checkpoint_step(first), last["model_avg"], checkpoint_step(last),
        period,
    )  # fmt: skip
    dtypes = {key: value.dtype for key, value in last["model"].items()}
    return {k: v.to(dtypes.get(k, torch.float32)) for k, v in averaged.items()}


def _period_of(checkpoint: Mapping[str, Any]) -> int:
    args = (checkpoint.get("identity") or {}).get("average_period")
    if args:
        return int(args)
    raise AveragingError("checkpoint records no average_period")


def final_average(
    exp_dir: Path,
    model_avg: Mapping[str, Tensor] | None,
    step: int,
    period: int,
    avg: int,
    save_every_n: int,
) -> tuple[dict[str, Tensor] | None, str]:
    """What the trainer's final `adapter/` (or `finetuned/`) holds: the running average over
    the last `avg` save intervals, or since the start when the checkpoint at the range's start
    is gone; None (the last weights) when `avg` is 0 or no average-period has passed."""
    if avg <= 0 or model_avg is None:
        return None, "the last weights (--avg 0)"
    if step < period:
        return None, f"the last weights (fewer than --average-period {period} steps)"
    start = step - avg * save_every_n if save_every_n > 0 else 0
    start_avg = None
    start_file = exp_dir / f"checkpoint-{start}.pt"
    if start > 0 and start_file.is_file():
        start_avg = torch.load(start_file, map_location="cpu", weights_only=True).get("model_avg")
    if start_avg is None or (start // period) * period >= (step // period) * period:
        start = 0
    averaged = range_average(start_avg, start, model_avg, step, period)
    first = (start // period) * period + period
    return averaged, f"the average of steps {first}..{(step // period) * period}"


@contextlib.contextmanager
def swapped_weights(model: nn.Module, weights: Mapping[str, Tensor] | None) -> Iterator[None]:
    """Within the block the model holds `weights` (named as its state dict); then its own
    weights come back. None leaves the model as it is."""
    if not weights:
        yield
        return
    own = model.state_dict()
    saved = {key: own[key].detach().clone() for key in weights}
    with torch.no_grad():
        for key, value in weights.items():
            own[key].copy_(value.to(own[key].dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for key, value in saved.items():
                own[key].copy_(value)
