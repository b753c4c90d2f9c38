"""Listening to a run: a few sentences synthesised with the current weights and scored at
each validation, so the curve users watch is speech, not only the flow-matching loss.

With `--eval-list TSV` (the inference test-list format; include speakers that are not in the
training set, whose similarity is what fine-tuning forgets first), at every validation rank 0
1. synthesises every line with the model as it is (adapters unmerged, eval mode), with
   `--eval-num-step` sampling steps and `--eval-vocoder`; line i always gets noise seed
   `seed + i`, so what changes between validations is the weights, not the noise;
2. writes `exp-dir/eval/step-N/`: `NAME.wav` per line, `scores.tsv` (one row per line, one
   column per metric; `nan` = the metric failed on it, empty = not applicable) and
   `summary.json` (per metric: mean, 95% interval, count, failures; the settings; seconds);
3. scores them with offline metrics (zipvoice.eval): `sim` (Resemblyzer cosine to the prompt)
   and `dnsmos` always, `accent_probe` on lines whose text is a probe sentence
   (zipvoice.eval.accent.probe_list), and the F0 match (`f0_corr`, `f0_rmse`, `vuv_error`) on
   lines with a ground-truth recording `--eval-ref-dir/NAME.wav`; `--eval-metrics` picks others;
4. logs the audio (`eval/audio/NAME`) to TensorBoard and W&B.

A metric that cannot score a line (an EvalError: early output often has no voiced frame for the
F0 match) gives NaN for that line with a warning, and the run goes on; so does any other error
inside a metric (logged with its traceback): evaluation never stops training.

`EvalHook.run` returns {metric: mean over the lines it could score} (NaN when none). The Trainer
keeps that dict as `trainer.eval_scores` and adds it to the validation values as
`eval/<metric>`: TensorBoard/W&B scalars, `Callback.on_validation`, and the scores that
best-checkpoint selection reads (`zipvoice.eval.registry.METRICS[name].higher_is_better` says
which way is better).

The training RNG streams are saved before and restored after synthesis, so a run trains the
same with or without `--eval-list`. Under DDP the other ranks wait at their next collective
while rank 0 evaluates: keep the list short (a few lines take seconds on a GPU).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from zipvoice.eval.utils import EvalError, Scorer, TestItem, read_test_list, summarize
from zipvoice.inference.common import MODEL_DEFAULTS, SAMPLING_RATE
from zipvoice.inference.prompt import Prompt
from zipvoice.training.checkpoints import get_rng_state, set_rng_state
from zipvoice.training.distributed import broadcast_object, is_main

if TYPE_CHECKING:
    from zipvoice.training.config import EvalConfig, TrainingConfig
    from zipvoice.training.experiment_log import ExperimentLog

logger = logging.getLogger("zipvoice.train")

EVAL_DIR = "eval"
SCORES_FILE = "scores.tsv"
SUMMARY_FILE = "summary.json"
ALWAYS = ("sim", "dnsmos")
F0_METRICS = ("f0_corr", "f0_rmse", "vuv_error")
HUB_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def step_dir(exp_dir: str | os.PathLike, step: int) -> Path:
    """Where the evaluation of `step` is written."""
    return Path(exp_dir) / EVAL_DIR / f"step-{step}"


def load_eval_vocoder(spec: str) -> nn.Module:
    """`griffin-lim`, a local Vocos folder, or a hub repo id (`owner/name`) downloaded once."""
    from zipvoice.models.griffin_lim import GRIFFIN_LIM_NAME
    from zipvoice.models.vocoder import load_vocoder

    path = Path(spec)
    if spec == GRIFFIN_LIM_NAME or path.is_dir():
        return load_vocoder(spec)
    if path.exists():
        raise EvalError(f"--eval-vocoder {spec} is a file; give a Vocos folder")
    if not HUB_REPO_ID.fullmatch(spec):
        raise FileNotFoundError(
            f"--eval-vocoder {spec}: no such folder (give a Vocos folder, a hub repo id such as "
            "charactr/vocos-mel-24khz, or griffin-lim)"
        )
    try:
        return load_vocoder(None, repo_id=spec)
    except Exception as err:  # offline, unknown repo, bad files: the hub says many things
        raise EvalError(
            f"--eval-vocoder {spec}: no such folder here, and loading it from the Hugging Face "
            f"hub failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None


def probe_names(items: Sequence[TestItem]) -> list[str]:
    """The lines whose text is an accent-probe sentence (exactly one probe word in it)."""
    from zipvoice.eval.accent.probe import find_probe

    names = []
    for item in items:
        try:
            find_probe(item.text)
        except EvalError:
            continue
        names.append(item.name)
    return names


def choose_metrics(config: EvalConfig, items: Sequence[TestItem]) -> dict[str, list[str]]:
    """metric -> the lines it scores. `auto`: sim and dnsmos on all, accent_probe on probe
    sentences, the F0 match on lines with a reference recording."""
    from zipvoice.eval.registry import parse_metrics

    every = [item.name for item in items]
    with_ref = []
    if config.eval_ref_dir:
        with_ref = [n for n in every if (Path(config.eval_ref_dir) / f"{n}.wav").is_file()]
    probes = probe_names(items)
    if config.eval_metrics != "auto":
        chosen = parse_metrics(config.eval_metrics)
        lines = {"accent_probe": probes, **{m: with_ref for m in F0_METRICS}}
        return {name: lines.get(name, every) for name in chosen}
    plan: dict[str, list[str]] = {name: every for name in ALWAYS}
    if probes:
        plan["accent_probe"] = probes
    if with_ref:
        plan.update({name: with_ref for name in F0_METRICS})
    elif config.eval_ref_dir:
        logger.warning("--eval-ref-dir %s holds none of the eval list's NAME.wav: no F0 match",
                       config.eval_ref_dir)  # fmt: skip
    return plan


def build_scorers(
    plan: dict[str, list[str]], ref_dir: str | None, device: str
) -> dict[str, Scorer]:
    """Each metric's model, built once for the whole run; a missing package is named."""
    from zipvoice.eval.registry import build_scorer

    options = {"ref_wav_dir": ref_dir} if ref_dir else {}
    scorers = {}
    for name in plan:
        try:
            scorers[name] = build_scorer(name, device=device, options=options)
        except ImportError as err:
            raise EvalError(
                f"--eval-list: metric {name} needs the eval extra ({err}); "
                "run scripts/setup.sh or pip install -e '.[eval]'"
            ) from None
    return scorers


