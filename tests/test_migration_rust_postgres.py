"""
A Rust jwtlet's PostgreSQL database works unchanged (migration.md, "The Rust
jwtlet"; issue 20): jwtlet keeps mappings and scopes in the Rust jwtlet's own
tables, with the same columns, serves a database the Rust jwtlet made at once,
and the two can run side by side on it.

:class:`RustJwtlet` is the Rust jwtlet's store as it talks to the database:
its DDL and its statements verbatim from eclipse-cfm/jwtlet at 937f28b,
``crates/jwtlet-postgres/src/resource_store.rs`` (read with ``fetch``), its
``$n`` parameters bound by number, each statement on its own (sqlx's pool
autocommits them) and ``initialize`` in one transaction, as there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import attrs
import jwt as pyjwt
import psycopg
import pytest
import pytest_twisted
import treq
from apps import WORKLOAD, Apps, make_apps
from postgres_fixtures import eventually, postgres_server, postgres_url, start_store  # noqa: F401 - fixtures
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from test_claims_migration import with_store
from twisted.internet import defer, reactor

from jwtlet import policy
from jwtlet.model import ResourceMapping, ScopeMapping
from jwtlet.plugins.postgres_store import PostgresStore
from jwtlet.web import token_api
from jwtlet.web.server import DrainingSite

pytestmark = pytest.mark.postgres

# -- the Rust jwtlet ------------------------------------------------------------------

CREATE_RESOURCE_MAPPINGS = """
    CREATE TABLE IF NOT EXISTS resource_mappings (
        client_identifier TEXT NOT NULL,
        participant_context TEXT NOT NULL,
        scopes TEXT[] NOT NULL DEFAULT '{}',
        audiences TEXT[] NOT NULL DEFAULT '{}',
        PRIMARY KEY (client_identifier, participant_context)
    )"""

CREATE_RESOURCE_MAPPINGS_INDEX = """
    CREATE INDEX IF NOT EXISTS idx_resource_mappings_client
    ON resource_mappings (client_identifier)"""

CREATE_SCOPE_MAPPINGS = """
    CREATE TABLE IF NOT EXISTS scope_mappings (
        scope TEXT PRIMARY KEY,
        claims JSONB NOT NULL DEFAULT '{}'
    )"""

RUST_TABLES = ("resource_mappings", "scope_mappings")
#: what jwtlet keeps beside the Rust jwtlet's tables
OWN_TABLES = {"integrations", "api_keys", "token_ids", "jwtlet_schema_version"}


@attrs.frozen
class RustJwtlet:
    """The Rust jwtlet's ``PostgresResourceStore`` on the database at ``url``."""

    url: str

    def _run(self, statement: str, *params: object) -> list[dict[str, Any]]:
        numbered = re.sub(r"\$(\d+)", r"%(p\1)s", statement)
        with psycopg.connect(self.url, autocommit=True, row_factory=dict_row) as connection:
            cursor = connection.execute(numbered, {f"p{n}": value for n, value in enumerate(params, start=1)})
            return cursor.fetchall() if cursor.description else []

    def initialize(self) -> None:
        with psycopg.connect(self.url) as connection, connection.transaction():
            for statement in (CREATE_RESOURCE_MAPPINGS, CREATE_RESOURCE_MAPPINGS_INDEX, CREATE_SCOPE_MAPPINGS):
                connection.execute(statement)

    def save_mapping(self, client: str, context: str, scopes: list[str], audiences: list[str]) -> None:
        self._run("INSERT INTO resource_mappings (client_identifier, participant_context, scopes, audiences)\n"
                  "             VALUES ($1, $2, $3, $4)", client, context, scopes, audiences)

    def update_mapping(self, client: str, context: str, scopes: list[str], audiences: list[str]) -> None:
        self._run("UPDATE resource_mappings SET scopes = $3, audiences = $4\n"
                  "             WHERE client_identifier = $1 AND participant_context = $2",
                  client, context, scopes, audiences)

    def remove_mapping(self, client: str, context: str) -> None:
        self._run("DELETE FROM resource_mappings WHERE client_identifier = $1 AND participant_context = $2",
                  client, context)

    def save_scope_mapping(self, scope: str, claims: dict[str, Any]) -> None:
        self._run("INSERT INTO scope_mappings (scope, claims) VALUES ($1, $2)\n"
                  "             ON CONFLICT (scope) DO UPDATE SET claims = EXCLUDED.claims", scope, Jsonb(claims))

    def resolve_mapping(self, client: str, context: str) -> Optional[tuple[dict[str, Any], list[dict[str, Any]]]]:
        rows = self._run("SELECT client_identifier, participant_context, scopes, audiences\n"
                         "             FROM resource_mappings\n"
                         "             WHERE client_identifier = $1 AND participant_context = $2", client, context)
        if not rows:
            return None
        scopes = self._run("SELECT scope, claims FROM scope_mappings WHERE scope = ANY($1)", rows[0]["scopes"])
        return rows[0], scopes


