"""Scoring a folder of generated audio with several metrics at once, for code rather than a
command line: the trainer's evaluation hook (synthesise the eval list, then score it at each
validation) and `zipvoice.bin.evaluate` both go through `Evaluator`.

An Evaluator builds each metric's model once and reuses it for every folder it scores, so a
training run pays the model-loading cost once, not at every validation."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zipvoice.eval.registry import METRICS, build_scorer, parse_metrics
from zipvoice.eval.utils import EvalError, Scorer, Summary, TestItem, score_items, summarize

logger = logging.getLogger(__name__)

OFFLINE_DEFAULT_METRICS = ("sim", "dnsmos")


@dataclass
class EvalResult:
    """Per-metric summaries and per-utterance scores (metric -> name -> score)."""

    summaries: dict[str, Summary] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)

    def means(self) -> dict[str, float]:
        """metric -> mean, the shape loggers (TensorBoard, W&B) want."""
        return {name: s.mean for name, s in self.summaries.items()}


class Evaluator:
    """Builds the scorers of `metrics` once; `score_folder` runs them all over one folder.
    With `offline_only`, a metric that needs downloaded weights is refused up front."""

    def __init__(
        self,
        metrics: str | Sequence[str] = OFFLINE_DEFAULT_METRICS,
        model_dir: str | None = None,
        device: str = "cpu",
        options: Mapping[str, Any] | None = None,
        offline_only: bool = False,
    ):
        self.metrics = parse_metrics(metrics if isinstance(metrics, str) else list(metrics))
        if offline_only:
            needs = [m for m in self.metrics if not METRICS[m].offline]
            if needs:
                raise EvalError(
                    f"metrics {needs} need downloaded models; offline: {OFFLINE_DEFAULT_METRICS}"
                )
            model_dir = None
        self.scorers: dict[str, Scorer] = {
            name: build_scorer(name, model_dir, device, options) for name in self.metrics
        }

    def score_folder(self, wav_dir: str | os.PathLike, items: Sequence[TestItem]) -> EvalResult:
        result = EvalResult()
        for name, scorer in self.scorers.items():
            scores = score_items(scorer, items, wav_dir)
            result.scores[name] = scores
            result.summaries[name] = summarize(name, list(scores.values()))
            logger.info("%s", result.summaries[name].format())
        return result


def score_folder(
    wav_dir: str | os.PathLike,
    items: Sequence[TestItem],
    metrics: Sequence[str] = OFFLINE_DEFAULT_METRICS,
    device: str = "cpu",
) -> dict[str, Summary]:
    """One-shot: score `wav_dir/<name>.wav` for `items` with offline-default models only.
    (Build an `Evaluator` instead to score many folders with the same models.)"""
    if not Path(wav_dir).is_dir():
        raise EvalError(f"wav folder {wav_dir} not found")
    evaluator = Evaluator(metrics, device=device, offline_only=True)
    return evaluator.score_folder(wav_dir, items).summaries


def format_table(result: EvalResult, digits: int = 4) -> str:
    """One plain-text table: metric, mean, 95% interval, count, and which way is better."""
    header = ("metric", "mean", "95% CI", "n", "better")
    rows = [header]
    for name, s in result.summaries.items():
        lo, hi = s.ci95
        better = "higher" if METRICS[name].higher_is_better else "lower"
        ci = f"[{lo:.{digits}f}, {hi:.{digits}f}]"
        rows.append((name, f"{s.mean:.{digits}f}", ci, str(s.count), better))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def check_outputs_free(out_dir: str | os.PathLike, metrics: Sequence[str], overwrite: bool) -> None:
    """Refuse (before any scoring, ideally) to replace earlier results unless asked to."""
    out = Path(out_dir)
    targets = [out / f"{name}.tsv" for name in metrics] + [out / "summary.tsv"]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise EvalError(f"{existing[0]} exists (pass --overwrite to replace it)")


def write_result(out_dir: str | os.PathLike, result: EvalResult, overwrite: bool = False) -> None:
    """`<metric>.tsv` per metric (per-utterance scores and summary, as each metric command
    writes) and `summary.tsv` (metric, mean, ci95_low, ci95_high, n), atomically."""
    from zipvoice.eval.utils import write_scores
    from zipvoice.utils.fileio import atomic_write_text

    out = Path(out_dir)
    check_outputs_free(out, list(result.summaries), overwrite)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["metric\tmean\tci95_low\tci95_high\tn"]
    for name, summary in result.summaries.items():
        write_scores(out / f"{name}.tsv", result.scores[name], summary)
        lo, hi = summary.ci95
        lines.append(f"{name}\t{summary.mean:.6f}\t{lo:.6f}\t{hi:.6f}\t{summary.count}")
    atomic_write_text(out / "summary.tsv", "\n".join(lines) + "\n")
