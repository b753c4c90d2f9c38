"""Training-step cost of full fine-tuning against LoRA/DoRA adapters, side by side.

    .venv/bin/python benchmarks/train_step.py                 # CPU, a few minutes on 2 cores
    .venv/bin/python benchmarks/train_step.py --device cuda --dtype fp16 \\
        --batch-size 8 --frames 1000 --tokens 150 --steps 20 --warmup 3   # a GPU

The model is the released configuration with random weights (cost does not depend on the
values), set up by the trainer's own functions (`zipvoice.training.model_setup.setup_model`,
`zipvoice.training.optimizer.build_optimizer`) from a temporary checkpoint, and trained on
one fixed synthetic batch. Each method runs in a fresh process:

- full: every parameter trains with ScaledAdam + Eden, as upstream fine-tunes, and the trainer
  keeps its float64 averaged copy of the trainable weights (`model_avg`) on the CPU;
- lora:<preset> / dora:<preset>: rank 32, alpha 64 adapters on the decoder's <preset> targets,
  with the embedding and text encoder training too (the trainer's defaults), AdamW + gradient
  clipping; the averaged copy then holds only those trainable weights.

A step is what the trainer does per batch: schedules, forward, backward, (clipping), optimizer
step, zero_grad. The averaged-model update runs once every --average-period steps (200), so it
is timed once on its own and reported separately. Ratios are to full fine-tuning in the same
run. Memory is the peak during the steps (see _common.PeakMemory): on CPU the whole process's
resident set, weights and the averaged copy included.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from zipvoice.training.config import TrainingConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    AUTOCAST_DTYPES,
    CHECKOUT,
    MIB,
    RELEASED_VOCAB_SIZE,
    PeakMemory,
    check_code_root,
    describe_machine,
    emit_result,
    export_revision,
    format_table,
    import_first,
    lockstep_wait,
    median,
    release_freed_memory,
    released_model_config,
    resolve_device,
    run_lockstep,
    run_worker,
    synchronize,
)

PRESET_NAMES = ("attention", "attention_ff_conv", "all_linear")
DEFAULT_METHODS = ("full",) + tuple(
    f"{kind}:{preset}" for preset in PRESET_NAMES for kind in ("lora", "dora")
)
PAD_ID = 0
TRAINER_MODULES = ("zipvoice.utils.trainer", "zipvoice.training.trainer", "zipvoice.training")


def parse_method(method: str) -> tuple[bool, bool, str]:
    """ "full" | "lora:<preset>" | "dora:<preset>" -> (use_lora, use_dora, preset)."""
    if method == "full":
        return False, False, "attention"
    kind, _, preset = method.partition(":")
    if kind not in ("lora", "dora") or not preset:
        raise SystemExit(f"--methods: {method!r} is not full, lora:<preset> or dora:<preset>")
    return True, kind == "dora", preset


def trainer_args(method: str, checkpoint: Path, cli: argparse.Namespace) -> argparse.Namespace:
    """The training command's own parsed flags for this method (its defaults elsewhere)."""
    get_parser = import_first("get_parser", "zipvoice.bin.train_zipvoice")
    use_lora, use_dora, preset = parse_method(method)
    return TrainingConfig().replace(
        checkpoint=str(checkpoint),
        finetune=True,
        num_iters=cli.warmup + cli.steps,
        use_lora=use_lora,
        use_dora=use_dora,
        lora_target_modules=preset,
        lora_rank=cli.rank,
        lora_alpha=2 * cli.rank,
        use_fp16=cli.dtype == "fp16",
        # The documented adapter learning rate; full training keeps ScaledAdam's default.
        base_lr=0.001 if use_lora else None,
    )


def synthetic_batch(cli: argparse.Namespace, feat_dim: int, device: torch.device):
    Batch = import_first("Batch", *TRAINER_MODULES)  # noqa: N806
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.randint(1, cli.vocab_size, (cli.batch_size, cli.tokens), generator=generator)
    # Scaled fbank features (the trainer multiplies by --feat-scale 0.1) of equal length.
    features = torch.randn(cli.batch_size, cli.frames, feat_dim, generator=generator)
    lens = torch.full((cli.batch_size,), cli.frames, dtype=torch.int64)
    return Batch(tokens.tolist(), features.to(device), lens.to(device), [])


