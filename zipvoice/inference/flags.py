"""Flags shared by the inference entry points (infer_zipvoice, infer_zipvoice_onnx,
onnx_export), and the functions that turn parsed flags into a loaded model or a Synthesizer."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zipvoice.inference.common import MODEL_DEFAULTS, InferenceError
from zipvoice.tokenizer.tokenizer import TOKENIZER_NAMES
from zipvoice.utils.cli import str2bool
from zipvoice.utils.validate import (
    assert_not_input,
    finite_float,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

if TYPE_CHECKING:  # building a parser (--help) must not import torch, lhotse or PEFT
    from torch import nn

    from zipvoice.inference.generation import GenerationStats, SampleFn, Synthesizer, VocodeFn


def add_model_arguments(parser: argparse.ArgumentParser, merge_lora_help: str) -> None:
    """Which model to load and which adapter to apply, for PyTorch inference and ONNX export."""
    parser.add_argument(
        "--model-name", default="zipvoice", choices=["zipvoice", "zipvoice_distill"]
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help="Folder with the checkpoint, model.json and tokens.txt; "
        "downloaded from the hub if omitted.",
    )
    parser.add_argument("--checkpoint-name", default="model.pt")
    parser.add_argument(
        "--lora-path", default=None, help="Adapter folder written by training, to merge in."
    )
    parser.add_argument(
        "--lora-scale",
        type=finite_float,
        default=1.0,
        help="Adapter strength s: each adapted weight is W0 + s*(W_merged - W0) (merged or not, "
        "LoRA or DoRA); 0 = base decoder, 1 = as trained.",
    )
    parser.add_argument("--merge-lora", type=str2bool, default=True, help=merge_lora_help)
    add_t_range_argument(parser)


def add_t_range_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lora-t-range",
        type=t_range_arg,
        default=None,
        help="A,B: apply the adapter only on ODE steps whose start time t (after t-shift) has "
        "A <= t < B, the base decoder elsewhere (0,1 = always, A,A = never). Default: always.",
    )


def t_range_arg(text: str) -> tuple[float, float]:
    """argparse type for --lora-t-range: a bad value is argparse's one-line error."""
    from zipvoice.models.modules.time_gate import TimeGateError, parse_t_range

    try:
        return parse_t_range(text)
    except TimeGateError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def load_model_from_args(args: argparse.Namespace) -> tuple[nn.Module, Path, dict[str, Any]]:
    """`load_model_for_inference` with the flags of `add_model_arguments`."""
    from zipvoice.inference.torch_backend import load_model_for_inference

    return load_model_for_inference(
        args.model_name,
        args.model_dir,
        args.checkpoint_name,
        lora_path=args.lora_path,
        lora_scale=args.lora_scale,
        merge_lora=args.merge_lora,
        lora_t_range=args.lora_t_range,
    )


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Inputs, outputs and sampling flags, with upstream's names and defaults."""
    parser.add_argument(
        "--tokenizer",
        default=None,
        choices=TOKENIZER_NAMES,
        help="Text front end; default: the adapter's, else emilia.",
    )
    parser.add_argument(
        "--lang",
        default=None,
        help="espeak voice for --tokenizer espeak; default: the adapter's, else en-us.",
    )
    parser.add_argument(
        "--test-list", default=None, help="TSV lines: name<TAB>prompt_text<TAB>prompt_wav<TAB>text."
    )
    parser.add_argument("--prompt-wav", default=None, help="The prompt wav to mimic.")
    parser.add_argument("--prompt-text", default=None, help="The transcription of the prompt.")
    parser.add_argument("--text", default=None, help="The text to synthesise.")
    parser.add_argument(
        "--res-dir", default="results", help="Output folder for --test-list ({name}.wav each)."
    )
    parser.add_argument(
        "--res-wav-path",
        default="result.wav",
        help="Output wav for a single sentence (replaced atomically).",
    )
    parser.add_argument(
        "--guidance-scale",
        type=finite_float,
        default=None,
        help="Classifier-free guidance scale; default 1.0, distill 3.0.",
    )
    parser.add_argument(
        "--num-step", type=positive_int, default=None, help="Sampling steps; default 16, distill 8."
    )
    parser.add_argument(
        "--feat-scale",
        type=positive_float,
        default=0.1,
        help="Scale of the log-mel features the model sees.",
    )
    parser.add_argument(
        "--speed", type=positive_float, default=1.0, help="Speech speed; > 1 speeds up."
    )
    parser.add_argument(
        "--t-shift",
        type=positive_float,
        default=0.5,
        help="Shift the time points to smaller t if < 1.",
    )
    parser.add_argument(
        "--target-rms",
        type=non_negative_float,
        default=0.1,
        help="Raise quieter prompts to this RMS; the output comes at this RMS (a quieter "
        "prompt's own level), peak-limited, never clipped (0: no level change).",
    )
    parser.add_argument("--seed", type=int, default=666, help="Random seed.")
    parser.add_argument(
        "--num-thread",
        "--num-threads",
        dest="num_thread",
        type=non_negative_int,
        default=0,
        help="CPU intra-op threads (0: the cores from the CPU affinity, or OMP_NUM_THREADS "
        "when set).",
    )
    parser.add_argument(
        "--max-duration",
        type=positive_float,
        default=100.0,
        help="Seconds of prompt + speech per batch of chunks.",
    )
    parser.add_argument("--remove-long-sil", type=str2bool, default=False,
                        help="Also shorten long pauses inside the generated speech.")  # fmt: skip
    parser.add_argument("--raw-evaluation", type=str2bool, default=False,
                        help="Feed the prompt wav, its text and the text to the model as given "
                        "(no silence removal, punctuation or chunking), as upstream's raw "
                        "evaluation mode.")  # fmt: skip


