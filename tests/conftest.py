"""Shared test fixtures: where the reference fixtures live, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Reference-parity data travels with the tests (tests/fixtures/upstream_parity/README.md), so a
# fresh clone tests itself; ZIPVOICE_PARITY_DIR points at another copy.
PARITY = Path(
    os.environ.get("ZIPVOICE_PARITY_DIR", REPO / "tests" / "fixtures" / "upstream_parity")
)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    if not PARITY.is_dir():
        pytest.fail(f"reference fixtures not found at {PARITY} (set ZIPVOICE_PARITY_DIR)")
    return PARITY
