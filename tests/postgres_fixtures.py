"""
A throwaway PostgreSQL server for the whole test session, a fresh database
per test, and started stores on it.  Where the server binaries are missing the
tests skip with the reason, except in CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import itertools
import os
import types
from typing import Any, Iterator

import psycopg
import pytest
from twisted.internet import reactor
from twisted.internet.task import deferLater

from jwtlet.plugins.postgres_store import PostgresStore, postgres
from jwtlet.testing.postgres import PostgresServer, available

_names = itertools.count()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    problem = available()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {problem}")
        pytest.skip(problem)
    # Not under pytest's temp dir: as root the server runs as the postgres user, who cannot enter it.
    server = PostgresServer.create()
    yield server
    server.destroy()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    name = f"jwtlet_test_{os.getpid()}_{next(_names)}"
    with psycopg.connect(postgres_server.url(), autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return postgres_server.url(name)


def start_store(url: str, **options: Any) -> PostgresStore:
    """A started ``postgres`` store on ``url`` (stop it with ``stopService``)."""
    context = types.SimpleNamespace(reactor=reactor, clock=reactor, data_dir=".")
    store = postgres.build(dict({"url": url, "pool": {"max_connections": 4, "acquire_timeout": "3s"}}, **options),
                           context)
    store.startService()
    return store


async def eventually(check: Any, attempts: int = 100, interval: float = 0.05) -> None:
    """Poll ``check`` (an async callable returning bool), bounded, without sleeping the reactor."""
    for _ in range(attempts):
        if await check():
            return
        await deferLater(reactor, interval, lambda: None)
    raise AssertionError("condition not reached in time")
