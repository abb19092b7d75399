"""
What the SQL stores share, so that ``sqlite`` and ``postgres`` keep only
what is their own (their dialect, their connections, how they learn of
changes): one schema written once for both dialects, the migration runner,
the row mappers, every query, a private thread pool so the reactor never
waits on the database, the translation of database errors, and the resolve
cache.  The rules every store follows are :mod:`jwtlet.plugins.store_rules`.

Over 400 lines because it holds every statement of both SQL stores: kept in
one place, a schema change and the queries it affects are one edit.

This module declares no plugin factory: discovery imports it and finds none.
"""

from __future__ import annotations

import enum
import functools
import json
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence, TypeVar

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorCore, IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from jwtlet.cache import ChangeAwareCache
from jwtlet.interfaces import NotFound
from jwtlet.model import ApiKeyRecord, Integration, Resolution, ResourceMapping, ScopeMapping
from jwtlet.plugins.store_rules import sorted_mappings, sorted_scopes, wanted_scopes, with_keys

T = TypeVar("T")

RESOLVE_CACHE_ENTRIES = 10_000


class Row(Protocol):
    """A result row by column name (``sqlite3.Row``, psycopg's ``dict_row``)."""

    def __getitem__(self, column: str) -> Any: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> Any: ...


class Connection(Protocol):
    """What the queries below need of a DB-API connection (or cursor)."""

    def execute(self, query: Any, params: Any = ..., /) -> Cursor: ...


class SQLReactor(IReactorCore, IReactorThreads, IReactorTime):
    """
    The reactor parts an SQL store uses: system events, threads, time.
    (``PluginContext.reactor`` is typed by the part every provider uses; the
    daemon's reactor provides these too.)
    """


@attrs.frozen
class Dialect:
    """
    How one database spells what the statements below need.  Statements are
    written with ``?`` parameters; :meth:`sql` gives them this dialect's.
    """

    placeholder: str
    json_type: str
    real_type: str
    bytes_type: str
    version_table: str
    #: taken in the migration's transaction so concurrent replicas take turns
    migration_lock: Optional[str] = None
    #: turns what the driver returns for a JSON column into Python values
    decode_json: Callable[[Any], Any] = json.loads

    def sql(self, statement: str) -> str:
        return _convert(statement, self.placeholder)


@functools.lru_cache(maxsize=256)
def _convert(statement: str, placeholder: str) -> str:
    return statement.replace("?", placeholder)


SCHEMA: tuple[str, ...] = (
    """
    CREATE TABLE mappings (
        client_identifier TEXT NOT NULL,
        participant_context TEXT NOT NULL,
        scopes {json} NOT NULL,
        audiences {json} NOT NULL,
        PRIMARY KEY (client_identifier, participant_context)
    );
    CREATE TABLE scopes (
        scope TEXT PRIMARY KEY,
        claims {json} NOT NULL
    );
    CREATE TABLE integrations (
        integration_id TEXT PRIMARY KEY,
        description TEXT NOT NULL,
        created_at {real} NOT NULL
    );
    CREATE TABLE api_keys (
        integration_id TEXT NOT NULL REFERENCES integrations (integration_id) ON DELETE CASCADE,
        key_id TEXT NOT NULL,
        secret_sha256 {bytes} NOT NULL,
        tier INTEGER NOT NULL,
        description TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at {real} NOT NULL,
        PRIMARY KEY (integration_id, key_id)
    );
    CREATE TABLE token_ids (
        issuer TEXT NOT NULL,
        token_id TEXT NOT NULL,
        expires_at {real} NOT NULL,
        PRIMARY KEY (issuer, token_id)
    );
    CREATE INDEX token_ids_expiry ON token_ids (expires_at)
    """,
)


def migrate(connection: Connection, dialect: Dialect) -> int:
    """
    Apply the migrations not yet applied, in the caller's transaction (so a
    failed one leaves the schema as it was); returns the schema version.
    """
    if dialect.migration_lock is not None:
        connection.execute(dialect.migration_lock)
    table = dialect.version_table
    connection.execute(f"CREATE TABLE IF NOT EXISTS {table} (version INTEGER NOT NULL)")
    row = connection.execute(f"SELECT MAX(version) AS version FROM {table}").fetchone()  # noqa: S608
    current = (row["version"] if row is not None else None) or 0
    types = {"json": dialect.json_type, "real": dialect.real_type, "bytes": dialect.bytes_type}
    for version, script in enumerate(SCHEMA[current:], start=current + 1):
        for statement in script.format(**types).split(";"):
            if statement.strip():
                connection.execute(statement)
        connection.execute(dialect.sql(f"INSERT INTO {table} (version) VALUES (?)"), (version,))  # noqa: S608
    return len(SCHEMA)


