"""Scoring generated audio for the study, with the library's evaluation hook and metrics.

- Japanese (the users' case): at every validation the library's `EvalHook` (what the trainer's
  `--eval-list` runs) synthesises `eval_ja.tsv` with the run's Japanese tokenizer and scores SIM
  to the prompt and the F0 match against the held-out speaker's ground truth
  (`exp/RUN/eval/step-N/`);
- English (the zero-shot skill kept): a second hook on `eval_en.tsv` at the same validations,
  English (character) tokens mapped through the run's extended token file
  (`exp/RUN/eval_en/eval/step-N/`): SIM only.
- Ceilings: the ground truth itself, and the ground truth through the same fbank + Griffin-Lim
  path as generated speech (`ceiling`), scored by the same scorers.
- Inference-time variants: `score_posthoc` loads a trained adapter with `--lora-scale` or
  `--lora-t-range` and runs the hook once.

Griffin-Lim (the hook's default vocoder) needs no trained weights; it costs the metrics what
the `ceiling` rows show.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from zipvoice.training.callbacks import Callback

if TYPE_CHECKING:
    from zipvoice.training.config import EvalConfig
    from zipvoice.training.eval_hook import EvalHook
    from zipvoice.training.trainer import Trainer

logger = logging.getLogger("lora_study")

JA_METRICS = "sim,f0_corr,f0_rmse,vuv_error"
EN_TOKENIZER = "simple"  # characters: no optional English front-end needed


def make_hook(eval_config: EvalConfig, out_dir: Path, tokenizer: Any, seed: int) -> EvalHook:
    """An EvalHook writing under `out_dir/eval/`, tokenising with `tokenizer`."""
    from zipvoice.training.eval_hook import EvalHook

    return EvalHook(
        eval_config, out_dir,
        text_to_tokens=lambda text: tokenizer.texts_to_tokens([text])[0],
        tokens_to_ids=tokenizer.tokens_to_token_ids, feat_scale=0.1, distill=False,
        seed=seed, device=torch.device("cpu"),
    )  # fmt: skip


class ListEval(Callback):
    """At every validation, synthesise and score a test list with the weights as they are,
    through the library's EvalHook (which restores the RNG streams: training is unchanged).

    Used instead of the trainer's own `--eval-list` for two reasons: the English list needs
    English tokens in a Japanese run, and step 0 is the same model in every run of the main
    seed (checked: equal scores to 1e-6), so only one run scores it (`score_start`)."""

    def __init__(self, config: EvalConfig, tokenizer: str, token_file: Path, out_dir: Path,
                 seed: int, score_start: bool = True):  # fmt: skip
        self.config, self.tokenizer, self.token_file = config, tokenizer, token_file
        self.out_dir, self.seed, self.score_start = out_dir, seed, score_start
        self.hook: EvalHook | None = None

    def on_validation(self, trainer: Trainer, values: Mapping[str, float]) -> None:
        from zipvoice.tokenizer.tokenizer import get_tokenizer

        if trainer.state.step == 0 and not self.score_start:
            return
        if self.hook is None:
            tokenizer = get_tokenizer(self.tokenizer, self.token_file)
            self.hook = make_hook(self.config, self.out_dir, tokenizer, self.seed)
        self.hook.run(trainer.model, trainer.state.step)


def list_evals(lists: Mapping[str, Path], token_file: Path, exp_dir: Path, num_step: int,
               seed: int, score_start: bool, japanese: bool = True) -> list[ListEval]:  # fmt: skip
    """The study's two evaluations of a run: Japanese into `exp_dir/eval/` (where the
    trainer's hook would write), English into `exp_dir/eval_en/eval/`."""
    from zipvoice.training.config import EvalConfig

    en = EvalConfig(eval_list=str(lists["eval_en"]), eval_num_step=num_step, eval_metrics="sim")
    out = [ListEval(en, EN_TOKENIZER, token_file, exp_dir / "eval_en", seed, score_start)]
    if japanese:
        ja = EvalConfig(eval_list=str(lists["eval_ja"]), eval_num_step=num_step,
                        eval_ref_dir=str(lists["refs_ja"]), eval_metrics=JA_METRICS)  # fmt: skip
        out.insert(0, ListEval(ja, "japanese", token_file, exp_dir, seed, score_start))
    return out