def score_metric(
    name: str, scorer: Scorer, items: Sequence[TestItem], wav_dir: Path, exp_dir: Path, step: int
) -> dict[str, float]:
    """line -> score; a line the metric cannot score is NaN, with a warning saying why."""
    scores: dict[str, float] = {}
    for item in items:
        if not (wav_dir / f"{item.name}.wav").is_file():
            scores[item.name] = math.nan  # synthesis failed and said so
            continue
        try:
            scores[item.name] = float(scorer.score(item, wav_dir))
        except EvalError as err:
            # Name the folder the wav ends up in, not the temporary one it is scored in.
            reason = str(err).replace(str(wav_dir), str(step_dir(exp_dir, step)))
            logger.warning("eval step %d: %s of %r is NaN: %s", step, name, item.name, reason)
            scores[item.name] = math.nan
        except Exception:
            logger.warning("eval step %d: %s failed on %r; NaN", step, name, item.name,
                           exc_info=True)  # fmt: skip
            scores[item.name] = math.nan
    return scores


def summarise_metric(name: str, scores: dict[str, float]) -> dict[str, Any]:
    """Mean and 95% interval over the lines scored; failures counted, NaN (null) if none."""
    finite = [v for v in scores.values() if math.isfinite(v)]
    entry: dict[str, Any] = {"mean": None, "ci95": None, "n": len(finite),
                             "failed": len(scores) - len(finite)}  # fmt: skip
    if finite:
        summary = summarize(name, finite)
        entry.update(mean=summary.mean, ci95=list(summary.ci95))
    return entry


def format_scores_table(names: Sequence[str], table: dict[str, dict[str, float]]) -> str:
    """`name<TAB>metric...` rows: `nan` = failed, empty = the metric does not apply."""
    lines = ["\t".join(["name", *table])]
    for line_name in names:
        cells = []
        for scores in table.values():
            value = scores.get(line_name)
            cells.append("" if value is None else ("nan" if math.isnan(value) else f"{value:.6f}"))
        lines.append("\t".join([line_name, *cells]))
    return "\n".join(lines) + "\n"


@dataclass
class EvalLine:
    """One eval-list line, its prompt prepared once for the whole run."""

    item: TestItem
    prompt: Prompt


