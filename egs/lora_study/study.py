"""Can any adaptation method learn Japanese pitch accent and keep unseen speakers? Measured on
generated audio, with every method a curve (learning-rate sweep x validation points).

The users' case: a prompt from a Japanese speaker the fine-tuning corpus does not hold, with
Japanese text; judged on the pitch accent (F0 match against that speaker's ground-truth
rendering) and on speaker similarity to the prompt. Everything is made here, offline, seeded:

1. corpus: >= 200 English pseudo-speakers and 20 + 8 Japanese ones by WORLD resynthesis of
   engine voices (`corpus.py`, `pseudo_speakers.py`), held-out speakers of both languages;
2. data: the project's pipeline (prepare_dataset, prepare_tokens, compute_fbank);
3. pretrain: a small ZipVoice from scratch on the English pseudo-speakers (project trainer);
4. ceilings: ground truth and ground truth through fbank + Griffin-Lim, scored;
5. adapt: every method (`methods.py`) at every learning rate, scored at every validation by the
   trainer's `--eval-list` hook (Japanese) and a callback (English); `--jobs` runs in parallel;
   the best configurations again with more seeds; inference-time variants re-score adapters;
6. report: results.json/csv, table.md, the accent-vs-similarity frontier plot (`report.py`).

Run it with `egs/lora_study/run.sh` (installs the TTS programs when missing). Finished stages
and runs are reused on a rerun (`--force` redoes the adaptation runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from adapt import Job, run_all, run_job, run_posthoc  # noqa: E402
from corpus import plan_corpus, render_corpus, write_eval_lists  # noqa: E402
from methods import BY_NAME, METHODS, POSTHOC  # noqa: E402
from report import (  # noqa: E402
    POINT_KEYS,
    X,
    Y,
    add_intervals,
    dominance,
    markdown,
    pareto,
    plot,
    point_rows,
    run_table,
    seed_spread,
    write_csv,
)
from scoring import EN_TOKENIZER, ceiling, eval_points, list_evals  # noqa: E402
from settings import (  # noqa: E402
    CUDA,
    FULL,
    PRETRAIN_LR,
    PRETRAIN_LR_BATCHES,
    QUICK,
    SEED,
    Budget,
    Layout,
    common_config,
    model_config,
    stage_done,
    validation_curves,
    write_json,
)

from zipvoice.dataset.manifests import write_text_atomically  # noqa: E402

logger = logging.getLogger("lora_study")

# --------------------------------------------------------------------------------------------
# Stages 1-2: corpus and data preparation
# --------------------------------------------------------------------------------------------


def make_corpus(layout: Layout, budget: Budget, jobs: int) -> None:
    settings = {"sizes": asdict(budget.sizes), "seed": SEED}
    marker = layout.corpus / "DONE.json"
    if stage_done(marker, settings):
        logger.info("corpus: reusing %s", layout.corpus)
        return
    start = time.monotonic()
    if layout.corpus.exists():
        shutil.rmtree(layout.corpus)
    plan, groups = plan_corpus(budget.sizes, SEED)
    by_split = render_corpus(plan, layout.corpus, jobs)
    tsvs = {}
    for split, rows in by_split.items():
        tsvs[split] = layout.corpus / f"{split}.tsv"
        write_text_atomically(tsvs[split], "".join(r + "\n" for r in rows))
    lists = write_eval_lists(layout.corpus, by_split, groups, budget.sizes.en_eval_lines)
    speakers = {k: [asdict(s) for s in v] for k, v in groups.items()}
    write_json(layout.corpus / "speakers.json", speakers)
    write_json(marker, {
        "settings": settings, "tsv": {k: str(v) for k, v in tsvs.items()},
        "eval": {k: str(v) for k, v in lists.items()},
        "utterances": {k: len(v) for k, v in by_split.items()},
        "seconds": time.monotonic() - start,
    })  # fmt: skip
    logger.info("corpus: %s in %.0f s", {k: len(v) for k, v in by_split.items()},
                time.monotonic() - start)  # fmt: skip


# English tokens: characters (`simple`), so that the study needs no optional front-end; espeak
# phonemes would need piper_phonemize (the emilia extra). Japanese symbols are appended to them.


def prepare_data(layout: Layout, device: str) -> None:
    from zipvoice.dataset.fbank import compute_fbank
    from zipvoice.dataset.manifests import prepare_dataset
    from zipvoice.dataset.tokens import prepare_tokens
    from zipvoice.tokenizer.prepare import prepare_token_file

    corpus = json.loads((layout.corpus / "DONE.json").read_text(encoding="utf-8"))
    settings = {"corpus": corpus["settings"], "model": model_config(device)}
    marker = layout.data / "DONE.json"
    if stage_done(marker, settings):
        logger.info("data: reusing %s", layout.data)
        return
    start = time.monotonic()
    if layout.data.exists():
        shutil.rmtree(layout.data)
    layout.data.mkdir(parents=True)
    write_json(layout.model_json, model_config(device))
    en_texts = layout.data / "en_texts.txt"
    texts = [
        line.split("\t")[1]
        for key in ("en_train", "en_heldout")
        for line in Path(corpus["tsv"][key]).read_text(encoding="utf-8").splitlines()
    ]
    write_text_atomically(en_texts, "".join(t + "\n" for t in texts))
    prepare_token_file(EN_TOKENIZER, layout.tokens_en, text_file=en_texts)
    prepare_token_file("japanese", layout.tokens_en_ja, base_token_file=layout.tokens_en)
    raw, tokenized = layout.data / "manifests", layout.data / "tokenized"
    for key in ("en_train", "en_heldout", "ja_train", "ja_dev"):
        prefix, subset = key.split("_", 1)
        prepared = prepare_dataset(corpus["tsv"][key], prefix=prefix, subset=subset,
                                   output_dir=raw)  # fmt: skip
        tokenizer, token_file = (EN_TOKENIZER, layout.tokens_en) if prefix == "en" else (
            "japanese", layout.tokens_en_ja)  # fmt: skip
        prepare_tokens(prepared.cuts, tokenized / prepared.cuts.name, tokenizer=tokenizer,
                       lang="en-us", token_file=token_file, num_jobs=2)  # fmt: skip
        compute_fbank(tokenized, layout.data / "fbank", prefix=prefix, subset=subset,
                      num_jobs=2, progress=False)  # fmt: skip
    write_json(marker, {"settings": settings, "seconds": time.monotonic() - start})
    logger.info("data: done in %.0f s", time.monotonic() - start)


# --------------------------------------------------------------------------------------------
# Stages 3-4: pre-training and ceilings
# --------------------------------------------------------------------------------------------


def pretrain(layout: Layout, budget: Budget) -> dict[str, Any]:
    from zipvoice.training.trainer import run_training

    exp_dir = layout.exp / "pretrain"
    result_path = exp_dir / "result.json"
    if result_path.is_file() and (layout.base_dir / "model.pt").is_file():
        logger.info("pretrain: reusing %s", exp_dir)
        return json.loads(result_path.read_text(encoding="utf-8"))
    if exp_dir.exists():
        shutil.rmtree(exp_dir)  # an interrupted run of this study; start it cleanly
    steps = budget.pretrain_steps
    config = common_config(layout, budget, exp_dir, steps, budget.pretrain_valid_every, SEED)
    config = config.replace(
        tokenizer=EN_TOKENIZER, token_file=str(layout.tokens_en),
        train_manifest=str(layout.fbank("en", "train")),
        dev_manifest=str(layout.fbank("en", "heldout")),
        optimizer="scaledadam", base_lr=PRETRAIN_LR, lr_batches=PRETRAIN_LR_BATCHES,
        finetune=False,
        # Upstream's schedules (dropout, layer skipping, balancers) settle by a batch count of
        # about 20000; count batches in smaller units so that they do so halfway through.
        ref_duration=(steps / 2) * budget.max_duration / 20000,
    )  # fmt: skip
    english = list_evals(layout.lists(), layout.tokens_en, exp_dir, budget.eval_num_step, SEED,
                         score_start=True, japanese=False)  # fmt: skip
    start = time.monotonic()
    run_training(config, callbacks=english)
    result = {
        "wall_s": time.monotonic() - start, "steps": steps,
        "curves": validation_curves(exp_dir),
        "points": {str(k): v for k, v in eval_points(exp_dir).items()},
    }  # fmt: skip
    write_json(result_path, result)
    return result


def ceilings(layout: Layout) -> dict[str, Any]:
    path = layout.exp / "ceiling" / "result.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    lists, start = layout.lists(), time.monotonic()
    out = {}
    for lang in ("ja", "en"):
        scored = ceiling(lists[f"eval_{lang}"], lists[f"refs_{lang}"], path.parent, f"{lang}_")
        for label, row in scored.items():
            out.setdefault(label, {}).update(row)
    out["seconds"] = time.monotonic() - start
    write_json(path, out)
    return out


# --------------------------------------------------------------------------------------------
# Stage 5: adaptation runs, repeats, inference-time variants
# --------------------------------------------------------------------------------------------


def balanced_score(points: dict[str, dict[str, float]]) -> float:
    """How a run's curve ranks for the seed repeats: its best accent + JA SIM over steps > 0."""
    best = -math.inf
    for step, p in points.items():
        value = p.get("ja_f0_corr", math.nan) + p.get("ja_sim", math.nan)
        if int(step) > 0 and math.isfinite(value):
            best = max(best, value)
    return best


