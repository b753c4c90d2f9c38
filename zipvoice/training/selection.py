"""Keeping the checkpoint with the best combined score (`--select-metric`), against forgetting.

The Japanese dev loss keeps falling long after the model has started to forget its speakers;
the step worth keeping is the one that balances both. `--select-metric` is a weighted sum of
score names, lower is better (a higher-is-better metric takes a minus sign), e.g.
`valid_loss+0.5*forgetting_loss-2*sim`:

- `valid_loss`: the dev loss (`valid/loss`);
- `forgetting_loss`: the loss on `--forgetting-manifest` (`valid/forgetting_loss`);
- any other scalar that validation reports as `valid/<name>` or `eval/<name>` is `<name>`:
  this is the hook point for the evaluation metrics. `Trainer.validate` puts the
  `--eval-list` means there as `eval/<metric>` (`sim`, `dnsmos`, `accent_probe`, ...), so
  they are selectable with no change to this module (see `selection_scores`).

After each validation `BestCheckpoint` computes the score; a new best is written to
`exp-dir/best/` (an adapter folder for LoRA runs, a model folder for full fine-tuning) and
`exp-dir/best.json` (step, score, the values it came from), and named in the log.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zipvoice.training.callbacks import Callback
from zipvoice.training.config import parse_select_metric

if TYPE_CHECKING:
    from zipvoice.training.trainer import Trainer

logger = logging.getLogger("zipvoice.train")

BEST_DIR = "best"
BEST_FILE = "best.json"
SCORE_PREFIXES = ("valid/", "eval/")


def selection_scores(values: Mapping[str, float]) -> dict[str, float]:
    """The score names of one validation's values (module docstring): `valid/loss` is
    `valid_loss`, any other `valid/<name>` or `eval/<name>` is `<name>`."""
    scores: dict[str, float] = {}
    for key, value in values.items():
        if key == "valid/loss":
            scores["valid_loss"] = float(value)
            continue
        for prefix in SCORE_PREFIXES:
            if key.startswith(prefix):
                scores[key[len(prefix) :]] = float(value)
    return scores


def combined_score(weights: Mapping[str, float], scores: Mapping[str, float], metric: str):
    """The weighted sum; a name the validation did not report is an error naming it."""
    missing = [name for name in weights if name not in scores]
    if missing:
        raise ValueError(
            f"--select-metric {metric!r} needs {', '.join(missing)}, which validation does not "
            f"report (it reports: {', '.join(sorted(scores)) or 'nothing'})"
        )
    return sum(weight * scores[name] for name, weight in weights.items())


class BestCheckpoint(Callback):
    """Keep `best/` at the validation step with the lowest `--select-metric` score."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.weights = parse_select_metric(metric)
        self.best_score = math.inf
        self.best_step: int | None = None

    def restore(self, exp_dir: Path, resumed_step: int) -> None:
        """On resume, continue from the best recorded by the same run up to `resumed_step`."""
        path = exp_dir / BEST_FILE
        if not path.is_file():
            return
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            logger.warning("%s is not valid JSON; the best checkpoint starts afresh", path)
            return
        if record.get("metric") == self.metric and int(record.get("step", -1)) <= resumed_step:
            self.best_score, self.best_step = float(record["score"]), int(record["step"])

    def on_validation(self, trainer: Trainer, values: Mapping[str, float]) -> None:
        scores = selection_scores(values)
        score = combined_score(self.weights, scores, self.metric)
        step = trainer.state.step
        if not math.isfinite(score) or score >= self.best_score:
            logger.info(
                "step %d: %s = %.5f (best %.5f at step %s)",
                step, self.metric, score, self.best_score, self.best_step,
            )  # fmt: skip
            return
        self.best_score, self.best_step = score, step
        write_best(trainer, self.record(step, score, scores))
        logger.info(
            "new best checkpoint at step %d: %s = %.5f -> %s/", step, self.metric, score, BEST_DIR
        )

    def record(self, step: int, score: float, scores: Mapping[str, float]) -> dict[str, Any]:
        return {"metric": self.metric, "step": step, "score": score, "scores": dict(scores)}


def write_best(trainer: Trainer, record: Mapping[str, Any]) -> None:
    """`best/` (replaced whole, atomically) and `best.json`, on the main rank."""
    from zipvoice.models.modules.lora_utils import is_lora_model
    from zipvoice.training import checkpoints as ckpt
    from zipvoice.training.distributed import is_main, unwrap_ddp
    from zipvoice.utils.fileio import atomic_replace_dir, atomic_write_json

    if not is_main(trainer.rank):
        return
    raw, out_dir = unwrap_ddp(trainer.model), trainer.exp_dir / BEST_DIR
    config = trainer.config
    if is_lora_model(raw):
        ckpt.save_run_adapter(
            raw, out_dir, config, trainer.setup_result, trainer.model_config,
            step=trainer.state.step, initial_adapter_dir=trainer.initial_adapter_dir,
        )  # fmt: skip
    else:
        token_file, model_config = config.model.token_file, trainer.model_config
        atomic_replace_dir(
            out_dir, lambda tmp: ckpt.save_full_model(raw, tmp, token_file, model_config)
        )
    atomic_write_json(trainer.exp_dir / BEST_FILE, dict(record))
