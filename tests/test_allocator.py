"""zipvoice.utils.allocator: glibc's thresholds are set, unless the user set them."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _applied_in_fresh_process(env: dict[str, str]) -> str:
    code = "from zipvoice.utils.allocator import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="mallopt thresholds are glibc's")
def test_thresholds_applied_unless_the_user_set_malloc_variables():
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    assert _applied_in_fresh_process(env) == "True"
    assert _applied_in_fresh_process({**env, "MALLOC_TRIM_THRESHOLD_": "4096"}) == "False"
