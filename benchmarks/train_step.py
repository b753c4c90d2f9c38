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
  clipping; the averaged copy then holds only those trainable weights;
- <method>+replay: the trainer's objective for batches with replay cuts
  (`zipvoice.training.distillation.ForgettingObjective`, every other cut marked replay): the
  same forward plus per-domain loss bookkeeping;
- <method>+kd: that objective with distillation (`--kd-weight 1`): a teacher forward with the
  start weights before the student's (for full fine-tuning the teacher is a copy of every
  trainable weight). These rows need a revision that has zipvoice.training.distillation.

`vs plain` compares a +replay/+kd row with the same method without it, in the same run.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    AUTOCAST_DTYPES,
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
    median,
    release_freed_memory,
    released_model_config,
    resolve_device,
    run_lockstep,
    run_worker,
    synchronize,
)
from _layout import (  # noqa: E402
    describe_layouts,
    layout,
    library,
    setting,
    training_config,
    tree_has,
)

PRESET_NAMES = ("attention", "attention_ff_conv", "all_linear")
DEFAULT_METHODS = (
    ("full",)
    + tuple(f"{kind}:{preset}" for preset in PRESET_NAMES for kind in ("lora", "dora"))
    + ("lora:attention+replay", "lora:attention+kd", "full+kd")
)
OBJECTIVES = ("replay", "kd")
OBJECTIVE_MODULE = "zipvoice.training.distillation"  # what +replay / +kd rows need
PAD_ID = 0


def split_objective(method: str) -> tuple[str, str | None]:
    """ "lora:attention+kd" -> ("lora:attention", "kd")."""
    base, _, objective = method.partition("+")
    if objective and objective not in OBJECTIVES:
        raise SystemExit(f"--methods: {method!r}: +{objective} is not +replay or +kd")
    return base, objective or None


def parse_method(method: str) -> tuple[bool, bool, str]:
    """ "full" | "lora:<preset>" | "dora:<preset>" (+replay|+kd) -> (use_lora, use_dora,
    preset)."""
    method, _ = split_objective(method)
    if method == "full":
        return False, False, "attention"
    kind, _, preset = method.partition(":")
    if kind not in ("lora", "dora") or not preset:
        raise SystemExit(f"--methods: {method!r} is not full, lora:<preset> or dora:<preset>")
    return True, kind == "dora", preset


def trainer_config(method: str, checkpoint: Path, cli: argparse.Namespace) -> Any:
    """The training command's configuration for this method (its defaults elsewhere), in
    this revision's form (see _layout.training_config)."""
    use_lora, use_dora, preset = parse_method(method)
    return training_config(
        {
            "checkpoint": str(checkpoint),
            "finetune": True,
            "num_iters": cli.warmup + cli.steps,
            "use_lora": use_lora,
            "use_dora": use_dora,
            "lora_target_modules": preset,
            "lora_rank": cli.rank,
            "lora_alpha": 2 * cli.rank,
            "lora_dropout": cli.lora_dropout if use_lora else None,
            "use_fp16": cli.dtype == "fp16",
            # The documented adapter learning rate; full training keeps ScaledAdam's default.
            "base_lr": 0.001 if use_lora else None,
        }
    )


def synthetic_batch(cli: argparse.Namespace, feat_dim: int, device: torch.device):
    Batch = library("Batch")  # noqa: N806
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.randint(1, cli.vocab_size, (cli.batch_size, cli.tokens), generator=generator)
    # Scaled fbank features (the trainer multiplies by --feat-scale 0.1) of equal length.
    features = torch.randn(cli.batch_size, cli.frames, feat_dim, generator=generator)
    lens = torch.full((cli.batch_size,), cli.frames, dtype=torch.int64)
    batch = Batch(tokens.tolist(), features.to(device), lens.to(device), [])
    if split_objective(cli.worker)[1] is not None:
        batch.replay = (torch.arange(cli.batch_size) % 2 == 0).to(device)
    return batch


def objective_for(method: str, model: torch.nn.Module):
    """None (the trainer's plain flow_matching_loss), or its replay/distillation objective."""
    _, objective = split_objective(method)
    if objective is None:
        return None
    ForgettingObjective = library("ForgettingObjective")  # noqa: N806
    start_weights = library("start_weights")
    if objective == "replay":
        return ForgettingObjective(0.0, "replay", None)
    return ForgettingObjective(1.0, "replay", start_weights(model))


