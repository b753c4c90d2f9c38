"""Every entry point builds its parser (`--help`) without the heavy libraries.

Importing PEFT alone took 5 s and onnxruntime's export path 11 s, so `--help` took 10 s; the
heavy imports now happen in `main` after parsing. Each check runs in a fresh interpreter,
since this test process has long imported them all. (The times are in docs/benchmarks.md;
no timing is asserted here.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

ENTRY_POINTS = sorted(
    p.stem for p in (REPO / "zipvoice" / "bin").glob("*.py") if p.stem != "__init__"
)
HEAVY = ("torch", "peft", "lhotse", "onnxruntime", "onnx", "transformers")

PROBE = """
import json, sys
import zipvoice.bin.{name} as entry
entry.get_parser().format_help()
print(json.dumps([m for m in {heavy!r} if m in sys.modules]))
"""


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_building_the_parser_imports_no_heavy_library(name):
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(name=name, heavy=HEAVY)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_every_entry_point_is_checked():
    assert {"train_zipvoice", "infer_zipvoice", "infer_zipvoice_onnx", "onnx_export"} <= set(
        ENTRY_POINTS
    )


def test_threads_and_workers_follow_the_cores_unless_given(monkeypatch):
    """Automatic counts from the CPU affinity (not os.cpu_count()); explicit ones win."""
    from zipvoice.utils import resources

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    # 2 cores: one worker (a core stays for training: no oversubscription warning), 2 threads.
    assert resources.choose_num_workers(-1) == 1
    assert resources.choose_num_threads(0) == 2
    assert (resources.choose_num_threads(0, 2), resources.choose_num_workers(-1, 2)) == (1, 0)
    assert (resources.choose_num_threads(3), resources.choose_num_workers(4)) == (3, 4)
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert resources.choose_num_workers(-1) == 2 and resources.choose_num_threads(0, 2) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert resources.choose_num_threads(0) == 1  # the user's environment chose


def test_a_negative_thread_or_worker_count_is_refused(tmp_path):
    from zipvoice.training.config import TrainingConfig

    for bad in ({"num_threads": -1}, {"num_workers": -2}):
        with pytest.raises(ValueError, match="--num-threads must be >= 0"):
            TrainingConfig().replace(exp_dir=str(tmp_path), **bad).validate()
