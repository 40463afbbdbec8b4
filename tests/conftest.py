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
    # one intra-op thread: on a shared 2-core runner, spinning OpenMP workers slow small
    # kernels by an order of magnitude (measured: 0.9 ms -> 64 ms per op under load)
    torch.set_num_threads(1)
