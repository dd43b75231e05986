"""Shared test fixtures."""

import os

import pytest
import torch

# the kernels run calls below 2^20 multiply-adds on one thread (kernels/src/pool.c); the tests'
# small shapes must still exercise the split over threads they ask for
os.environ.setdefault("SPFQ_PARALLEL_MIN_WORK", "0")


@pytest.fixture()
def single_thread():
    """Tiny matmuls are far faster on one thread (no pool wake-ups on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
