"""Cost of time-gated adapters (--lora-t-range) against the merged sampler, side by side.

    .venv/bin/python benchmarks/time_gate.py                 # PyTorch rows, a few minutes
    .venv/bin/python benchmarks/time_gate.py --onnx          # + ONNX rows and int8 distance
    .venv/bin/python benchmarks/time_gate.py --device cuda --num-step 16 --seconds 10

The model is the released configuration with random weights and a DoRA adapter (rank 32,
`attention`, random non-zero B and magnitudes) merged in. One process, one model: `merged`
samples with no gate attached; `gated` attaches a `TimeGate` over the same modules with the
range 0,0.5 (half the steps on each weight set: two swaps per sampling, the most a single
range costs). The runs alternate merged, gated, merged, ... so load changes hit both alike;
the table gives medians. On a loaded machine whole runs vary by 10 % or more, so the row
`gate work alone` times what the gate adds (two swaps, one hook call per step) on its own,
and its ratio is (merged + that) / merged. With --onnx the same merged model is exported
twice (plain, and time-gated with fm_decoder_base.onnx) and run on ONNX Runtime the same
way; the int8 copies of the gated export are run too, and the mean absolute distance of their
mel features to the fp32 ones is printed (same noise).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RELEASED_VOCAB_SIZE,
    describe_machine,
    format_table,
    median,
    released_model_config,
    resolve_device,
    synchronize,
)

T_RANGE = (0.0, 0.5)
FRAMES_PER_SECOND = 24000 / 256
TOKENS_PER_SECOND = 12


def build_merged(cli: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The released-size model with a merged random DoRA adapter, and its base weights."""
    from zipvoice.models.loader import build_model
    from zipvoice.models.modules.lora_utils import (
        apply_lora_to_model,
        create_lora_config,
        get_lora_target_modules,
        merge_lora_weights,
    )

    config, _ = released_model_config(None)
    torch.manual_seed(0)
    model = build_model(config, RELEASED_VOCAB_SIZE, 0).eval()
    targets = get_lora_target_modules(model, "attention")
    apply_lora_to_model(model, create_lora_config(32, 64, 0.0, True, targets))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
            elif "lora_magnitude_vector" in name:
                param.mul_(1.05)
    base: dict[str, torch.Tensor] = {}
    merge_lora_weights(model, base_weights=base)
    return model.eval(), base


def case(cli: argparse.Namespace) -> tuple[list[int], list[int], np.ndarray]:
    prompt_frames = int(cli.prompt_seconds * FRAMES_PER_SECOND)
    prompt_tokens = list(range(1, int(cli.prompt_seconds * TOKENS_PER_SECOND) + 1))
    tokens = list(range(1, int(cli.seconds * TOKENS_PER_SECOND) + 1))
    rng = np.random.default_rng(0)
    return tokens, prompt_tokens, (rng.standard_normal((prompt_frames, 100)) * 0.3).astype("f4")


def torch_runner(model, cli, device) -> Callable[[], np.ndarray]:
    tokens, prompt_tokens, prompt = case(cli)
    features = torch.from_numpy(prompt).to(device)[None]

    @torch.inference_mode()
    def run() -> np.ndarray:
        torch.manual_seed(1)
        out, _, _, _ = model.sample(
            [tokens], [prompt_tokens], features, torch.tensor([len(prompt)], device=device),
            t_shift=0.5, num_step=cli.num_step, guidance_scale=1.0,
        )  # fmt: skip
        synchronize(device)
        return out[0].float().cpu().numpy()

    return run


def onnx_runner(folder: Path, cli, int8: bool = False) -> Callable[[], np.ndarray]:
    from zipvoice.onnx.runtime import OnnxZipVoice

    runtime = OnnxZipVoice(folder, int8=int8, num_thread=cli.threads)
    tokens, prompt_tokens, prompt = case(cli)

    def run() -> np.ndarray:
        rng = np.random.default_rng(1)
        return runtime.sample_one(tokens, prompt_tokens, prompt, cli.num_step, 1.0, rng=rng)

    return run


