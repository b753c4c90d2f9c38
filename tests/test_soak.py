"""Soak test: training killed with SIGKILL at random moments, resumed each time, ends exactly
where an uninterrupted run ends.

A rented GPU can vanish mid-step or mid-save. Every kill here is a real `kill -9` of
`python -m zipvoice.bin.train_zipvoice`, at a seeded random step plus a random delay (so some
land inside a checkpoint or adapter write); rerunning the same command must resume from the
newest complete checkpoint and the final adapter must equal the uninterrupted run's.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.data_fixtures import *  # noqa: F403 - session fixtures
from tests.test_train import user_flags

NUM_ITERS = 8
KILLS = 3
STEP_LINE = re.compile(r"step (\d+)/")


def training_command(data: dict, exp_dir: Path) -> list[str]:
    flags = user_flags(
        data,
        exp_dir,
        num_iters=NUM_ITERS,
        save_every_n=2,
        valid_interval=0,
        lora_rank=4,
        lora_alpha=8,
        log_interval=1,
    )
    return [sys.executable, "-m", "zipvoice.bin.train_zipvoice", *flags]


def child_env() -> dict[str, str]:
    """Same thread count for every run: float sums must happen in the same order."""
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    env.pop("WANDB_API_KEY", None)
    return env


def run_until_killed(command: list[str], kill_at_step: int, extra_delay: float) -> tuple[int, str]:
    """Start training; SIGKILL it `extra_delay` s after it logs `kill_at_step` (or let it end).
    Returns (exit code, output)."""
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        match = STEP_LINE.search(line)
        if match and int(match.group(1)) >= kill_at_step:
            time.sleep(extra_delay)
            process.send_signal(signal.SIGKILL)
            break
    rest, _ = process.communicate(timeout=300)
    return process.wait(), "".join(lines) + (rest or "")


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(
    japanese_fbank_manifests, tmp_path
):
    data = japanese_fbank_manifests
    rng = random.Random(20240607)
    timings: dict[str, float] = {}

    start = time.monotonic()
    straight = subprocess.run(
        training_command(data, tmp_path / "straight"),
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    timings["uninterrupted run"] = time.monotonic() - start
    assert straight.returncode == 0, straight.stderr[-3000:]

    exp_dir = tmp_path / "killed"
    command = training_command(data, exp_dir)
    kills, last_step = 0, 0
    start = time.monotonic()
    for _ in range(KILLS):
        kill_at = min(NUM_ITERS - 1, last_step + rng.randint(1, 2))
        delay = rng.uniform(0.0, 0.5)
        code, output = run_until_killed(command, kill_at, delay)
        if code == -signal.SIGKILL:
            kills += 1
        else:
            assert code == 0, output[-3000:]
        steps = [int(m.group(1)) for m in STEP_LINE.finditer(output)]
        last_step = max(steps, default=last_step)
        print(f"run {kills}: killed after step {last_step} (+{delay:.2f} s), exit {code}")
        if last_step >= NUM_ITERS - 1:
            break
    final = subprocess.run(
        command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600
    )
    timings[f"{kills} killed runs + final resume"] = time.monotonic() - start
    assert final.returncode == 0, final.stderr[-3000:]
    assert kills >= 2, "the kills did not happen: the test would prove nothing"
    assert "resuming from" in final.stderr

    for name in ("adapter_model.safetensors", "text_side.safetensors"):
        expected = load_file(tmp_path / "straight" / "adapter" / name)
        resumed = load_file(exp_dir / "adapter" / name)
        assert expected.keys() == resumed.keys()
        for key in expected:
            torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6, msg=key)
    assert not list(exp_dir.glob(".tmp-*")), "an interrupted save was left behind"
    for label, seconds in timings.items():
        print(f"{label}: {seconds:.1f} s")
