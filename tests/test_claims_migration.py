"""
A mapping written before conditions and claim expressions existed behaves
exactly as before (issue 17): a database created and filled by the previous
schema is opened by this version, migrated, and exchanges give the tokens and
refusals they gave.

"The previous schema" is the migration list as it was before claims.md:
migrations are append-only, so it is ``SCHEMA[:1]``, run by the same runner
and filled with the statements the previous version used (positional
``INSERT``s that name no new column).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import attrs
import jwt as pyjwt
import psycopg
import pytest
import pytest_twisted
from apps import WORKLOAD, Apps, make_apps
from postgres_fixtures import postgres_server, postgres_url, start_store  # noqa: F401 - fixtures
from psycopg.rows import dict_row
from twisted.internet import reactor

from jwtlet import policy
from jwtlet.exchange.pipeline import Exchange
from jwtlet.model import ResourceMapping, ScopeMapping
from jwtlet.plugins import postgres_store, sql_store, sqlite_store
from jwtlet.plugins.sqlite_store import SQLiteStore
from jwtlet.providers import adapt
from jwtlet.web import codecs

PREVIOUS_SCHEMA = sql_store.SCHEMA[:1]
MAPPINGS = (
    ResourceMapping(WORKLOAD.username, "ctx", scopes=("read", "write", "same-level"), audiences=("edc",)),
    ResourceMapping(WORKLOAD.username, "open", scopes=("read",)),
)
SCOPES = (
    ScopeMapping("read", {"role": "reader", "level": 1}),
    ScopeMapping("write", {"role": "writer"}),
    ScopeMapping("same-level", {"level": 1}),
)
#: What each request was answered before: the claims beyond the registered ones, or the refusal.
BEHAVIOUR: list[tuple[dict[str, Any], Any]] = [
    ({"resource": "ctx", "scope": "read same-level", "audience": "edc"}, {"role": "reader", "level": 1}),
    ({"resource": "open"}, {}),
    ({"resource": "ctx", "scope": "read write", "audience": "edc"}, "invalid_scope"),
    ({"resource": "ctx", "scope": "admin", "audience": "edc"}, "unauthorized_client"),
    ({"resource": "ctx", "audience": "elsewhere"}, "unauthorized_client"),
    ({"resource": "nowhere"}, "unauthorized_client"),
]


@pytest.fixture
def previous_schema(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """While active, the migration runner knows only the migrations the previous version had."""
    monkeypatch.setattr(sql_store, "SCHEMA", PREVIOUS_SCHEMA)
    yield
    monkeypatch.undo()


def fill_the_previous_way(connection: Any, placeholder: str) -> None:
    mapping_row = f"INSERT INTO mappings VALUES ({', '.join([placeholder] * 4)})"  # noqa: S608
    for mapping in MAPPINGS:
        connection.execute(mapping_row, (mapping.client_identifier, mapping.participant_context,
                                         json.dumps(list(mapping.scopes)), json.dumps(list(mapping.audiences))))
    for scope in SCOPES:
        connection.execute(f"INSERT INTO scopes VALUES ({placeholder}, {placeholder})",  # noqa: S608
                           (scope.scope, json.dumps(dict(scope.claims))))


def with_store(apps: Apps, store: Any) -> Exchange:
    """The apps' exchange (its validator, signer, clock) over ``store``."""
    exchange = apps.token_api.exchange
    return attrs.evolve(exchange, mappings=attrs.evolve(exchange.mappings, store=adapt("store", store)))


async def outcome(exchange: Exchange, fields: dict[str, Any]) -> Any:
    form = {"grant_type": [policy.GRANT_TYPE_TOKEN_EXCHANGE], "subject_token": ["token-workload"]}
    form.update({name: [value] for name, value in fields.items()})
    try:
        issued = await exchange.exchange(policy.parse_token_request(form))
    except policy.Refusal as refusal:
        return refusal.code
    claims = pyjwt.decode(issued.access_token, options={"verify_signature": False})
    registered = {"iss", "sub", "jwtlet_pc", "aud", "iat", "nbf", "exp", "jti", "act"}
    assert claims["act"] == policy.actor_claim(WORKLOAD)
    return {name: value for name, value in claims.items() if name not in registered}


async def behaves_as_before(apps: Apps, store: Any) -> None:
    assert await store.list_mappings() == sorted(MAPPINGS, key=lambda mapping: mapping.key)
    assert [codecs.mapping_to_json(m) for m in await store.list_mappings()] == [
        {"clientIdentifier": m.client_identifier, "participantContext": m.participant_context,
         "scopes": sorted(m.scopes), "audiences": sorted(m.audiences)}
        for m in sorted(MAPPINGS, key=lambda mapping: mapping.key)
    ]
    assert [codecs.scope_to_json(s) for s in await store.list_scopes()] == [
        {"scope": s.scope, "claims": dict(s.claims)} for s in sorted(SCOPES, key=lambda scope: scope.scope)
    ]
    exchange = with_store(apps, store)
    assert [await outcome(exchange, fields) for fields, _ in BEHAVIOUR] == [then for _, then in BEHAVIOUR]


@pytest_twisted.ensureDeferred
async def test_a_sqlite_file_of_the_previous_schema_keeps_every_mapping(
    tmp_path: Path, previous_schema: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "jwtlet.sqlite3"
    connection = sqlite3.connect(path, isolation_level=None)
    assert sqlite_store.migrate(connection) == 1
    fill_the_previous_way(connection, "?")
    connection.close()
    monkeypatch.undo()  # from here on, this version

    store = SQLiteStore(path, reactor, reactor)
    try:
        await behaves_as_before(make_apps(tmp_path / "apps"), store)
    finally:
        await store.stopService()
    versions = sqlite3.connect(path).execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert versions == [(v,) for v in range(1, len(sql_store.SCHEMA) + 1)]


@pytest.mark.postgres
@pytest_twisted.ensureDeferred
async def test_a_postgres_database_of_the_previous_schema_keeps_every_mapping(
    tmp_path: Path, postgres_url: str, previous_schema: None, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    with psycopg.connect(postgres_url, row_factory=dict_row) as connection:
        assert postgres_store.migrate(connection) == 1
        fill_the_previous_way(connection, "%s")
    monkeypatch.undo()  # from here on, this version

    store = start_store(postgres_url)
    try:
        await behaves_as_before(make_apps(tmp_path), store)
    finally:
        await store.stopService()


@pytest.mark.postgres
@pytest_twisted.ensureDeferred
async def test_the_postgres_store_keeps_conditions_and_claim_expressions(postgres_url: str) -> None:  # noqa: F811
    from test_claims_cel import round_trip

    store = start_store(postgres_url)
    try:
        await round_trip(store)
    finally:
        await store.stopService()
