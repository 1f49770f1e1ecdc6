"""Shared fixtures: one pool of spawned gloo workers for the whole session."""
from __future__ import annotations

import pytest

from plait.testing import WorkerPool

POOL_SIZE = 8


@pytest.fixture(scope="session")
def pool():
    workers = WorkerPool(POOL_SIZE)
    yield workers
    workers.shutdown()
