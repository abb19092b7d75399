"""
The ``postgres`` store: psycopg 3 with a connection pool, for several replicas
sharing one database.

Why threads: the daemon runs on Twisted's default reactor, and psycopg's
blocking API on a ``psycopg_pool.ConnectionPool`` is its most mature path.
Each call runs on a Twisted thread pool sized to the connection pool, so the
reactor never waits on the database (the asyncio pool would force the whole
daemon onto the asyncio reactor for one plugin).

Several replicas: migrations run under a transaction-scoped advisory lock, so
replicas starting together apply them once; every write sends
``NOTIFY jwtlet_changes`` in its transaction, and a listener connection per
replica drops the resolve cache when any replica changes something.  While
the listener is disconnected the cache is bypassed, so a mapping deleted
elsewhere is never served from it; and a resolve that read before a change
and finishes after its notification does not fill the cache (a generation
counter, bumped by every invalidation, says so).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Optional, TypeVar

import attrs
import psycopg
import psycopg_pool
from psycopg import errors as pg_errors
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from jwtlet.interfaces import (
    Conflict,
    DependencyUnavailable,
    IChangeNotifier,
    IMappingStore,
    IMappingStoreFactory,
    IReadiness,
    IReplayRecord,
    NotFound,
    PluginConfigError,
    PluginContext,
)
from jwtlet.model import ApiKeyRecord, Integration, Resolution, ResourceMapping, ScopeMapping

log = Logger(namespace="jwtlet.store.postgres")

T = TypeVar("T")

CHANNEL = "jwtlet_changes"
MIGRATION_LOCK = 0x6A77746C  # "jwtl"
RESOLVE_CACHE_ENTRIES = 10_000

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE mappings (
        client_identifier TEXT NOT NULL,
        participant_context TEXT NOT NULL,
        scopes JSONB NOT NULL,
        audiences JSONB NOT NULL,
        PRIMARY KEY (client_identifier, participant_context)
    );
    CREATE TABLE scopes (
        scope TEXT PRIMARY KEY,
        claims JSONB NOT NULL
    );
    CREATE TABLE integrations (
        integration_id TEXT PRIMARY KEY,
        description TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE api_keys (
        integration_id TEXT NOT NULL REFERENCES integrations (integration_id) ON DELETE CASCADE,
        key_id TEXT NOT NULL,
        secret_sha256 BYTEA NOT NULL,
        tier INTEGER NOT NULL,
        description TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (integration_id, key_id)
    );
    CREATE TABLE token_ids (
        issuer TEXT NOT NULL,
        token_id TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (issuer, token_id)
    );
    CREATE INDEX token_ids_expiry ON token_ids (expires_at)
    """,
)


def migrate(connection: psycopg.Connection[Any]) -> None:
    """Apply missing migrations; the advisory lock makes concurrent replicas take turns."""
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        connection.execute("CREATE TABLE IF NOT EXISTS jwtlet_schema_version (version INTEGER NOT NULL)")
        row = connection.execute("SELECT MAX(version) AS version FROM jwtlet_schema_version").fetchone()
        current = (row["version"] if row else None) or 0
        for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
            for statement in script.split(";"):
                if statement.strip():
                    connection.execute(statement.encode())
            connection.execute("INSERT INTO jwtlet_schema_version (version) VALUES (%s)", (version,))


def _mapping(row: Mapping[str, Any]) -> ResourceMapping:
    return ResourceMapping(row["client_identifier"], row["participant_context"],
                           scopes=tuple(row["scopes"]), audiences=tuple(row["audiences"]))