def trainer_step(
    model: torch.nn.Module, training: Any, cli: argparse.Namespace, device: torch.device
) -> tuple[Callable[[Any, int], torch.Tensor], str]:
    """(step(batch, index) -> loss, optimizer kind): what the revision's trainer does per
    batch (schedules, forward under autocast, backward, clipping, optimizer step,
    zero_grad), with that revision's own functions and settings."""
    adjusted_batch_count = library("adjusted_batch_count")
    set_batch_count = library("set_batch_count")
    flow_matching_loss = library("flow_matching_loss")
    backward_and_step = library("backward_and_step")
    optimizer, scheduler, optimizer_kind = library("build_optimizer")(model, training)
    max_duration, ref_duration = (setting(training, k) for k in ("max_duration", "ref_duration"))
    drop_ratio, grad_clip = (setting(training, k) for k in ("condition_drop_ratio", "grad_clip"))
    finetune_offset = 100000 if setting(training, "finetune") else 0
    autocast_dtype = AUTOCAST_DTYPES[cli.dtype]
    scaler = torch.amp.GradScaler("cuda", enabled=cli.dtype == "fp16" and device.type == "cuda")
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    objective = objective_for(cli.worker, model)

    def step(batch: Any, index: int) -> torch.Tensor:
        count = adjusted_batch_count(index, max_duration, 1, ref_duration)
        set_batch_count(model, count + finetune_offset)
        scheduler.step_batch(index)
        with torch.autocast(
            device_type=device.type,
            dtype=autocast_dtype or torch.float32,
            enabled=autocast_dtype is not None,
        ):
            if objective is None:
                loss = flow_matching_loss(model, batch, condition_drop_ratio=drop_ratio)
            else:
                loss, _ = objective(model, batch, drop_ratio)
        backward_and_step(loss, scaler, optimizer, optimizer_kind, trainable_params, grad_clip)
        return loss

    return step, optimizer_kind


def trainer_keeps_freed_memory() -> bool:
    """Whether this revision's trainer keeps freed memory for reuse before training (later
    revisions than e2c5dcb; older ones, some with the allocator module, ran without it)."""
    import zipvoice

    trainer = Path(zipvoice.__file__).parent / "training" / "trainer.py"
    return trainer.is_file() and "keep_freed_memory()" in trainer.read_text()


