"""The accent-vs-speaker trade-off of adapting ZipVoice to a new language, measured end to end.

Hypothesis under test: LoRA/DoRA adapters on the flow-matching decoder learn a new language about
as well as full fine-tuning while keeping zero-shot speaker ability about as well as a frozen
decoder. Everything is made here, offline, on CPU, with fixed seeds:

1. corpus: a multi-speaker English corpus from Debian's TTS voices (`english_corpus.py`, some
   speakers held out) and pyopenjtalk's Japanese pseudo-speakers;
2. data: the project's own pipeline (prepare_dataset, prepare_tokens, compute_fbank); English
   tokens from espeak (piper_phonemize) or characters, Japanese symbols appended to them;
3. pretrain: a small ZipVoice trained from scratch on English with the project trainer;
4. adapt: the same step budget and seed for every method (full fine-tuning, frozen decoder,
   partially frozen decoder, LoRA/DoRA at several ranks and target sets);
5. report: Japanese dev loss (the language learned), loss on held-out English speakers (the
   zero-shot speaker ability kept), trainable parameters and wall time, as JSON, CSV, a
   markdown table and a plot.

All losses are the trainer's deterministic validation loss (fixed noise, t and masks), so every
model is scored on exactly the same noise: differences between methods are paired.

Run it with `egs/lora_study/run.sh` (installs the TTS programs when missing). Stages that
finished are reused on a rerun; `--force` redoes the adaptation runs.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from english_corpus import SPEAKERS, make_english_corpus  # noqa: E402

from zipvoice.dataset.manifests import write_text_atomically  # noqa: E402

if TYPE_CHECKING:
    from zipvoice.training.config import TrainingConfig

logger = logging.getLogger("lora_study")

SEED = 42

# A little larger than the upstream-parity fixture (decoder 64-dim); sized so that pre-training
# fits in about a quarter of an hour on two CPU cores.
MODEL_CONFIG: dict[str, Any] = {
    "model": {
        "fm_decoder_downsampling_factor": [1, 2, 4, 2, 1],
        "fm_decoder_num_layers": [1, 1, 2, 1, 1],
        "fm_decoder_cnn_module_kernel": [31, 15, 7, 15, 31],
        "fm_decoder_feedforward_dim": 256,
        "fm_decoder_num_heads": 4,
        "fm_decoder_dim": 128,
        "text_encoder_num_layers": 2,
        "text_encoder_feedforward_dim": 128,
        "text_encoder_cnn_module_kernel": 9,
        "text_encoder_num_heads": 4,
        "text_encoder_dim": 64,
        "query_head_dim": 16,
        "value_head_dim": 8,
        "pos_head_dim": 4,
        "pos_dim": 32,
        "time_embed_dim": 64,
        "text_embed_dim": 64,
        "feat_dim": 100,
    },
    "feature": {"sampling_rate": 24000, "type": "vocos"},
}


@dataclass(frozen=True)
class Budget:
    """How much data and training; `quick` is a smoke test of the whole pipeline."""

    en_train_sentences: int = 50
    en_dev_sentences: int = 10
    ja_speakers: int = 6
    ja_sentences: int = 30
    pretrain_steps: int = 450
    adapt_steps: int = 150
    valid_every: int = 30
    max_duration: float = 20.0


FULL = Budget()
QUICK = Budget(
    en_train_sentences=6,
    en_dev_sentences=2,
    ja_speakers=2,
    ja_sentences=6,
    pretrain_steps=6,
    adapt_steps=4,
    valid_every=2,
    max_duration=12.0,
)

# Learning rates. Pre-training: ScaledAdam as upstream. Adaptation: every method except the
# upstream-style reference trains with the same optimiser, rate and schedule (AdamW, warm-up,
# cosine), so that the methods differ only in WHICH weights train; the rate is the trainer's
# example for adapters and moves the weights within the short budget. Not tuned per method.
PRETRAIN_LR = 0.02
PRETRAIN_LR_BATCHES = 150  # Eden's decay, compressed to the short pre-training
SCALEDADAM_ADAPT_LR = 0.002
ADAMW_ADAPT_LR = 0.001


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    # TrainingConfig changes, named by flag destination (see TrainingConfig.replace).
    settings: Mapping[str, Any]
    # Decoder-relative parameter-name prefixes that stay trainable (None: the trainer decides).
    decoder_trainable: tuple[str, ...] | None = None


def _full(optimizer: str = "adamw") -> dict[str, Any]:
    lr = ADAMW_ADAPT_LR if optimizer == "adamw" else SCALEDADAM_ADAPT_LR
    return {"use_lora": False, "optimizer": optimizer, "base_lr": lr}


def _lora(rank: int, dora: bool, targets: str) -> dict[str, Any]:
    return {
        "use_lora": True, "use_dora": dora, "lora_rank": rank, "lora_alpha": 2 * rank,
        "lora_target_modules": targets, "lora_dropout": 0.05, "optimizer": "adamw",
        "base_lr": ADAMW_ADAPT_LR,
    }  # fmt: skip


METHODS: tuple[Method, ...] = (
    Method(
        "full_scaledadam",
        "full fine-tuning, ScaledAdam + Eden (upstream style)",
        _full("scaledadam"),
    ),
    Method("full", "full fine-tuning", _full()),
    Method("frozen_decoder", "decoder frozen; embedding + text encoder train", _full(), ()),
    Method(
        "partial_last2",
        "last two decoder stacks + output projection train (and the text side)",
        _full(),
        ("encoders.3.", "encoders.4.", "out_proj."),
    ),
    Method("lora_r32_attn", "LoRA r32/a64, attention", _lora(32, False, "attention")),
    Method("dora_r32_attn", "DoRA r32/a64, attention", _lora(32, True, "attention")),
    Method("dora_r8_attn", "DoRA r8/a16, attention", _lora(8, True, "attention")),
    Method(
        "dora_r32_attn_ff_conv",
        "DoRA r32/a64, attention + ff + conv",
        _lora(32, True, "attention_ff_conv"),
    ),
    Method(
        "dora_r32_attn_text_frozen",
        "DoRA r32/a64, attention; text encoder frozen (of the text side only the embedding trains)",
        {**_lora(32, True, "attention"), "train_text_encoder": False},
    ),
)


# --------------------------------------------------------------------------------------------
# Paths and stage markers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    work: Path

    @property
    def corpus(self) -> Path:
        return self.work / "corpus"

    @property
    def data(self) -> Path:
        return self.work / "data"

    @property
    def exp(self) -> Path:
        return self.work / "exp"

    @property
    def results(self) -> Path:
        return self.work / "results"

    def fbank(self, prefix: str, subset: str) -> Path:
        return self.data / "fbank" / f"{prefix}_cuts_{subset}.jsonl.gz"

    @property
    def tokens_en(self) -> Path:
        return self.data / "tokens_en.txt"

    @property
    def tokens_en_ja(self) -> Path:
        return self.data / "tokens_en_ja.txt"

    @property
    def model_json(self) -> Path:
        return self.data / "model.json"

    @property
    def base_checkpoint(self) -> Path:
        return self.exp / "pretrain" / "finetuned" / "model.pt"


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def stage_done(marker: Path, settings: dict[str, Any]) -> bool:
    """A stage is reused only if it finished with the same settings."""
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("settings") == settings
    except json.JSONDecodeError:
        return False


# --------------------------------------------------------------------------------------------
# Stages 1-2: corpus and data preparation
# --------------------------------------------------------------------------------------------


def english_tokenizer() -> str:
    """espeak phonemes (upstream's English front-end) when piper_phonemize is installed."""
    try:
        import piper_phonemize  # noqa: F401
    except ImportError:
        return "simple"
    return "espeak"


def make_corpus(layout: Layout, budget: Budget) -> None:
    from zipvoice.dataset.synthetic import make_japanese_corpus

    sizes = ("en_train_sentences", "en_dev_sentences", "ja_speakers", "ja_sentences")
    settings = {
        "sizes": {k: getattr(budget, k) for k in sizes},
        "speakers": [asdict(s) for s in SPEAKERS],
    }
    marker = layout.corpus / "DONE.json"
    if stage_done(marker, settings):
        logger.info("corpus: reusing %s", layout.corpus)
        return
    start = time.monotonic()
    english = make_english_corpus(
        layout.corpus / "english", budget.en_train_sentences, budget.en_dev_sentences
    )
    japanese = make_japanese_corpus(
        layout.corpus / "japanese",
        num_speakers=budget.ja_speakers,
        num_sentences=budget.ja_sentences,
        name="ja",
        dev_fraction=0.1,
        overwrite=True,
        progress=False,
    )
    tsvs = {
        "en_train": english["train"],
        "en_dev": english["dev"],
        "en_heldout": english["heldout"],
        "ja_train": japanese["train_tsv"],
        "ja_dev": japanese["dev_tsv"],
    }
    write_json(
        marker,
        {
            "settings": settings,
            "tsv": {k: str(v) for k, v in tsvs.items()},
            "seconds": time.monotonic() - start,
        },
    )
    logger.info("corpus: done in %.0f s", time.monotonic() - start)


def prepare_data(layout: Layout, budget: Budget) -> None:
    from zipvoice.dataset.fbank import compute_fbank
    from zipvoice.dataset.manifests import prepare_dataset
    from zipvoice.dataset.tokens import prepare_tokens
    from zipvoice.tokenizer.prepare import prepare_token_file

    corpus = json.loads((layout.corpus / "DONE.json").read_text(encoding="utf-8"))
    en_tok = english_tokenizer()
    settings = {"corpus": corpus["settings"], "en_tokenizer": en_tok, "model": MODEL_CONFIG}
    marker = layout.data / "DONE.json"
    if stage_done(marker, settings):
        logger.info("data: reusing %s", layout.data)
        return
    start = time.monotonic()
    if layout.data.exists():
        shutil.rmtree(layout.data)
    layout.data.mkdir(parents=True)
    write_json(layout.model_json, MODEL_CONFIG)

    # English tokens (the base model's vocabulary), then Japanese symbols appended after them.
    en_texts = layout.data / "en_texts.txt"
    texts = [
        line.split("\t")[1]
        for key in ("en_train", "en_dev", "en_heldout")
        for line in Path(corpus["tsv"][key]).read_text(encoding="utf-8").splitlines()
    ]
    write_text_atomically(en_texts, "".join(t + "\n" for t in texts))
    prepare_token_file(en_tok, layout.tokens_en, text_file=en_texts if en_tok == "simple" else None)
    prepare_token_file("japanese", layout.tokens_en_ja, base_token_file=layout.tokens_en)

    raw, tokenized = layout.data / "manifests", layout.data / "tokenized"
    for key, tsv in corpus["tsv"].items():
        prefix, subset = key.split("_", 1)
        prepared = prepare_dataset(tsv, prefix=prefix, subset=subset, output_dir=raw)
        if prefix == "en":
            tokenizer, token_file = en_tok, layout.tokens_en
        else:
            tokenizer, token_file = "japanese", layout.tokens_en_ja
        prepare_tokens(
            prepared.cuts,
            tokenized / prepared.cuts.name,
            tokenizer=tokenizer,
            lang="en-us",
            token_file=token_file,
            num_jobs=2,
        )
        compute_fbank(
            tokenized,
            layout.data / "fbank",
            prefix=prefix,
            subset=subset,
            num_jobs=2,
            progress=False,
        )
    write_json(marker, {"settings": settings, "seconds": time.monotonic() - start})
    logger.info("data: done in %.0f s", time.monotonic() - start)


# --------------------------------------------------------------------------------------------
# Stages 3-4: training
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderPrefixes:
    """Trainer `trainable` predicate: of the decoder, only parameters whose decoder-relative
    names start with `prefixes` train; the rest of the model is left to the trainer."""

    prefixes: tuple[str, ...]

    def __call__(self, name: str) -> bool:
        if not name.startswith("fm_decoder."):
            return True
        return name.removeprefix("fm_decoder.").startswith(self.prefixes)


def common_config(
    layout: Layout, budget: Budget, exp_dir: Path, steps: int, seed: int = SEED
) -> TrainingConfig:
    from zipvoice.dataset.config import DataConfig
    from zipvoice.training.config import ModelConfig, RunConfig, TrainingConfig

    return TrainingConfig(
        data=DataConfig(dataset="custom", max_duration=budget.max_duration, num_workers=0),
        model=ModelConfig(model_config=str(layout.model_json)),
        run=RunConfig(
            exp_dir=str(exp_dir), world_size=1, use_fp16=False, num_iters=steps,
            valid_interval=budget.valid_every, save_every_n=0, keep_last_k=1, log_interval=20,
            seed=seed, resume="never", tensorboard=True,
        ),
    )  # fmt: skip


def validation_curves(exp_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The trainer's validation scalars from its tensorboard log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(exp_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags().get("scalars", []))
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in ("valid/loss", "valid/forgetting_loss")
        if tag in tags
    }


@dataclass
class Evaluator:
    """The trainer's deterministic validation loss on each evaluation set."""

    layout: Layout
    budget: Budget
    sets: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sets = {
            "ja_dev": self.layout.fbank("ja", "dev"),
            "en_heldout": self.layout.fbank("en", "heldout"),
            "en_dev": self.layout.fbank("en", "dev"),
        }

    def __call__(self, model: torch.nn.Module, config: TrainingConfig) -> dict[str, float]:
        from lhotse import CutSet

        from zipvoice.dataset.datamodule import TtsDataModule
        from zipvoice.tokenizer.tokenizer import get_tokenizer
        from zipvoice.training.steps import compute_validation_loss

        tokenizer = get_tokenizer(
            config.model.tokenizer, config.model.token_file, config.model.lang
        )
        datamodule = TtsDataModule(config.data, tokenizer=tokenizer, seed=config.run.seed)
        losses = {}
        for name, path in self.sets.items():
            loader = datamodule.dev_dataloaders(CutSet.from_file(path))
            losses[name] = compute_validation_loss(
                model,
                loader,
                tokenizer=tokenizer,
                feat_scale=config.model.feat_scale,
                device=torch.device("cpu"),
                seed=SEED,  # the same noise for every model, whatever seed trained it
            )
        return losses


def pretrain(layout: Layout, budget: Budget) -> dict[str, Any]:
    from zipvoice.training.trainer import run_training

    exp_dir = layout.exp / "pretrain"
    result_path = exp_dir / "result.json"
    if result_path.is_file() and layout.base_checkpoint.is_file():
        logger.info("pretrain: reusing %s", exp_dir)
        return json.loads(result_path.read_text(encoding="utf-8"))
    if exp_dir.exists():
        shutil.rmtree(exp_dir)  # an interrupted run of this study; start it cleanly
    config = common_config(layout, budget, exp_dir, budget.pretrain_steps).replace(
        tokenizer=english_tokenizer(), token_file=str(layout.tokens_en),
        train_manifest=str(layout.fbank("en", "train")),
        dev_manifest=str(layout.fbank("en", "dev")),
        forgetting_manifest=str(layout.fbank("en", "heldout")),
        optimizer="scaledadam", base_lr=PRETRAIN_LR, lr_batches=PRETRAIN_LR_BATCHES,
        finetune=False,
        # Upstream's schedules (dropout, layer skipping, balancers) settle by a batch count of
        # about 20000; count batches in smaller units so that they do so halfway through.
        ref_duration=(budget.pretrain_steps / 2) * budget.max_duration / 20000,
    )  # fmt: skip
    start = time.monotonic()
    run_training(config)
    result = {
        "wall_s": time.monotonic() - start,
        "steps": budget.pretrain_steps,
        "curves": validation_curves(exp_dir),
    }
    write_json(result_path, result)
    return result


def adaptation_config(
    layout: Layout, budget: Budget, exp_dir: Path, seed: int = SEED
) -> TrainingConfig:
    return common_config(layout, budget, exp_dir, budget.adapt_steps, seed).replace(
        tokenizer="japanese", token_file=str(layout.tokens_en_ja),
        checkpoint=str(layout.base_checkpoint), finetune=True,
        train_manifest=str(layout.fbank("ja", "train")),
        dev_manifest=str(layout.fbank("ja", "dev")),
        forgetting_manifest=str(layout.fbank("en", "heldout")),
        warmup_steps=max(1, budget.adapt_steps // 20), lr_schedule="cosine",
        # Eden's warm-up and decay would make ScaledAdam's rate differ from AdamW's over the
        # same budget: keep ScaledAdam's rate nearly flat, as upstream's fine-tuning does.
        lr_batches=100000,
    )  # fmt: skip


def count_trainable(model: torch.nn.Module) -> dict[str, int]:
    from zipvoice.models.modules.lora_utils import count_parameters

    trainable, total = count_parameters(model)
    decoder = sum(p.numel() for p in model.fm_decoder.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "decoder_trainable_params": decoder, "total": total}


def evaluate_base(layout: Layout, budget: Budget, evaluate: Evaluator) -> dict[str, Any]:
    """The pre-trained model as every adaptation run starts from it (extended embedding with
    the same seeded new rows), before any step."""
    from zipvoice.models.loader import load_model_config
    from zipvoice.tokenizer.tokenizer import get_tokenizer
    from zipvoice.training.model_setup import setup_model
    from zipvoice.utils.cli import fix_random_seed

    config = adaptation_config(layout, budget, layout.exp / "base").replace(use_lora=False)
    fix_random_seed(config.run.seed)
    model_cfg = config.model
    tokenizer = get_tokenizer(model_cfg.tokenizer, model_cfg.token_file, model_cfg.lang)
    model_json = load_model_config(model_cfg.model_config)
    setup = setup_model(config, tokenizer.vocab_size, tokenizer.pad_id, model_json)
    losses = evaluate(setup.model, config)
    return {
        "method": "base",
        "description": "pre-trained English model, before adaptation",
        "trainable_params": 0,
        "decoder_trainable_params": 0,
        "total": count_trainable(setup.model)["total"],
        "wall_s": 0.0,
        "steps": 0,
        **losses,
    }


def adapt(
    layout: Layout,
    budget: Budget,
    method: Method,
    evaluate: Evaluator,
    force: bool,
    seed: int = SEED,
) -> dict[str, Any]:
    """One adaptation run; a seed other than SEED repeats it to show training noise."""
    from zipvoice.training.trainer import run_training

    name = method.name if seed == SEED else f"{method.name}_seed{seed}"
    exp_dir = layout.exp / name
    result_path = exp_dir / "result.json"
    if result_path.is_file() and not force:
        logger.info("%s: reusing %s", name, result_path)
        return json.loads(result_path.read_text(encoding="utf-8"))
    if exp_dir.exists():
        shutil.rmtree(exp_dir)
    config = adaptation_config(layout, budget, exp_dir, seed).replace(**method.settings)
    prefixes = method.decoder_trainable
    trainable = DecoderPrefixes(prefixes) if prefixes is not None else None
    logger.info("%s: %s", name, method.description)
    start = time.monotonic()
    model = run_training(config, trainable=trainable)
    wall = time.monotonic() - start
    result = {
        "method": name,
        "description": method.description,
        "seed": seed,
        **count_trainable(model),
        "wall_s": wall,
        "steps": budget.adapt_steps,
        **evaluate(model, config),
        "curves": validation_curves(exp_dir),
    }
    write_json(result_path, result)
    logger.info(
        "%s: ja_dev %.4f, en_heldout %.4f, en_dev %.4f, %d trainable, %.0f s",
        name,
        result["ja_dev"],
        result["en_heldout"],
        result["en_dev"],
        result["trainable_params"],
        wall,
    )
    return result


# --------------------------------------------------------------------------------------------
# Stage 5: report
# --------------------------------------------------------------------------------------------

TABLE_COLUMNS = (
    ("method", "method"),
    ("trainable_params", "trainable params"),
    ("decoder_trainable_params", "of which decoder"),
    ("wall_s", "wall time (s)"),
    ("ja_dev", "JA dev loss ↓"),
    ("en_heldout", "EN held-out speakers loss ↓"),
    ("en_dev", "EN seen speakers loss ↓"),
)


def _cell(key: str, value: Any) -> str:
    if key in ("ja_dev", "en_heldout", "en_dev"):
        return f"{value:.4f}"
    if key == "wall_s":
        return f"{value:.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(title for _, title in TABLE_COLUMNS) + " |",
        "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(k, row[k]) for k, _ in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = [k for k in rows[-1] if k != "curves"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(path, buffer.getvalue())


def plot(path: Path, rows: list[dict[str, Any]], base: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (scatter, curves) = plt.subplots(1, 2, figsize=(13, 5.2))
    palette = plt.get_cmap("tab20").colors
    main_rows = [r for r in rows if r.get("seed", SEED) == SEED]
    color_of = {r["method"]: palette[(2 * i) % 20] for i, r in enumerate(main_rows)}
    point_of = {r["method"]: (r["ja_dev"], r["en_heldout"]) for r in main_rows}
    for row in main_rows:
        color = color_of[row["method"]]
        marker = "*" if row["method"] == "base" else "o"
        scatter.scatter(row["ja_dev"], row["en_heldout"], color=color, marker=marker, s=70)
        scatter.annotate(
            row["method"], (row["ja_dev"], row["en_heldout"]), fontsize=8,
            xytext=(4, 4), textcoords="offset points",
        )  # fmt: skip
        for tag, style in (("valid/loss", "-"), ("valid/forgetting_loss", ":")):
            points = (row.get("curves") or {}).get(tag)
            if points:
                steps, values = zip(*points, strict=True)
                label = row["method"] if tag == "valid/loss" else None
                curves.plot(steps, values, style, color=color, label=label)
    # Repeats with another training seed: hollow, joined to the main run (training noise).
    # Their trainer curves used that seed's validation noise, so they are not drawn.
    for row in rows:
        seed = row.get("seed", SEED)
        main = row["method"].removesuffix(f"_seed{seed}")
        if seed == SEED or main not in point_of:
            continue
        color = color_of[main]
        x0, y0 = point_of[main]
        scatter.plot([x0, row["ja_dev"]], [y0, row["en_heldout"]], color=color, lw=0.8)
        scatter.scatter(
            row["ja_dev"], row["en_heldout"], s=70, facecolors="none", edgecolors=color,
            label=f"{main}, seed {seed}",
        )  # fmt: skip
    if any(r.get("seed", SEED) != SEED for r in rows):
        scatter.legend(fontsize=7, loc="upper right", title="repeats", title_fontsize=7)
    scatter.axhline(base["en_heldout"], color="grey", lw=0.8, ls="--")
    scatter.set_xlabel("Japanese dev loss (lower: new language learned)")
    scatter.set_ylabel("loss on held-out English speakers (lower: zero-shot kept)")
    scatter.set_title("After adaptation (base = pre-trained model, dashed)")
    curves.set_xlabel("adaptation step")
    curves.set_ylabel("validation loss")
    curves.set_title("Japanese dev (solid) and held-out English speakers (dotted)")
    curves.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def report(layout: Layout, rows: list[dict[str, Any]], meta: dict[str, Any], plot_out: Path | None):
    results = layout.results
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / "results.json", {"meta": meta, "rows": rows})
    write_csv(results / "results.csv", rows)
    write_text_atomically(results / "table.md", markdown_table(rows))
    base = next(r for r in rows if r["method"] == "base")
    plot(results / "lora-study.png", rows, base)
    if plot_out is not None:
        plot(plot_out, rows, base)
    print(markdown_table(rows))
    logger.info("results in %s", results)


# --------------------------------------------------------------------------------------------


STAGES = ("corpus", "data", "pretrain", "report")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=HERE / "work")
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test budget")
    parser.add_argument("--methods", default="all", help="comma-separated subset of methods")
    parser.add_argument("--force", action="store_true", help="redo finished adaptation runs")
    parser.add_argument(
        "--repeat-seeds",
        default="",
        help="comma-separated extra training seeds; each repeats --repeat-methods",
    )
    parser.add_argument(
        "--repeat-methods", default="full,dora_r32_attn", help="methods the extra seeds repeat"
    )
    parser.add_argument("--plot-out", type=Path, default=None, help="also write the plot here")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on shared cores, 2 threads ran up to 8x slower)",
    )
    parser.add_argument("--stop-after", choices=STAGES, default="report", help="last stage to run")
    opts = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s"
    )
    torch.set_num_threads(opts.threads)
    budget = QUICK if opts.quick else FULL
    methods = METHODS
    if opts.methods != "all":
        wanted = opts.methods.split(",")
        unknown = sorted(set(wanted) - {m.name for m in METHODS})
        if unknown:
            parser.error(f"unknown method(s) {unknown}; choose from {[m.name for m in METHODS]}")
        methods = tuple(m for m in METHODS if m.name in wanted)
    layout = Layout(opts.work_dir.resolve())
    total_start = time.monotonic()

    make_corpus(layout, budget)
    if opts.stop_after == "corpus":
        return 0
    prepare_data(layout, budget)
    if opts.stop_after == "data":
        return 0
    pretrained = pretrain(layout, budget)
    if opts.stop_after == "pretrain":
        return 0
    evaluate = Evaluator(layout, budget)
    rows = [evaluate_base(layout, budget, evaluate)]
    for method in methods:
        rows.append(adapt(layout, budget, method, evaluate, opts.force))
    repeat = {m for m in opts.repeat_methods.split(",") if m}
    for seed in (int(x) for x in opts.repeat_seeds.split(",") if x):
        for method in methods:
            if method.name in repeat:
                rows.append(adapt(layout, budget, method, evaluate, opts.force, seed))
    meta = {
        "budget": asdict(budget),
        "seed": SEED,
        "en_tokenizer": english_tokenizer(),
        "model_config": MODEL_CONFIG,
        "pretrain": {k: v for k, v in pretrained.items()},
        "lr": {
            "pretrain_scaledadam": PRETRAIN_LR,
            "adapt_scaledadam": SCALEDADAM_ADAPT_LR,
            "adapt_adamw": ADAMW_ADAPT_LR,
        },
        "torch_threads": opts.threads,
        "total_wall_s_this_invocation": time.monotonic() - total_start,
    }
    report(layout, rows, meta, opts.plot_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
