"""Tokenise every supervision's text of a cuts manifest and store the tokens in it.

Tokens go to `supervision.custom["tokens"]` (read back as `supervision.tokens`, as upstream
does), so training does not run the text front-end again every epoch. A text that yields no
tokens, or none the token file knows, cannot be trained on; like bad tsv rows such cuts are all
collected and reported by id (and tsv line) before anything is written.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lhotse import CutSet
from lhotse.cut import Cut
from lhotse.utils import fastcopy

from zipvoice.dataset.manifests import (
    ON_ERROR_CHOICES,
    list_problems,
    write_manifest_atomically,
)
from zipvoice.tokenizer.tokenizer import get_tokenizer
from zipvoice.utils.fileio import atomic_write_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RejectedCut:
    """A cut that cannot be trained on; `tsv_line` lets the user find its source row."""

    cut_id: str
    tsv_line: int | None  # recorded by prepare_dataset
    reason: str
    text: str

    @property
    def where(self) -> str:
        return self.cut_id if self.tsv_line is None else f"{self.cut_id} (tsv line {self.tsv_line})"


class UntokenizableCutsError(ValueError):
    """Raised with `--on-error fail` when any cut's text yields no usable tokens."""

    def __init__(self, manifest: Path, rejected: list[RejectedCut], report: Path) -> None:
        self.rejected = rejected
        super().__init__(
            list_problems(
                f"{manifest}: {len(rejected)} cut(s) cannot be tokenised:",
                [f"cut {r.where}: {r.reason}: {r.text!r}" for r in rejected],
                [
                    f"All of them are listed in {report}.",
                    "Fix their text, or pass --on-error skip to leave them out.",
                ],
            )
        )


@dataclass(frozen=True)
class TokenizedManifest:
    output_file: Path
    rejected_tsv: Path | None
    num_cuts: int
    rejected: list[RejectedCut]


def _reject(cut: Cut, reason: str, text: str) -> RejectedCut:
    return RejectedCut(cut.id, (cut.custom or {}).get("tsv_line"), reason, text)


def rejected_report_path(output_file: Path) -> Path:
    name = output_file.name
    for suffix in (".jsonl.gz", ".jsonl", ".json.gz", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return output_file.with_name(f"{name}_rejected.tsv")


def _write_report(path: Path, rejected: list[RejectedCut]) -> None:
    """`cut_id<TAB>tsv_line<TAB>reason<TAB>text`, one per rejected cut, after a '#' header."""
    lines = ["# cut_id\ttsv_line\treason\ttext\n"]
    for r in rejected:
        text = " ".join(r.text.split())
        line = "" if r.tsv_line is None else r.tsv_line
        lines.append(f"{r.cut_id}\t{line}\t{r.reason}\t{text}\n")
    atomic_write_text(path, "".join(lines))


def _check_paths(input_file: Path, output_file: Path, overwrite: bool) -> None:
    if not input_file.is_file():
        raise FileNotFoundError(f"cuts manifest not found: {input_file}")
    if output_file.resolve() == input_file.resolve():
        raise ValueError(f"--output-file must differ from --input-file ({input_file})")
    output_file.parent.mkdir(parents=True, exist_ok=True)


def _tokenize_cuts(
    cuts: list[Cut], all_tokens: Iterator[list[str]], known: Any, token_file: Any
) -> tuple[list[Cut], list[RejectedCut], Counter]:
    """(cuts with tokens, rejected cuts, tokens missing from the token file); a cut is
    rejected when a supervision yields no token, or none that the token file knows."""
    kept = []
    rejected: list[RejectedCut] = []
    unknown: Counter = Counter()
    for cut in cuts:
        if not cut.supervisions:
            rejected.append(_reject(cut, "cut has no supervision", ""))
            continue
        new_sups = []
        problem = None
        for sup in cut.supervisions:
            tokens = list(next(all_tokens))
            if not tokens:
                problem = problem or _reject(cut, "text yields no tokens", sup.text or "")
            elif known is not None:
                missing = [t for t in tokens if t not in known]
                unknown.update(missing)
                if len(missing) == len(tokens):
                    problem = problem or _reject(
                        cut, f"none of its tokens are in {token_file}", sup.text or ""
                    )
            custom = dict(sup.custom or {})
            custom["tokens"] = tokens
            new_sups.append(fastcopy(sup, custom=custom))
        if problem is not None:
            rejected.append(problem)
        else:
            kept.append(fastcopy(cut, supervisions=new_sups))
    return kept, rejected, unknown


def prepare_tokens(
    input_file: str | os.PathLike,
    output_file: str | os.PathLike,
    tokenizer: str = "emilia",
    lang: str = "en-us",
    token_file: str | os.PathLike | None = None,
    num_jobs: int = 1,
    on_error: str = "fail",
    overwrite: bool = False,
) -> TokenizedManifest:
    """Write `output_file`: the input cuts with `tokens` on every supervision."""
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    input_file, output_file = Path(input_file), Path(output_file)
    _check_paths(input_file, output_file, overwrite)
    from zipvoice.dataset.finished import already_done, mark_done

    inputs = [input_file] + ([Path(token_file)] if token_file else [])
    settings = {"step": "prepare_tokens", "tokenizer": tokenizer, "lang": lang,
                "on_error": on_error}  # fmt: skip
    if already_done(output_file, inputs, settings, overwrite):
        report = rejected_report_path(output_file)
        return TokenizedManifest(output_file, report if report.is_file() else None,
                                 len(CutSet.from_file(output_file)), [])  # fmt: skip

    tok = get_tokenizer(tokenizer, token_file=token_file, lang=lang)
    if hasattr(tok, "num_workers"):
        tok.num_workers = max(1, num_jobs)  # the Japanese front-end runs its own process pool
    known = getattr(tok, "token2id", None)

    logger.info("Loading %s", input_file)
    cuts = list(CutSet.from_file(input_file))
    texts = [sup.text or "" for cut in cuts for sup in cut.supervisions]
    logger.info("Tokenising %d texts with the %s tokenizer", len(texts), tokenizer)
    all_tokens = iter(tok.texts_to_tokens(texts))

    kept, rejected, unknown = _tokenize_cuts(cuts, all_tokens, known, token_file)
    if unknown:
        shown = ", ".join(f"{t!r} x{n}" for t, n in unknown.most_common(20))
        logger.warning(
            "%d token(s) are not in %s and will be dropped in training: %s",
            sum(unknown.values()),
            token_file,
            shown,
        )
    report = rejected_report_path(output_file)
    if rejected:
        _write_report(report, rejected)
        if on_error == "fail":
            raise UntokenizableCutsError(input_file, rejected, report)
        for r in rejected:
            logger.warning("skipped cut %s: %s: %r", r.where, r.reason, r.text)
        logger.warning(
            "Skipped %d of %d cuts; they are listed in %s", len(rejected), len(cuts), report
        )
    if not kept:
        raise ValueError(f"{input_file}: no cut is left to write")
    write_manifest_atomically(CutSet.from_cuts(kept), output_file)
    if not rejected:
        report.unlink(missing_ok=True)  # a report from an earlier run would mislead
    mark_done(output_file, inputs, settings)
    logger.info("Wrote %d cuts to %s", len(kept), output_file)
    return TokenizedManifest(
        output_file=output_file,
        rejected_tsv=report if rejected else None,
        num_cuts=len(kept),
        rejected=rejected,
    )
