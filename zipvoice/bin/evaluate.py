#!/usr/bin/env python3
"""Score one folder of generated audio with several metrics and print one table.

    python3 -m zipvoice.bin.evaluate --wav-path results/ --test-list test.tsv \\
        --metrics sim,dnsmos[,utmos,cer,wer,f0_corr,accent_probe,...] \\
        [--model-dir tts_eval_models] [--opt key=value ...] [--output-dir scores/]

The test list is the inference list (name<TAB>prompt_text<TAB>prompt_wav<TAB>text) and
`--wav-path` holds `<name>.wav` for each line. `sim` and `dnsmos` run offline with embedded
models; `--model-dir` (upstream's k2-fsa/TTS_eval_models layout) switches `sim` to upstream's
WavLM + ECAPA-TDNN model and provides the models of the metrics that have no embedded one.
`--opt key=value` passes an option to every metric whose scorer takes it (e.g. language=ja).
With `--output-dir`, per-utterance scores go to `<metric>.tsv` and the table to `summary.tsv`.
See docs/evaluation.md for what each score means.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from zipvoice.eval.offline import Evaluator, check_outputs_free, format_table, write_result
from zipvoice.eval.registry import METRICS, parse_metrics
from zipvoice.eval.utils import EvalError, read_test_list
from zipvoice.utils.cli import exit_on_error, setup_logging


@dataclass
class EvaluateConfig:
    wav_path: str
    test_list: str
    metrics: str = "sim,dnsmos"
    model_dir: str | None = None
    device: str = "cpu"
    options: dict[str, str] = field(default_factory=dict)
    output_dir: str | None = None
    overwrite: bool = False


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--wav-path", required=True, help="Folder of generated <name>.wav.")
    parser.add_argument("--test-list", required=True, help="The inference test list (TSV).")
    parser.add_argument(
        "--metrics", default="sim,dnsmos", help=f"Comma-separated, from: {', '.join(METRICS)}."
    )
    parser.add_argument("--model-dir", default=None, help="Upstream's evaluation-models folder.")
    parser.add_argument("--device", default="cpu", help="torch device for the models.")
    parser.add_argument(
        "--opt", action="append", default=[], metavar="KEY=VALUE", help="Metric option."
    )
    parser.add_argument("--output-dir", default=None, help="Write per-metric tsv files here.")
    parser.add_argument("--overwrite", action="store_true", help="Replace existing outputs.")
    return parser


def parse_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise EvalError(f"--opt expects KEY=VALUE, got {pair!r}")
        options[key.strip().replace("-", "_")] = value.strip()
    return options


def config_from_args(argv: list[str] | None) -> EvaluateConfig:
    args = get_parser().parse_args(argv)
    return EvaluateConfig(
        wav_path=args.wav_path,
        test_list=args.test_list,
        metrics=args.metrics,
        model_dir=args.model_dir,
        device=args.device,
        options=parse_options(args.opt),
        output_dir=args.output_dir,
        overwrite=args.overwrite,
    )


@exit_on_error
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    cfg = config_from_args(argv)
    items = read_test_list(cfg.test_list)
    if cfg.output_dir is not None:
        check_outputs_free(cfg.output_dir, parse_metrics(cfg.metrics), cfg.overwrite)
    evaluator = Evaluator(cfg.metrics, cfg.model_dir, cfg.device, cfg.options)
    result = evaluator.score_folder(cfg.wav_path, items)
    print(format_table(result))
    if cfg.output_dir is not None:
        write_result(cfg.output_dir, result, overwrite=cfg.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
