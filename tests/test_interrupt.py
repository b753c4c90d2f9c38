"""Ctrl-C and SIGTERM during training, and results that do not depend on the worker count.

Real `python -m zipvoice.bin.train_zipvoice` processes get real signals, sent to the whole
process group as a terminal's Ctrl-C is (so the data-loader workers receive it too). The
interrupted run must save, say in one line how to continue, exit 128 + the signal; rerunning
the same command must end with an adapter equal (torch.equal) to the uninterrupted run's.
"""

from __future__ import annotations

import os
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
from tests.helpers import free_port
from tests.test_train import user_config, user_flags
from zipvoice.training.callbacks import Callback
from zipvoice.training.interrupt import TrainingInterrupted
from zipvoice.training.trainer import run_training

STEP_LINE = re.compile(r"step (\d+)/")
NUM_ITERS = 6


def _flags(data: dict, exp_dir: Path, workers: int) -> list[str]:
    return user_flags(
        data, exp_dir, num_iters=NUM_ITERS, save_every_n=0, valid_interval=0, lora_rank=4,
        lora_alpha=8, num_workers=workers, num_threads=1,
    )  # fmt: skip


def _command(data: dict, exp_dir: Path, workers: int = 2, *extra: str) -> list[str]:
    flags = _flags(data, exp_dir, workers)
    return [sys.executable, "-m", "zipvoice.bin.train_zipvoice", *flags, *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.pop("OMP_NUM_THREADS", None)  # --num-threads 1 decides
    return env


def _run_and_signal(
    command: list[str], at_step: int, signals: list[int], repeat: bool = False
) -> tuple[int, str]:
    """Start training in its own process group; after it logs `at_step`, send `signals` to
    the whole group (with `repeat`, the last one again every 0.02 s until it exits: a user
    pressing Ctrl-C again, soon enough to land before a short step and its save end).
    Returns (exit status, everything it printed)."""
    process = subprocess.Popen(
        command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        match = STEP_LINE.search(line)
        if match and int(match.group(1)) >= at_step:
            for sig in signals:
                os.killpg(process.pid, sig)
            while repeat and process.poll() is None:
                time.sleep(0.02)
                os.killpg(process.pid, signals[-1])
            break
    rest, _ = process.communicate(timeout=300)
    return process.wait(), "".join(lines) + (rest or "")


def _run(command: list[str]) -> str:
    done = subprocess.run(
        command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _adapter(exp_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("adapter_model.safetensors", "text_side.safetensors"):
        out.update({f"{name}:{k}": v for k, v in load_file(exp_dir / "adapter" / name).items()})
    return out


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, different[:5]


def _interrupt_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "interrupted:" in line]


@pytest.mark.slow
def test_sigint_with_workers_saves_and_the_same_command_resumes_exactly(
    japanese_fbank_manifests, tmp_path
):
    # --max-duration 3: one cut per batch, several batches per epoch, all prefetched by the
    # two workers at once, so wherever the signal lands (but at an epoch's end) the sampler is
    # ahead of training; saving its own state then made the resumed run skip batches.
    data = japanese_fbank_manifests
    _run(_command(data, tmp_path / "straight", 2, "--max-duration", "3"))
    command = _command(data, tmp_path / "stopped", 2, "--max-duration", "3")
    code, output = _run_and_signal(command, at_step=2, signals=[signal.SIGINT])
    assert code == 130, output[-3000:]
    assert "Traceback" not in output
    (line,) = _interrupt_lines(output)
    step = int(re.search(r"after step (\d+)", line).group(1))
    assert 2 <= step < NUM_ITERS
    assert "run the same command again" in line and "zipvoice.bin.train_zipvoice" in line
    assert (tmp_path / "stopped" / f"checkpoint-{step}.pt").is_file()
    assert not (tmp_path / "stopped" / "adapter").exists()
    resumed = _run(command)
    assert f"checkpoint-{step}.pt" in resumed and "resuming from" in resumed
    _assert_equal(_adapter(tmp_path / "straight"), _adapter(tmp_path / "stopped"))


@pytest.mark.slow
def test_sigterm_exits_143_and_a_second_ctrl_c_stops_at_once(japanese_fbank_manifests, tmp_path):
    data = japanese_fbank_manifests
    code, output = _run_and_signal(_command(data, tmp_path / "term"), 1, [signal.SIGTERM])
    assert code == 143, output[-3000:]
    assert "Traceback" not in output and len(_interrupt_lines(output)) == 1
    assert "stopped on SIGTERM" in output
    code, output = _run_and_signal(
        _command(data, tmp_path / "twice"), 1, [signal.SIGINT], repeat=True
    )
    assert code == 130, output[-3000:]
    assert "Traceback" not in output
    (line,) = _interrupt_lines(output)
    assert "stopped at once" in line


class _SignalAfterStep(Callback):
    """As if SIGINT arrived during step `step`: the run finishes it, saves and stops. Records
    how many batches the loader's sampler had yielded beyond those trained on (`ahead`)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.ahead: int | None = None

    def on_step_end(self, trainer) -> bool:
        if trainer.state.step == self.step:
            self.ahead = trainer.sampler_position.ahead
            trainer.stop_request.signum = signal.SIGINT
        return False


@pytest.mark.parametrize("scan_oom", [False, True])
def test_a_stop_while_workers_prefetch_resumes_where_training_was(
    japanese_fbank_manifests, tmp_path, scan_oom
):
    """Without timing: stop mid-epoch while two workers hold prefetched batches, resume, and
    the adapter equals the uninterrupted run's (the checkpoint must hold the sampler as of the
    last trained batch, not as of the last prefetched one). --scan-oom iterates the sampler
    before training: the resumed run's restored position must survive it."""
    data = japanese_fbank_manifests
    common = dict(num_iters=NUM_ITERS, save_every_n=0, valid_interval=0, lora_rank=4,
                  lora_alpha=8, num_workers=2, max_duration=3, scan_oom=scan_oom)  # fmt: skip
    run_training(user_config(data, tmp_path / "straight", **common))
    config = user_config(data, tmp_path / "stopped", **common)
    stop = _SignalAfterStep(2)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(TrainingInterrupted, match="after step 2"):
            run_training(config, callbacks=[stop])
    finally:  # a stopped run ignores further signals on its way out; pytest goes on
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert stop.ahead and stop.ahead > 0  # the case under test: the sampler ran ahead
    checkpoint = torch.load(tmp_path / "stopped" / "checkpoint-2.pt", weights_only=True)
    assert checkpoint["batches_in_epoch"] == 2
    run_training(config)
    _assert_equal(_adapter(tmp_path / "straight"), _adapter(tmp_path / "stopped"))


def test_zero_and_two_workers_train_the_same_adapter(japanese_fbank_manifests, tmp_path):
    """Loader workers and their iterators never touch the random numbers training draws."""
    data = japanese_fbank_manifests
    common = dict(num_iters=4, save_every_n=0, valid_interval=2, lora_rank=4, lora_alpha=8)
    for workers in (0, 2):
        run_training(user_config(data, tmp_path / f"w{workers}", num_workers=workers, **common))
    _assert_equal(_adapter(tmp_path / "w0"), _adapter(tmp_path / "w2"))


@pytest.mark.slow
def test_ctrl_c_stops_both_ddp_ranks_at_one_step_and_the_run_resumes(
    japanese_fbank_manifests, tmp_path
):
    """The parent takes the signal and passes it on; both ranks stop after the same step."""
    port = free_port()
    command = _command(japanese_fbank_manifests, tmp_path, workers=0) + [
        "--world-size", "2", "--master-port", str(port), "--max-duration", "3",
    ]  # fmt: skip
    code, output = _run_and_signal(command, at_step=1, signals=[signal.SIGINT])
    assert code == 130, output[-3000:]
    assert "Traceback" not in output
    (line,) = _interrupt_lines(output)
    step = int(re.search(r"after step (\d+)", line).group(1))
    checkpoint = torch.load(tmp_path / f"checkpoint-{step}.pt", weights_only=True)
    assert checkpoint["step"] == step and len(checkpoint["rng"]) == 2
    resumed = _run(command)
    assert "resuming from" in resumed
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_ctrl_c_in_another_entry_point_is_one_line_and_130(tmp_path):
    """Outside training, Ctrl-C stops at once: one line, no traceback (utils/cli.py)."""
    command = [
        sys.executable, "-m", "zipvoice.bin.generate_japanese_corpus", "--output-dir",
        str(tmp_path), "--num-speakers", "4",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    seen = ""
    while "Synthesising" not in seen:
        char = process.stdout.read(1)
        assert char, seen[-2000:]
        seen += char
    os.killpg(process.pid, signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    output = seen + rest
    assert process.returncode == 130, output[-3000:]
    assert "Traceback" not in output
    # (after a progress bar's last `\r` redraw, on the same line as it)
    (line,) = _interrupt_lines(output)
    assert line.endswith("interrupted: stopped at once (Ctrl-C)")