def worker(cli: argparse.Namespace) -> None:
    """One method in this process: set up as the trainer does, run steps, report."""
    check_code_root(cli.code_root)
    from zipvoice.models.modules.lora_utils import count_parameters

    device = resolve_device(cli.device)
    if cli.threads:
        torch.set_num_threads(cli.threads)
    if trainer_keeps_freed_memory():
        library("keep_freed_memory")()
    torch.manual_seed(0)
    random.seed(0)  # layer skipping and the shapers draw from Python's generator
    config, _ = released_model_config(cli.model_config)
    training = trainer_config(cli.worker, cli.checkpoint, cli)
    model = library("setup_model")(training, cli.vocab_size, PAD_ID, config).model
    trainable, total = count_parameters(model)
    # The trainer's running average of the trainable weights: float64, on the CPU.
    model_avg = {
        n: p.detach().to("cpu", torch.float64).clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    model.to(device).train()
    step, optimizer_kind = trainer_step(model, training, cli, device)
    batch = synthetic_batch(cli, int(model.feat_dim), device)

    memory = PeakMemory(device)
    release_freed_memory()
    before_bytes = memory.current_bytes()
    memory.reset()
    step_seconds: list[float] = []
    losses: list[float] = []
    for index in range(cli.warmup + cli.steps):
        if index >= cli.warmup:
            lockstep_wait(cli.lockstep)
        synchronize(device)
        start = time.perf_counter()
        loss = step(batch, index)
        synchronize(device)
        if index >= cli.warmup:
            step_seconds.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    peak_bytes = memory.peak_bytes()

    period = setting(training, "average_period")
    start = time.perf_counter()
    library("update_average")(model_avg, model, period, period)
    synchronize(device)
    average_seconds = time.perf_counter() - start

    emit_result(
        {
            "method": cli.worker,
            "layout": layout(),
            "optimizer": optimizer_kind,
            "trainable": trainable,
            "total": total,
            "step_seconds": step_seconds,
            "average_seconds": average_seconds,
            "average_period": period,
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


def build_parser() -> argparse.ArgumentParser:
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
        help="comma-separated: full, lora:<preset>, dora:<preset>, each optionally +replay or "
        "+kd (presets: " + ", ".join(PRESET_NAMES) + ")",
    )
    parser.add_argument("--rank", type=int, default=32, help="adapter rank (alpha = 2 * rank)")
    parser.add_argument(
        "--lora-dropout",
        type=float,
        default=None,
        help="adapter dropout (default: the training command's). With 0, PEFT's DoRA reuses "
        "the base layer's output instead of recomputing it on the dropped-out input",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own)")
    parser.add_argument("--model-config", type=Path, default=None, help="default: released")
    parser.add_argument("--vocab-size", type=int, default=RELEASED_VOCAB_SIZE)
    add_side_by_side_arguments(parser)
    parser.add_argument("--checkpoint", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    cli = build_parser().parse_args()
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
        *([f"--lora-dropout={cli.lora_dropout}"] if cli.lora_dropout is not None else []),
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
        + ("" if cli.lora_dropout is None else f"adapter dropout {cli.lora_dropout}, ")
        + f"median of {cli.steps} steps x {cli.rounds} process(es) after {cli.warmup} warm-up; "
        f"{results[0]['machine']}; load average at the start {os.getloadavg()[0]:.2f}"
    )
    print(
        f"memory: {results[0]['memory_label']} during the steps"
        + (" (whole process: reset refused)" if results[0]["whole_process_peak"] else "")
        + f"; {describe_layouts(results)}"
    )
    print_table(results, cli.baseline)
    print(
        f"avg-model update: the float64 running average, once every "
        f"{reference['average_period']} steps (not in step s)"
    )


def revisions_for(method: str, revisions: dict[str, Path]) -> dict[str, Path]:
    """The revisions that can run ``method``: a +replay / +kd row needs OBJECTIVE_MODULE, and
    a revision that predates it (e.g. a --baseline) is skipped with a note."""
    if split_objective(method)[1] is None:
        return revisions
    kept = {label: root for label, root in revisions.items() if tree_has(root, OBJECTIVE_MODULE)}
    for label in revisions:
        if label not in kept:
            print(f"note: {method} not run for {label}: that revision has no {OBJECTIVE_MODULE}")
    return kept


def run_all(
    cli: argparse.Namespace, methods: list[str], argv: list[str], revisions: dict[str, Path]
) -> list[dict]:
    """Every method under every revision. With a baseline the two revisions' workers run at
    once and take their timed steps in turn (run_lockstep), over --rounds pairs of
    processes; the steps of one (method, revision) are pooled, the peak is the largest."""
    results = []
    for method in methods:
        pooled: dict[str, dict] = {}
        runs_on = revisions_for(method, revisions)
        rounds = cli.rounds if len(runs_on) > 1 else len(runs_on)  # one process, or none
        for _ in range(rounds):
            print(f"running {method} ...", file=sys.stderr, flush=True)
            worker_argv = [*argv, f"--worker={method}"]
            if len(runs_on) > 1:
                round_results = run_lockstep(
                    Path(__file__), worker_argv, runs_on, cli.steps, method
                )
            else:
                ((label, root),) = runs_on.items()
                round_results = {label: run_worker(Path(__file__), worker_argv, method, root)}
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
    headers += ["vs plain: step", "vs plain: peak"]
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
        # A +replay/+kd row against the same method without it, same revision.
        plain = by_key.get((split_objective(r["method"])[0], r["revision"]))
        if plain is None or plain is r:
            row += ["-", "-"]
        else:
            row += [
                ratio(step, min(plain["step_seconds"])),
                ratio(r["peak_bytes"], plain["peak_bytes"]),
            ]
        rows.append(row)
    print(format_table(headers, rows))
    print(
        "ratios from the best step (the least disturbed by other load); step ratio / peak "
        "ratio: to full fine-tuning under the same revision"
    )


if __name__ == "__main__":
    main()
