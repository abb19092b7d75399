"""
The ``postgres`` store: psycopg 3 with a connection pool, for several replicas
sharing one database.

Why threads: the daemon runs on Twisted's default reactor, and psycopg's
blocking API on a ``psycopg_pool.ConnectionPool`` is its most mature path.
Each call runs on a Twisted thread pool sized to the connection pool, so the
reactor never waits on the database (the asyncio pool would force the whole
daemon onto the asyncio reactor for one plugin).

Schema, queries and the resolve cache are shared with ``sqlite``
(:mod:`jwtlet.plugins.sql_store`); this module is the PostgreSQL side: the
connection pool, its errors, and hearing about other replicas' changes.

Mappings and scopes live in the Rust jwtlet's own tables (``resource_mappings``,
``scope_mappings``), so a database it made is used as it is and both may share
one during a migration.

Several replicas: migrations run under a transaction-scoped advisory lock, so
replicas starting together apply them once; every write to the mapping tables
(by any replica, or by a Rust jwtlet beside them) sends ``NOTIFY
jwtlet_changes`` from a trigger in its transaction, and a listener connection
per replica drops the resolve cache when anything changed.  While
the listener is disconnected the cache is bypassed, so a mapping deleted
elsewhere is never served from it; and a resolve that read before a change
and finishes after its notification does not fill the cache (a generation
counter, bumped by every invalidation, says so).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, TypeVar, cast

import attrs
from twisted.application.service import IService
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from jwtlet.config.reader import SectionReader, as_bool, as_int, as_nonempty_str, as_str, one_of
from jwtlet.interfaces import (
    Conflict,
    DependencyUnavailable,
    IMappingStore,
    IMappingStoreFactory,
    IReadiness,
    IReplayRecord,
    PluginConfigError,
    PluginContext,
)
from jwtlet.plugins import sql_store
from jwtlet.plugins.sql_store import Access, Connection, SQLReactor, SQLStore

# psycopg is imported where it is used, not here: every plugin module is
# imported by discovery, and a daemon on SQLite would carry psycopg's ~9 MB.
if TYPE_CHECKING:
    import psycopg

log = Logger(namespace="jwtlet.store.postgres")

T = TypeVar("T")

CHANNEL = "jwtlet_changes"
MIGRATION_LOCK = 0x6A77746C  # "jwtl"

#: Every write to the mapping tables, by any client (this daemon, another replica, a Rust
#: jwtlet sharing the database, psql), announces itself in its own transaction, so no
#: replica's resolve cache outlives it.
CHANGE_TRIGGERS = (
    f"""
    CREATE FUNCTION jwtlet_announce_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('{CHANNEL}', '');
        RETURN NULL;
    END
    $$
    """,
    *(
        f"CREATE TRIGGER {table}_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} "
        "FOR EACH STATEMENT EXECUTE FUNCTION jwtlet_announce_change()"
        for table in ("resource_mappings", "scope_mappings")
    ),
)

DIALECT = sql_store.Dialect(
    placeholder="%s", json_type="JSONB", real_type="DOUBLE PRECISION", bytes_type="BYTEA",
    # the Rust jwtlet's column type: psycopg passes and returns Python lists as arrays
    list_type="TEXT[]", empty_list="'{}'", list_from_json="ARRAY(SELECT jsonb_array_elements_text({column}))",
    version_table="jwtlet_schema_version", migration_lock=f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})",
    # psycopg hands JSONB columns over already decoded
    decode_json=lambda value: value,
    encode_list=lambda value: value,
    decode_list=lambda value: value,
    own_migrations={sql_store.RUST_LAYOUT: CHANGE_TRIGGERS},
)


def migrate(connection: psycopg.Connection[Any]) -> int:
    """Apply missing migrations; the advisory lock makes concurrent replicas take turns."""
    with connection.transaction():
        return sql_store.migrate(connection, DIALECT)


#: The units of the Rust jwtlet's durations (humantime), in seconds.
_UNITS = {
    **dict.fromkeys(("ms", "msec", "millis"), 0.001),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
}
_NOT_A_DURATION = 'must be a duration such as "30s"'
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


def parse_duration(value: Any) -> float:
    """
    A number of seconds, or a duration as the Rust jwtlet writes them:
    ``"30s"``, ``"5m"``, ``"250ms"``, ``"1h30m"``, ``"1h 30m"``.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = value.strip().lower() if isinstance(value, str) else ""
    parts = list(_DURATION_PART.finditer(text))
    # Every character must belong to a part (spaces between parts aside).
    if not parts or "".join(part.group(0) for part in parts) != text.replace(" ", "").replace("\t", ""):
        raise ValueError(_NOT_A_DURATION)
    total = 0.0
    for part in parts:
        unit = part.group(2) or ("s" if len(parts) == 1 else "")
        if unit not in _UNITS:
            raise ValueError(_NOT_A_DURATION)
        total += float(part.group(1)) * _UNITS[unit]
    return total


