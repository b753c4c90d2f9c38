"""The end-to-end demo as a recipe: each stage runs a real entry point, in-process.

Kept as library code so that a test can run it at a smaller size; `zipvoice.bin.demo` is the
command-line front.
"""

from __future__ import annotations

import csv
import io
import logging
import shlex
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from zipvoice.utils.fileio import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

MARKER = ".zipvoice-demo"

# The fixture-sized model: about 1 M parameters, trains at several steps per second on a CPU.
TINY_MODEL_CONFIG = {
    "model": {
        "fm_decoder_downsampling_factor": [1, 2, 4, 2, 1],
        "fm_decoder_num_layers": [1, 1, 2, 1, 1],
        "fm_decoder_cnn_module_kernel": [31, 15, 7, 15, 31],
        "fm_decoder_feedforward_dim": 192,
        "fm_decoder_num_heads": 4,
        "fm_decoder_dim": 96,
        "text_encoder_num_layers": 2,
        "text_encoder_feedforward_dim": 128,
        "text_encoder_cnn_module_kernel": 9,
        "text_encoder_num_heads": 4,
        "text_encoder_dim": 64,
        "query_head_dim": 16,
        "value_head_dim": 8,
        "pos_head_dim": 4,
        "pos_dim": 24,
        "time_embed_dim": 64,
        "text_embed_dim": 64,
        "feat_dim": 100,
    },
    "feature": {"sampling_rate": 24000, "type": "vocos"},
}


@dataclass
class DemoSettings:
    out_dir: str = "demo_out"
    model_dir: str | None = None
    vocoder_path: str = "griffin-lim"
    num_speakers: int = 4
    num_sentences: int = 16
    pretrain_iters: int = 600
    lora_iters: int = 100
    lora_rank: int = 32
    lora_alpha: float = 64.0
    use_dora: bool = True
    max_duration: float = 20.0
    text: str = "今日はとても良い天気ですね。"
    overwrite: bool = False
    progress: bool = True


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Never touch a folder the demo did not make; start over only when asked."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out-dir {out} is a file, not a folder; choose another --out-dir")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise FileExistsError(
                f"{out} exists and was not made by the demo; choose another --out-dir"
            )
        if not overwrite:
            raise FileExistsError(
                f"{out} holds an earlier demo run; pass --overwrite to start over, "
                "or --out-dir for a new folder"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MARKER, "made by python -m zipvoice.bin.demo\n")


def _run(module: str, main: Callable[[list[str]], int | None], argv: Sequence[str]) -> None:
    """Run one entry point in-process, showing the command a user would type."""
    print(f"\n$ python -m {module} {shlex.join(str(a) for a in argv)}", flush=True)
    rc = main([str(a) for a in argv])
    if rc not in (None, 0):
        raise RuntimeError(f"{module} failed (exit code {rc})")


def _split_by_speaker(tsv: Path, speakers: set[str], out: Path) -> Path:
    """Rows of `tsv` whose utterance id starts with one of `speakers` (ids are spk_xxx)."""
    with open(tsv, encoding="utf-8") as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if r and r[0].split("_")[0] in speakers]
    text = io.StringIO()
    csv.writer(text, delimiter="\t", lineterminator="\n").writerows(rows)
    atomic_write_text(out, text.getvalue())
    return out


