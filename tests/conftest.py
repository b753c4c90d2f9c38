"""Shared test fixtures: where the reference fixtures live, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Reference fixtures live beside the checkout (../shared), never inside it.
SHARED = Path(os.environ.get("ZIPVOICE_SHARED", REPO.parent / "shared"))
PARITY = SHARED / "fixtures" / "upstream_parity"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    if not PARITY.is_dir():
        pytest.fail(f"reference fixtures not found at {PARITY} (set ZIPVOICE_SHARED)")
    return PARITY
