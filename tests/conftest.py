"""Shared fixtures: one pool of spawned gloo workers for the whole session."""
from __future__ import annotations

import os

if os.environ.get("PLAIT_TEST_DEVICE", "cpu") != "cuda":
    # The suite is the CPU suite on any machine: "auto" devices and the workers see no GPU
    # (set before torch first asks CUDA how many devices there are).
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402

from helpers import synthetic_data, tiny_model_config
from plait.testing import WorkerPool

POOL_SIZE = 8


@pytest.fixture(scope="session")
def pool():
    workers = WorkerPool(POOL_SIZE)
    yield workers
    workers.shutdown()


@pytest.fixture(scope="session")
def data():
    """The synthetic token stream the equivalence tests train on."""
    return synthetic_data()


@pytest.fixture(scope="session")
def model_config():
    """tiny with 8 blocks: enough for pp=4 with two virtual stages."""
    return tiny_model_config(num_hidden_layers=8)
