"""Inference cost of the base model, a merged adapter, unmerged LoRA/DoRA and ONNX, side by side.

    .venv/bin/python benchmarks/inference.py                       # quick: a few minutes on CPU
    .venv/bin/python benchmarks/inference.py --preset released     # 16 steps, 3 s -> 10 s
    .venv/bin/python benchmarks/inference.py --preset released --device cuda --repeats 5

The model is the released configuration with random weights (cost does not depend on the
values); adapters are rank 32, alpha 64 on --lora-preset targets, with random non-zero B
matrices. One fresh process per method generates features for one text after one prompt with
the project's samplers (`zipvoice.inference.torch_backend.torch_sampler`,
`zipvoice.onnx.runtime.OnnxZipVoice`), Euler with classifier-free guidance (guidance > 0
doubles the batch), t_shift 0.5:

- base: the plain model; merged: the adapter merged into the weights by `merge_lora_weights`,
  which gives the base model's modules, so its cost equals the base model's by construction
  (measured anyway); lora / dora: PEFT wrappers left in place (extra matmuls, and for DoRA a
  weight norm per layer per call);
- onnx-fp32 / onnx-int8: the base model exported by `onnx_export.export_model` (int8: dynamic
  weight quantisation) and run on ONNX Runtime's CPU provider, always on the CPU.

RTF = seconds of generation / seconds of generated audio (prompt excluded). The vocoder is not
included unless --vocoder is given (then a released-size Vocos with random weights decodes
every output, on the torch device, in every row). Ratios are to the base model in the same run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    CHECKOUT,
    MIB,
    RELEASED_VOCAB_SIZE,
    PeakMemory,
    add_side_by_side_arguments,
    check_code_root,
    describe_machine,
    emit_result,
    export_revision,
    format_table,
    lockstep_wait,
    max_abs_difference,
    median,
    release_freed_memory,
    released_model_config,
    resolve_device,
    run_lockstep,
    run_worker,
    synchronize,
)
from _layout import describe_layouts, has_module, layout, library  # noqa: E402

METHODS = ("base", "distill", "merged", "lora", "dora", "onnx-fp32", "onnx-int8")
PRESETS = {
    # name: (num_step, prompt seconds, output seconds, repeats)
    "quick": (2, 1.0, 2.0, 3),
    "released": (16, 3.0, 10.0, 3),
}
SAMPLE_RATE, HOP_LENGTH = 24000, 256
TOKENS_PER_SECOND = 12  # about the phoneme rate of read speech; sets the prompt's token count
PAD_ID = 0
T_SHIFT = 0.5


def build_base(cli: argparse.Namespace, distill: bool = False) -> torch.nn.Module:
    from zipvoice.models.loader import build_model

    config, _ = released_model_config(cli.model_config)
    torch.manual_seed(0)
    model = build_model(config, cli.vocab_size, PAD_ID, distill=distill).eval()
    # The constructor deep-copies one layer per stack, so a fresh model's layers hold equal
    # weights; the ONNX exporter then shares them (Identity nodes), and int8 quantisation,
    # which takes only MatMuls with their own constant weight, skipped two thirds of them.
    # A released checkpoint's layers differ: so do these (each tensor moved by 10 % of its
    # spread, the scale kept).
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1:
                p.add_(torch.randn_like(p), alpha=0.1 * float(p.std()))
    return model


def build_variant(method: str, cli: argparse.Namespace) -> torch.nn.Module:
    """The model a method runs: base, or base with an adapter (merged or not)."""
    from zipvoice.models.modules.lora_utils import (
        apply_lora_to_model,
        create_lora_config,
        get_lora_target_modules,
        lora_layers,
        merge_lora_weights,
    )

    model = build_base(cli, distill=method == "distill")
    if method in ("base", "distill"):
        return model
    targets = get_lora_target_modules(model, cli.lora_preset)
    config = create_lora_config(
        rank=cli.rank, alpha=2 * cli.rank, use_dora=method != "lora", target_modules=targets
    )
    apply_lora_to_model(model, config)
    with torch.no_grad():  # a trained adapter's B is not zero
        for _, layer in lora_layers(model):
            for lora_b in layer.lora_B.values():
                lora_b.weight.normal_(std=0.01)
    if method == "merged":
        merge_lora_weights(model)
    return model.eval()


def synthetic_inputs(cli: argparse.Namespace, feat_dim: int):
    """(text ids, prompt ids, prompt features (T, F)) giving about --output-seconds of audio."""
    rng = np.random.default_rng(7)
    prompt_frames = max(1, round(cli.prompt_seconds * SAMPLE_RATE / HOP_LENGTH))
    prompt_tokens = max(1, round(cli.prompt_seconds * TOKENS_PER_SECOND))
    text_tokens = max(1, round(cli.output_seconds * TOKENS_PER_SECOND))
    prompt_ids = rng.integers(1, cli.vocab_size, prompt_tokens).tolist()
    text_ids = rng.integers(1, cli.vocab_size, text_tokens).tolist()
    prompt_features = (0.1 * rng.standard_normal((prompt_frames, feat_dim))).astype(np.float32)
    return text_ids, prompt_ids, prompt_features


def released_vocoder(device: torch.device) -> torch.nn.Module:
    """charactr/vocos-mel-24khz's shape (dim 512, intermediate 1536, 8 layers), random weights."""
    from zipvoice.models.vocoder import ISTFTHead, Vocos, VocosBackbone

    torch.manual_seed(0)
    head = ISTFTHead(dim=512, n_fft=1024, hop_length=HOP_LENGTH, padding="same")
    return Vocos(VocosBackbone(), head).eval().to(device)