def check_io_arguments(args: argparse.Namespace) -> None:
    """Exactly one of --test-list or (--prompt-wav, --prompt-text, --text)."""
    single = (args.prompt_wav, args.prompt_text, args.text)
    if getattr(args, "num_thread", 0) < 0:
        raise InferenceError(f"--num-thread must be >= 0 (0: automatic), got {args.num_thread}")
    if args.test_list is not None:
        if any(v is not None for v in single):
            raise InferenceError("give either --test-list or --prompt-wav/--prompt-text/--text")
        return
    if any(v is None for v in single):
        raise InferenceError(
            "give --prompt-wav, --prompt-text and --text (or --test-list for many sentences)"
        )
    assert_not_input(args.res_wav_path, {"--prompt-wav": args.prompt_wav}, "--res-wav-path")
    for name in ("num_step",):  # --num-thread 0 means automatic; its type refuses negatives
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise InferenceError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def resolve_sampling_defaults(args: argparse.Namespace, kind: str) -> None:
    for key, value in MODEL_DEFAULTS[kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.num_step < 1:
        raise InferenceError(f"--num-step must be >= 1, got {args.num_step}")


def text_frontend(args: argparse.Namespace, metadata: Mapping[str, Any]) -> tuple[str, str]:
    """(tokenizer, lang): the flags if given, else what the adapter or export recorded, else
    the pretrained model's front end."""
    return (
        args.tokenizer or metadata.get("tokenizer", "emilia"),
        args.lang or metadata.get("lang", "en-us"),
    )


def synthesizer_from_args(
    args: argparse.Namespace,
    sample_features: SampleFn,
    vocode: VocodeFn,
    token_file: str | Path,
    metadata: Mapping[str, Any],
) -> Synthesizer:
    """A Synthesizer for a backend, configured by the flags of `add_generation_arguments`."""
    from zipvoice.inference.generation import Synthesizer, make_text_functions

    tokenizer_name, lang = text_frontend(args, metadata)
    text_to_tokens, tokens_to_ids = make_text_functions(tokenizer_name, token_file, lang)
    return Synthesizer(
        text_to_tokens,
        tokens_to_ids,
        sample_features,
        vocode,
        feat_scale=args.feat_scale,
        target_rms=args.target_rms,
        speed=args.speed,
        max_duration=args.max_duration,
        remove_long_sil=args.remove_long_sil,
        raw_evaluation=getattr(args, "raw_evaluation", False),
    )


def run_from_args(args: argparse.Namespace, synthesizer: Synthesizer) -> GenerationStats:
    if args.test_list is not None:
        return synthesizer.run_test_list(args.test_list, args.res_dir)
    stats = synthesizer.synthesize_to_file(
        args.text, args.prompt_wav, args.prompt_text, args.res_wav_path
    )
    print(f"Saved {args.res_wav_path} ({stats.seconds_audio:.2f} s); RTF {stats.rtf:.4f}")
    return stats