@attrs.frozen
class PoolOptions:
    min_connections: int = 1
    max_connections: int = 10
    acquire_timeout: float = 5.0
    idle_timeout: float = 600.0
    max_lifetime: float = 3600.0
    test_before_acquire: bool = False
    application_name: str = "jwtlet"
    #: prepared statements kept per connection (psycopg's ``prepared_max``);
    #: 0: none at all, as behind PgBouncer in transaction mode; ``None``: psycopg's default
    statement_cache_capacity: Optional[int] = None

    def configure(self, connection: psycopg.Connection[Any]) -> None:
        """Applied to each new connection of the pool."""
        if self.statement_cache_capacity == 0:
            connection.prepare_threshold = None
        elif self.statement_cache_capacity is not None:
            connection.prepared_max = self.statement_cache_capacity


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

    def __init__(self, conninfo: str, reactor: IReactorFromThreads, changed: Callable[[], None]):
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
        import psycopg

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


@implementer(IMappingStore, IReplayRecord, IReadiness, IService)
class PostgresStore(SQLStore):
    """A MappingStore in PostgreSQL; see the module docstring."""

    dialect = DIALECT

    def __init__(self, conninfo: str, pool: PoolOptions, reactor: SQLReactor, clock: IReactorTime,
                 run_migrations: bool = True):
        super().__init__(reactor, clock,
                         ThreadPool(minthreads=0, maxthreads=pool.max_connections, name="jwtlet-postgres"))
        self.conninfo = conninfo
        self.run_migrations = run_migrations
        self.pool_options = pool
        import psycopg_pool
        from psycopg.rows import dict_row

        self._pool = psycopg_pool.ConnectionPool(
            conninfo,
            min_size=pool.min_connections,
            max_size=pool.max_connections,
            timeout=pool.acquire_timeout,
            max_idle=pool.idle_timeout,
            max_lifetime=pool.max_lifetime,
            kwargs={"application_name": pool.application_name, "connect_timeout": 5, "row_factory": dict_row},
            check=psycopg_pool.ConnectionPool.check_connection if pool.test_before_acquire else None,
            configure=pool.configure,
            open=False,
            name="jwtlet",
        )
        self._migrated = not run_migrations
        self._migrating = threading.Lock()
        self._listener = Listener(conninfo, reactor, self._invalidate)

    def _opened(self) -> None:
        self._pool.open(wait=False)
        self._listener.start()

    def _close(self) -> None:
        self._listener.stop()
        self._pool.close(5.0)

    def _cache_trusted(self) -> bool:
        # While the listener is disconnected, another replica's change would go unheard.
        return self._listener.connected

    def _transaction(self, work: Callable[[Connection], T], access: Access) -> T:
        if not self._migrated:
            # Pool threads meet here together on the first requests: one
            # migrates, the others wait for it instead of each running it.
            with self._migrating:
                if not self._migrated:
                    with self._pool.connection() as connection:
                        migrate(connection)
                    self._migrated = True
        # No NOTIFY here: the tables' triggers (CHANGE_TRIGGERS) send it for every writer.
        with self._pool.connection() as connection:
            with connection.transaction():
                return work(connection)

    def _translate(self, error: Exception) -> Optional[Exception]:
        import psycopg
        import psycopg_pool
        from psycopg import errors as pg_errors

        if isinstance(error, pg_errors.UniqueViolation):
            return Conflict(type(error).__name__)
        if isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout,
                              pg_errors.AdminShutdown)):
            return DependencyUnavailable(f"postgres: {type(error).__name__}")
        return None