def make_sampler(method: str, cli: argparse.Namespace, device: torch.device, threads: int):
    """(sample(batch, prompt ids, prompt features, num_step) -> features, feat_dim) for a
    method, with this revision's torch sampler or ONNX Runtime model."""
    if method.startswith("onnx"):
        OnnxZipVoice = library("OnnxZipVoice")  # noqa: N806
        onnx_model = OnnxZipVoice(cli.onnx_dir, int8=method == "onnx-int8", num_thread=threads)

        def sample(batch, prompt_ids, prompt_features, num_step):
            return onnx_model.sample(
                batch,
                prompt_ids,
                prompt_features,
                num_step=num_step,
                guidance_scale=cli.guidance_scale,
                t_shift=T_SHIFT,
                rng=np.random.default_rng(0),
            )

        return sample, onnx_model.feat_dim
    torch_sampler = library("torch_sampler")
    model = build_variant(method, cli).to(device)
    samplers = {
        n: torch_sampler(model, n, cli.guidance_scale, T_SHIFT, device=device)
        for n in {1, cli.num_step}
    }

    def sample(batch, prompt_ids, prompt_features, num_step):
        return samplers[num_step](batch, prompt_ids, prompt_features)

    return sample, int(model.feat_dim)


def worker(cli: argparse.Namespace) -> None:
    check_code_root(cli.code_root)
    method = cli.worker
    if method == "export":
        emit_result({"method": method, "export_seconds": export_onnx(cli, cli.onnx_dir)})
        return
    torch_device = resolve_device(cli.device)
    is_onnx = method.startswith("onnx")
    run_device = torch.device("cpu") if is_onnx else torch_device
    threads = cli.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if not is_onnx and has_module("zipvoice.utils.allocator"):
        # What infer_zipvoice does first, in revisions that have it.
        library("keep_freed_memory")()
    sample, feat_dim = make_sampler(method, cli, torch_device, threads)
    vocode = None
    if cli.vocoder:
        vocode = library("torch_vocoder")(released_vocoder(torch_device), torch_device)
    text_ids, prompt_ids, prompt_features = synthetic_inputs(cli, feat_dim)

    if cli.profile:
        for _ in range(cli.warmup):
            sample([text_ids], prompt_ids, prompt_features, 1)
        emit_result(
            {
                "method": method,
                "profile": profile_one_step(sample, text_ids, prompt_ids, prompt_features),
            }
        )
        return
    memory = PeakMemory(torch_device if not is_onnx else run_device)
    release_freed_memory()
    loaded_bytes = memory.current_bytes()
    memory.reset()
    for _ in range(cli.warmup):  # one Euler step: allocators, kernels, ONNX arenas
        sample([text_ids], prompt_ids, prompt_features, 1)
    run_seconds: list[float] = []
    audio_seconds = 0.0
    for _ in range(cli.repeats):
        lockstep_wait(cli.lockstep)
        torch.manual_seed(1234)  # the same initial noise in every run and every revision
        synchronize(torch_device)
        start = time.perf_counter()
        (mel,) = sample([text_ids], prompt_ids, prompt_features, cli.num_step)
        if vocode is not None:
            vocode(mel)
        synchronize(torch_device)
        run_seconds.append(time.perf_counter() - start)
        audio_seconds = mel.shape[1] * HOP_LENGTH / SAMPLE_RATE
    if cli.save_output is not None:
        np.save(cli.save_output, np.asarray(mel, dtype=np.float32))
    emit_result(
        {
            "method": method,
            "layout": layout(),
            "device": run_device.type,
            "run_seconds": run_seconds,
            "audio_seconds": audio_seconds,
            "loaded_bytes": loaded_bytes,
            "peak_bytes": memory.peak_bytes(),
            "memory_label": memory.label,
            "whole_process_peak": memory.whole_process,
            "machine": describe_machine(torch_device, threads),
        }
    )