def _key(row: Mapping[str, Any]) -> ApiKeyRecord:
    return ApiKeyRecord(
        integration_id=row["integration_id"], key_id=row["key_id"], secret_sha256=bytes(row["secret_sha256"]),
        tier=row["tier"], description=row["description"], status=row["status"], created_at=row["created_at"],
    )


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: Any) -> float:
    """``"30s"``, ``"5m"``, ``"250ms"`` or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError("must be a duration such as \"30s\"")
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


@attrs.frozen
class PoolOptions:
    min_connections: int = 1
    max_connections: int = 10
    acquire_timeout: float = 5.0
    idle_timeout: float = 600.0
    max_lifetime: float = 3600.0
    test_before_acquire: bool = False
    application_name: str = "jwtlet"


class Listener:
    """
    A connection of its own that LISTENs for changes and calls back on the
    reactor: after each notification, and after every (re)connect, since
    notifications may have been missed while disconnected.

    ``connected`` (whether the cache may be trusted) changes only on the
    reactor thread, in the order the listener thread saw things happen, and a
    reconnect invalidates before it says so: no resolve can slip in between
    and serve an entry a missed notification should have dropped.
    """

    def __init__(self, conninfo: str, reactor: Any, changed: Callable[[], None]):
        self.conninfo = conninfo
        self.reactor = reactor
        self.changed = changed
        self.connected = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="jwtlet-pg-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _up(self) -> None:
        self.changed()
        self.connected = True

    def _down(self) -> None:
        self.connected = False

    def _loop(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            listening = False
            try:
                with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    listening = True
                    delay = 0.1
                    self.reactor.callFromThread(self._up)
                    while not self._stop.is_set():
                        for _ in connection.notifies(timeout=0.2):
                            self.reactor.callFromThread(self.changed)
            except psycopg.Error as error:
                if listening:
                    log.warn("change listener lost its connection: {error}", error=type(error).__name__)
            finally:
                if listening:
                    self.reactor.callFromThread(self._down)
            self._stop.wait(delay)
            delay = min(delay * 2, 5.0)


@implementer(IMappingStore, IReplayRecord, IChangeNotifier, IReadiness, IService)
class PostgresStore(Service):
    """A MappingStore in PostgreSQL; see the module docstring."""

    def __init__(self, conninfo: str, pool: PoolOptions, reactor: Any, clock: Any, run_migrations: bool = True):
        self.conninfo = conninfo
        self.reactor = reactor
        self.clock = clock
        self.run_migrations = run_migrations
        self.pool_options = pool
        self._threads = ThreadPool(minthreads=0, maxthreads=pool.max_connections, name="jwtlet-postgres")
        self._pool = psycopg_pool.ConnectionPool(
            conninfo,
            min_size=pool.min_connections,
            max_size=pool.max_connections,
            timeout=pool.acquire_timeout,
            max_idle=pool.idle_timeout,
            max_lifetime=pool.max_lifetime,
            kwargs={"application_name": pool.application_name, "connect_timeout": 5, "row_factory": dict_row},
            check=psycopg_pool.ConnectionPool.check_connection if pool.test_before_acquire else None,
            open=False,
            name="jwtlet",
        )
        self._migrated = not run_migrations
        self._listeners: list[Callable[[], None]] = []
        self._cache: OrderedDict[tuple[str, str, tuple[str, ...]], Resolution] = OrderedDict()
        #: bumped by every invalidation: a resolve that read under an older one must not fill the cache
        self._generation = 0
        self._listener = Listener(conninfo, reactor, self._changed)
        self._started = False

    # -- lifecycle ------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self._start()

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self._threads.start()
        self._pool.open(wait=False)
        self._listener.start()
        self._shutdown = self.reactor.addSystemEventTrigger("during", "shutdown", self._threads.stop)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self._listener.stop()
        closing: Deferred[None] = deferToThreadPool(self.reactor, self._threads, self._pool.close, 5.0)

        def stop_threads(result: object) -> object:
            if self._started:
                self.reactor.removeSystemEventTrigger(self._shutdown)
                self._threads.stop()
                self._started = False
            return result

        return closing.addBoth(stop_threads)

    # -- running work on the pool ----------------------------------------------

    def _run(self, work: Callable[[psycopg.Connection[Any]], T], notify: bool = False) -> Deferred[T]:
        self._start()
        deferred = deferToThreadPool(self.reactor, self._threads, self._guarded, work, notify)
        if notify:
            deferred.addCallback(self._after_write)
        return deferred

    def _guarded(self, work: Callable[[psycopg.Connection[Any]], T], notify: bool) -> T:
        try:
            if not self._migrated:
                with self._pool.connection() as connection:
                    migrate(connection)
                self._migrated = True
            with self._pool.connection() as connection:
                with connection.transaction():
                    result = work(connection)
                    if notify:
                        connection.execute(f"NOTIFY {CHANNEL}")
                return result
        except pg_errors.UniqueViolation as error:
            raise Conflict(type(error).__name__) from None
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout, pg_errors.AdminShutdown) as error:
            raise DependencyUnavailable(f"postgres: {type(error).__name__}") from None
        except psycopg.InterfaceError as error:
            raise DependencyUnavailable(f"postgres: {type(error).__name__}") from None

    def _after_write(self, result: T) -> T:
        self._changed()
        return result

    def _changed(self) -> None:
        self._generation += 1
        self._cache.clear()
        for listener in list(self._listeners):
            listener()

    # -- mappings -----------------------------------------------------------------

    def add_mapping(self, mapping: ResourceMapping) -> Deferred[None]:
        def add(connection: psycopg.Connection[Any]) -> None:
            connection.execute(
                "INSERT INTO mappings VALUES (%s, %s, %s, %s)",
                (mapping.client_identifier, mapping.participant_context,
                 json.dumps(list(mapping.scopes)), json.dumps(list(mapping.audiences))),
            )

        return self._run(add, notify=True)

    def get_mapping(self, client_identifier: str, participant_context: str) -> Deferred[ResourceMapping]:
        def get(connection: psycopg.Connection[Any]) -> ResourceMapping:
            row = connection.execute(
                "SELECT * FROM mappings WHERE client_identifier = %s AND participant_context = %s",
                (client_identifier, participant_context),
            ).fetchone()
            if row is None:
                raise NotFound(client_identifier)
            return _mapping(row)

        return self._run(get)

    def list_mappings(self, client_identifier: Optional[str] = None) -> Deferred[list[ResourceMapping]]:
        def list_(connection: psycopg.Connection[Any]) -> list[ResourceMapping]:
            rows = connection.execute(
                "SELECT * FROM mappings WHERE %s::text IS NULL OR client_identifier = %s "
                "ORDER BY client_identifier COLLATE \"C\", participant_context COLLATE \"C\"",
                (client_identifier, client_identifier),
            ).fetchall()
            return [_mapping(row) for row in rows]

        return self._run(list_)

    def update_mapping(self, mapping: ResourceMapping) -> Deferred[None]:
        def update(connection: psycopg.Connection[Any]) -> None:
            cursor = connection.execute(
                "UPDATE mappings SET scopes = %s, audiences = %s "
                "WHERE client_identifier = %s AND participant_context = %s",
                (json.dumps(list(mapping.scopes)), json.dumps(list(mapping.audiences)),
                 mapping.client_identifier, mapping.participant_context),
            )
            if cursor.rowcount == 0:
                raise NotFound(mapping.key)

        return self._run(update, notify=True)

    def delete_mapping(self, client_identifier: str, participant_context: str) -> Deferred[bool]:
        def delete(connection: psycopg.Connection[Any]) -> bool:
            return connection.execute(
                "DELETE FROM mappings WHERE client_identifier = %s AND participant_context = %s",
                (client_identifier, participant_context),
            ).rowcount > 0

        return self._run(delete, notify=True)

    def delete_client_mappings(self, client_identifier: str) -> Deferred[int]:
        def delete(connection: psycopg.Connection[Any]) -> int:
            return int(connection.execute(
                "DELETE FROM mappings WHERE client_identifier = %s", (client_identifier,)).rowcount)

        return self._run(delete, notify=True)

    # -- scopes ---------------------------------------------------------------------

    def add_scope(self, scope: ScopeMapping) -> Deferred[None]:
        def add(connection: psycopg.Connection[Any]) -> None:
            connection.execute("INSERT INTO scopes VALUES (%s, %s)", (scope.scope, json.dumps(dict(scope.claims))))

        return self._run(add, notify=True)

    def get_scope(self, scope: str) -> Deferred[ScopeMapping]:
        def get(connection: psycopg.Connection[Any]) -> ScopeMapping:
            row = connection.execute("SELECT * FROM scopes WHERE scope = %s", (scope,)).fetchone()
            if row is None:
                raise NotFound(scope)
            return ScopeMapping(row["scope"], row["claims"])

        return self._run(get)

    def list_scopes(self) -> Deferred[list[ScopeMapping]]:
        def list_(connection: psycopg.Connection[Any]) -> list[ScopeMapping]:
            rows = connection.execute("SELECT * FROM scopes ORDER BY scope COLLATE \"C\"").fetchall()
            return [ScopeMapping(row["scope"], row["claims"]) for row in rows]

        return self._run(list_)

    def update_scope(self, scope: ScopeMapping) -> Deferred[None]:
        def update(connection: psycopg.Connection[Any]) -> None:
            cursor = connection.execute(
                "UPDATE scopes SET claims = %s WHERE scope = %s", (json.dumps(dict(scope.claims)), scope.scope))
            if cursor.rowcount == 0:
                raise NotFound(scope.scope)

        return self._run(update, notify=True)

    def delete_scope(self, scope: str) -> Deferred[bool]:
        def delete(connection: psycopg.Connection[Any]) -> bool:
            return connection.execute("DELETE FROM scopes WHERE scope = %s", (scope,)).rowcount > 0

        return self._run(delete, notify=True)

    def resolve(
        self, client_identifier: str, participant_context: str, scopes: Iterable[str]
    ) -> Deferred[Resolution]:
        wanted = tuple(sorted(set(scopes)))
        key = (client_identifier, participant_context, wanted)
        cached = self._cache.get(key) if self._listener.connected else None
        if cached is not None:
            self._cache.move_to_end(key)
            done: Deferred[Resolution] = Deferred()
            done.callback(cached)
            return done
        generation = self._generation

        def resolve(connection: psycopg.Connection[Any]) -> Resolution:
            # One round trip: the mapping row with its scope rows joined in.
            rows = connection.execute(
                "SELECT m.*, s.scope AS scope_name, s.claims AS scope_claims FROM mappings m "
                "LEFT JOIN scopes s ON s.scope = ANY(%s) "
                "WHERE m.client_identifier = %s AND m.participant_context = %s",
                (list(wanted), client_identifier, participant_context),
            ).fetchall()
            if not rows:
                raise NotFound(client_identifier)
            found = {row["scope_name"]: ScopeMapping(row["scope_name"], row["scope_claims"])
                     for row in rows if row["scope_name"] is not None}
            return Resolution(mapping=_mapping(rows[0]), scopes=found)

        def remember(resolution: Resolution) -> Resolution:
            if self._listener.connected and generation == self._generation:
                self._cache[key] = resolution
                while len(self._cache) > RESOLVE_CACHE_ENTRIES:
                    self._cache.popitem(last=False)
            return resolution

        return self._run(resolve).addCallback(remember)

    # -- integrations and keys --------------------------------------------------------

    def add_integration(self, integration: Integration) -> Deferred[None]:
        now = self.clock.seconds()

        def add(connection: psycopg.Connection[Any]) -> None:
            connection.execute("INSERT INTO integrations VALUES (%s, %s, %s)",
                               (integration.integration_id, integration.description, now))

        return self._run(add)

    def list_integrations(self) -> Deferred[list[Integration]]:
        def list_(connection: psycopg.Connection[Any]) -> list[Integration]:
            keys: dict[str, list[ApiKeyRecord]] = {}
            for row in connection.execute(
                    "SELECT * FROM api_keys ORDER BY integration_id COLLATE \"C\", key_id COLLATE \"C\"").fetchall():
                keys.setdefault(row["integration_id"], []).append(_key(row))
            return [
                Integration(row["integration_id"], row["description"], row["created_at"],
                            tuple(keys.get(row["integration_id"], ())))
                for row in connection.execute(
                    "SELECT * FROM integrations ORDER BY integration_id COLLATE \"C\"").fetchall()
            ]

        return self._run(list_)

    def add_api_key(self, record: ApiKeyRecord) -> Deferred[None]:
        now = self.clock.seconds()

        def add(connection: psycopg.Connection[Any]) -> None:
            try:
                connection.execute(
                    "INSERT INTO api_keys VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (record.integration_id, record.key_id, record.secret_sha256, record.tier,
                     record.description, record.status, now),
                )
            except pg_errors.ForeignKeyViolation:
                raise NotFound(record.integration_id) from None

        return self._run(add)

    def get_api_key(self, integration_id: str, key_id: str) -> Deferred[ApiKeyRecord]:
        def get(connection: psycopg.Connection[Any]) -> ApiKeyRecord:
            row = connection.execute("SELECT * FROM api_keys WHERE integration_id = %s AND key_id = %s",
                                     (integration_id, key_id)).fetchone()
            if row is None:
                raise NotFound(key_id)
            return _key(row)

        return self._run(get)

    def revoke_api_key(self, integration_id: str, key_id: str) -> Deferred[bool]:
        def revoke(connection: psycopg.Connection[Any]) -> bool:
            return connection.execute(
                "UPDATE api_keys SET status = 'revoked' WHERE integration_id = %s AND key_id = %s",
                (integration_id, key_id),
            ).rowcount > 0

        return self._run(revoke)

    # -- optional interfaces ---------------------------------------------------------

    def record_token_id(self, issuer: str, token_id: str, expires_at: float) -> Deferred[bool]:
        now = self.clock.seconds()

        def record(connection: psycopg.Connection[Any]) -> bool:
            connection.execute("DELETE FROM token_ids WHERE expires_at <= %s", (now,))
            return connection.execute(
                "INSERT INTO token_ids VALUES (%s, %s, %s) ON CONFLICT DO NOTHING", (issuer, token_id, expires_at)
            ).rowcount == 1

        return self._run(record)

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def check_ready(self) -> Deferred[None]:
        def probe(connection: psycopg.Connection[Any]) -> None:
            connection.execute("SELECT 1")

        return self._run(probe)


# -- options --------------------------------------------------------------------------

_TOP = frozenset({"url", "pool", "run_migrations_on_startup", "sslmode", "ssl_root_cert"})
_POOL = frozenset({"min_connections", "max_connections", "acquire_timeout", "idle_timeout", "max_lifetime",
                   "test_before_acquire", "application_name", "statement_cache_capacity"})
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _pool_options(raw: Any, problems: list[str]) -> PoolOptions:
    if raw is None:
        return PoolOptions()
    if not isinstance(raw, Mapping):
        problems.append("pool: must be a table")
        return PoolOptions()
    problems.extend(f"pool.{key}: unknown key" for key in raw if key not in _POOL)
    values: dict[str, Any] = {}
    for key in ("min_connections", "max_connections"):
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key.startswith("min") else 1):
                problems.append(f"pool.{key}: must be a whole number ({'0' if key.startswith('min') else '1'} or more)")
            else:
                values[key] = value
    for key in ("acquire_timeout", "idle_timeout", "max_lifetime"):
        if key in raw:
            try:
                values[key] = parse_duration(raw[key])
            except ValueError as error:
                problems.append(f"pool.{key}: {error}")
    if "test_before_acquire" in raw:
        if isinstance(raw["test_before_acquire"], bool):
            values["test_before_acquire"] = raw["test_before_acquire"]
        else:
            problems.append("pool.test_before_acquire: must be true or false")
    if "application_name" in raw:
        values["application_name"] = str(raw["application_name"])
    if "statement_cache_capacity" in raw:
        log.warn("storage_backend.pool.statement_cache_capacity has no meaning for psycopg and is ignored")
    options = PoolOptions(**values)
    if options.min_connections > options.max_connections:
        problems.append("pool.min_connections: must not exceed max_connections")
    return options


@implementer(IPlugin, IMappingStoreFactory)
@attrs.frozen
class PostgresStoreFactory:
    name: str = "postgres"
    description: str = "keeps mappings in PostgreSQL (psycopg 3, pooled; several replicas may share it)"

    def build(self, options: Mapping[str, Any], context: PluginContext) -> PostgresStore:
        problems = [f"{key}: unknown key" for key in options if key not in _TOP]
        url = options.get("url")
        if not isinstance(url, str) or not url.strip():
            problems.append("url: required for the postgres store (a libpq URL)")
        pool = _pool_options(options.get("pool"), problems)
        migrations = options.get("run_migrations_on_startup", True)
        if not isinstance(migrations, bool):
            problems.append("run_migrations_on_startup: must be true or false")
        sslmode = options.get("sslmode")
        if sslmode is not None and sslmode not in _SSLMODES:
            problems.append(f"sslmode: must be one of {', '.join(_SSLMODES)}")
        if problems:
            raise PluginConfigError(*problems)
        conninfo = str(url)
        extra = {k: v for k, v in (("sslmode", sslmode), ("sslrootcert", options.get("ssl_root_cert"))) if v}
        if extra:
            conninfo = make_conninfo(conninfo, **extra)
        return PostgresStore(conninfo, pool, context.reactor, context.clock, run_migrations=bool(migrations))


postgres = PostgresStoreFactory()