def adaptation(layout: Layout, budget: Budget, methods: list[str], opts) -> list[dict[str, Any]]:
    """The lr sweep of every method, then the repeats of the best lr of `repeat_methods` and of
    the best-scoring other method, and the inference-time variants of the best adapter."""
    main = [Job(m, lr) for m in methods for lr in BY_NAME[m].lrs[: budget.lrs]]
    main[0] = Job(main[0].method, main[0].lr, score_start=True)  # the base model's point
    results = run_all([(run_job, layout, budget, j, opts.force) for j in main], opts.jobs)
    by_method: dict[str, list[dict]] = {}
    for r in results:
        by_method.setdefault(r["method"], []).append(r)
    best = {m: max(rs, key=lambda r: balanced_score(r["points"])) for m, rs in by_method.items()}
    chosen = [m for m in budget.repeat_methods if m in best]
    others = [m for m in best if m not in chosen]
    if others:  # the best-scoring method besides those named
        chosen.append(max(others, key=lambda m: balanced_score(best[m]["points"])))
    repeats = [Job(m, best[m]["lr"], seed) for m in chosen for seed in budget.repeat_seeds]
    # Inference-time variants of the source method's adapter at its best learning rate.
    variants = [(run_posthoc, layout, budget, p.name, best[p.source]["lr"], opts.force)
                for p in POSTHOC if p.source in best]  # fmt: skip
    tasks = [(run_job, layout, budget, j, opts.force) for j in repeats] + variants
    return results + run_all(tasks, opts.jobs)


