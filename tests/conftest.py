"""Shared fixtures: the device under test comes from LPM_TEST_DEVICE (default cpu)."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("LPM_TEST_DEVICE", "cpu")


@pytest.fixture
def device() -> str:
    """Device the suite runs on (``LPM_TEST_DEVICE=cuda`` on a GPU machine)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _threads() -> None:
    # keep timings stable and leave a core for the rest of the machine
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
