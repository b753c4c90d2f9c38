"""What every metric shares: reading the inference test list, loading audio at the rate a
model wants, summarising per-utterance scores with a 95% interval, writing them as tsv, and the
command line every `python -m zipvoice.eval.<area>.<metric>` main is built from.

Metrics expose a scorer object with `score(item, wav_dir) -> float`, so `zipvoice.bin.evaluate`
and the trainer's evaluation hook can call them without going through a command line."""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from zipvoice.utils.cli import exit_on_error, setup_logging
from zipvoice.utils.fileio import atomic_write_text

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class EvalError(ValueError):
    """Input a metric cannot score: a bad test list, a missing generated wav, a bad model."""


@dataclass
class TestItem:
    """One row of the test list: what was generated (`name`), from which prompt, saying what."""

    __test__ = False  # not a pytest test class, despite the name

    name: str
    prompt_text: str
    prompt_wav: Path
    text: str


@dataclass
class Summary:
    """Mean of a metric over a test set with its 95% confidence interval (t-interval)."""

    metric: str
    mean: float
    ci95: tuple[float, float]
    count: int

    def format(self, digits: int = 4) -> str:
        lo, hi = self.ci95
        return (
            f"{self.metric}: mean {self.mean:.{digits}f} "
            f"95% CI [{lo:.{digits}f}, {hi:.{digits}f}] n={self.count}"
        )


class Scorer(Protocol):
    """What a metric module's scorer class provides."""

    def score(self, item: TestItem, wav_dir: Path) -> float: ...


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise EvalError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    return text.splitlines()


def read_test_list(path: str | os.PathLike) -> list[TestItem]:
    """`name<TAB>prompt_text<TAB>prompt_wav<TAB>text` per line, the format the inference
    command reads, so one list drives generation and evaluation. Blank lines are skipped; a
    relative prompt_wav is taken relative to the list's folder (as inference does)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"test list {path} not found")
    items: list[TestItem] = []
    seen: set[str] = set()
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) != 4:
            raise EvalError(
                f"{path}:{number}: expected 4 tab-separated fields "
                f"(name, prompt_text, prompt_wav, text), got {len(fields)}"
            )
        name, prompt_text, prompt_wav, text = (f.strip() for f in fields)
        if not name or "/" in name or name in (".", ".."):
            raise EvalError(f"{path}:{number}: bad utterance name {name!r}")
        if name in seen:
            raise EvalError(f"{path}:{number}: utterance name {name!r} appears twice")
        if not prompt_wav:
            raise EvalError(f"{path}:{number}: empty prompt_wav field")
        seen.add(name)
        wav = Path(prompt_wav)
        if not wav.is_absolute() and not wav.exists():
            wav = path.parent / wav
        items.append(TestItem(name, prompt_text, wav, text))
    if not items:
        raise EvalError(f"test list {path} has no utterances")
    return items


def load_wav(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """Mono float32 samples at `sample_rate` (soxr resampling); errors name the file."""
    from zipvoice.utils.audio import load_audio  # here: evaluate's --help stays light

    return load_audio(path, target_sr=sample_rate).numpy()


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file, or from a torch file without running pickled
    code (weights_only); a checkpoint dict's "model" entry is used when there is one."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise EvalError(f"cannot load {path} as weights only: {err}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(t, torch.Tensor) for t in obj.values()):
        raise EvalError(f"{path} is not a state dict of tensors")
    return obj


def generated_wav(wav_dir: str | os.PathLike, item: TestItem) -> Path:
    """Where inference wrote `item`'s audio: `wav_dir/<name>.wav`."""
    path = Path(wav_dir) / f"{item.name}.wav"
    if not path.is_file():
        raise EvalError(f"generated wav {path} for utterance {item.name!r} not found")
    return path


def _t_quantile_975(dof: int) -> float:
    from scipy.stats import t  # scipy is a core dependency; imported here to keep start-up fast

    return float(t.ppf(0.975, dof))