def worker(cli: argparse.Namespace) -> None:
    """One method in this process: set up as the trainer does, run steps, report."""
    check_code_root(cli.code_root)
    count_parameters = import_first("count_parameters", "zipvoice.models.modules.lora_utils")
    names = (
        "_update_average",
        "adjusted_batch_count",
        "backward_and_step",
        "build_optimizer",
        "flow_matching_loss",
        "set_batch_count",
        "setup_model",
    )
    (
        _update_average,
        adjusted_batch_count,
        backward_and_step,
        flow_matching_loss,
        set_batch_count,
        setup_model,
    ) = (import_first(name, *TRAINER_MODULES) for name in names)

    device = resolve_device(cli.device)
    if cli.threads:
        torch.set_num_threads(cli.threads)
    torch.manual_seed(0)
    random.seed(0)  # layer skipping and the shapers draw from Python's generator
    config, _ = released_model_config(cli.model_config)
    training = trainer_config(cli.worker, cli.checkpoint, cli)
    setup = setup_model(training, cli.vocab_size, PAD_ID, config)
    model = setup.model
    trainable, total = count_parameters(model)
    # The trainer's running average of the trainable weights: float64, on the CPU.
    model_avg = {
        n: p.detach().to("cpu", torch.float64).clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    model.to(device).train()
    optimizer, scheduler, optimizer_kind = build_optimizer(model, training)
    autocast_dtype = AUTOCAST_DTYPES[cli.dtype]
    use_scaler = cli.dtype == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    batch = synthetic_batch(cli, int(model.feat_dim), device)

    memory = PeakMemory(device)
    release_freed_memory()
    before_bytes = memory.current_bytes()
    memory.reset()
    step_seconds: list[float] = []
    losses: list[float] = []
    for step in range(cli.warmup + cli.steps):
        if step >= cli.warmup:
            lockstep_wait(cli.lockstep)
        synchronize(device)
        start = time.perf_counter()
        count = adjusted_batch_count(
            step, training.data.max_duration, 1, training.model.ref_duration
        )
        set_batch_count(model, count + 100000)  # --finetune 1
        scheduler.step_batch(step)
        with torch.autocast(
            device_type=device.type,
            dtype=autocast_dtype or torch.float32,
            enabled=autocast_dtype is not None,
        ):
            loss = flow_matching_loss(
                model, batch, condition_drop_ratio=training.model.condition_drop_ratio
            )
        backward_and_step(
            loss, scaler, optimizer, optimizer_kind, trainable_params, training.optim.grad_clip
        )
        synchronize(device)
        if step >= cli.warmup:
            step_seconds.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    peak_bytes = memory.peak_bytes()

    start = time.perf_counter()
    update_average(model_avg, model, training.optim.average_period, training.optim.average_period)
    synchronize(device)
    average_seconds = time.perf_counter() - start

    emit_result(
        {
            "method": cli.worker,
            "optimizer": optimizer_kind,
            "trainable": trainable,
            "total": total,
            "step_seconds": step_seconds,
            "average_seconds": average_seconds,
            "average_period": training.optim.average_period,
            "before_bytes": before_bytes,
            "peak_bytes": peak_bytes,
            "whole_process_peak": memory.whole_process,
            "memory_label": memory.label,
            "losses": losses,
            "machine": describe_machine(device, torch.get_num_threads()),
        }
    )


def write_random_checkpoint(path: Path, config: dict, vocab_size: int) -> None:
    from zipvoice.models.loader import build_model
    from zipvoice.utils.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model(config, vocab_size, PAD_ID)
    save_checkpoint({"model": model.state_dict()}, path)


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}" if reference else "-"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--frames", type=int, default=200, help="feature frames per utterance")
    parser.add_argument("--tokens", type=int, default=40, help="tokens per utterance")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=list(AUTOCAST_DTYPES))
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated: full, lora:<preset>, dora:<preset> (presets: "
        + ", ".join(PRESET_NAMES)
        + ")",
    )
    parser.add_argument("--rank", type=int, default=32, help="adapter rank (alpha = 2 * rank)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own)")
    parser.add_argument("--model-config", type=Path, default=None, help="default: released")
    parser.add_argument("--vocab-size", type=int, default=RELEASED_VOCAB_SIZE)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="REF",
        help="also run git revision REF's code side by side (interleaved) and print ratios",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="with --baseline: worker processes per revision"
    )
    parser.add_argument("--checkpoint", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--code-root", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lockstep", action="store_true", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    for name in ("batch_size", "frames", "tokens", "steps", "rank", "rounds"):
        if getattr(cli, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if cli.warmup < 0:
        raise SystemExit("--warmup must be >= 0")
    if cli.worker is not None:
        worker(cli)
        return

    methods = [m.strip() for m in cli.methods.split(",") if m.strip()]
    for method in methods:
        parse_method(method)
    device = resolve_device(cli.device)
    config, config_source = released_model_config(cli.model_config)
    forwarded = [
        f"--batch-size={cli.batch_size}",
        f"--frames={cli.frames}",
        f"--tokens={cli.tokens}",
        f"--steps={cli.steps}",
        f"--warmup={cli.warmup}",
        f"--device={device.type}",
        f"--dtype={cli.dtype}",
        f"--rank={cli.rank}",
        f"--threads={cli.threads}",
        f"--vocab-size={cli.vocab_size}",
    ]
    if cli.model_config is not None:
        forwarded.append(f"--model-config={cli.model_config}")

    with tempfile.TemporaryDirectory(prefix="zipvoice-bench-") as tmp:
        checkpoint = Path(tmp) / "model.pt"
        write_random_checkpoint(checkpoint, config, cli.vocab_size)
        revisions = {"current": CHECKOUT}
        if cli.baseline is not None:
            revisions[cli.baseline] = Path(tmp) / "baseline"
            export_revision(cli.baseline, revisions[cli.baseline])
        argv = [*forwarded, f"--checkpoint={checkpoint}"]
        results = run_all(cli, methods, argv, revisions)

    reference = next((r for r in results if r["method"] == "full"), results[0])
    print(
        f"train step: {config_source}, {reference['total']:,} parameters, batch "
        f"{cli.batch_size} x {cli.frames} frames x {cli.tokens} tokens, {cli.dtype}, "
        f"median of {cli.steps} steps x {cli.rounds} process(es) after {cli.warmup} warm-up; "
        f"{results[0]['machine']}; load average at the start {os.getloadavg()[0]:.2f}"
    )
    print(
        f"memory: {results[0]['memory_label']} during the steps"
        + (" (whole process: reset refused)" if results[0]["whole_process_peak"] else "")
    )
    print_table(results, cli.baseline)
    print(
        f"avg-model update: the float64 running average, once every "
        f"{reference['average_period']} steps (not in step s)"
    )


def run_all(
    cli: argparse.Namespace, methods: list[str], argv: list[str], revisions: dict[str, Path]
) -> list[dict]:
    """Every method under every revision. With a baseline the two revisions' workers run at
    once and take their timed steps in turn (run_lockstep), over --rounds pairs of
    processes; the steps of one (method, revision) are pooled, the peak is the largest."""
    results = []
    for method in methods:
        pooled: dict[str, dict] = {}
        for _ in range(cli.rounds if len(revisions) > 1 else 1):
            print(f"running {method} ...", file=sys.stderr, flush=True)
            worker_argv = [*argv, f"--worker={method}"]
            if len(revisions) > 1:
                round_results = run_lockstep(
                    Path(__file__), worker_argv, revisions, cli.steps, method
                )
            else:
                (label,) = revisions
                round_results = {label: run_worker(Path(__file__), worker_argv, method)}
            for label, result in round_results.items():
                if label in pooled:
                    pooled[label]["step_seconds"] += result["step_seconds"]
                    pooled[label]["peak_bytes"] = max(
                        pooled[label]["peak_bytes"], result["peak_bytes"]
                    )
                else:
                    pooled[label] = dict(result, revision=label)
        results.extend(pooled[label] for label in revisions if label in pooled)
    return results


def print_table(results: list[dict], baseline: str | None) -> None:
    """One row per (method, revision); ratios to full fine-tuning under the same revision
    and, with a baseline, to the same method under the baseline (steps and peak memory, and
    the largest difference of the per-step losses, which share their random draws)."""
    by_key = {(r["method"], r["revision"]): r for r in results}
    headers = ["method", "revision", "optimizer", "trainable params", "% trainable"]
    headers += ["median s", "best s"]
    headers += ["step ratio"]
    if baseline is not None:
        headers += ["vs baseline", "peak vs baseline", "max |loss diff|"]
    headers += ["avg-model update s", "before MiB", "peak MiB", "peak ratio"]
    rows = []
    for r in results:
        step = min(r["step_seconds"])
        reference = by_key.get(("full", r["revision"]), r)
        row = [
            r["method"],
            r["revision"],
            r["optimizer"],
            f"{r['trainable']:,}",
            f"{100 * r['trainable'] / r['total']:.2f}",
            f"{median(r['step_seconds']):.3f}",
            f"{step:.3f}",
            ratio(step, min(reference["step_seconds"])),
        ]
        if baseline is not None:
            base = by_key.get((r["method"], baseline))
            if base is None:
                row += ["-", "-", "-"]
            else:
                diffs = [abs(a - b) for a, b in zip(r["losses"], base["losses"], strict=False)]
                row += [
                    ratio(step, min(base["step_seconds"])),
                    ratio(r["peak_bytes"], base["peak_bytes"]),
                    f"{max(diffs, default=0.0):.1e}",
                ]
        row += [
            f"{r['average_seconds']:.3f}",
            f"{r['before_bytes'] / MIB:.0f}",
            f"{r['peak_bytes'] / MIB:.0f}",
            ratio(r["peak_bytes"], reference["peak_bytes"]),
        ]
        rows.append(row)
    print(format_table(headers, rows))
    print(
        "ratios from the best step (the least disturbed by other load); step ratio / peak "
        "ratio: to full fine-tuning under the same revision"
    )


if __name__ == "__main__":
    main()
