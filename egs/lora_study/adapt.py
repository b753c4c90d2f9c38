"""Adaptation runs of the study: one (method, lr, seed) per run, run in worker processes.

Each run is the project trainer from the pre-trained model, with the Japanese and English
held-out lists scored at every validation (`scoring.list_evals`); its result (points per
validation step, losses, trainable parameters, wall time) goes to `exp/RUN/result.json`, which
a rerun reuses.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

from methods import BY_NAME, POSTHOC, run_name
from scoring import EN_TOKENIZER, eval_points, list_evals, score_posthoc
from settings import SEED, Budget, Layout, common_config, validation_curves, write_json

if TYPE_CHECKING:
    from zipvoice.training.config import TrainingConfig

logger = logging.getLogger("lora_study")


@dataclass(frozen=True)
class Job:
    """One adaptation run."""

    method: str
    lr: float
    seed: int = SEED
    score_start: bool = False  # score step 0 (the same model in every run of the main seed)

    @property
    def name(self) -> str:
        return run_name(self.method, self.lr, self.seed, SEED)


def adaptation_config(layout: Layout, budget: Budget, exp_dir: Path, job: Job) -> TrainingConfig:
    """The common fine-tuning settings, then the method's, then the learning rate."""
    method = BY_NAME[job.method]
    config = common_config(layout, budget, exp_dir, budget.adapt_steps,
                                 budget.valid_every, job.seed)  # fmt: skip
    settings = dict(method.settings)
    if method.needs_replay:
        settings.update(replay_manifest=str(layout.fbank("en", "train")),
                        replay_tokenizer=EN_TOKENIZER)  # fmt: skip
    return config.replace(
        tokenizer="japanese", token_file=str(layout.tokens_en_ja),
        checkpoint=str(layout.base_dir / "model.pt"), finetune=True,
        train_manifest=str(layout.fbank("ja", "train")),
        dev_manifest=str(layout.fbank("ja", "dev")),
        forgetting_manifest=str(layout.fbank("en", "heldout")),
        warmup_steps=max(1, budget.adapt_steps // 20), lr_schedule="cosine",
        **settings, base_lr=job.lr,
    )  # fmt: skip


def run_job(layout: Layout, budget: Budget, job: Job, force: bool) -> dict[str, Any]:
    """Train one run (or reuse its result) and collect its curve."""
    import torch

    from zipvoice.models.modules.lora_utils import count_parameters
    from zipvoice.training.trainer import run_training

    torch.set_num_threads(1)
    exp_dir = layout.exp / job.name
    result_path = exp_dir / "result.json"
    if result_path.is_file() and not force:
        return json.loads(result_path.read_text(encoding="utf-8"))
    if exp_dir.exists():
        shutil.rmtree(exp_dir)
    config = adaptation_config(layout, budget, exp_dir, job)
    evals = list_evals(layout.lists(), layout.tokens_en_ja, exp_dir, budget.eval_num_step,
                       job.seed, job.score_start)  # fmt: skip
    logger.info("%s: %s, lr %g, seed %d", job.name, BY_NAME[job.method].description, job.lr,
                job.seed)  # fmt: skip
    start = time.monotonic()
    model = run_training(config, callbacks=evals)
    wall = time.monotonic() - start
    trainable, total = count_parameters(model)
    result = {
        "run": job.name, "method": job.method, "lr": job.lr, "seed": job.seed,
        "trainable_params": trainable, "total_params": total, "wall_s": wall,
        "steps": budget.adapt_steps, "curves": validation_curves(exp_dir),
        "points": {str(k): v for k, v in eval_points(exp_dir).items()},
    }  # fmt: skip
    write_json(result_path, result)
    logger.info("%s: done in %.0f s", job.name, wall)
    return result


def run_posthoc(
    layout: Layout, budget: Budget, variant: str, lr: float, force: bool
) -> dict[str, Any]:
    """Re-score the source method's final adapter (lr `lr`) with a scale or a time gate."""
    import torch

    torch.set_num_threads(1)
    spec = next(p for p in POSTHOC if p.name == variant)
    source = run_name(spec.source, lr, SEED, SEED)
    out_dir = layout.exp / "posthoc" / f"{variant}_lr{lr:g}"
    result_path = out_dir / "result.json"
    if result_path.is_file() and not force:
        return json.loads(result_path.read_text(encoding="utf-8"))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    start = time.monotonic()
    points = score_posthoc(
        layout.base_dir, layout.exp / source / "adapter", out_dir,
        layout.lists(), budget.adapt_steps, budget.eval_num_step, SEED,
        spec.lora_scale, spec.lora_t_range,
    )  # fmt: skip
    result = {
        "run": f"{variant}_lr{lr:g}", "method": variant, "lr": lr, "seed": SEED,
        "source": source, "lora_scale": spec.lora_scale, "lora_t_range": spec.lora_t_range,
        "wall_s": time.monotonic() - start, "steps": budget.adapt_steps,
        "points": {str(k): v for k, v in points.items()},
    }  # fmt: skip
    write_json(result_path, result)
    return result


def _init_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s [%(name)s] %(message)s")  # fmt: skip


def run_all(tasks: list[tuple], jobs: int) -> list[dict[str, Any]]:
    """Run `(function, *args)` tasks, `jobs` at a time in worker processes (in this process
    when jobs is 1); results in task order. A failed task fails the study, naming the run."""
    if jobs <= 1:
        return [fn(*args) for fn, *args in tasks]
    results = []
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"),
                             initializer=_init_worker) as pool:  # fmt: skip
        futures = [pool.submit(fn, *args) for fn, *args in tasks]
        for future in futures:
            results.append(future.result())
    return results