class EvalHook:
    """Synthesise and score the eval list (module docstring); built on rank 0 only."""

    def __init__(
        self,
        config: EvalConfig,
        exp_dir: str | os.PathLike,
        *,
        text_to_tokens: Callable[[str], list[str]],
        tokens_to_ids: Callable[[list[list[str]]], list[list[int]]],
        feat_scale: float,
        distill: bool,
        seed: int,
        device: torch.device,
        experiment: ExperimentLog | None = None,
    ) -> None:
        self.config, self.exp_dir, self.device = config, Path(exp_dir), device
        self.text_to_tokens, self.tokens_to_ids = text_to_tokens, tokens_to_ids
        self.feat_scale, self.seed, self.experiment = feat_scale, seed, experiment
        defaults = MODEL_DEFAULTS["zipvoice_distill" if distill else "zipvoice"]
        scale = config.eval_guidance_scale
        self.guidance_scale = float(defaults["guidance_scale"] if scale is None else scale)
        self.lines = self._prepare_lines(read_test_list(config.eval_list))
        items = [line.item for line in self.lines]
        self.plan = choose_metrics(config, items)
        self.scorers = build_scorers(self.plan, config.eval_ref_dir, "cpu")
        self.vocoder = load_eval_vocoder(config.eval_vocoder).to(device)
        self.metric_seconds: dict[str, float] = {}  # of the last scoring, in summary.json
        for leftover in (self.exp_dir / EVAL_DIR).glob(".tmp-*"):  # a kill mid-evaluation
            shutil.rmtree(leftover, ignore_errors=True)
        logger.info("eval list: %d lines, metrics %s, %d steps, vocoder %s",
                    len(items), ", ".join(self.plan), config.eval_num_step,
                    config.eval_vocoder)  # fmt: skip

    def _prepare_lines(self, items: list[TestItem]) -> list[EvalLine]:
        """Prompts featurised once; a prompt or text the model cannot take fails here, before
        the first training step."""
        from zipvoice.inference.chunking import add_punctuation
        from zipvoice.inference.common import InferenceError
        from zipvoice.inference.prompt import prepare_prompt

        lines = []
        where = f"--eval-list {self.config.eval_list}"
        for item in items:
            try:
                prompt = prepare_prompt(item.prompt_wav, item.prompt_text, self.text_to_tokens,
                                        feat_scale=self.feat_scale)  # fmt: skip
            except InferenceError as err:
                raise EvalError(f"{where}: line {item.name!r}: {err}") from None
            ids = self.tokens_to_ids([self.text_to_tokens(add_punctuation(item.text))])[0]
            if not ids:
                raise EvalError(f"{where}: the text of {item.name!r} has no known token")
            lines.append(EvalLine(item, prompt))
        return lines

    # ------------------------------------------------------------------ one validation

    def run(self, model: nn.Module, step: int) -> dict[str, float]:
        """Synthesise, score, write `eval/step-{step}/`, log audio; {metric: mean}."""
        from zipvoice.utils.fileio import atomic_replace_dir

        result: dict[str, Any] = {}

        def build(folder: Path) -> None:
            start = time.perf_counter()
            result["waves"] = self.synthesise(model, folder, step)
            middle = time.perf_counter()
            result["table"] = self.score(folder, step)
            result["seconds"] = {"synthesis": middle - start,
                                 "scoring": time.perf_counter() - middle,
                                 "per_metric": self.metric_seconds}  # fmt: skip
            self._write_results(folder, step, result["table"], result["seconds"])

        out_dir = atomic_replace_dir(step_dir(self.exp_dir, step), build)
        means = {
            name: math.nan if entry["mean"] is None else entry["mean"]
            for name, entry in self._summaries(result["table"]).items()
        }
        self._log_audio(result["waves"], step)
        logger.info(
            "eval at step %d: %d lines in %.1f s + scored in %.1f s: %s -> %s", step,
            len(result["waves"]), result["seconds"]["synthesis"], result["seconds"]["scoring"],
            ", ".join(f"{k} {v:.4f}" for k, v in means.items()), out_dir,
        )  # fmt: skip
        return means

    def synthesise(self, model: nn.Module, folder: Path, step: int) -> dict[str, np.ndarray]:
        """NAME.wav per line in `folder`; the training RNG streams and mode are restored."""
        from zipvoice.inference.generation import generate_wave
        from zipvoice.inference.torch_backend import torch_sampler, torch_vocoder
        from zipvoice.utils.audio import save_wav

        was_training = model.training
        rng = get_rng_state()
        model.eval()
        sample = torch_sampler(model, self.config.eval_num_step, self.guidance_scale,
                               device=self.device)  # fmt: skip
        vocode = torch_vocoder(self.vocoder, self.device)
        waves: dict[str, np.ndarray] = {}
        try:
            for index, line in enumerate(self.lines):
                torch.manual_seed(self.seed + index)
                try:
                    wave, _ = generate_wave(
                        line.item.text, line.prompt, self.text_to_tokens, self.tokens_to_ids,
                        sample, vocode, feat_scale=self.feat_scale,
                    )  # fmt: skip
                    wave = np.nan_to_num(wave.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
                    save_wav(folder / f"{line.item.name}.wav", wave, sr=SAMPLING_RATE)
                except Exception:
                    logger.warning("eval step %d: synthesising %r failed; its scores are NaN",
                                   step, line.item.name, exc_info=True)  # fmt: skip
                    continue
                waves[line.item.name] = wave
        finally:
            model.train(was_training)
            set_rng_state(rng)
        return waves

    def score(self, folder: Path, step: int) -> dict[str, dict[str, float]]:
        """metric -> line -> score, over the lines each metric applies to."""
        by_name = {line.item.name: line.item for line in self.lines}
        table = {}
        self.metric_seconds = {}
        for name, scorer in self.scorers.items():
            items = [by_name[n] for n in self.plan[name]]
            start = time.perf_counter()
            table[name] = score_metric(name, scorer, items, folder, self.exp_dir, step)
            self.metric_seconds[name] = time.perf_counter() - start
            if items and not any(math.isfinite(v) for v in table[name].values()):
                logger.warning("eval step %d: %s could score no line; logged as NaN", step, name)
        return table

    def _summaries(self, table: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
        from zipvoice.eval.registry import METRICS

        return {
            name: {**summarise_metric(name, scores),
                   "higher_is_better": METRICS[name].higher_is_better}
            for name, scores in table.items()
        }  # fmt: skip

    def _write_results(
        self, folder: Path, step: int, table: dict[str, dict[str, float]], seconds: dict
    ) -> None:
        from zipvoice.utils.fileio import atomic_write_json, atomic_write_text

        names = [line.item.name for line in self.lines]
        atomic_write_text(folder / SCORES_FILE, format_scores_table(names, table))
        config = self.config
        atomic_write_json(folder / SUMMARY_FILE, {
            "step": step,
            "metrics": self._summaries(table),
            "settings": {"eval_list": config.eval_list, "eval_num_step": config.eval_num_step,
                         "guidance_scale": self.guidance_scale, "seed": self.seed,
                         "eval_vocoder": config.eval_vocoder, "eval_ref_dir": config.eval_ref_dir},
            "seconds": seconds,
        })  # fmt: skip

    def _log_audio(self, waves: dict[str, np.ndarray], step: int) -> None:
        if self.experiment is None:
            return
        texts = {f"eval/audio/{line.item.name}": line.item.text for line in self.lines}
        clips = {f"eval/audio/{name}": wave for name, wave in waves.items() if wave.size}
        self.experiment.audio(clips, step, SAMPLING_RATE, captions=texts)


def make_eval_hook(
    config: TrainingConfig,
    exp_dir: str | os.PathLike,
    rank: int,
    tokenizer: Any,
    device: torch.device,
    experiment: ExperimentLog | None,
) -> EvalHook | None:
    """The run's hook on rank 0 when `--eval-list` is given, else None."""
    if not config.eval.eval_list or not is_main(rank):
        return None
    return EvalHook(
        config.eval,
        exp_dir,
        text_to_tokens=lambda text: tokenizer.texts_to_tokens([text])[0],
        tokens_to_ids=tokenizer.tokens_to_token_ids,
        feat_scale=config.model.feat_scale,
        distill=config.model.distill,
        seed=config.run.seed,
        device=device,
        experiment=experiment,
    )


def validation_scores(
    hook: EvalHook | None, model: nn.Module, step: int, world_size: int
) -> dict[str, float]:
    """Rank 0 runs the hook; every rank gets its {metric: mean} (empty without a hook)."""
    scores = hook.run(model, step) if hook is not None else {}
    return dict(broadcast_object(scores, world_size))