def profile_one_step(sample, text_ids, prompt_ids, prompt_features) -> dict:
    """torch.profiler over a one-step generation (one decoder call, the guidance batch, plus
    the text encoder once): {op: [self CPU ms, calls]} and the total."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(1234)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sample([text_ids], prompt_ids, prompt_features, 1)
    events = prof.key_averages()
    ops = {
        e.key: [e.self_cpu_time_total / 1e3, e.count] for e in events if e.key.startswith("aten::")
    }
    return {"ops": ops, "total_ms": sum(e.self_cpu_time_total for e in events) / 1e3}


def print_profiles(results: list[dict], top: int = 15) -> None:
    """The ops costing most in any revision, self CPU ms per one-step generation."""
    for method in dict.fromkeys(r["method"] for r in results):
        rows_of = [r for r in results if r["method"] == method]
        union: dict[str, float] = {}
        for r in rows_of:
            for op, (ms, _) in r["profile"]["ops"].items():
                union[op] = max(union.get(op, 0.0), ms)
        headers = ["op"] + [f"{r['revision']} ms (calls)" for r in rows_of]
        if len(rows_of) == 2:
            headers.append("ratio")
        rows = []
        for op in sorted(union, key=lambda o: -union[o])[:top]:
            cells = [op]
            values = []
            for r in rows_of:
                ms, calls = r["profile"]["ops"].get(op, [0.0, 0])
                values.append(ms)
                cells.append(f"{ms:.1f} ({calls})")
            if len(rows_of) == 2:
                cells.append(f"{values[0] / values[1]:.2f}" if values[1] else "-")
            rows.append(cells)
        totals = [f"{r['profile']['total_ms']:.1f}" for r in rows_of]
        rows.append(
            ["all ops (total)", *totals]
            + (["%.2f" % (float(totals[0]) / float(totals[1]))] if len(rows_of) == 2 else [])
        )
        print(f"profile of {method}: one Euler step with guidance, top {top} ops by self CPU time")
        print(format_table(headers, rows))


def export_onnx(cli: argparse.Namespace, out_dir: Path) -> float:
    """Export the base model (text encoder, decoder, their int8 versions); returns seconds."""
    export_model = library("export_model")
    model = build_base(cli)
    # Beside the export, not in it: the current runtime refuses files its manifest lacks.
    token_file = out_dir.with_name(out_dir.name + "-tokens_in.txt")
    token_file.write_text(
        "".join(f"{'_' if i == PAD_ID else f't{i}'}\t{i}\n" for i in range(cli.vocab_size)),
        encoding="utf-8",
    )
    start = time.perf_counter()
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # onnxruntime's quantiser advises on the root logger
    try:
        export_model(model, out_dir, token_file, int8=True)
    finally:
        root_logger.setLevel(level)
    return time.perf_counter() - start


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        default="quick",
        choices=list(PRESETS),
        help="quick: 2 steps, 1 s prompt, 2 s out, 3 runs; released: 16 steps, 3 s, 10 s, 3 runs",
    )
    parser.add_argument("--num-step", type=int, default=None, help="Euler steps (preset's)")
    parser.add_argument("--prompt-seconds", type=float, default=None)
    parser.add_argument("--output-seconds", type=float, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed one-step runs first")
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--methods", default=",".join(METHODS), help=", ".join(METHODS))
    parser.add_argument("--lora-preset", default="attention", help="adapter targets")
    parser.add_argument("--rank", type=int, default=32, help="adapter rank (alpha = 2 * rank)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch/ORT threads (0: torch's)")
    parser.add_argument("--vocoder", action="store_true", help="include a Vocos decode")
    parser.add_argument("--model-config", type=Path, default=None, help="default: released")
    parser.add_argument("--vocab-size", type=int, default=RELEASED_VOCAB_SIZE)
    add_side_by_side_arguments(parser)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing: torch.profiler's top ops for one Euler step per method",
    )
    parser.add_argument("--onnx-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save-output", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    cli = build_parser().parse_args()
    num_step, prompt_s, output_s, repeats = PRESETS[cli.preset]
    cli.num_step = cli.num_step if cli.num_step is not None else num_step
    cli.prompt_seconds = cli.prompt_seconds if cli.prompt_seconds is not None else prompt_s
    cli.output_seconds = cli.output_seconds if cli.output_seconds is not None else output_s
    cli.repeats = cli.repeats if cli.repeats is not None else repeats
    if cli.num_step < 1 or cli.repeats < 1 or cli.warmup < 0 or cli.rounds < 1:
        raise SystemExit("--num-step, --repeats and --rounds must be >= 1, --warmup >= 0")
    if cli.prompt_seconds <= 0 or cli.output_seconds <= 0:
        raise SystemExit("--prompt-seconds and --output-seconds must be positive")
    if cli.worker is not None:
        worker(cli)
        return

    methods = [m.strip() for m in cli.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    device = resolve_device(cli.device)
    _, config_source = released_model_config(cli.model_config)
    forwarded = [
        f"--num-step={cli.num_step}",
        f"--prompt-seconds={cli.prompt_seconds}",
        f"--output-seconds={cli.output_seconds}",
        f"--repeats={cli.repeats}",
        f"--warmup={cli.warmup}",
        f"--guidance-scale={cli.guidance_scale}",
        f"--lora-preset={cli.lora_preset}",
        f"--rank={cli.rank}",
        f"--device={device.type}",
        f"--threads={cli.threads}",
        f"--vocab-size={cli.vocab_size}",
    ]
    if cli.vocoder:
        forwarded.append("--vocoder")
    if cli.model_config is not None:
        forwarded.append(f"--model-config={cli.model_config}")

    with tempfile.TemporaryDirectory(prefix="zipvoice-bench-") as tmp:
        revisions = {"current": CHECKOUT}
        if cli.baseline is not None:
            revisions[cli.baseline] = Path(tmp) / "baseline"
            export_revision(cli.baseline, revisions[cli.baseline])
        if cli.profile:
            methods = [m for m in methods if not m.startswith("onnx")]
            forwarded.append("--profile")
        results = run_all(cli, methods, forwarded, revisions, Path(tmp))
        int8_losses = quantisation_losses(results)  # while the saved outputs exist
    if cli.profile:
        print(f"{config_source}; {cli.prompt_seconds:g} s prompt + {cli.output_seconds:g} s")
        print_profiles(results)
        return
    print(
        f"inference: {config_source}, random weights; {cli.num_step} steps, guidance "
        f"{cli.guidance_scale}, t_shift {T_SHIFT}, {cli.prompt_seconds:g} s prompt -> "
        f"{results[0]['audio_seconds']:.2f} s of audio; median of {cli.repeats} run(s) x "
        f"{cli.rounds} process(es) after {cli.warmup} one-step warm-up; vocoder "
        f"{'included' if cli.vocoder else 'not included'}"
    )
    print(
        f"{results[0]['machine']}; adapters rank {cli.rank} alpha {2 * cli.rank} on "
        f"{cli.lora_preset}; memory: {results[0]['memory_label']} while generating "
        f"(ONNX rows: peak RSS); load average at the start {os.getloadavg()[0]:.2f}; "
        + describe_layouts(results)
    )
    for revision, seconds in results[0]["export_seconds"].items():
        print(f"ONNX export (fp32 + int8, {revision}) took {seconds:.1f} s, not in the table")
    print_table(results, cli.baseline)
    for revision, (mean_diff, mean_level, max_diff) in int8_losses.items():
        print(
            f"onnx-int8 against onnx-fp32 ({revision}, the same initial noise): mean |mel "
            f"difference| {mean_diff:.4f} against a mean |mel| of {mean_level:.4f} "
            f"({100 * mean_diff / mean_level:.2f} %), largest {max_diff:.3f}"
        )


def quantisation_losses(results: list[dict]) -> dict[str, tuple[float, float, float]]:
    """Per revision with both ONNX rows: what int8 quantisation changes in the features,
    (mean |int8 - fp32|, mean |fp32|, max |int8 - fp32|). Both ONNX rows draw their noise
    from the same seeded generator, so the difference is the quantisation's alone."""
    by_key = {(r["method"], r["revision"]): r for r in results}
    losses = {}
    for (method, revision), result in by_key.items():
        fp32 = by_key.get(("onnx-fp32", revision))
        if method != "onnx-int8" or fp32 is None:
            continue
        int8_mel, fp32_mel = np.load(result["output"]), np.load(fp32["output"])
        if int8_mel.shape != fp32_mel.shape:
            continue
        difference = np.abs(int8_mel.astype(np.float64) - fp32_mel)
        losses[revision] = (
            float(difference.mean()),
            float(np.abs(fp32_mel).mean()),
            float(difference.max()),
        )
    return losses