def fill_as_the_rust_jwtlet_would(rust: RustJwtlet) -> None:
    rust.initialize()
    rust.save_mapping(WORKLOAD.username, "ctx", ["read", "same-level"], ["edc"])
    rust.save_mapping(WORKLOAD.username, "open", ["read"], [])
    rust.save_scope_mapping("read", {"role": "reader", "level": 1})
    rust.save_scope_mapping("same-level", {"level": 1})
    rust.save_scope_mapping("write", {"role": "writer"})


# -- the schema -----------------------------------------------------------------------


def describe(connection: psycopg.Connection[Any], table: str) -> dict[str, Any]:
    """A table's columns (type, nullability, default), primary key and index definitions."""
    columns = {
        row["column_name"]: (row["udt_name"], row["is_nullable"], row["column_default"])
        for row in connection.execute(
            "SELECT column_name, udt_name, is_nullable, column_default FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name = %s", (table,))
    }
    primary_key = [row["column_name"] for row in connection.execute(
        "SELECT k.column_name FROM information_schema.table_constraints c "
        "JOIN information_schema.key_column_usage k USING (constraint_schema, constraint_name) "
        "WHERE c.table_name = %s AND c.constraint_type = 'PRIMARY KEY' ORDER BY k.ordinal_position", (table,))]
    indexes = {row["indexname"]: row["indexdef"] for row in connection.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename = %s", (table,))}
    return {"columns": columns, "primary_key": primary_key, "indexes": indexes}


def tables(connection: psycopg.Connection[Any]) -> set[str]:
    """The tables of the public schema."""
    listed = connection.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {row["tablename"] for row in listed}


@pytest_twisted.ensureDeferred
async def test_jwtlet_keeps_mappings_and_scopes_in_the_rust_jwtlets_tables_with_the_same_columns(
    postgres_url: str,  # noqa: F811
) -> None:
    """
    The Rust jwtlet's tables, as its own DDL makes them, are jwtlet's: same
    columns, types, defaults, keys and index; jwtlet's extra columns are
    nullable or defaulted (so the Rust jwtlet's INSERTs, which name only its
    columns, still work), and jwtlet's own data is in tables of its own.
    """
    RustJwtlet(postgres_url).initialize()
    with psycopg.connect(postgres_url, row_factory=dict_row, autocommit=True) as connection:
        rust = {table: describe(connection, table) for table in RUST_TABLES}
        for table in RUST_TABLES:
            connection.execute(f"DROP TABLE {table}")

    store = start_store(postgres_url)
    try:
        await store.check_ready()  # migrated from an empty database
    finally:
        await store.stopService()

    with psycopg.connect(postgres_url, row_factory=dict_row) as connection:
        for table in RUST_TABLES:
            ours = describe(connection, table)
            assert {name: ours["columns"][name] for name in rust[table]["columns"]} == rust[table]["columns"]
            assert ours["primary_key"] == rust[table]["primary_key"]
            assert ours["indexes"] == rust[table]["indexes"]
            extra = {name: column for name, column in ours["columns"].items() if name not in rust[table]["columns"]}
            assert extra, "jwtlet's own columns are here too"
            for name, (_, nullable, default) in extra.items():
                assert nullable == "YES" or default is not None, f"{table}.{name} would refuse the Rust jwtlet's rows"
        assert set(describe(connection, "resource_mappings")["columns"]) == {
            "client_identifier", "participant_context", "scopes", "audiences",
            "condition_expression", "claim_expressions"}
        assert set(describe(connection, "scope_mappings")["columns"]) == {"scope", "claims", "claim_expressions"}
        assert tables(connection) == set(RUST_TABLES) | OWN_TABLES, "no mappings/scopes tables beside them"


# -- serving a Rust jwtlet's database -------------------------------------------------


@attrs.frozen
class Served:
    apps: Apps
    url: str

    async def exchange(self, **fields: str) -> tuple[int, Any]:
        """POST /token as a workload would; the status and the token's own claims or the error."""
        form = {"grant_type": policy.GRANT_TYPE_TOKEN_EXCHANGE, "subject_token": "token-workload", **fields}
        response = await treq.post(self.url + "/token", data=form)
        body = await response.json()
        if response.code != 200:
            return response.code, body["error"]
        return 200, pyjwt.decode(body["access_token"], options={"verify_signature": False})


@pytest_twisted.async_yield_fixture
async def served(tmp_path: Path, postgres_url: str) -> AsyncIterator[tuple[Served, PostgresStore]]:  # noqa: F811
    """
    The token port over the ``postgres`` store on a database the Rust jwtlet
    made and filled, listening on a real socket.
    """
    fill_as_the_rust_jwtlet_would(RustJwtlet(postgres_url))
    store = start_store(postgres_url)
    apps = make_apps(tmp_path)
    api = attrs.evolve(apps.token_api, exchange=with_store(apps, store))
    site = DrainingSite(api.app.resource(), body_limits=token_api.BODY_LIMITS, reactor=reactor)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        yield Served(apps, f"http://127.0.0.1:{port.getHost().port}"), store
    finally:
        await defer.maybeDeferred(port.stopListening)
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_pointed_at_a_rust_jwtlets_database_jwtlet_serves_its_mappings_at_once(
    served: tuple[Served, PostgresStore],
) -> None:
    """No import, no second table: the first request is answered from the Rust jwtlet's rows."""
    server, store = served
    status, claims = await server.exchange(resource="ctx", scope="read same-level", audience="edc")
    assert status == 200
    assert (claims["sub"], claims["aud"], claims["role"], claims["level"]) == ("ctx", "edc", "reader", 1)
    assert (await server.exchange(resource="open"))[0] == 200
    assert await server.exchange(resource="ctx", scope="write", audience="edc") == (403, "unauthorized_client")
    assert await server.exchange(resource="ctx", audience="elsewhere") == (403, "unauthorized_client")
    assert [mapping.key for mapping in await store.list_mappings()] == [
        (WORKLOAD.username, "ctx"), (WORKLOAD.username, "open")]
    assert [scope.scope for scope in await store.list_scopes()] == ["read", "same-level", "write"]


@pytest_twisted.ensureDeferred
async def test_side_by_side_what_the_rust_jwtlet_writes_later_is_served(
    served: tuple[Served, PostgresStore], postgres_url: str,  # noqa: F811
) -> None:
    """
    Both run on one database: the Rust jwtlet restarts (its DDL finds jwtlet's
    tables and changes nothing), inserts a mapping with a plain INSERT that
    names none of jwtlet's columns and upserts a scope; jwtlet serves both,
    although it answered for that scope from its cache just before.
    """
    server, store = served
    rust = RustJwtlet(postgres_url)

    async def listening() -> bool:
        return bool(store._listener.connected)

    await eventually(listening)
    assert (await server.exchange(resource="ctx", scope="read", audience="edc"))[1]["role"] == "reader"

    rust.initialize()
    rust.save_mapping(WORKLOAD.username, "later", ["write"], ["other"])
    status, claims = await server.exchange(resource="later", scope="write", audience="other")
    assert (status, claims["role"]) == (200, "writer")

    rust.save_scope_mapping("read", {"role": "auditor"})

    async def new_claims_served() -> bool:
        return (await server.exchange(resource="ctx", scope="read", audience="edc"))[1]["role"] == "auditor"

    await eventually(new_claims_served)


@pytest_twisted.ensureDeferred
async def test_a_mapping_the_rust_jwtlet_removes_beside_jwtlet_is_not_served_from_jwtlets_cache(
    served: tuple[Served, PostgresStore], postgres_url: str,  # noqa: F811
) -> None:
    """
    An operator revokes a workload's access through the Rust jwtlet's API
    while jwtlet serves the same database with that mapping in its resolve
    cache: jwtlet must stop issuing tokens for it, as if a replica had deleted
    it (the tables' trigger announces every writer's change).
    """
    server, store = served
    rust = RustJwtlet(postgres_url)

    async def listening() -> bool:
        return bool(store._listener.connected)

    await eventually(listening)
    assert (await server.exchange(resource="ctx", scope="read", audience="edc"))[0] == 200  # now cached
    rust.update_mapping(WORKLOAD.username, "ctx", ["same-level"], ["edc"])

    async def narrowed() -> bool:
        return await server.exchange(resource="ctx", scope="read", audience="edc") == (403, "unauthorized_client")

    await eventually(narrowed)
    assert (await server.exchange(resource="ctx", scope="same-level", audience="edc"))[0] == 200
    rust.remove_mapping(WORKLOAD.username, "ctx")

    async def revoked() -> bool:
        return await server.exchange(resource="ctx", scope="same-level", audience="edc") == (
            403, "unauthorized_client")

    await eventually(revoked)


@pytest_twisted.ensureDeferred
async def test_the_rust_jwtlet_reads_what_jwtlet_writes(postgres_url: str) -> None:  # noqa: F811
    """
    A mapping written through jwtlet (with a condition only jwtlet knows) is
    an ordinary row to the Rust jwtlet's queries: its lists arrive as
    ``TEXT[]``, every character kept, whatever the element looks like.
    """
    awkward = ["a,b", "{braces}", 'say "hi"', "back\\slash", "NULL", "with space", "ü😀"]
    store = start_store(postgres_url)
    try:
        await store.add_mapping(ResourceMapping(WORKLOAD.username, "ctx", scopes=tuple(awkward),
                                                audiences=("edc",), condition="true"))
        await store.add_scope(ScopeMapping("a,b", {"x": 1}))
    finally:
        await store.stopService()
    rust = RustJwtlet(postgres_url)
    rust.initialize()  # the Rust jwtlet starting on jwtlet's database
    found = rust.resolve_mapping(WORKLOAD.username, "ctx")
    assert found is not None
    row, scopes = found
    assert sorted(row["scopes"]) == sorted(awkward) and row["audiences"] == ["edc"]
    assert scopes == [{"scope": "a,b", "claims": {"x": 1}}]

    rust.save_mapping(WORKLOAD.username, "rust", awkward, [])
    store = start_store(postgres_url)
    try:
        assert (await store.get_mapping(WORKLOAD.username, "rust")).scopes == tuple(sorted(awkward))
    finally:
        await store.stopService()
