"""The end-to-end demo as a recipe: each stage calls the library function behind an entry
point, and prints the command that does the same by hand.

Kept as library code so that a test can run it at a smaller size; `zipvoice.bin.demo` is the
command-line front. The stages: corpus -> token file -> manifests, tokens, features ->
(pre-training of a tiny base) -> LoRA/DoRA fine-tuning -> PyTorch synthesis -> ONNX export ->
onnxruntime synthesis.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shlex
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zipvoice.utils.fileio import atomic_write_json, atomic_write_text
from zipvoice.utils.resources import available_cores

if TYPE_CHECKING:
    from zipvoice.training.config import TrainingConfig

logger = logging.getLogger(__name__)

MARKER = ".zipvoice-demo"
STAGES_FILE = ".zipvoice-demo-stages.json"
# Worker processes of the data stages (the entry points' default).
NUM_JOBS = min(8, available_cores())

# The fixture-sized model: 1.67 M parameters (the pre-training log's count); its speed on a
# CPU is in the README (measured, with the machine's load).
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
    """Never touch a folder the demo did not make; start over only when asked (else an
    earlier run in it continues, see _Stages)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out-dir {out} is a file, not a folder; choose another --out-dir")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise FileExistsError(
                f"{out} exists and was not made by the demo; choose another --out-dir"
            )
        if not overwrite:
            return
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MARKER, "made by python -m zipvoice.bin.demo\n")


class _Stages:
    """The finished stages of a demo folder and what each returned, in STAGES_FILE, so that a
    rerun (after Ctrl-C, a crash, a full disk) continues after the last finished stage. An
    unfinished stage runs again from its start, replacing its partial outputs; an interrupted
    training stage resumes from its checkpoint. Other settings than the recorded ones are
    refused: the finished stages would not be what they ask for."""

    def __init__(self, out: Path, settings: DemoSettings) -> None:
        self.path = out / STAGES_FILE
        wanted = {k: v for k, v in asdict(settings).items() if k not in ("overwrite", "progress")}
        if self.path.is_file():
            self.record = json.loads(self.path.read_text(encoding="utf-8"))
            if self.record.get("settings") != wanted:
                changed = sorted(
                    k for k in wanted if self.record.get("settings", {}).get(k) != wanted[k]
                )
                raise FileExistsError(
                    f"{out} holds a demo run with other settings ({', '.join(changed)}); pass "
                    "--overwrite to start over, or --out-dir for a new folder"
                )
        else:
            self.record = {"settings": wanted, "done": {}}
            atomic_write_json(self.path, self.record)

    def run(self, name: str, stage: Callable[..., Any], *args: Any) -> Any:
        done = self.record["done"]
        if name in done:
            print(f"\n== {name}: finished in an earlier run of this folder, skipped", flush=True)
            return _from_json(done[name])
        result = stage(*args)
        done[name] = _to_json(result)
        atomic_write_json(self.path, self.record)
        return result


