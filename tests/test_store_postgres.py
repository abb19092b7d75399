"""
The PostgreSQL store against a real throwaway server: the conformance suite,
two replicas on one database, a restart under load, concurrent writers, and
replicas migrating together.
"""

from __future__ import annotations

import types
from typing import Any, Iterator

import pytest
import pytest_twisted
from postgres_fixtures import eventually, postgres_server, postgres_url, start_store  # noqa: F401 - fixtures
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, gatherResults

from jwtlet.interfaces import Conflict, DependencyUnavailable, NotFound, PluginConfigError
from jwtlet.model import ResourceMapping, ScopeMapping
from jwtlet.plugins.postgres_store import parse_duration, postgres
from jwtlet.plugins.sql_store import SCHEMA
from jwtlet.testing.conformance.store import StoreConformance
from jwtlet.testing.postgres import PostgresServer

pytestmark = pytest.mark.postgres


def context() -> types.SimpleNamespace:
    return types.SimpleNamespace(reactor=reactor, clock=reactor, data_dir=".")


@pytest.fixture
def clock() -> Any:
    return reactor


class TestPostgresStore(StoreConformance):
    @pytest.fixture
    def store(self, postgres_url: str) -> Iterator[Any]:  # noqa: F811
        store = start_store(postgres_url)
        yield store
        pytest_twisted.blockon(store.stopService())


@pytest_twisted.ensureDeferred
async def test_a_change_through_one_replica_is_used_by_the_other_within_a_second(postgres_url: str) -> None:  # noqa: F811
    one, two = start_store(postgres_url), start_store(postgres_url)
    try:
        await one.add_mapping(ResourceMapping("client", "ctx", scopes=("read",)))
        await one.add_scope(ScopeMapping("read", {"v": 1}))

        async def listening() -> bool:
            return bool(two._listener.connected)

        await eventually(listening)
        assert (await two.resolve("client", "ctx", ["read"])).scopes["read"].claims == {"v": 1}
        started = reactor.seconds()
        await one.update_scope(ScopeMapping("read", {"v": 2}))
        await one.delete_mapping("client", "ctx")

        async def gone() -> bool:
            try:
                await two.resolve("client", "ctx", ["read"])
            except NotFound:
                return True
            return False

        await eventually(gone)
        assert reactor.seconds() - started < 1.0
    finally:
        await gatherResults([one.stopService(), two.stopService()])


@pytest_twisted.ensureDeferred
async def test_concurrent_writers_on_one_key_exactly_one_wins(postgres_url: str) -> None:  # noqa: F811
    stores = [start_store(postgres_url) for _ in range(3)]
    try:
        await stores[0].list_mappings()  # migrated before the race
        attempts = [store.add_mapping(ResourceMapping("client", "same")) for store in stores for _ in range(4)]
        results = await DeferredList(attempts, consumeErrors=True)
        successes = [ok for ok, _ in results if ok]
        conflicts = [failure for ok, failure in results if not ok and failure.check(Conflict)]
        assert len(successes) == 1 and len(conflicts) == len(attempts) - 1
    finally:
        await gatherResults([store.stopService() for store in stores])


@pytest_twisted.ensureDeferred
async def test_replicas_starting_together_migrate_once(postgres_url: str) -> None:  # noqa: F811
    stores = [start_store(postgres_url) for _ in range(4)]
    try:
        await gatherResults([store.list_scopes() for store in stores])

        def versions(connection: Any) -> list[Any]:
            return [row["version"] for row in connection.execute("SELECT version FROM jwtlet_schema_version")]

        assert await stores[0]._run(versions) == list(range(1, len(SCHEMA) + 1))
    finally:
        await gatherResults([store.stopService() for store in stores])


@pytest_twisted.ensureDeferred
async def test_a_restart_under_load_loses_nothing_and_recovers_by_itself(
    postgres_server: PostgresServer, postgres_url: str  # noqa: F811
) -> None:
    store = start_store(postgres_url)
    try:
        for index in range(20):
            await store.add_mapping(ResourceMapping("client", f"ctx-{index}"))
        postgres_server.stop()
        with pytest.raises(DependencyUnavailable):
            await store.add_mapping(ResourceMapping("client", "during-outage"))
        with pytest.raises(DependencyUnavailable):
            await store.list_mappings()
        with pytest.raises(DependencyUnavailable):
            await store.check_ready()
        postgres_server.start()

        async def recovered() -> bool:
            try:
                await store.check_ready()
            except DependencyUnavailable:
                return False
            return True

        await eventually(recovered, attempts=200)
        mappings = await store.list_mappings("client")
        assert len(mappings) == 20, "nothing acknowledged was lost"
        await store.add_mapping(ResourceMapping("client", "after-outage"))
    finally:
        await store.stopService()


def test_option_problems_and_durations() -> None:
    assert parse_duration("30s") == 30 and parse_duration("5m") == 300 and parse_duration("250ms") == 0.25
    with pytest.raises(PluginConfigError) as raised:
        postgres.build({"pool": {"max_connections": 0, "acquire_timeout": "soon", "bogus": 1},
                        "sslmode": "maybe", "extra": 1}, context())
    assert sorted(raised.value.messages) == sorted([
        "extra: unknown key",
        "url: required for the postgres store (a libpq URL)",
        "pool.bogus: unknown key",
        "pool.max_connections: must be a whole number (1 or more)",
        'pool.acquire_timeout: must be a duration such as "30s"',
        "sslmode: must be disable, allow, prefer, require, verify-ca or verify-full",
    ])


def test_building_for_check_config_connects_to_nothing() -> None:
    """``jwtlet check-config`` builds the store only to check its options: no pool, no threads, no listener."""
    checking = types.SimpleNamespace(reactor=reactor, clock=reactor, data_dir=".", check_only=True)
    store = postgres.build({"url": "postgresql://jwtlet@127.0.0.1:1/jwtlet"}, checking)
    assert store._pool.closed and not store._threads.started and not store._listener._thread.is_alive()