def run_demo(s: DemoSettings) -> dict[str, Path]:
    from zipvoice.bin import (
        compute_fbank,
        infer_zipvoice,
        infer_zipvoice_onnx,
        onnx_export,
        prepare_dataset,
        prepare_token_file,
        prepare_tokens,
        train_zipvoice,
    )
    from zipvoice.dataset.synthetic import make_japanese_corpus

    start = time.time()
    out = Path(s.out_dir).resolve()
    if s.model_dir is not None:
        # Fail now, not after minutes of corpus generation and feature extraction.
        from zipvoice.models.loader import resolve_model_dir

        resolve_model_dir(model_dir=s.model_dir)
    _prepare_out_dir(out, s.overwrite)
    data = out / "data"
    manifests, fbank = data / "manifests", data / "fbank"

    print("\n== 1. Generate a Japanese corpus with pyopenjtalk's voice", flush=True)
    corpus = make_japanese_corpus(
        out / "corpus", s.num_speakers, s.num_sentences, name="ja", progress=s.progress
    )
    speakers = sorted({p.name.split("_")[0] for p in corpus["wav_dir"].glob("*.wav")})
    # Without a real pretrained model, half the speakers stand in for the pre-training data.
    half = max(1, len(speakers) // 2) if s.model_dir is None else 0
    base_spk, adapt_spk = set(speakers[:half]), set(speakers[half:]) or set(speakers)
    subsets = {
        "adapt_train": _split_by_speaker(
            corpus["train_tsv"], adapt_spk, out / "corpus/adapt_train.tsv"
        ),
        "adapt_dev": _split_by_speaker(corpus["dev_tsv"], adapt_spk, out / "corpus/adapt_dev.tsv"),
    }
    if base_spk:
        subsets["base_train"] = _split_by_speaker(
            corpus["train_tsv"], base_spk, out / "corpus/base_train.tsv"
        )
        subsets["base_dev"] = _split_by_speaker(
            corpus["dev_tsv"], base_spk, out / "corpus/base_dev.tsv"
        )

    print("\n== 2. Token file (the base vocabulary plus every Japanese token)", flush=True)
    token_file = data / "tokens_japanese_extended.txt"
    argv = ["--tokenizer", "japanese", "--output", token_file]
    if s.model_dir is not None:
        argv += ["--base-token-file", Path(s.model_dir) / "tokens.txt"]
    _run("zipvoice.bin.prepare_token_file", prepare_token_file.main, argv)

    print("\n== 3. Manifests, tokens (with accent marks) and Vocos features", flush=True)
    for subset, tsv in subsets.items():
        _run(
            "zipvoice.bin.prepare_dataset",
            prepare_dataset.main,
            [
                "--tsv-path",
                tsv,
                "--prefix",
                "ja",
                "--subset",
                f"raw_{subset}",
                "--output-dir",
                manifests,
            ],
        )
        _run(
            "zipvoice.bin.prepare_tokens",
            prepare_tokens.main,
            [
                "--input-file", manifests / f"ja_cuts_raw_{subset}.jsonl.gz",
                "--output-file", manifests / f"ja_cuts_{subset}.jsonl.gz",
                "--tokenizer", "japanese",
            ],
        )  # fmt: skip
        _run(
            "zipvoice.bin.compute_fbank",
            compute_fbank.main,
            ["--source-dir", manifests, "--dest-dir", fbank, "--prefix", "ja", "--subset", subset],
        )

    def cuts(subset: str) -> Path:
        return fbank / f"ja_cuts_{subset}.jsonl.gz"

    common = [
        "--tokenizer", "japanese", "--token-file", token_file, "--dataset", "custom",
        "--max-duration", s.max_duration, "--min-len", 0.5, "--num-workers", 0,
        "--valid-interval", 100, "--log-interval", 25, "--wandb-project", "",
    ]  # fmt: skip

    if s.model_dir is None:
        print(
            "\n== 4. Pre-train a tiny base model (stand-in for the published checkpoint)",
            flush=True,
        )
        config_path = out / "tiny_model.json"
        atomic_write_json(config_path, TINY_MODEL_CONFIG)
        base_exp = out / "exp" / "base"
        _run(
            "zipvoice.bin.train_zipvoice",
            train_zipvoice.main,
            common
            + [
                "--model-config", config_path, "--num-iters", s.pretrain_iters,
                "--train-manifest", cuts("base_train"), "--dev-manifest", cuts("base_dev"),
                "--exp-dir", base_exp, "--save-every-n", s.pretrain_iters, "--base-lr", 0.02,
                "--lr-batches", max(50, s.pretrain_iters // 2),
                # The model's dropout / layer-skip schedules settle after ~20000 batches of
                # upstream's size; count in smaller units so they settle halfway through.
                "--ref-duration", s.pretrain_iters / 2 * s.max_duration / 20000,
            ],
        )  # fmt: skip
        model_dir = base_exp / "finetuned"
    else:
        print("\n== 4. Pre-training skipped: using the model in --model-dir", flush=True)
        model_dir = Path(s.model_dir)

    print("\n== 5. LoRA/DoRA fine-tuning: base decoder frozen, adapters learn", flush=True)
    lora_exp = out / "exp" / "lora"
    argv = common + [
        "--finetune", 1, "--checkpoint", model_dir / "model.pt",
        "--model-config", model_dir / "model.json",
        "--use-lora", 1, "--lora-rank", s.lora_rank, "--lora-alpha", s.lora_alpha,
        "--use-dora", int(s.use_dora), "--lora-dropout", 0.05, "--base-lr", 0.001,
        "--num-iters", s.lora_iters, "--save-every-n", s.lora_iters,
        "--train-manifest", cuts("adapt_train"), "--dev-manifest", cuts("adapt_dev"),
        "--exp-dir", lora_exp,
    ]  # fmt: skip
    if "base_dev" in subsets:
        argv += ["--forgetting-manifest", cuts("base_dev")]
    _run("zipvoice.bin.train_zipvoice", train_zipvoice.main, argv)
    adapter = lora_exp / "adapter"

    print("\n== 6. Synthesise with the adapter merged (PyTorch)", flush=True)
    with open(subsets["adapt_dev"], encoding="utf-8") as f:
        prompt_id, prompt_text, prompt_wav = next(csv.reader(f, delimiter="\t"))[:3]
    results = out / "results"
    wav = results / "demo_lora.wav"
    _run(
        "zipvoice.bin.infer_zipvoice",
        infer_zipvoice.main,
        [
            "--model-dir", model_dir, "--lora-path", adapter, "--vocoder-path", s.vocoder_path,
            "--prompt-wav", prompt_wav, "--prompt-text", prompt_text, "--text", s.text,
            "--res-wav-path", wav, "--seed", 0,
        ],
    )  # fmt: skip

    print("\n== 7. Export to ONNX with the adapter merged into the weights", flush=True)
    onnx_dir = out / "onnx"
    argv = ["--model-dir", model_dir, "--lora-path", adapter, "--onnx-model-dir", onnx_dir]
    _run("zipvoice.bin.onnx_export", onnx_export.main, argv)

    print("\n== 8. Synthesise again with onnxruntime", flush=True)
    onnx_wav = results / "demo_lora_onnx.wav"
    _run(
        "zipvoice.bin.infer_zipvoice_onnx",
        infer_zipvoice_onnx.main,
        [
            "--onnx-model-dir", onnx_dir, "--vocoder-path", s.vocoder_path,
            "--prompt-wav", prompt_wav, "--prompt-text", prompt_text, "--text", s.text,
            "--res-wav-path", onnx_wav, "--seed", 0,
        ],
    )  # fmt: skip

    artefacts = {
        "corpus": corpus["out_dir"],
        "token file": token_file,
        "features": fbank,
        "base model": model_dir,
        "adapter": adapter,
        "speech (PyTorch, adapter merged)": wav,
        "ONNX models": onnx_dir,
        "speech (onnxruntime)": onnx_wav,
    }
    print(f"\nDemo finished in {time.time() - start:.0f} s. What it made:")
    for name, path in artefacts.items():
        print(f"  {name:34s} {path}")
    if s.vocoder_path == "griffin-lim":
        print(
            "  (audio: a tiny model trained for minutes, decoded with Griffin-Lim: speech-shaped, "
            "not natural; pass --model-dir and --vocoder-path for the real thing)"
        )
    return artefacts