def summarize(metric: str, scores: Sequence[float]) -> Summary:
    """Mean and 95% t-interval of the mean (small test sets are the norm, so t, not normal)."""
    values = np.asarray(list(scores), dtype=np.float64)
    if values.size == 0:
        raise EvalError(f"{metric}: no scores to summarise")
    if not np.isfinite(values).all():
        raise EvalError(f"{metric}: some scores are NaN or infinite")
    mean = float(values.mean())
    if values.size == 1:
        return Summary(metric, mean, (mean, mean), 1)
    half = _t_quantile_975(values.size - 1) * float(values.std(ddof=1)) / math.sqrt(values.size)
    return Summary(metric, mean, (mean - half, mean + half), int(values.size))


def format_scores(scores: Mapping[str, float], summary: Summary) -> str:
    """The tsv text `write_scores` writes: per-utterance lines, then `#` summary lines."""
    lines = [f"{name}\t{value:.6f}" for name, value in scores.items()]
    lo, hi = summary.ci95
    lines += [
        f"# metric\t{summary.metric}",
        f"# mean\t{summary.mean:.6f}",
        f"# ci95\t{lo:.6f}\t{hi:.6f}",
        f"# n\t{summary.count}",
    ]
    return "\n".join(lines) + "\n"


def write_scores(
    output_file: str | os.PathLike,
    scores: Mapping[str, float],
    summary: Summary,
    overwrite: bool = True,
) -> None:
    """Atomic tsv write (`name<TAB>score` lines, then the summary as `#` lines). With
    `overwrite=False` an existing file is an error instead of being replaced."""
    path = Path(output_file)
    if not overwrite and path.exists():
        raise EvalError(f"output file {path} exists (pass --overwrite to replace it)")
    if path.parent and not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, format_scores(scores, summary))


def read_scores(path: str | os.PathLike) -> dict[str, float]:
    """Per-utterance scores back from a file `write_scores` wrote (summary lines skipped)."""
    path = Path(path)
    scores: dict[str, float] = {}
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        try:
            scores[fields[0]] = float(fields[1])
        except (IndexError, ValueError):
            raise EvalError(f"{path}:{number}: expected name<TAB>score, got {line!r}") from None
    return scores


def score_items(
    scorer: Scorer | Callable[[TestItem, Path], float],
    items: Sequence[TestItem],
    wav_dir: str | os.PathLike,
) -> dict[str, float]:
    """Scores every item in order (name -> score); `scorer` is a scorer object or a function."""
    score = scorer.score if hasattr(scorer, "score") else scorer
    wav_dir = Path(wav_dir)
    if not wav_dir.is_dir():
        raise EvalError(f"wav folder {wav_dir} not found")
    return {item.name: float(score(item, wav_dir)) for item in items}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The flags every metric command takes (upstream's names)."""
    parser.add_argument("--wav-path", required=True, help="Folder of generated <name>.wav files.")
    parser.add_argument(
        "--test-list",
        required=True,
        help="TSV lines: name<TAB>prompt_text<TAB>prompt_wav<TAB>text (the inference list).",
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help="Folder holding the metric's model files; without it the offline default is used.",
    )
    parser.add_argument(
        "--output-file", default=None, help="Write per-utterance scores and the summary (tsv)."
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace an existing --output-file."
    )
    parser.add_argument("--device", default="cpu", help="torch device for model inference.")


def run_metric_cli(
    argv: Sequence[str] | None,
    metric_name: str,
    make_scorer: Callable[[argparse.Namespace], Scorer | Callable[[TestItem, Path], float]],
    description: str | None = None,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """A whole metric command: parse the common flags (plus `add_args`'), build the scorer
    from them, score every utterance, print the summary, write the tsv if asked.
    Returns the exit status; a user's mistake is one `error: ...` line and status 1."""
    description = description or f"Score generated audio: {metric_name}."
    parser = argparse.ArgumentParser(description=description)
    add_common_args(parser)
    if add_args is not None:
        add_args(parser)
    args = parser.parse_args(argv)
    setup_logging()

    @exit_on_error
    def main() -> None:
        out = args.output_file
        if out and not args.overwrite and Path(out).exists():
            raise EvalError(f"output file {out} exists (pass --overwrite to replace it)")
        items = read_test_list(args.test_list)
        scorer = make_scorer(args)
        scores = score_items(scorer, items, args.wav_path)
        summary = summarize(metric_name, list(scores.values()))
        print(summary.format())
        if args.output_file:
            write_scores(args.output_file, scores, summary, overwrite=True)
            logger.info("wrote %d scores to %s", len(scores), args.output_file)

    return main()
