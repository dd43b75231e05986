"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture()
def single_thread():
    """Tiny matmuls are far faster on one thread (no pool wake-ups on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
