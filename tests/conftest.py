"""Fixtures shared by the test modules (pytest-twisted runs the reactor)."""

from __future__ import annotations

import time
from typing import AsyncIterator

import pytest
import pytest_twisted
from k8s_fixtures import Cluster, start_cluster, stopping
from twisted.internet.task import Clock


@pytest.fixture
def clock() -> Clock:
    """A fake clock set to now, so tokens minted for real time agree with it."""
    clock = Clock()
    clock.advance(time.time())
    return clock


@pytest_twisted.async_yield_fixture
async def cluster(clock: Clock) -> AsyncIterator[Cluster]:
    """The fake Kubernetes API server on loopback, with the service account ns/app."""
    async for running in stopping(await start_cluster(clock)):
        running.fake.add_service_account("ns", "app")
        yield running


@pytest_twisted.async_yield_fixture(autouse=True)
async def fresh_global_http_pool() -> AsyncIterator[None]:
    """
    Forget treq's cached connections after each test: a daemon started later
    may get the port of one that has gone, and a kept-alive socket to the
    old one would be reused.
    """
    yield
    from treq.api import get_global_pool

    pool = get_global_pool()
    if pool is not None:
        await pool.closeCachedConnections()
