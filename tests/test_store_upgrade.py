"""
Upgrading a database of an earlier jwtlet schema into the Rust jwtlet's table
layout (migration.md, issue 20) loses nothing: mappings, scopes, integrations,
API keys and remembered token ids are all there afterwards and served, on
SQLite and PostgreSQL; on PostgreSQL the upgrade is one transaction taken
under the migration advisory lock.

"An earlier schema" is every version before :data:`sql_store.RUST_LAYOUT`,
made by the same runner with the migration list cut there (migrations are
append-only: version 1 is what the code at 4b664ad created, 2 added the CEL
columns, 3 the integrations' profiles) and filled the way that version wrote
rows, naming only the columns it had.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import attrs
import psycopg
import pytest
import pytest_twisted
from apps import WORKLOAD, make_apps
from postgres_fixtures import postgres_server, postgres_url, start_store  # noqa: F401 - fixtures
from psycopg import errors as pg_errors
from psycopg.rows import dict_row
from test_claims_migration import outcome, with_store
from test_migration_rust_postgres import RustJwtlet, tables
from twisted.internet import reactor

from jwtlet.model import ApiKeyRecord, Integration, ResourceMapping, ScopeMapping
from jwtlet.plugins import postgres_store, sql_store, sqlite_store
from jwtlet.plugins.sqlite_store import SQLiteStore
from jwtlet.plugins.store_rules import sorted_mappings, sorted_scopes, with_keys

#: the migrations that added conditions and claim expressions, and integrations' profiles
CEL, PROFILES = 2, 3
EARLIER = range(1, sql_store.RUST_LAYOUT)

MAPPINGS = (
    ResourceMapping(WORKLOAD.username, "ctx", scopes=("read", "write"), audiences=("edc", "other")),
    ResourceMapping(WORKLOAD.username, "open"),
    ResourceMapping("system:serviceaccount:other:sa", "ctx", scopes=("read",)),
)
CEL_MAPPING = ResourceMapping(WORKLOAD.username, "cel", scopes=("read",), condition='subject.namespace == "ns"',
                              claim_expressions={"team": "subject.namespace"})
SCOPES = (ScopeMapping("read", {"role": "reader"}), ScopeMapping("write", {"role": "writer", "n": {"a": [1, None]}}))
CEL_SCOPE = ScopeMapping("computed", claim_expressions={"who": "subject.name"})
INTEGRATION = Integration("cii_a", "made first", 1_500_000_000.5)
BOUND_INTEGRATION = Integration("cii_b", "bound", 1_600_000_000.0, profiles=("integration",))
KEYS = (
    ApiKeyRecord("cii_a", "ki_1", bytes(range(32)), tier=2, description="k1", created_at=1_500_000_001.0),
    ApiKeyRecord("cii_a", "ki_2", bytes(32), status="revoked", created_at=1_500_000_002.0),
)
TOKEN_IDS = (("https://issuer.test", "jti-1", 4_000_000_000.0), ("https://other.test", "jti-1", 4_000_000_001.0))


def mappings_at(version: int) -> tuple[ResourceMapping, ...]:
    return (*MAPPINGS, CEL_MAPPING) if version >= CEL else MAPPINGS


def scopes_at(version: int) -> tuple[ScopeMapping, ...]:
    return (*SCOPES, CEL_SCOPE) if version >= CEL else SCOPES


def integrations_at(version: int) -> tuple[Integration, ...]:
    return (INTEGRATION, BOUND_INTEGRATION) if version >= PROFILES else (INTEGRATION,)


def fill(connection: Any, placeholder: str, version: int) -> None:
    """Rows as the jwtlet of schema ``version`` wrote them."""

    def insert(table: str, row: dict[str, object]) -> None:
        marks = ", ".join([placeholder] * len(row))
        connection.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({marks})",  # noqa: S608
                           tuple(row.values()))

    for mapping in mappings_at(version):
        row: dict[str, object] = {
            "client_identifier": mapping.client_identifier, "participant_context": mapping.participant_context,
            "scopes": json.dumps(list(mapping.scopes)), "audiences": json.dumps(list(mapping.audiences))}
        if version >= CEL:
            row.update(condition_expression=mapping.condition,
                       claim_expressions=json.dumps(dict(mapping.claim_expressions)))
        insert("mappings", row)
    for scope in scopes_at(version):
        row = {"scope": scope.scope, "claims": json.dumps(dict(scope.claims))}
        if version >= CEL:
            row.update(claim_expressions=json.dumps(dict(scope.claim_expressions)))
        insert("scopes", row)
    for integration in integrations_at(version):
        row = {"integration_id": integration.integration_id, "description": integration.description,
               "created_at": integration.created_at}
        if version >= PROFILES:
            row.update(profiles=None if integration.profiles is None else json.dumps(list(integration.profiles)))
        insert("integrations", row)
    for key in KEYS:
        insert("api_keys", {"integration_id": key.integration_id, "key_id": key.key_id,
                            "secret_sha256": key.secret_sha256, "tier": key.tier, "description": key.description,
                            "status": key.status, "created_at": key.created_at})
    for issuer, token_id, expires_at in TOKEN_IDS:
        insert("token_ids", {"issuer": issuer, "token_id": token_id, "expires_at": expires_at})


@attrs.frozen
class Database:
    """One dialect's database: raw connections, its migration runner, its store."""

    placeholder: str
    connect: Callable[[], ContextManager[Any]]
    migrate: Callable[[Any], int]
    open_store: Callable[[], Any]
    tables: Callable[[Any], set[str]]


