"""
A throwaway PostgreSQL server for the whole test session, and a fresh
database per test.  Where the server binaries are missing the tests skip with
the reason, except in CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import itertools
import os
from typing import Iterator

import psycopg
import pytest

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
