#!/usr/bin/env python3
"""Tokenise every supervision's text of a cuts manifest and store the tokens in it.

Tokens go to `supervision.custom["tokens"]` (read back as `supervision.tokens`, as upstream
does), so training does not run the text front-end again every epoch.

Usage:

python3 -m zipvoice.bin.prepare_tokens \\
    --input-file data/manifests/custom_cuts_raw_train.jsonl.gz \\
    --output-file data/manifests/custom_cuts_train.jsonl.gz \\
    --tokenizer japanese

A text that yields no tokens (only punctuation or emoji, say), or none that the optional
--token-file knows, cannot be trained on. Such cuts are reported by id: `--on-error fail`
(default) writes no manifest, `--on-error skip` leaves them out. Either way they are listed in
`{output name}_rejected.tsv` beside the output.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lhotse import CutSet
from lhotse.cut import Cut
from lhotse.utils import fastcopy

from zipvoice.bin.prepare_dataset import ON_ERROR_CHOICES, write_manifest_atomically
from zipvoice.tokenizer.tokenizer import TOKENIZER_NAMES, get_tokenizer

MAX_LISTED_ERRORS = 30


@dataclass(frozen=True)
class RejectedCut:
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
        lines = [f"{manifest}: {len(rejected)} cut(s) cannot be tokenised:"]
        lines += [f"  cut {r.where}: {r.reason}: {r.text!r}" for r in rejected[:MAX_LISTED_ERRORS]]
        if len(rejected) > MAX_LISTED_ERRORS:
            lines.append(f"  ... and {len(rejected) - MAX_LISTED_ERRORS} more")
        lines.append(f"All of them are listed in {report}.")
        lines.append("Fix their text, or pass --on-error skip to leave them out.")
        super().__init__("\n".join(lines))


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
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("# cut_id\ttsv_line\treason\ttext\n")
        for r in rejected:
            text = " ".join(r.text.split())
            line = "" if r.tsv_line is None else r.tsv_line
            f.write(f"{r.cut_id}\t{line}\t{r.reason}\t{text}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_tokens(
    input_file: str | os.PathLike,
    output_file: str | os.PathLike,
    tokenizer: str = "japanese",
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
    if not input_file.is_file():
        raise FileNotFoundError(f"cuts manifest not found: {input_file}")
    if output_file.resolve() == input_file.resolve():
        raise ValueError(f"--output-file must differ from --input-file ({input_file})")
    if output_file.exists() and not overwrite:
        raise FileExistsError(f"{output_file} already exists; pass --overwrite to replace it")
    output_file.parent.mkdir(parents=True, exist_ok=True)

    tok = get_tokenizer(tokenizer, token_file=token_file, lang=lang)
    if hasattr(tok, "num_workers"):
        tok.num_workers = max(1, num_jobs)  # the Japanese front-end runs its own process pool
    known = getattr(tok, "token2id", None)

    logging.info("Loading %s", input_file)
    cuts = list(CutSet.from_file(input_file))
    texts = [sup.text or "" for cut in cuts for sup in cut.supervisions]
    logging.info("Tokenising %d texts with the %s tokenizer", len(texts), tokenizer)
    all_tokens = iter(tok.texts_to_tokens(texts))

    kept = []
    rejected: list[RejectedCut] = []
    unknown = Counter()
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

    if unknown:
        shown = ", ".join(f"{t!r} x{n}" for t, n in unknown.most_common(20))
        logging.warning(
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
            logging.warning("skipped cut %s: %s: %r", r.where, r.reason, r.text)
        logging.warning(
            "Skipped %d of %d cuts; they are listed in %s", len(rejected), len(cuts), report
        )
    if not kept:
        raise ValueError(f"{input_file}: no cut is left to write")
    write_manifest_atomically(CutSet.from_cuts(kept), output_file)
    if not rejected:
        report.unlink(missing_ok=True)  # a report from an earlier run would mislead
    logging.info("Wrote %d cuts to %s", len(kept), output_file)
    return TokenizedManifest(
        output_file=output_file,
        rejected_tsv=report if rejected else None,
        num_cuts=len(kept),
        rejected=rejected,
    )


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input-file", type=str, required=True, help="Cuts without tokens.")
    parser.add_argument("--output-file", type=str, required=True, help="Cuts with tokens.")
    parser.add_argument(
        "--num-jobs", type=int, default=min(8, os.cpu_count() or 1), help="Tokeniser processes."
    )
    parser.add_argument("--tokenizer", choices=TOKENIZER_NAMES, default="japanese")
    parser.add_argument(
        "--lang", type=str, default="en-us", help="espeak voice, for --tokenizer espeak."
    )
    parser.add_argument(
        "--token-file",
        type=str,
        default=None,
        help="Optional token file: tokens it lacks are reported (training would drop them).",
    )
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR_CHOICES,
        default="fail",
        help="fail: write nothing if any text yields no tokens (default); skip: leave those "
        "cuts out. Either way they are reported.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output.")
    return parser


def main() -> None:
    formatter = "%(asctime)s %(levelname)s [%(filename)s:%(lineno)d] %(message)s"
    logging.basicConfig(format=formatter, level=logging.INFO, force=True)
    args = get_parser().parse_args()
    try:
        prepare_tokens(
            input_file=args.input_file,
            output_file=args.output_file,
            tokenizer=args.tokenizer,
            lang=args.lang,
            token_file=args.token_file,
            num_jobs=args.num_jobs,
            on_error=args.on_error,
            overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