def alternate(runs: dict[str, Callable[[], np.ndarray]], repeats: int) -> dict[str, list[float]]:
    """Each run once as warm-up, then `repeats` rounds of every run in turn."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def torch_rows(cli, device) -> list[list]:
    from zipvoice.models.modules.time_gate import TimeGate

    model, base = build_merged(cli)
    model.to(device)
    run = torch_runner(model, cli, device)
    state: dict[str, TimeGate | None] = {"gate": None}

    def merged() -> np.ndarray:
        if state["gate"] is not None:
            state["gate"].remove()
            state["gate"] = None
        return run()

    def gated() -> np.ndarray:
        if state["gate"] is None:
            state["gate"] = TimeGate(model.fm_decoder, base, T_RANGE)
        return run()

    times = alternate({"merged": merged, "gated 0,0.5": gated}, cli.repeats)
    ref = median(times["merged"])
    rows = [["torch", name, device.type, median(t), median(t) / ref] for name, t in times.items()]
    # The gate's own work, timed alone (free of the load noise of whole runs): a sampling
    # pays two swaps and one hook call per step.
    gate = TimeGate(model.fm_decoder, base, T_RANGE)
    start = time.perf_counter()
    for _ in range(500):
        gate.use_adapter(False)
        gate.use_adapter(True)
    swap = (time.perf_counter() - start) / 1000
    t = torch.tensor([0.7, 0.7], device=device)
    start = time.perf_counter()
    for _ in range(1000):
        gate._pre_hook(model.fm_decoder, (), {"t": t})
        gate.use_adapter(True)
    hook = (time.perf_counter() - start) / 1000 - swap
    gate.remove()
    work = 2 * swap + cli.num_step * max(hook, 0.0)
    rows.append(["torch", "gate work alone", device.type, work, (ref + work) / ref])
    return rows


def onnx_rows(cli) -> tuple[list[list], str]:
    from zipvoice.models.modules.time_gate import TimeGate
    from zipvoice.onnx.export import export_model

    model, base = build_merged(cli)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        token_file = Path(tmp) / "tokens.txt"
        token_file.write_text("".join(f"{'_' if i == 0 else f't{i}'}\t{i}\n" for i in range(360)))
        export_model(model, Path(tmp) / "merged", token_file)
        model.time_gate = TimeGate(model.fm_decoder, base, T_RANGE)
        export_model(model, Path(tmp) / "gated", token_file, int8=True)
        runs = {
            "merged": onnx_runner(Path(tmp) / "merged", cli),
            "gated 0,0.5": onnx_runner(Path(tmp) / "gated", cli),
            "gated 0,0.5 int8": onnx_runner(Path(tmp) / "gated", cli, int8=True),
        }
        fp32, int8 = runs["gated 0,0.5"](), runs["gated 0,0.5 int8"]()
        times = alternate(runs, cli.repeats)
    distance = float(np.abs(int8 - fp32).mean())
    scale = float(np.abs(fp32).mean())
    note = f"int8 vs fp32 (gated): mean |mel difference| {distance:.4f}, mean |mel| {scale:.4f}"
    ref = median(times["merged"])
    rows = [["onnx", name, "cpu", median(t), median(t) / ref] for name, t in times.items()]
    return rows, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-step", type=int, default=4)
    parser.add_argument("--prompt-seconds", type=float, default=0.5)
    parser.add_argument("--seconds", type=float, default=1.0, help="Generated speech.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--onnx", action="store_true", help="Also the ONNX rows (exports).")
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    device = resolve_device(cli.device)
    rows = torch_rows(cli, device)
    note = ""
    if cli.onnx:
        more, note = onnx_rows(cli)
        rows += more
    print(
        f"time gate: released config, random weights, DoRA r32 attention merged; "
        f"{cli.num_step} steps, guidance 1.0, t_shift 0.5, {cli.prompt_seconds} s prompt -> "
        f"{cli.seconds} s; median of {cli.repeats} alternating runs; "
        f"{describe_machine(device, cli.threads)}. Ratios to merged of the same backend."
    )
    headers = ["backend", "method", "device", "seconds", "time ratio"]
    print(format_table(headers, [[b, m, d, f"{s:.6f}", f"{r:.5f}"] for b, m, d, s, r in rows]))
    if note:
        print(note)


if __name__ == "__main__":
    main()
