"""Fixtures shared by the test modules (pytest-twisted runs the reactor)."""

from __future__ import annotations

import time
from typing import AsyncIterator

import pytest
import pytest_twisted
from k8s_fixtures import Cluster, memory_cluster
from twisted.internet import reactor
from twisted.internet.task import Clock

from jwtlet.outbound import OutboundHTTPClient, build_http_client, close_http_client


@pytest.fixture
def clock() -> Clock:
    """A fake clock set to now, so tokens minted for real time agree with it."""
    clock = Clock()
    clock.advance(time.time())
    return clock


@pytest_twisted.async_yield_fixture
async def outbound_client() -> AsyncIterator[OutboundHTTPClient]:
    """The daemon's own kind of outbound client, over real sockets, closed after the test."""
    client = build_http_client(reactor)
    try:
        yield client
    finally:
        await close_http_client(client)


@pytest.fixture
def cluster(clock: Clock) -> Cluster:
    """
    The fake Kubernetes API server in memory, with the service account ns/app.
    Requests to any other origin fail as an unknown host does: nothing here
    touches a socket.  (Nothing keeps connections, so there is nothing to close.)
    """
    running = memory_cluster(clock)
    running.fake.add_service_account("ns", "app")
    return running


@pytest_twisted.async_yield_fixture(autouse=True)
async def fresh_global_http_pool() -> AsyncIterator[None]:
    """
    Forget treq's cached connections after each test.  Only tests that call
    treq's module-level functions over real sockets (the end-to-end and
    daemon tests) fill that global pool; a daemon started later may get the
    port of one that has gone, and a kept-alive socket to the old one would
    be reused.  In-memory tests never touch it.
    """
    yield
    from treq.api import get_global_pool

    pool = get_global_pool()
    if pool is not None:
        await pool.closeCachedConnections()