def run_all(
    cli: argparse.Namespace,
    methods: list[str],
    forwarded: list[str],
    revisions: dict[str, Path],
    tmp: Path,
) -> list[dict]:
    """Every method under every revision, revisions interleaved (ABBA over --rounds); the
    runs of one (method, revision) are pooled. Each result carries its revision and the
    largest |difference| of its output from the baseline's."""
    export_seconds: dict[str, float] = {}
    onnx_dirs = {}
    for label, root in revisions.items():
        onnx_dirs[label] = tmp / f"onnx-{len(onnx_dirs)}"
        if any(m.startswith("onnx") for m in methods):
            print(f"exporting ONNX ({label}) ...", file=sys.stderr, flush=True)
            argv = [*forwarded, "--worker=export", f"--onnx-dir={onnx_dirs[label]}"]
            onnx_dirs[label].mkdir()
            export_seconds[label] = run_worker(Path(__file__), argv, "export", root)[
                "export_seconds"
            ]
    results = []
    for method in methods:
        pooled: dict[str, dict] = {}
        lockstep = len(revisions) > 1 and not cli.profile
        for round_index in range(cli.rounds if len(revisions) > 1 else 1):
            outputs = {
                label: tmp / f"{method}-{i}-{round_index}.npy" for i, label in enumerate(revisions)
            }
            if lockstep:  # both revisions loaded at once, their runs taken in turn
                print(f"running {method} ...", file=sys.stderr, flush=True)
                round_results = run_lockstep(
                    Path(__file__),
                    [*forwarded, f"--worker={method}"],
                    revisions,
                    cli.repeats,
                    method,
                    per_tree_argv={
                        label: [f"--onnx-dir={onnx_dirs[label]}", f"--save-output={outputs[label]}"]
                        for label in revisions
                    },
                )
            else:
                round_results = {}
                for label in revisions:
                    print(f"running {method} ({label}) ...", file=sys.stderr, flush=True)
                    argv = [
                        *forwarded,
                        f"--worker={method}",
                        f"--onnx-dir={onnx_dirs[label]}",
                        f"--save-output={outputs[label]}",
                    ]
                    round_results[label] = run_worker(
                        Path(__file__), argv, f"{method} ({label})", revisions[label]
                    )
            for label, result in round_results.items():
                output = outputs[label]
                if "profile" in result:
                    pooled[label] = dict(result, revision=label, output=None)
                elif label in pooled:
                    pooled[label]["run_seconds"] += result["run_seconds"]
                    pooled[label]["peak_bytes"] = max(
                        pooled[label]["peak_bytes"], result["peak_bytes"]
                    )
                else:
                    pooled[label] = dict(result, revision=label, output=output)
        pooled = {label: pooled[label] for label in revisions if label in pooled}
        for result in pooled.values():
            base = pooled.get(cli.baseline) if cli.baseline is not None else None
            has_outputs = base is not None and base["output"] is not None
            result["max_diff"] = (
                max_abs_difference(result["output"], base["output"]) if has_outputs else None
            )
            result["output"] = str(result["output"])
            results.append(dict(result, export_seconds=export_seconds))
    return results