def read_scores(path: Path) -> dict[str, dict[str, float]]:
    """scores.tsv -> line name -> metric -> value (NaN for `nan`, absent when empty)."""
    out: dict[str, dict[str, float]] = {}
    with path.open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            name = row.pop("name")
            out[name] = {k: float(v) for k, v in row.items() if v not in ("", None)}
    return out


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def summarise_scores(scores: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    """Means over the lines named `prefix*` of every metric, keys `<prefix><metric>`."""
    lines = [v for k, v in scores.items() if k.startswith(prefix)]
    metrics = sorted({m for line in lines for m in line})
    out = {f"{prefix}{m}": _mean([line.get(m, math.nan) for line in lines]) for m in metrics}
    out[f"{prefix}failed"] = sum(1 for line in lines for v in line.values() if not math.isfinite(v))
    return out


def eval_points(exp_dir: Path) -> dict[int, dict[str, float]]:
    """step -> {ja_sim, ja_f0_corr, ..., en_sim} from a run's two eval folders."""
    points: dict[int, dict[str, float]] = {}
    for sub, prefix in (("eval", "ja_"), ("eval_en/eval", "en_")):
        for step_dir in sorted((exp_dir / sub).glob("step-*")):
            scores = step_dir / "scores.tsv"
            if scores.is_file():
                step = int(step_dir.name.split("-")[1])
                points.setdefault(step, {}).update(summarise_scores(read_scores(scores), prefix))
    return points


def ceiling(eval_list: Path, refs: Path, out_dir: Path, prefix: str) -> dict[str, Any]:
    """The ground truth, and the ground truth through fbank + Griffin-Lim, scored as the
    generated speech is: the best any model can score with this vocoder."""
    from zipvoice.eval.registry import build_scorer
    from zipvoice.eval.utils import read_test_list
    from zipvoice.models.griffin_lim import GriffinLimVocoder
    from zipvoice.utils.audio import load_audio, save_wav
    from zipvoice.utils.feature import compute_vocos_mel

    items = read_test_list(eval_list)
    gl_dir = out_dir / f"{prefix}griffin_lim"
    gl_dir.mkdir(parents=True, exist_ok=True)
    vocoder = GriffinLimVocoder()
    for item in items:
        wave = load_audio(refs / f"{item.name}.wav", 24000).reshape(1, -1)
        with torch.inference_mode():
            mel = compute_vocos_mel(wave).transpose(1, 2)
            save_wav(gl_dir / f"{item.name}.wav", vocoder.decode(mel)[0].numpy(), sr=24000)
    metrics = ["sim"] + (["f0_corr", "f0_rmse", "vuv_error"] if prefix == "ja_" else [])
    result: dict[str, Any] = {}
    for label, wav_dir in (("ground_truth", refs), ("griffin_lim", gl_dir)):
        row = {}
        for metric in metrics:
            scorer = build_scorer(metric, options={"ref_wav_dir": str(refs)})
            row[f"{prefix}{metric}"] = _mean([scorer.score(it, wav_dir) for it in items])
        result[label] = row
    return result


def score_posthoc(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    lists: Mapping[str, Path],
    step: int,
    num_step: int,
    seed: int,
    lora_scale: float,
    lora_t_range: tuple[float, float] | None,
) -> dict[int, dict[str, float]]:
    """A trained adapter at inference with a scale or a time gate, scored on both lists as
    the training-time hook scores it (same noise seeds, same metrics)."""
    from zipvoice.inference.torch_backend import load_model_for_inference
    from zipvoice.tokenizer.tokenizer import get_tokenizer
    from zipvoice.training.config import EvalConfig

    model, token_file, _ = load_model_for_inference(
        "zipvoice", model_dir=base_dir, lora_path=adapter_dir, lora_scale=lora_scale,
        lora_t_range=lora_t_range,
    )  # fmt: skip
    ja = EvalConfig(eval_list=str(lists["eval_ja"]), eval_num_step=num_step,
                    eval_ref_dir=str(lists["refs_ja"]), eval_metrics=JA_METRICS)  # fmt: skip
    en = EvalConfig(eval_list=str(lists["eval_en"]), eval_num_step=num_step, eval_metrics="sim")
    make_hook(ja, out_dir, get_tokenizer("japanese", token_file), seed).run(model, step)
    english = get_tokenizer(EN_TOKENIZER, token_file)
    make_hook(en, out_dir / "eval_en", english, seed).run(model, step)
    return eval_points(out_dir)
