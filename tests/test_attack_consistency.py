"""
A mapping deleted or changed is never served afterwards: an attacker whose
mapping an operator just removed keeps exchanging tokens while a replica
serves the mapping from its resolve cache.  The race that allowed it: a
resolve reads the mapping, the delete (and its notification) happens, then
the resolve stores what it read in the cache.  Each test holds a resolve
between its read and its store, deterministically, while the change happens.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import attrs
import pytest
import pytest_twisted
from postgres_fixtures import eventually, postgres_server, postgres_url, start_store  # noqa: F401 - fixtures
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults

from jwtlet.interfaces import NotFound
from jwtlet.model import ResourceMapping, ScopeMapping
from jwtlet.plugins.postgres_store import Listener
from jwtlet.plugins.sqlite_store import SQLiteStore, sqlite

CLIENT = "system:serviceaccount:attacker:app"
NOTIFICATION_TIMEOUT = 10.0  # a generous bound on a loopback NOTIFY, so a broken listener fails instead of hanging


@attrs.define
class Held:
    """A store call held after its database work: ``read`` fires with what it read, ``release`` lets it go on."""

    read: Deferred[Any] = attrs.field(factory=Deferred)
    release: Deferred[None] = attrs.field(factory=Deferred)


def hold_next_call(store: Any) -> Held:
    """Hold the next call a store makes to its database between the read and whatever the store does next."""
    held = Held()
    original = store._run

    def run_once(*args: Any, **kwargs: Any) -> Deferred[Any]:
        store._run = original

        def pause(value: Any) -> Deferred[Any]:
            held.read.callback(value)
            return held.release.addCallback(lambda _: value)

        return original(*args, **kwargs).addCallback(pause)

    store._run = run_once
    return held


def changes(store: Any, count: int) -> Deferred[None]:
    """
    Fires once ``store`` has processed ``count`` more changes: each write of
    its own, and each notification (another replica's writes, and on
    PostgreSQL the echo of its own).  Waiting for all of them keeps a late one
    from invalidating the cache during a race and passing the test for it.
    """
    fired: Deferred[None] = Deferred()
    seen = [0]
    empty = store._cache.invalidate

    def changed() -> None:
        empty()
        seen[0] += 1
        if seen[0] == count:
            fired.callback(None)

    store._cache.invalidate = changed  # every change the store processes empties its resolve cache
    fired.addTimeout(NOTIFICATION_TIMEOUT, reactor)
    return fired


# What the operator does, and what must hold afterwards on every replica.

async def delete_mapping(store: Any) -> None:
    await store.delete_mapping(CLIENT, "ctx")


async def mapping_gone(store: Any) -> None:
    with pytest.raises(NotFound):
        await store.resolve(CLIENT, "ctx", ["read"])


async def update_scope(store: Any) -> None:
    await store.update_scope(ScopeMapping("read", {"role": "reader"}))


async def scope_updated(store: Any) -> None:
    assert (await store.resolve(CLIENT, "ctx", ["read"])).scopes["read"].claims == {"role": "reader"}


CHANGES = [(delete_mapping, mapping_gone), (update_scope, scope_updated)]
Step = Callable[[Any], Awaitable[None]]


SEED_WRITES = 2


async def seed(store: Any) -> None:
    await store.add_mapping(ResourceMapping(CLIENT, "ctx", scopes=("read",)))
    await store.add_scope(ScopeMapping("read", {"role": "admin"}))


async def race(reader: Any, writer: Any, change: Step, reader_saw_change: Deferred[None]) -> None:
    """``reader`` resolves; held after its read, ``writer`` changes and ``reader`` processes that; then it stores."""
    held = hold_next_call(reader)
    pending = reader.resolve(CLIENT, "ctx", ["read"])
    stale = await held.read
    assert stale.scopes["read"].claims == {"role": "admin"}, "read before the change"
    await change(writer)
    await reader_saw_change
    held.release.callback(None)
    await pending  # this caller asked before the change: it may get the old answer, nobody after it may


# -- SQLite: the local write is the notification -------------------------------------------------------------

@pytest_twisted.async_yield_fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = sqlite.build({"path": str(tmp_path / "jwtlet.sqlite3")},
                         types.SimpleNamespace(reactor=reactor, clock=reactor, data_dir=tmp_path))
    store.startService()
    try:
        yield store
    finally:
        await store.stopService()


@pytest.mark.parametrize("change, check", CHANGES, ids=["delete-mapping", "update-scope"])
@pytest_twisted.ensureDeferred
async def test_sqlite_a_resolve_that_read_before_a_change_does_not_cache_what_it_read(
    sqlite_store: SQLiteStore, change: Step, check: Step
) -> None:
    await seed(sqlite_store)
    await race(sqlite_store, sqlite_store, change, changes(sqlite_store, 1))
    await check(sqlite_store)


# -- PostgreSQL: NOTIFY between replicas ---------------------------------------------------------------------------

async def listening(*stores: Any) -> None:
    async def connected() -> bool:
        return all(store._listener.connected for store in stores)

    await eventually(connected)


@pytest.mark.postgres
@pytest.mark.parametrize("change, check", CHANGES, ids=["delete-mapping", "update-scope"])
@pytest_twisted.ensureDeferred
async def test_postgres_a_resolve_that_read_before_a_change_does_not_cache_what_it_read(
    postgres_url: str, change: Step, check: Step  # noqa: F811
) -> None:
    store = start_store(postgres_url)
    try:
        await listening(store)
        seeded = changes(store, 2 * SEED_WRITES)  # each write, then its echo
        await seed(store)
        await seeded
        await race(store, store, change, changes(store, 2))
        await check(store)
    finally:
        await store.stopService()


@pytest.mark.postgres
@pytest.mark.parametrize("change, check", CHANGES, ids=["delete-mapping", "update-scope"])
@pytest_twisted.ensureDeferred
async def test_postgres_a_replica_resolving_while_another_changes_does_not_cache_what_it_read(
    postgres_url: str, change: Step, check: Step  # noqa: F811
) -> None:
    """The reviewer's case: replica two read the mapping, replica one deleted it, two's notification came first."""
    one, two = start_store(postgres_url), start_store(postgres_url)
    try:
        await listening(one, two)
        seeded = changes(two, SEED_WRITES)
        await seed(one)
        await seeded
        await race(two, one, change, changes(two, 1))
        await check(two)
    finally:
        await gatherResults([one.stopService(), two.stopService()])


@pytest.mark.postgres
@pytest_twisted.ensureDeferred
async def test_postgres_a_delete_through_one_replica_stops_a_mapping_the_other_had_cached(
    postgres_url: str,  # noqa: F811
) -> None:
    one, two = start_store(postgres_url), start_store(postgres_url)
    try:
        await listening(one, two)
        seeded = changes(two, SEED_WRITES)
        await seed(one)
        await seeded
        await two.resolve(CLIENT, "ctx", ["read"])
        assert len(two._cache) == 1, "two serves the mapping from its cache"
        deleted = changes(two, 1)
        await delete_mapping(one)
        await deleted
        await mapping_gone(two)
    finally:
        await gatherResults([one.stopService(), two.stopService()])


def test_a_reconnected_listener_drops_the_cache_before_the_cache_is_trusted_again() -> None:
    """Notifications missed while disconnected: no resolve may use the cache between reconnect and invalidation."""
    seen: list[bool] = []

    def changed() -> None:
        seen.append(listener.connected)

    listener = Listener("", reactor, changed)
    listener._up()
    assert seen == [False] and listener.connected
    listener._down()
    assert not listener.connected