def write_report(layout: Layout, results: list[dict[str, Any]], meta: dict[str, Any],
                 plot_out: Path | None) -> dict[str, Any]:  # fmt: skip
    def folder_of(result: dict[str, Any]) -> Path:
        posthoc = "source" in result
        return layout.exp / "posthoc" / result["run"] if posthoc else layout.exp / result["run"]

    add_intervals(results, folder_of)
    rows = point_rows(results)
    main = [r for r in rows if r["seed"] == SEED and r["step"] > 0]
    front = pareto([(r[X], r[Y]) for r in main])
    on_front = {(main[i]["run"], main[i]["step"]) for i in front}
    base_row = next(r for r in rows if r["step"] == 0 and r["kind"] == "train")
    base = {k: base_row[k] for k in POINT_KEYS}
    ceil = meta["ceilings"]
    methods = sorted({r["method"] for r in rows})
    summary = {
        "frontier": [{k: main[i][k] for k in ("run", "step", X, Y, "en_sim")} for i in front],
        "dominance": {m: dominance(rows, m, ("frozen_decoder", "full")) for m in methods},
        "spread": seed_spread(rows, SEED),
        "base": base,
    }
    out = layout.results
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", {"meta": meta, "summary": summary, "runs": results})
    write_csv(out / "results.csv", rows)
    ceiling_rows = [[label, *(ceil[label].get(k, math.nan) for k in (Y, X, "en_sim"))]
                    for label in ("ground_truth", "griffin_lim")]  # fmt: skip
    ceiling_rows.append(["base model (step 0)", base[Y], base[X], base["en_sim"]])
    text = "## Ceilings and base\n\n" + markdown(["", "accent ↑", "JA SIM ↑", "EN SIM ↑"],
                                                  ceiling_rows)  # fmt: skip
    text += "\n## Runs (main seed)\n\n" + run_table(rows, on_front, SEED)
    if summary["spread"]:
        spread = [[s["method"], f"{s['lr']:g}", s["step"], s["seeds"],
                   f"{s[Y + '_mean']:.3f} ± {s[Y + '_sd']:.3f}",
                   f"{s[X + '_mean']:.3f} ± {s[X + '_sd']:.3f}",
                   f"{s['en_sim_mean']:.3f} ± {s['en_sim_sd']:.3f}"]
                  for s in summary["spread"]]  # fmt: skip
        text += "\n## Seed spread (mean ± sd)\n\n" + markdown(
            ["method", "lr", "step", "seeds", "accent", "JA SIM", "EN SIM"], spread
        )
    write_text_atomically(out / "table.md", text)
    plot(out / "lora-study.png", rows, base, ceil, SEED)
    if plot_out is not None:
        plot(plot_out, rows, base, ceil, SEED)
    print(text)
    return summary


