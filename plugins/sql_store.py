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
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence, TypeVar

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
    #: a column holding a list of strings, and the SQL literal of the empty one
    list_type: str
    empty_list: str
    #: the SQL expression turning the JSON array in ``{column}`` into a ``list_type`` value
    list_from_json: str
    version_table: str
    #: taken in the migration's transaction so concurrent replicas take turns
    migration_lock: Optional[str] = None
    #: turns what the driver returns for a JSON column into Python values
    decode_json: Callable[[Any], Any] = json.loads
    #: a list of strings as a parameter for, and as read from, a ``list_type`` column
    encode_list: Callable[[list[str]], Any] = json.dumps
    decode_list: Callable[[Any], Any] = json.loads
    #: statements of this dialect alone, run right after the shared migration of that version
    own_migrations: Mapping[int, tuple[str, ...]] = attrs.field(factory=dict)

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
    # claims.md: a mapping's condition and claim expressions, a scope's claim
    # expressions.  Nullable or defaulted, so every existing row means what it
    # meant: no condition, no expressions.
    """
    ALTER TABLE mappings ADD COLUMN condition_expression TEXT;
    ALTER TABLE mappings ADD COLUMN claim_expressions {json} NOT NULL DEFAULT '{{}}';
    ALTER TABLE scopes ADD COLUMN claim_expressions {json} NOT NULL DEFAULT '{{}}'
    """,
    # migration.md (M-Lab): the API-key profiles an integration is bound to.  NULL, what every
    # integration stored before has, means every profile, so none of them changes meaning.
    """
    ALTER TABLE integrations ADD COLUMN profiles {json}
    """,
    # migration.md: mappings and scopes move into the Rust jwtlet's tables, created exactly as its
    # crates/jwtlet-postgres creates them (so a database it made, or shares, is used as it is), with
    # this version's columns added, nullable or defaulted, so the Rust jwtlet still writes them.
    # Where both systems already kept the same key, this version's row wins: it is what this
    # daemon served until now.
    """
    CREATE TABLE IF NOT EXISTS resource_mappings (
        client_identifier TEXT NOT NULL,
        participant_context TEXT NOT NULL,
        scopes {list} NOT NULL DEFAULT {empty_list},
        audiences {list} NOT NULL DEFAULT {empty_list},
        PRIMARY KEY (client_identifier, participant_context)
    );
    CREATE INDEX IF NOT EXISTS idx_resource_mappings_client ON resource_mappings (client_identifier);
    CREATE TABLE IF NOT EXISTS scope_mappings (
        scope TEXT PRIMARY KEY,
        claims {json} NOT NULL DEFAULT '{{}}'
    );
    ALTER TABLE resource_mappings ADD COLUMN condition_expression TEXT;
    ALTER TABLE resource_mappings ADD COLUMN claim_expressions {json} NOT NULL DEFAULT '{{}}';
    ALTER TABLE scope_mappings ADD COLUMN claim_expressions {json} NOT NULL DEFAULT '{{}}';
    INSERT INTO resource_mappings
        (client_identifier, participant_context, scopes, audiences, condition_expression, claim_expressions)
        SELECT client_identifier, participant_context, {scopes_from_json}, {audiences_from_json},
               condition_expression, claim_expressions
        FROM mappings WHERE TRUE
        ON CONFLICT (client_identifier, participant_context) DO UPDATE SET
            scopes = excluded.scopes, audiences = excluded.audiences,
            condition_expression = excluded.condition_expression, claim_expressions = excluded.claim_expressions;
    INSERT INTO scope_mappings (scope, claims, claim_expressions)
        SELECT scope, claims, claim_expressions FROM scopes WHERE TRUE
        ON CONFLICT (scope) DO UPDATE SET claims = excluded.claims, claim_expressions = excluded.claim_expressions;
    DROP TABLE mappings;
    DROP TABLE scopes
    """,
)
#: the version of the migration above; a dialect's own statements for those tables run with it
RUST_LAYOUT = 4


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
    names = {
        "json": dialect.json_type, "real": dialect.real_type, "bytes": dialect.bytes_type,
        "list": dialect.list_type, "empty_list": dialect.empty_list,
        "scopes_from_json": dialect.list_from_json.format(column="scopes"),
        "audiences_from_json": dialect.list_from_json.format(column="audiences"),
    }
    for version, script in enumerate(SCHEMA[current:], start=current + 1):
        shared = [statement for statement in script.format(**names).split(";") if statement.strip()]
        for statement in (*shared, *dialect.own_migrations.get(version, ())):
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
        as_list = self.dialect.decode_list
        return ResourceMapping(row["client_identifier"], row["participant_context"],
                               scopes=tuple(as_list(row["scopes"])), audiences=tuple(as_list(row["audiences"])),
                               condition=row["condition_expression"],
                               claim_expressions=self.dialect.decode_json(row["claim_expressions"]))

    def _scope(self, row: Row, prefix: str = "") -> ScopeMapping:
        """A scope row, or the scope columns of a resolve's join (named with ``prefix``)."""
        decode = self.dialect.decode_json
        return ScopeMapping(row[prefix + "scope"], decode(row[prefix + "claims"]),
                            claim_expressions=decode(row[prefix + "claim_expressions"]))

    @staticmethod
    def _key(row: Row) -> ApiKeyRecord:
        return ApiKeyRecord(
            integration_id=row["integration_id"], key_id=row["key_id"], secret_sha256=bytes(row["secret_sha256"]),
            tier=row["tier"], description=row["description"], status=row["status"], created_at=row["created_at"],
        )

    def _lists(self, mapping: ResourceMapping) -> tuple[Any, Any]:
        """A mapping's scopes and audiences as parameters for their columns."""
        encode = self.dialect.encode_list
        return encode(list(mapping.scopes)), encode(list(mapping.audiences))

    def _profiles(self, value: Any) -> Optional[tuple[str, ...]]:
        """An integration's ``profiles`` column: ``None`` (every profile) or the list it is bound to."""
        return None if value is None else tuple(self.dialect.decode_json(value))

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
            "INSERT INTO resource_mappings (client_identifier, participant_context, scopes, audiences, "
            "condition_expression, claim_expressions) VALUES (?, ?, ?, ?, ?, ?)",
            (mapping.client_identifier, mapping.participant_context, *self._lists(mapping),
             mapping.condition, json.dumps(dict(mapping.claim_expressions))),
        ).addCallback(lambda _: None)

    def get_mapping(self, client_identifier: str, participant_context: str) -> Deferred[ResourceMapping]:
        return self._run(lambda connection: self._mapping(self._one(
            connection, "SELECT * FROM resource_mappings WHERE client_identifier = ? AND participant_context = ?",
            (client_identifier, participant_context), client_identifier)))

    def list_mappings(self, client_identifier: Optional[str] = None) -> Deferred[list[ResourceMapping]]:
        def list_(connection: Connection) -> list[ResourceMapping]:
            if client_identifier is None:
                rows = connection.execute(self._sql("SELECT * FROM resource_mappings"), ()).fetchall()
            else:
                rows = connection.execute(
                    self._sql("SELECT * FROM resource_mappings WHERE client_identifier = ?"), (client_identifier,)
                ).fetchall()
            return sorted_mappings(self._mapping(row) for row in rows)

        return self._run(list_)

    def update_mapping(self, mapping: ResourceMapping) -> Deferred[None]:
        return self._existed(
            "UPDATE resource_mappings SET scopes = ?, audiences = ?, condition_expression = ?, "
            "claim_expressions = ? WHERE client_identifier = ? AND participant_context = ?",
            (*self._lists(mapping), mapping.condition, json.dumps(dict(mapping.claim_expressions)),
             mapping.client_identifier, mapping.participant_context),
            missing=str(mapping.key),
        )

    def delete_mapping(self, client_identifier: str, participant_context: str) -> Deferred[bool]:
        return self._count(
            "DELETE FROM resource_mappings WHERE client_identifier = ? AND participant_context = ?",
            (client_identifier, participant_context),
        ).addCallback(lambda count: count > 0)

    def delete_client_mappings(self, client_identifier: str) -> Deferred[int]:
        return self._count("DELETE FROM resource_mappings WHERE client_identifier = ?", (client_identifier,))

    # -- scopes ---------------------------------------------------------------------------

    def add_scope(self, scope: ScopeMapping) -> Deferred[None]:
        return self._count(
            "INSERT INTO scope_mappings (scope, claims, claim_expressions) VALUES (?, ?, ?)",
            (scope.scope, json.dumps(dict(scope.claims)), json.dumps(dict(scope.claim_expressions))),
        ).addCallback(lambda _: None)

    def get_scope(self, scope: str) -> Deferred[ScopeMapping]:
        return self._run(lambda connection: self._scope(self._one(
            connection, "SELECT * FROM scope_mappings WHERE scope = ?", (scope,), scope)))

    def list_scopes(self) -> Deferred[list[ScopeMapping]]:
        return self._run(lambda connection: sorted_scopes(
            self._scope(row) for row in connection.execute(self._sql("SELECT * FROM scope_mappings"), ()).fetchall()))

    def update_scope(self, scope: ScopeMapping) -> Deferred[None]:
        return self._existed("UPDATE scope_mappings SET claims = ?, claim_expressions = ? WHERE scope = ?",
                             (json.dumps(dict(scope.claims)), json.dumps(dict(scope.claim_expressions)),
                              scope.scope), missing=scope.scope)

    def delete_scope(self, scope: str) -> Deferred[bool]:
        return self._count("DELETE FROM scope_mappings WHERE scope = ?", (scope,)).addCallback(lambda count: count > 0)

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
            "SELECT m.*, s.scope AS joined_scope, s.claims AS joined_claims, "  # noqa: S608
            "s.claim_expressions AS joined_claim_expressions FROM resource_mappings m "
            f"LEFT JOIN scope_mappings s ON {join} WHERE m.client_identifier = ? AND m.participant_context = ?"
        )

        def resolve(connection: Connection) -> Resolution:
            rows = connection.execute(self._sql(statement), (*wanted, client_identifier, participant_context))
            found = rows.fetchall()
            if not found:
                raise NotFound(client_identifier)
            return Resolution(
                mapping=self._mapping(found[0]),
                scopes={row["joined_scope"]: self._scope(row, "joined_")
                        for row in found if row["joined_scope"] is not None},
            )

        def remember(resolution: Resolution) -> Resolution:
            if self._cache_trusted():
                self._cache.put(key, resolution, generation)
            return resolution

        return self._run(resolve).addCallback(remember)

    # -- integrations and keys ----------------------------------------------------------

    def add_integration(self, integration: Integration) -> Deferred[None]:
        profiles = None if integration.profiles is None else json.dumps(list(integration.profiles))
        return self._count(
            "INSERT INTO integrations (integration_id, description, created_at, profiles) VALUES (?, ?, ?, ?)",
            (integration.integration_id, integration.description, self.clock.seconds(), profiles), Access.WRITE,
        ).addCallback(lambda _: None)

    def list_integrations(self) -> Deferred[list[Integration]]:
        def list_(connection: Connection) -> list[Integration]:
            keys = [self._key(row) for row in connection.execute(self._sql("SELECT * FROM api_keys"), ()).fetchall()]
            integrations = (
                Integration(row["integration_id"], row["description"], row["created_at"],
                            profiles=self._profiles(row["profiles"]))
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
        def get(connection: Connection) -> ApiKeyRecord:
            # The key with its integration's profiles, in one round trip.
            row = self._one(
                connection, "SELECT k.*, i.profiles AS integration_profiles FROM api_keys k "
                "JOIN integrations i ON i.integration_id = k.integration_id "
                "WHERE k.integration_id = ? AND k.key_id = ?", (integration_id, key_id), key_id)
            return attrs.evolve(self._key(row), profiles=self._profiles(row["integration_profiles"]))

        return self._run(get)

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