# -- options --------------------------------------------------------------------------

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _at_least(low: int) -> Callable[[int], Optional[str]]:
    def check(value: int) -> Optional[str]:
        return None if value >= low else f"must be a whole number ({low} or more)"

    return check


def _existing_file(path: str) -> Optional[str]:
    return None if Path(path).is_file() else f"no such file: {path}"


@attrs.frozen
class ConnectionOptions:
    """
    The keys the Rust jwtlet reads under ``pool`` and jwtlet also beside
    ``url``: either place, not both.
    """

    run_migrations: bool = True
    sslmode: Optional[str] = None
    ssl_root_cert: Optional[str] = None

    @classmethod
    def read(cls, section: SectionReader, pool: SectionReader) -> ConnectionOptions:
        def either(key: str, kind: Callable[[Any], T], check: Optional[Callable[[T], Optional[str]]] = None) -> Any:
            beside, under = (reader.get(key, kind, None, check) for reader in (section, pool))
            if beside is not None and under is not None:
                section.problem(key, f"given twice (also as pool.{key}): give it in one place")
            return beside if beside is not None else under

        migrations = either("run_migrations_on_startup", as_bool)
        return cls(
            run_migrations=True if migrations is None else migrations,
            sslmode=either("sslmode", as_str, one_of(*SSLMODES)),
            ssl_root_cert=either("ssl_root_cert", as_nonempty_str, _existing_file),
        )

    def conninfo(self, url: str) -> str:
        """``url`` with these options, which win over the same parameters in it (as in the Rust jwtlet)."""
        extra = {key: value for key, value in (("sslmode", self.sslmode), ("sslrootcert", self.ssl_root_cert))
                 if value}
        if not extra:
            return url
        from psycopg.conninfo import make_conninfo

        return make_conninfo(url, **extra)


def _pool_options(pool: SectionReader) -> PoolOptions:
    before = len(pool.problems)
    values = {
        "min_connections": pool.get("min_connections", as_int, None, check=_at_least(0)),
        "max_connections": pool.get("max_connections", as_int, None, check=_at_least(1)),
        "acquire_timeout": pool.get("acquire_timeout", parse_duration, None),
        "idle_timeout": pool.get("idle_timeout", parse_duration, None),
        "max_lifetime": pool.get("max_lifetime", parse_duration, None),
        "test_before_acquire": pool.get("test_before_acquire", as_bool, None),
        "application_name": pool.get("application_name", as_str, None),
        "statement_cache_capacity": pool.get("statement_cache_capacity", as_int, None, check=_at_least(0)),
    }
    options = PoolOptions(**{key: value for key, value in values.items() if value is not None})
    if len(pool.problems) == before and options.min_connections > options.max_connections:
        pool.problem("min_connections", "must not exceed max_connections")
    return options


@implementer(IPlugin, IMappingStoreFactory)
@attrs.frozen
class PostgresStoreFactory:
    name: str = "postgres"
    description: str = "keeps mappings in PostgreSQL (psycopg 3, pooled; several replicas may share it)"

    def build(self, options: Mapping[str, Any], context: PluginContext) -> PostgresStore:
        problems: list[str] = []
        section = SectionReader(options, "", problems)
        url: Optional[str] = section.get("url", as_nonempty_str, None)
        if not section.present("url"):
            section.problem("url", "required for the postgres store (a libpq URL)")
        pool_section = section.table("pool")
        pool = _pool_options(pool_section)
        connection = ConnectionOptions.read(section, pool_section)
        pool_section.finish()
        section.finish()
        if problems:
            raise PluginConfigError(*problems)
        # Nothing connects here (the pool opens on first use): ``jwtlet check-config`` builds stores to check them.
        return PostgresStore(connection.conninfo(str(url)), pool, cast(SQLReactor, context.reactor), context.clock,
                             run_migrations=connection.run_migrations)


postgres = PostgresStoreFactory()