def _sqlite(path: Path) -> Database:
    return Database(
        placeholder="?",
        connect=lambda: contextlib.closing(sqlite3.connect(path, isolation_level=None)),
        migrate=sqlite_store.migrate,
        open_store=lambda: SQLiteStore(path, reactor, reactor),
        tables=lambda connection: {name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")},
    )


def _postgres(url: str) -> Database:
    return Database(
        placeholder="%s",
        connect=lambda: psycopg.connect(url, row_factory=dict_row),
        migrate=postgres_store.migrate,
        open_store=lambda: start_store(url),
        tables=tables,
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    if request.param == "sqlite":
        return _sqlite(tmp_path / "jwtlet.sqlite3")
    return _postgres(request.getfixturevalue("postgres_url"))


@contextlib.contextmanager
def schema_cut_at(version: int) -> Iterator[None]:
    """While active, the migration runner knows only the migrations up to ``version``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sql_store, "SCHEMA", sql_store.SCHEMA[:version])
        yield


def at_version(database: Database, version: int) -> None:
    with schema_cut_at(version), database.connect() as connection:
        assert database.migrate(connection) == version
        fill(connection, database.placeholder, version)


@pytest.mark.parametrize("version", EARLIER)
@pytest_twisted.ensureDeferred
async def test_a_database_of_an_earlier_schema_loses_nothing_on_upgrade(
    database: Database, version: int, tmp_path: Path
) -> None:
    at_version(database, version)

    store = database.open_store()
    try:
        assert await store.list_mappings() == sorted_mappings(mappings_at(version))
        assert await store.list_scopes() == sorted_scopes(scopes_at(version))
        assert await store.list_integrations() == with_keys(integrations_at(version), KEYS)
        assert await store.get_api_key("cii_a", "ki_1") == KEYS[0]
        for issuer, token_id, expires_at in TOKEN_IDS:
            assert await store.record_token_id(issuer, token_id, expires_at) is False, "still remembered"
        exchange = with_store(make_apps(tmp_path), store)
        assert await outcome(exchange, {"resource": "ctx", "scope": "read", "audience": "edc"}) == {"role": "reader"}
    finally:
        await store.stopService()
    with database.connect() as connection:
        names = database.tables(connection)
    assert {"resource_mappings", "scope_mappings", "integrations", "api_keys", "token_ids"} <= names
    assert not names & {"mappings", "scopes"}, "the old tables went once their rows moved"


# -- PostgreSQL: one transaction, under the lock --------------------------------------

BEFORE = sql_store.RUST_LAYOUT - 1


def value(connection: psycopg.Connection[Any], query: str) -> Any:
    """The one value ``query`` answers (in a column named ``v``)."""
    row = connection.execute(query.encode()).fetchone()
    assert row is not None
    return row["v"]


def version_of(connection: psycopg.Connection[Any]) -> int:
    return int(value(connection, "SELECT MAX(version) AS v FROM jwtlet_schema_version"))


@pytest.mark.postgres
def test_an_upgrade_that_fails_part_way_leaves_the_database_as_it_was(postgres_url: str) -> None:  # noqa: F811
    """
    A ``resource_mappings`` table made by something else (no primary key)
    makes the upgrade fail after it has already changed the schema: all of it
    is rolled back, and the database is still the earlier version with every
    row where it was.
    """
    database = _postgres(postgres_url)
    at_version(database, BEFORE)
    with psycopg.connect(postgres_url, row_factory=dict_row) as connection:
        connection.execute("CREATE TABLE resource_mappings (client_identifier TEXT, participant_context TEXT, "
                           "scopes TEXT[], audiences TEXT[])")
        connection.commit()
        with pytest.raises(pg_errors.InvalidColumnReference):  # ON CONFLICT without a matching key
            postgres_store.migrate(connection)
        assert version_of(connection) == BEFORE
        assert database.tables(connection) >= {"mappings", "scopes"}
        assert value(connection, "SELECT COUNT(*) AS v FROM mappings") == len(mappings_at(BEFORE))
        columns = {row["column_name"] for row in connection.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'resource_mappings'")}
        assert columns == {"client_identifier", "participant_context", "scopes", "audiences"}, "no column added"
        assert value(connection, "SELECT to_regclass('scope_mappings') AS v") is None


@pytest.mark.postgres
def test_the_upgrade_waits_for_the_migration_lock(postgres_url: str) -> None:  # noqa: F811
    """
    While another replica holds the migration lock, the upgrade changes
    nothing: it waits (here: until its lock timeout), and runs once the lock
    is free.
    """
    at_version(_postgres(postgres_url), BEFORE)
    with psycopg.connect(postgres_url, row_factory=dict_row) as holder, \
            psycopg.connect(postgres_url, row_factory=dict_row) as upgrader:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (postgres_store.MIGRATION_LOCK,))
        upgrader.execute("SET lock_timeout = '200ms'")
        upgrader.commit()
        with pytest.raises(pg_errors.LockNotAvailable):
            postgres_store.migrate(upgrader)
        assert version_of(upgrader) == BEFORE
        holder.commit()  # the other replica is done
        assert postgres_store.migrate(upgrader) == len(sql_store.SCHEMA)
        assert version_of(upgrader) == len(sql_store.SCHEMA)


@pytest.mark.postgres
@pytest_twisted.ensureDeferred
async def test_a_database_the_earlier_jwtlet_shared_with_the_rust_jwtlet_keeps_both_sets(
    postgres_url: str,  # noqa: F811
) -> None:
    """
    The issue's situation: the earlier jwtlet ran on a Rust jwtlet's
    database, each with its own tables.  After the upgrade jwtlet serves the
    mappings of both; where both kept the same key, jwtlet's row (what it
    served until now) wins.
    """
    rust = RustJwtlet(postgres_url)
    rust.initialize()
    rust.save_mapping("system:serviceaccount:rust:only", "ctx", ["rust-scope"], [])
    rust.save_mapping(WORKLOAD.username, "ctx", ["rust-scope"], ["rust-audience"])  # the same key as jwtlet's
    rust.save_scope_mapping("rust-scope", {"from": "rust"})
    rust.save_scope_mapping("read", {"role": "rust-reader"})
    at_version(_postgres(postgres_url), BEFORE)

    store = start_store(postgres_url)
    try:
        assert await store.list_mappings() == sorted_mappings(
            (*mappings_at(BEFORE), ResourceMapping("system:serviceaccount:rust:only", "ctx", scopes=("rust-scope",))))
        assert await store.list_scopes() == sorted_scopes((*scopes_at(BEFORE), ScopeMapping("rust-scope",
                                                                                            {"from": "rust"})))
    finally:
        await store.stopService()