class Access(enum.Enum):
    """What a unit of database work does, which decides its transaction and what follows it."""

    READ = "read"
    #: writes that no resolve reads (integrations, keys, replay records)
    WRITE = "write"
    #: writes that change what a resolve answers: the resolve caches are emptied
    CHANGE = "change"


class SQLStore(Service):
    """
    A MappingStore over SQL, for a dialect module to complete with:
    ``dialect``, :meth:`_transaction` (run work on a connection, on a pool
    thread), :meth:`_translate` (database errors to store errors), and where
    needed :meth:`_opened`, :meth:`_close` and :meth:`_cache_trusted`.

    Work runs on ``threads``, started on first use (so a store built outside
    a service tree works) and stopped at shutdown either way.
    """

    dialect: Dialect

    def __init__(self, reactor: SQLReactor, clock: IReactorTime, threads: ThreadPool):
        self.reactor = reactor
        self.clock = clock
        self._threads = threads
        self._shutdown_trigger: Optional[Any] = None
        self._cache: ChangeAwareCache[tuple[str, str, tuple[str, ...]], Resolution] = ChangeAwareCache(
            RESOLVE_CACHE_ENTRIES
        )

    # -- what a dialect module provides -------------------------------------------------

    def _transaction(self, work: Callable[[Connection], T], access: Access) -> T:
        """Run ``work`` on a connection, in a transaction unless it only reads (on a pool thread)."""
        raise NotImplementedError

    def _translate(self, error: Exception) -> Optional[Exception]:
        """The store error for a database error (on a pool thread), or ``None`` to let it through."""
        raise NotImplementedError

    def _opened(self) -> None:
        """Called once when the store starts, on the reactor thread."""

    def _close(self) -> None:
        """Release connections when the store stops, on a pool thread."""

    def _cache_trusted(self) -> bool:
        """Whether the resolve cache may answer now (it may miss changes while this is false)."""
        return True

    # -- lifecycle ----------------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self._start()

    def _start(self) -> None:
        if self._threads.started:
            return
        self._threads.start()
        self._shutdown_trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self._threads.stop)
        self._opened()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if not self._threads.started:
            return succeed(None)
        closing: Deferred[None] = deferToThreadPool(self.reactor, self._threads, self._close)

        def stop_threads(result: object) -> object:
            if self._shutdown_trigger is not None:
                self.reactor.removeSystemEventTrigger(self._shutdown_trigger)
                self._shutdown_trigger = None
            self._threads.stop()
            return result

        return closing.addBoth(stop_threads)

    # -- running work -------------------------------------------------------------------

    def _run(self, work: Callable[[Connection], T], access: Access = Access.READ) -> Deferred[T]:
        self._start()
        done: Deferred[T] = deferToThreadPool(self.reactor, self._threads, self._guarded, work, access)
        if access is Access.CHANGE:
            done.addCallback(self._changed)
        return done

    def _guarded(self, work: Callable[[Connection], T], access: Access) -> T:
        try:
            return self._transaction(work, access)
        except Exception as error:
            translated = self._translate(error)
            if translated is None:
                raise
            raise translated from None

    def _changed(self, result: T) -> T:
        self._invalidate()
        return result

    def _invalidate(self) -> None:
        """Something changed (here, or elsewhere where a dialect can tell): no cached resolve may be served."""
        self._cache.invalidate()

    def _sql(self, statement: str) -> str:
        return self.dialect.sql(statement)

    # -- rows -----------------------------------------------------------------------------

    def _mapping(self, row: Row) -> ResourceMapping:
        decode = self.dialect.decode_json
        return ResourceMapping(row["client_identifier"], row["participant_context"],
                               scopes=tuple(decode(row["scopes"])), audiences=tuple(decode(row["audiences"])))

    def _scope(self, row: Row, name: str = "scope", claims: str = "claims") -> ScopeMapping:
        return ScopeMapping(row[name], self.dialect.decode_json(row[claims]))

    @staticmethod
    def _key(row: Row) -> ApiKeyRecord:
        return ApiKeyRecord(
            integration_id=row["integration_id"], key_id=row["key_id"], secret_sha256=bytes(row["secret_sha256"]),
            tier=row["tier"], description=row["description"], status=row["status"], created_at=row["created_at"],
        )

    def _one(self, connection: Connection, statement: str, params: Sequence[object], missing: str) -> Row:
        row: Optional[Row] = connection.execute(self._sql(statement), params).fetchone()
        if row is None:
            raise NotFound(missing)
        return row

    def _count(self, statement: str, params: Sequence[object], access: Access = Access.CHANGE) -> Deferred[int]:
        """Run one statement; fires with the number of rows it touched."""
        return self._run(lambda connection: int(connection.execute(self._sql(statement), params).rowcount), access)

    def _existed(self, statement: str, params: Sequence[object], missing: str) -> Deferred[None]:
        """Run one change; :class:`NotFound` (and nothing changed) when it touched no row."""

        def change(connection: Connection) -> None:
            if connection.execute(self._sql(statement), params).rowcount == 0:
                raise NotFound(missing)

        return self._run(change, Access.CHANGE)

    # -- mappings -----------------------------------------------------------------------

    def add_mapping(self, mapping: ResourceMapping) -> Deferred[None]:
        return self._count(
            "INSERT INTO mappings VALUES (?, ?, ?, ?)",
            (mapping.client_identifier, mapping.participant_context,
             json.dumps(list(mapping.scopes)), json.dumps(list(mapping.audiences))),
        ).addCallback(lambda _: None)

    def get_mapping(self, client_identifier: str, participant_context: str) -> Deferred[ResourceMapping]:
        return self._run(lambda connection: self._mapping(self._one(
            connection, "SELECT * FROM mappings WHERE client_identifier = ? AND participant_context = ?",
            (client_identifier, participant_context), client_identifier)))

    def list_mappings(self, client_identifier: Optional[str] = None) -> Deferred[list[ResourceMapping]]:
        def list_(connection: Connection) -> list[ResourceMapping]:
            if client_identifier is None:
                rows = connection.execute(self._sql("SELECT * FROM mappings"), ()).fetchall()
            else:
                rows = connection.execute(
                    self._sql("SELECT * FROM mappings WHERE client_identifier = ?"), (client_identifier,)
                ).fetchall()
            return sorted_mappings(self._mapping(row) for row in rows)

        return self._run(list_)

    def update_mapping(self, mapping: ResourceMapping) -> Deferred[None]:
        return self._existed(
            "UPDATE mappings SET scopes = ?, audiences = ? WHERE client_identifier = ? AND participant_context = ?",
            (json.dumps(list(mapping.scopes)), json.dumps(list(mapping.audiences)),
             mapping.client_identifier, mapping.participant_context),
            missing=str(mapping.key),
        )

    def delete_mapping(self, client_identifier: str, participant_context: str) -> Deferred[bool]:
        return self._count(
            "DELETE FROM mappings WHERE client_identifier = ? AND participant_context = ?",
            (client_identifier, participant_context),
        ).addCallback(lambda count: count > 0)

    def delete_client_mappings(self, client_identifier: str) -> Deferred[int]:
        return self._count("DELETE FROM mappings WHERE client_identifier = ?", (client_identifier,))

    # -- scopes ---------------------------------------------------------------------------

    def add_scope(self, scope: ScopeMapping) -> Deferred[None]:
        return self._count(
            "INSERT INTO scopes VALUES (?, ?)", (scope.scope, json.dumps(dict(scope.claims)))
        ).addCallback(lambda _: None)

    def get_scope(self, scope: str) -> Deferred[ScopeMapping]:
        return self._run(lambda connection: self._scope(self._one(
            connection, "SELECT * FROM scopes WHERE scope = ?", (scope,), scope)))

    def list_scopes(self) -> Deferred[list[ScopeMapping]]:
        return self._run(lambda connection: sorted_scopes(
            self._scope(row) for row in connection.execute(self._sql("SELECT * FROM scopes"), ()).fetchall()))

    def update_scope(self, scope: ScopeMapping) -> Deferred[None]:
        return self._existed("UPDATE scopes SET claims = ? WHERE scope = ?",
                             (json.dumps(dict(scope.claims)), scope.scope), missing=scope.scope)

    def delete_scope(self, scope: str) -> Deferred[bool]:
        return self._count("DELETE FROM scopes WHERE scope = ?", (scope,)).addCallback(lambda count: count > 0)

    def resolve(
        self, client_identifier: str, participant_context: str, scopes: Iterable[str]
    ) -> Deferred[Resolution]:
        wanted = wanted_scopes(scopes)
        key = (client_identifier, participant_context, wanted)
        cached = self._cache.get(key) if self._cache_trusted() else None
        if cached is not None:
            return succeed(cached)
        generation = self._cache.generation
        # One round trip: the mapping row with the wanted scope rows joined in.
        join = f"s.scope IN ({', '.join('?' for _ in wanted)})" if wanted else "1 = 0"
        statement = (
            "SELECT m.*, s.scope AS scope_name, s.claims AS scope_claims FROM mappings m "  # noqa: S608
            f"LEFT JOIN scopes s ON {join} WHERE m.client_identifier = ? AND m.participant_context = ?"
        )

        def resolve(connection: Connection) -> Resolution:
            rows = connection.execute(self._sql(statement), (*wanted, client_identifier, participant_context))
            found = rows.fetchall()
            if not found:
                raise NotFound(client_identifier)
            return Resolution(
                mapping=self._mapping(found[0]),
                scopes={row["scope_name"]: self._scope(row, "scope_name", "scope_claims")
                        for row in found if row["scope_name"] is not None},
            )

        def remember(resolution: Resolution) -> Resolution:
            if self._cache_trusted():
                self._cache.put(key, resolution, generation)
            return resolution

        return self._run(resolve).addCallback(remember)

    # -- integrations and keys ----------------------------------------------------------

    def add_integration(self, integration: Integration) -> Deferred[None]:
        return self._count(
            "INSERT INTO integrations VALUES (?, ?, ?)",
            (integration.integration_id, integration.description, self.clock.seconds()), Access.WRITE,
        ).addCallback(lambda _: None)

    def list_integrations(self) -> Deferred[list[Integration]]:
        def list_(connection: Connection) -> list[Integration]:
            keys = [self._key(row) for row in connection.execute(self._sql("SELECT * FROM api_keys"), ()).fetchall()]
            integrations = (
                Integration(row["integration_id"], row["description"], row["created_at"])
                for row in connection.execute(self._sql("SELECT * FROM integrations"), ()).fetchall()
            )
            return with_keys(integrations, keys)

        return self._run(list_)

    def add_api_key(self, record: ApiKeyRecord) -> Deferred[None]:
        now = self.clock.seconds()

        def add(connection: Connection) -> None:
            self._one(connection, "SELECT 1 AS found FROM integrations WHERE integration_id = ?",
                      (record.integration_id,), record.integration_id)
            connection.execute(
                self._sql("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?)"),
                (record.integration_id, record.key_id, record.secret_sha256, record.tier,
                 record.description, record.status, now),
            )

        return self._run(add, Access.WRITE)

    def get_api_key(self, integration_id: str, key_id: str) -> Deferred[ApiKeyRecord]:
        return self._run(lambda connection: self._key(self._one(
            connection, "SELECT * FROM api_keys WHERE integration_id = ? AND key_id = ?",
            (integration_id, key_id), key_id)))

    def revoke_api_key(self, integration_id: str, key_id: str) -> Deferred[bool]:
        return self._count(
            "UPDATE api_keys SET status = 'revoked' WHERE integration_id = ? AND key_id = ?",
            (integration_id, key_id), Access.WRITE,
        ).addCallback(lambda count: count > 0)

    # -- optional interfaces ------------------------------------------------------------

    def record_token_id(self, issuer: str, token_id: str, expires_at: float) -> Deferred[bool]:
        now = self.clock.seconds()

        def record(connection: Connection) -> bool:
            connection.execute(self._sql("DELETE FROM token_ids WHERE expires_at <= ?"), (now,))
            return connection.execute(
                self._sql("INSERT INTO token_ids VALUES (?, ?, ?) ON CONFLICT DO NOTHING"),
                (issuer, token_id, expires_at),
            ).rowcount == 1

        return self._run(record, Access.WRITE)

    def check_ready(self) -> Deferred[None]:
        def probe(connection: Connection) -> None:
            connection.execute("SELECT 1", ())

        return self._run(probe)