def print_table(results: list[dict], baseline: str | None) -> None:
    """One row per (method, revision): time and memory, ratios to the same revision's base
    model and, with a baseline, to the same method under the baseline."""
    by_key = {(r["method"], r["revision"]): r for r in results}
    headers = ["method", "revision", "device", "median s", "best s", "RTF", "time ratio"]
    if baseline is not None:
        headers += ["vs baseline", "max |diff|"]
    headers += ["loaded MiB", "peak MiB", "peak ratio"]
    rows = []
    for r in results:
        seconds = min(r["run_seconds"])
        reference = by_key.get(("base", r["revision"]), r)
        ref_seconds = min(reference["run_seconds"])
        row = [
            r["method"],
            r["revision"],
            r["device"],
            f"{median(r['run_seconds']):.3f}",
            f"{seconds:.3f}",
            f"{seconds / r['audio_seconds']:.3f}",
            f"{seconds / ref_seconds:.2f}",
        ]
        if baseline is not None:
            base = by_key.get((r["method"], baseline))
            row.append(f"{seconds / min(base['run_seconds']):.2f}" if base else "-")
            row.append("-" if r["max_diff"] is None else f"{r['max_diff']:.1e}")
        same_meter = r["device"] == reference["device"]
        row += [
            f"{r['loaded_bytes'] / MIB:.0f}",
            f"{r['peak_bytes'] / MIB:.0f}",
            f"{r['peak_bytes'] / reference['peak_bytes']:.2f}" if same_meter else "-",
        ]
        rows.append(row)
    print(format_table(headers, rows))
    print(
        "RTF and ratios from the best run (the least disturbed by other load); time ratio / "
        "peak ratio: to base under the same revision"
    )


if __name__ == "__main__":
    main()