# --------------------------------------------------------------------------------------------


STAGES = ("corpus", "data", "pretrain", "ceilings", "adapt", "report")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=HERE / "work",
        help="where corpus, data, runs and results go",
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test budget")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: a larger corpus, model and budget (the trainer uses the GPU)",
    )
    parser.add_argument("--methods", default="all", help="comma-separated subset of methods")
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="adaptation runs in parallel (worker processes, 1 thread each)",
    )
    parser.add_argument("--force", action="store_true", help="redo finished adaptation runs")
    parser.add_argument("--plot-out", type=Path, default=None, help="also write the plot here")
    parser.add_argument("--stop-after", choices=STAGES, default="report", help="last stage to run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s [%(name)s] %(message)s")  # fmt: skip
    torch.set_num_threads(1)
    budget = QUICK if opts.quick else (CUDA if opts.device == "cuda" else FULL)
    methods = [m.name for m in METHODS]
    if opts.methods != "all":
        wanted = opts.methods.split(",")
        unknown = sorted(set(wanted) - set(methods))
        if unknown:
            raise SystemExit(f"error: unknown method(s) {unknown}; choose from {methods}")
        methods = [m for m in methods if m in wanted]
    layout = Layout(opts.work_dir.resolve())
    timings: dict[str, float] = {}

    def stage(name: str, fn, *args):
        start = time.monotonic()
        value = fn(*args)
        timings[name] = time.monotonic() - start
        return value

    stage("corpus", make_corpus, layout, budget, opts.jobs)
    if opts.stop_after != "corpus":
        stage("data", prepare_data, layout, opts.device)
    if opts.stop_after in ("corpus", "data"):
        return 0
    pretrained = stage("pretrain", pretrain, layout, budget)
    ceil = stage("ceilings", ceilings, layout)
    if opts.stop_after in ("pretrain", "ceilings"):
        return 0
    results = stage("adapt", adaptation, layout, budget, methods, opts)
    if opts.stop_after == "adapt":
        return 0
    meta = {"budget": asdict(budget), "seed": SEED, "model_config": model_config(opts.device),
            "pretrain": pretrained, "ceilings": ceil, "jobs": opts.jobs,
            "stage_seconds_this_invocation": timings}  # fmt: skip
    write_report(layout, results, meta, opts.plot_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