def _to_json(value: Any) -> Any:
    if isinstance(value, Path):
        return {"path": str(value)}
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"path"}:
            return Path(value["path"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value


def _show(module: str, argv: Sequence[object]) -> None:
    """Print the command a user would type for this stage."""
    print(f"\n$ python -m {module} {shlex.join(str(a) for a in argv)}", flush=True)


def _split_by_speaker(tsv: Path, speakers: set[str], out: Path) -> Path:
    """Rows of `tsv` whose utterance id starts with one of `speakers` (ids are spk_xxx)."""
    with open(tsv, encoding="utf-8") as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if r and r[0].split("_")[0] in speakers]
    text = io.StringIO()
    csv.writer(text, delimiter="\t", lineterminator="\n").writerows(rows)
    atomic_write_text(out, text.getvalue())
    return out


def _corpus(s: DemoSettings, out: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """Stage 1: the corpus, split by speaker into base (pre-training) and adaptation sets."""
    from zipvoice.dataset.synthetic import make_japanese_corpus

    print("\n== 1. Generate a Japanese corpus with pyopenjtalk's voice", flush=True)
    # overwrite: a stage that runs again replaces its own unfinished output.
    where, progress = out / "corpus", s.progress
    corpus = make_japanese_corpus(
        where, s.num_speakers, s.num_sentences, name="ja", progress=progress, overwrite=True
    )
    speakers = sorted({p.name.split("_")[0] for p in corpus["wav_dir"].glob("*.wav")})
    # Without a real pretrained model, half the speakers stand in for the pre-training data.
    half = max(1, len(speakers) // 2) if s.model_dir is None else 0
    base_spk, adapt_spk = set(speakers[:half]), set(speakers[half:]) or set(speakers)
    subsets = {}
    for part, spk in (("adapt", adapt_spk), ("base", base_spk)):
        if not spk:
            continue
        for split in ("train", "dev"):
            tsv = corpus[f"{split}_tsv"]
            subsets[f"{part}_{split}"] = _split_by_speaker(
                tsv, spk, out / f"corpus/{part}_{split}.tsv"
            )
    return corpus, subsets


def _token_file(s: DemoSettings, data: Path) -> Path:
    """Stage 2: the base vocabulary plus every Japanese token."""
    from zipvoice.tokenizer.prepare import prepare_token_file

    print("\n== 2. Token file (the base vocabulary plus every Japanese token)", flush=True)
    token_file = data / "tokens_japanese_extended.txt"
    base = Path(s.model_dir) / "tokens.txt" if s.model_dir is not None else None
    argv: list[object] = ["--tokenizer", "japanese", "--output", token_file]
    if base is not None:
        argv += ["--base-token-file", base]
    _show("zipvoice.bin.prepare_token_file", argv)
    prepare_token_file("japanese", token_file, base_token_file=base, overwrite=True)
    return token_file


def _features(subsets: dict[str, Path], manifests: Path, fbank: Path) -> None:
    """Stage 3: manifests, tokens (with accent marks) and Vocos features for each subset."""
    from zipvoice.dataset.fbank import compute_fbank
    from zipvoice.dataset.manifests import prepare_dataset
    from zipvoice.dataset.tokens import prepare_tokens

    print("\n== 3. Manifests, tokens (with accent marks) and Vocos features", flush=True)
    for subset, tsv in subsets.items():
        raw = manifests / f"ja_cuts_raw_{subset}.jsonl.gz"
        tokenized = manifests / f"ja_cuts_{subset}.jsonl.gz"
        _show("zipvoice.bin.prepare_dataset", ["--tsv-path", tsv, "--prefix", "ja",
              "--subset", f"raw_{subset}", "--output-dir", manifests])  # fmt: skip
        prepare_dataset(tsv, "ja", f"raw_{subset}", manifests, num_jobs=NUM_JOBS, overwrite=True)
        _show("zipvoice.bin.prepare_tokens", ["--input-file", raw, "--output-file", tokenized,
              "--tokenizer", "japanese"])  # fmt: skip
        prepare_tokens(raw, tokenized, tokenizer="japanese", num_jobs=NUM_JOBS, overwrite=True)
        _show("zipvoice.bin.compute_fbank", ["--source-dir", manifests, "--dest-dir", fbank,
              "--prefix", "ja", "--subset", subset])  # fmt: skip
        compute_fbank(
            manifests, fbank, prefix="ja", subset=subset, num_jobs=NUM_JOBS, overwrite=True
        )


def _train(config: TrainingConfig) -> None:
    """Run one training, showing the equivalent command."""
    from zipvoice.training.config import TrainingConfig
    from zipvoice.training.trainer import run_training

    defaults = TrainingConfig().flags()
    argv: list[object] = []
    for key, value in config.flags().items():
        if value != defaults[key] and value is not None:
            argv += [f"--{key.replace('_', '-')}", int(value) if isinstance(value, bool) else value]
    _show("zipvoice.bin.train_zipvoice", argv)
    run_training(config)


def _common_config(s: DemoSettings, token_file: Path) -> TrainingConfig:
    from zipvoice.dataset.config import DataConfig
    from zipvoice.training.config import ModelConfig, RunConfig, TrainingConfig

    return TrainingConfig(
        data=DataConfig(dataset="custom", max_duration=s.max_duration, min_len=0.5, num_workers=0),
        model=ModelConfig(tokenizer="japanese", token_file=str(token_file)),
        run=RunConfig(valid_interval=100, log_interval=25),
    )


def _pretrain(s: DemoSettings, out: Path, common: TrainingConfig, cuts) -> Path:
    """Stage 4: a tiny base model (stand-in for the published checkpoint), or the given one."""
    if s.model_dir is not None:
        print("\n== 4. Pre-training skipped: using the model in --model-dir", flush=True)
        return Path(s.model_dir)
    print("\n== 4. Pre-train a tiny base model (stand-in for the published checkpoint)", flush=True)
    config_path = out / "tiny_model.json"
    atomic_write_json(config_path, TINY_MODEL_CONFIG)
    base_exp = out / "exp" / "base"
    _train(
        common.replace(
            model_config=str(config_path), num_iters=s.pretrain_iters,
            train_manifest=str(cuts("base_train")), dev_manifest=str(cuts("base_dev")),
            exp_dir=str(base_exp), save_every_n=s.pretrain_iters, base_lr=0.02,
            lr_batches=max(50, s.pretrain_iters // 2),
            # The model's dropout / layer-skip schedules settle after ~20000 batches of
            # upstream's size; count in smaller units so they settle halfway through.
            ref_duration=s.pretrain_iters / 2 * s.max_duration / 20000,
        )
    )  # fmt: skip
    return base_exp / "finetuned"


def _fine_tune(s: DemoSettings, out: Path, common: TrainingConfig, model_dir: Path, cuts,
               forgetting: Path | None) -> Path:  # fmt: skip
    """Stage 5: LoRA/DoRA on the decoder; the base decoder stays frozen."""
    print("\n== 5. LoRA/DoRA fine-tuning: base decoder frozen, adapters learn", flush=True)
    lora_exp = out / "exp" / "lora"
    _train(
        common.replace(
            finetune=True, checkpoint=str(model_dir / "model.pt"),
            model_config=str(model_dir / "model.json"), use_lora=True,
            lora_rank=s.lora_rank, lora_alpha=s.lora_alpha, use_dora=s.use_dora,
            lora_dropout=0.05, base_lr=0.001, num_iters=s.lora_iters,
            save_every_n=s.lora_iters, train_manifest=str(cuts("adapt_train")),
            dev_manifest=str(cuts("adapt_dev")), exp_dir=str(lora_exp),
            forgetting_manifest=str(forgetting) if forgetting else None,
        )
    )  # fmt: skip
    return lora_exp / "adapter"


def _synthesizer(sample, vocode, token_file: Path, metadata: dict[str, Any]):
    """The generation pipeline with the entry points' defaults and the recorded front end."""
    from zipvoice.inference.generation import Synthesizer, make_text_functions

    tokenizer, lang = metadata.get("tokenizer", "emilia"), metadata.get("lang", "en-us")
    text_to_tokens, tokens_to_ids = make_text_functions(tokenizer, token_file, lang)
    return Synthesizer(text_to_tokens, tokens_to_ids, sample, vocode)


def _speak_torch(s: DemoSettings, model_dir: Path, adapter: Path, prompt, wav: Path) -> None:
    """Stage 6: synthesis with PyTorch, the adapter merged into the weights."""
    from zipvoice.inference.common import MODEL_DEFAULTS
    from zipvoice.inference.torch_backend import (
        load_model_for_inference,
        model_kind,
        torch_sampler,
        torch_vocoder,
    )  # fmt: skip
    from zipvoice.models.vocoder import load_vocoder
    from zipvoice.utils.cli import fix_random_seed

    print("\n== 6. Synthesise with the adapter merged (PyTorch)", flush=True)
    prompt_wav, prompt_text = prompt
    _show("zipvoice.bin.infer_zipvoice", ["--model-dir", model_dir, "--lora-path", adapter,
          "--vocoder-path", s.vocoder_path, "--prompt-wav", prompt_wav, "--prompt-text",
          prompt_text, "--text", s.text, "--res-wav-path", wav, "--seed", 0])  # fmt: skip
    model, token_file, meta = load_model_for_inference(model_dir=model_dir, lora_path=adapter)
    defaults = MODEL_DEFAULTS[model_kind(model)]
    sample = torch_sampler(model, int(defaults["num_step"]), float(defaults["guidance_scale"]))
    vocode = torch_vocoder(load_vocoder(s.vocoder_path))
    synthesizer = _synthesizer(sample, vocode, token_file, meta)
    # Seed after loading, as the entry point does: attaching adapters draws random numbers.
    fix_random_seed(0)
    synthesizer.synthesize_to_file(s.text, prompt_wav, prompt_text, wav)


def _export_onnx(model_dir: Path, adapter: Path, onnx_dir: Path) -> None:
    """Stage 7: ONNX export with the adapter merged into the weights."""
    import torch

    from zipvoice.inference.torch_backend import load_model_for_inference
    from zipvoice.onnx.export import export_metadata, export_model

    print("\n== 7. Export to ONNX with the adapter merged into the weights", flush=True)
    _show("zipvoice.bin.onnx_export", ["--model-dir", model_dir, "--lora-path", adapter,
          "--onnx-model-dir", onnx_dir])  # fmt: skip
    with torch.no_grad():
        model, token_file, meta = load_model_for_inference(model_dir=model_dir, lora_path=adapter)
        tokenizer, lang = meta.get("tokenizer", "emilia"), meta.get("lang", "en-us")
        metadata = export_metadata(tokenizer, lang, "model.pt", adapter, 1.0, meta)
        export_model(model, onnx_dir, token_file, metadata=metadata)


def _speak_onnx(s: DemoSettings, onnx_dir: Path, prompt, wav: Path) -> None:
    """Stage 8: synthesis again, with onnxruntime."""
    from zipvoice.inference.common import MODEL_DEFAULTS
    from zipvoice.inference.torch_backend import torch_vocoder
    from zipvoice.models.vocoder import load_vocoder
    from zipvoice.onnx.runtime import OnnxZipVoice
    from zipvoice.utils.cli import fix_random_seed

    print("\n== 8. Synthesise again with onnxruntime", flush=True)
    prompt_wav, prompt_text = prompt
    _show("zipvoice.bin.infer_zipvoice_onnx", ["--model-dir", onnx_dir, "--vocoder-path",
          s.vocoder_path, "--prompt-wav", prompt_wav, "--prompt-text", prompt_text, "--text",
          s.text, "--res-wav-path", wav, "--seed", 0])  # fmt: skip
    fix_random_seed(0)
    model = OnnxZipVoice(onnx_dir)
    defaults = MODEL_DEFAULTS[model.model_type]
    sample = model.sampler(int(defaults["num_step"]), float(defaults["guidance_scale"]), seed=0)
    vocode = torch_vocoder(load_vocoder(s.vocoder_path))
    synthesizer = _synthesizer(sample, vocode, model.token_file, model.metadata)
    synthesizer.synthesize_to_file(s.text, prompt_wav, prompt_text, wav)


def run_demo(s: DemoSettings) -> dict[str, Path]:
    """Every stage in order; returns the artefacts by name (also printed)."""
    start = time.time()
    out = Path(s.out_dir).resolve()
    if s.model_dir is not None:
        # Fail now, not after minutes of corpus generation and feature extraction.
        from zipvoice.models.loader import resolve_model_dir

        resolve_model_dir(model_dir=s.model_dir)
    _prepare_out_dir(out, s.overwrite)
    stages = _Stages(out, s)
    data = out / "data"
    manifests, fbank = data / "manifests", data / "fbank"
    corpus, subsets = stages.run("corpus", _corpus, s, out)
    token_file = stages.run("token file", _token_file, s, data)
    stages.run("features", _features, subsets, manifests, fbank)

    def cuts(subset: str) -> Path:
        return fbank / f"ja_cuts_{subset}.jsonl.gz"

    common = _common_config(s, token_file)
    model_dir = stages.run("pre-training", _pretrain, s, out, common, cuts)
    forgetting = cuts("base_dev") if "base_dev" in subsets else None
    adapter = stages.run("fine-tuning", _fine_tune, s, out, common, model_dir, cuts, forgetting)
    with open(subsets["adapt_dev"], encoding="utf-8") as f:
        _, prompt_text, prompt_wav = next(csv.reader(f, delimiter="\t"))[:3]
    prompt = (prompt_wav, prompt_text)
    results, onnx_dir = out / "results", out / "onnx"
    wav, onnx_wav = results / "demo_lora.wav", results / "demo_lora_onnx.wav"
    stages.run("PyTorch synthesis", _speak_torch, s, model_dir, adapter, prompt, wav)
    stages.run("ONNX export", _export_onnx, model_dir, adapter, onnx_dir)
    stages.run("onnxruntime synthesis", _speak_onnx, s, onnx_dir, prompt, onnx_wav)
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
    _report(artefacts, time.time() - start, s.vocoder_path)
    return artefacts


def _report(artefacts: dict[str, Path], seconds: float, vocoder_path: str) -> None:
    print(f"\nDemo finished in {seconds:.0f} s. What it made:")
    for name, path in artefacts.items():
        print(f"  {name:34s} {path}")
    if vocoder_path == "griffin-lim":
        print(
            "  (audio: a tiny model trained for minutes, decoded with Griffin-Lim: speech-shaped, "
            "not natural; pass --model-dir and --vocoder-path for the real thing)"
        )
