"""Which metrics exist and where their scorers live, so `zipvoice.bin.evaluate` and the
trainer's evaluation hook can build any of them by name. Modules are imported only when a
metric is used: each pulls in heavy optional packages (the `eval` extra)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zipvoice.eval.utils import EvalError, Scorer


@dataclass(frozen=True)
class MetricSpec:
    """A metric: its scorer class, whether it runs offline without --model-dir (an embedded
    model), and which direction is better (for reading tables)."""

    name: str
    module: str
    cls: str
    offline: bool
    higher_is_better: bool
    summary: str
    fixed: tuple[tuple[str, Any], ...] = ()  # constructor arguments this metric always gets


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            "sim",
            "zipvoice.eval.speaker_similarity.sim",
            "SpeakerSimilarity",
            True,
            True,
            "speaker similarity to the prompt (cosine)",
        ),
        MetricSpec(
            "dnsmos", "zipvoice.eval.mos.dnsmos", "DNSMOS", True, True, "DNSMOS OVRL quality (1-5)"
        ),
        MetricSpec(
            "utmos", "zipvoice.eval.mos.utmos", "UTMOS", False, True, "UTMOS naturalness (1-5)"
        ),
        MetricSpec(
            "cer",
            "zipvoice.eval.wer.cer",
            "CharErrorRate",
            False,
            False,
            "character error rate of an ASR transcript (kana-normalised for Japanese)",
        ),
        MetricSpec(
            "wer",
            "zipvoice.eval.wer.cer",
            "WordErrorRate",
            False,
            False,
            "word error rate of an ASR transcript",
        ),
        MetricSpec(
            "f0_corr",
            "zipvoice.eval.accent.f0_match",
            "F0MatchScorer",
            True,
            True,
            "log-F0 correlation with a same-text reference after DTW (--opt ref_wav_dir=DIR)",
            (("metric", "log_f0_corr"),),
        ),
        MetricSpec(
            "f0_rmse",
            "zipvoice.eval.accent.f0_match",
            "F0MatchScorer",
            True,
            False,
            "F0 RMSE in cents against a same-text reference (--opt ref_wav_dir=DIR)",
            (("metric", "f0_rmse_cents"),),
        ),
        MetricSpec(
            "vuv_error",
            "zipvoice.eval.accent.f0_match",
            "F0MatchScorer",
            True,
            False,
            "voiced/unvoiced disagreement with a same-text reference (--opt ref_wav_dir=DIR)",
            (("metric", "vuv_error"),),
        ),
        MetricSpec(
            "accent_probe",
            "zipvoice.eval.accent.probe",
            "AccentProbeScorer",
            True,
            True,
            "minimal-pair pitch-accent probe accuracy (a probe list from accent.probe_list)",
        ),
    )
}


def parse_metrics(text: str | list[str]) -> list[str]:
    """`"sim,dnsmos"` (or a list) -> known metric names, in order, without repeats."""
    names = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name not in METRICS:
            raise EvalError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise EvalError("no metrics given")
    return out


def build_scorer(
    name: str,
    model_dir: str | None = None,
    device: str = "cpu",
    options: Mapping[str, Any] | None = None,
) -> Scorer:
    """The scorer of metric `name`. `options` are passed on where the constructor takes
    them (so one `--opt language=ja` can serve several metrics)."""
    spec = METRICS[name]
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError as err:
        if err.name and spec.module.startswith(err.name):
            raise EvalError(f"metric {name!r} is not available ({spec.module} missing)") from None
        raise
    cls = getattr(module, spec.cls, None)
    if cls is None:
        raise EvalError(f"metric {name!r}: {spec.module} has no {spec.cls}")
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = {"device": device}
    if model_dir is not None:
        kwargs["model_dir"] = model_dir
    for key, value in [*(options or {}).items(), *spec.fixed]:
        if takes_any or key in params:
            kwargs[key] = value
    kwargs = {k: v for k, v in kwargs.items() if takes_any or k in params}
    return cls(**kwargs)
