"""
The ``sqlite`` store, the embedded default: one file, WAL journal, every write
in a transaction, all database work on one dedicated thread so the reactor
never waits on the disk.

Resolves are answered from memory once read: this process is the file's only
writer, so every change passes through it and empties that cache; a resolve
that read before a change and finishes after it does not fill the cache (a
generation counter, bumped by every change, says so).

Durability: ``synchronous=FULL`` makes each commit reach the disk before it is
acknowledged, so neither a killed process nor a crashed machine loses a write
that was answered 201.  (WAL with ``NORMAL`` would survive a killed process
but may lose the last commits on power loss.)
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, TypeVar

import attrs
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, succeed
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

log = Logger(namespace="jwtlet.store.sqlite")

T = TypeVar("T")

RESOLVE_CACHE_ENTRIES = 10_000

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE mappings (
        client_identifier TEXT NOT NULL,
        participant_context TEXT NOT NULL,
        scopes TEXT NOT NULL,
        audiences TEXT NOT NULL,
        PRIMARY KEY (client_identifier, participant_context)
    );
    CREATE TABLE scopes (
        scope TEXT PRIMARY KEY,
        claims TEXT NOT NULL
    );
    CREATE TABLE integrations (
        integration_id TEXT PRIMARY KEY,
        description TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE api_keys (
        integration_id TEXT NOT NULL REFERENCES integrations (integration_id) ON DELETE CASCADE,
        key_id TEXT NOT NULL,
        secret_sha256 BLOB NOT NULL,
        tier INTEGER NOT NULL,
        description TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (integration_id, key_id)
    );
    CREATE TABLE token_ids (
        issuer TEXT NOT NULL,
        token_id TEXT NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (issuer, token_id)
    );
    CREATE INDEX token_ids_expiry ON token_ids (expires_at);
    """,
)


def migrate(connection: sqlite3.Connection) -> int:
    """Apply the migrations not yet applied, each in its own transaction."""
    connection.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = connection.execute("SELECT MAX(version) FROM schema_version").fetchone()
    current = row[0] or 0
    for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
        connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in script.split(";"):
                if statement.strip():
                    connection.execute(statement)
            connection.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)


PRIVATE = 0o600
SIDECARS = ("-wal", "-shm")


def create_private(path: Path) -> None:
    """
    Create the database file mode 0600 before SQLite opens it (SQLite would
    create it with 0644 minus the umask); an existing file is left as it is.
    """
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE)
    except FileExistsError:
        return
    try:
        os.fchmod(descriptor, PRIVATE)  # whatever the umask made of it
    finally:
        os.close(descriptor)


def make_sidecars_private(path: Path) -> None:
    """SQLite's WAL and shared-memory files hold the same rows: 0600 too."""
    for suffix in SIDECARS:
        sidecar = path.with_name(path.name + suffix)
        if sidecar.exists():
            os.chmod(sidecar, PRIVATE)


def _mapping(row: sqlite3.Row) -> ResourceMapping:
    return ResourceMapping(
        client_identifier=row["client_identifier"],
        participant_context=row["participant_context"],
        scopes=tuple(json.loads(row["scopes"])),
        audiences=tuple(json.loads(row["audiences"])),
    )


def _scope(row: sqlite3.Row) -> ScopeMapping:
    return ScopeMapping(scope=row["scope"], claims=json.loads(row["claims"]))


def _key(row: sqlite3.Row) -> ApiKeyRecord:
    return ApiKeyRecord(
        integration_id=row["integration_id"],
        key_id=row["key_id"],
        secret_sha256=bytes(row["secret_sha256"]),
        tier=row["tier"],
        description=row["description"],
        status=row["status"],
        created_at=row["created_at"],
    )


@implementer(IMappingStore, IReplayRecord, IChangeNotifier, IReadiness, IService)
class SQLiteStore(Service):
    """A MappingStore in one SQLite file, worked on by one thread."""

    def __init__(self, path: Path, reactor: Any, clock: Any, run_migrations: bool = True):
        self.path = path
        self.reactor = reactor
        self.clock = clock
        self.run_migrations = run_migrations
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="jwtlet-sqlite")
        self._connection: Optional[sqlite3.Connection] = None
        self._listeners: list[Callable[[], None]] = []
        self._stopping: Optional[Any] = None
        self._resolved: OrderedDict[tuple[str, str, tuple[str, ...]], Resolution] = OrderedDict()
        #: bumped by every change: a resolve that read under an older one must not fill the cache
        self._generation = 0

    # -- lifecycle ------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self._ensure_pool()

    def _ensure_pool(self) -> None:
        # Started on first use too, so a store built outside a service tree
        # (the jwtlet apikey command, tests) works; stopped at shutdown either way.
        if not self._pool.started:
            self._pool.start()
            self._stopping = self.reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        closing = self._run(self._close)

        def stop_pool(result: object) -> object:
            if self._stopping is not None:
                self.reactor.removeSystemEventTrigger(self._stopping)
                self._stopping = None
            self._pool.stop()
            return result

        return closing.addBoth(stop_pool)

    def _open(self) -> sqlite3.Connection:
        if self._connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            create_private(self.path)
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA foreign_keys=ON")
            if self.run_migrations:
                migrate(connection)
            make_sidecars_private(self.path)
            self._connection = connection
        return self._connection

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _run(self, work: Callable[..., T], *args: Any) -> Deferred[T]:
        self._ensure_pool()
        return deferToThreadPool(self.reactor, self._pool, self._guarded, work, *args)

    def _guarded(self, work: Callable[..., T], *args: Any) -> T:
        try:
            return work(*args)
        except sqlite3.IntegrityError as error:
            raise Conflict(str(error)) from None
        except sqlite3.OperationalError as error:
            # read-only file, disk full, locked past the timeout, cannot open
            self._close()
            raise DependencyUnavailable(f"sqlite: {error}") from None
        except OSError as error:
            # the directory or the file could not be created
            self._close()
            raise DependencyUnavailable(f"sqlite: {error.strerror}") from None

    def _read(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return self._open().execute(sql, parameters).fetchall()

    def _write(self, statements: Iterable[tuple[str, tuple[Any, ...]]]) -> list[int]:
        """Run statements in one transaction; returns each one's row count."""
        connection = self._open()
        connection.execute("BEGIN IMMEDIATE")
        try:
            counts = [connection.execute(sql, parameters).rowcount for sql, parameters in statements]
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return counts

    def _changed(self, result: T) -> T:
        self._generation += 1
        self._resolved.clear()
        for listener in list(self._listeners):
            listener()
        return result

    def _write_then_notify(self, *statements: tuple[str, tuple[Any, ...]]) -> Deferred[list[int]]:
        return self._run(self._write, list(statements)).addCallback(self._changed)

    # -- mappings ---------------------------------------------------------------

    def add_mapping(self, mapping: ResourceMapping) -> Deferred[None]:
        return self._write_then_notify(
            (
                "INSERT INTO mappings VALUES (?, ?, ?, ?)",
                (mapping.client_identifier, mapping.participant_context,
                 json.dumps(list(mapping.scopes)), json.dumps(list(mapping.audiences))),
            )
        ).addCallback(lambda _: None)

    def get_mapping(self, client_identifier: str, participant_context: str) -> Deferred[ResourceMapping]:
        def get() -> ResourceMapping:
            rows = self._read(
                "SELECT * FROM mappings WHERE client_identifier = ? AND participant_context = ?",
                (client_identifier, participant_context),
            )
            if not rows:
                raise NotFound(client_identifier)
            return _mapping(rows[0])

        return self._run(get)

    def list_mappings(self, client_identifier: Optional[str] = None) -> Deferred[list[ResourceMapping]]:
        def list_() -> list[ResourceMapping]:
            if client_identifier is None:
                rows = self._read("SELECT * FROM mappings ORDER BY client_identifier, participant_context")
            else:
                rows = self._read(
                    "SELECT * FROM mappings WHERE client_identifier = ? ORDER BY participant_context",
                    (client_identifier,),
                )
            return [_mapping(row) for row in rows]

        return self._run(list_)

    def update_mapping(self, mapping: ResourceMapping) -> Deferred[None]:
        def checked(counts: list[int]) -> None:
            if counts[0] == 0:
                raise NotFound(mapping.key)

        return self._write_then_notify(
            (
                "UPDATE mappings SET scopes = ?, audiences = ? "
                "WHERE client_identifier = ? AND participant_context = ?",
                (json.dumps(list(mapping.scopes)), json.dumps(list(mapping.audiences)),
                 mapping.client_identifier, mapping.participant_context),
            )
        ).addCallback(checked)

    def delete_mapping(self, client_identifier: str, participant_context: str) -> Deferred[bool]:
        return self._write_then_notify(
            ("DELETE FROM mappings WHERE client_identifier = ? AND participant_context = ?",
             (client_identifier, participant_context))
        ).addCallback(lambda counts: counts[0] > 0)

    def delete_client_mappings(self, client_identifier: str) -> Deferred[int]:
        return self._write_then_notify(
            ("DELETE FROM mappings WHERE client_identifier = ?", (client_identifier,))
        ).addCallback(lambda counts: counts[0])

    # -- scopes -------------------------------------------------------------------

    def add_scope(self, scope: ScopeMapping) -> Deferred[None]:
        return self._write_then_notify(
            ("INSERT INTO scopes VALUES (?, ?)", (scope.scope, json.dumps(dict(scope.claims))))
        ).addCallback(lambda _: None)

    def get_scope(self, scope: str) -> Deferred[ScopeMapping]:
        def get() -> ScopeMapping:
            rows = self._read("SELECT * FROM scopes WHERE scope = ?", (scope,))
            if not rows:
                raise NotFound(scope)
            return _scope(rows[0])

        return self._run(get)

    def list_scopes(self) -> Deferred[list[ScopeMapping]]:
        return self._run(lambda: [_scope(row) for row in self._read("SELECT * FROM scopes ORDER BY scope")])

    def update_scope(self, scope: ScopeMapping) -> Deferred[None]:
        def checked(counts: list[int]) -> None:
            if counts[0] == 0:
                raise NotFound(scope.scope)

        return self._write_then_notify(
            ("UPDATE scopes SET claims = ? WHERE scope = ?", (json.dumps(dict(scope.claims)), scope.scope))
        ).addCallback(checked)

    def delete_scope(self, scope: str) -> Deferred[bool]:
        return self._write_then_notify(
            ("DELETE FROM scopes WHERE scope = ?", (scope,))
        ).addCallback(lambda counts: counts[0] > 0)

    def resolve(
        self, client_identifier: str, participant_context: str, scopes: Iterable[str]
    ) -> Deferred[Resolution]:
        wanted = tuple(sorted(set(scopes)))
        key = (client_identifier, participant_context, wanted)
        cached = self._resolved.get(key)
        if cached is not None:
            self._resolved.move_to_end(key)
            return succeed(cached)
        generation = self._generation

        def resolve() -> Resolution:
            rows = self._read(
                "SELECT * FROM mappings WHERE client_identifier = ? AND participant_context = ?",
                (client_identifier, participant_context),
            )
            if not rows:
                raise NotFound(client_identifier)
            found: dict[str, ScopeMapping] = {}
            if wanted:
                marks = ", ".join("?" for _ in wanted)
                for row in self._read(f"SELECT * FROM scopes WHERE scope IN ({marks})", tuple(wanted)):  # noqa: S608
                    found[row["scope"]] = _scope(row)
            return Resolution(mapping=_mapping(rows[0]), scopes=found)

        def remember(resolution: Resolution) -> Resolution:
            if generation == self._generation:
                self._resolved[key] = resolution
                while len(self._resolved) > RESOLVE_CACHE_ENTRIES:
                    self._resolved.popitem(last=False)
            return resolution

        return self._run(resolve).addCallback(remember)

    # -- integrations and keys ----------------------------------------------------

    def add_integration(self, integration: Integration) -> Deferred[None]:
        return self._run(
            self._write,
            [("INSERT INTO integrations VALUES (?, ?, ?)",
              (integration.integration_id, integration.description, self.clock.seconds()))],
        ).addCallback(lambda _: None)

    def list_integrations(self) -> Deferred[list[Integration]]:
        def list_() -> list[Integration]:
            keys: dict[str, list[ApiKeyRecord]] = {}
            for row in self._read("SELECT * FROM api_keys ORDER BY integration_id, key_id"):
                keys.setdefault(row["integration_id"], []).append(_key(row))
            return [
                Integration(
                    integration_id=row["integration_id"],
                    description=row["description"],
                    created_at=row["created_at"],
                    keys=tuple(keys.get(row["integration_id"], ())),
                )
                for row in self._read("SELECT * FROM integrations ORDER BY integration_id")
            ]

        return self._run(list_)

    def add_api_key(self, record: ApiKeyRecord) -> Deferred[None]:
        def add() -> None:
            if not self._read("SELECT 1 FROM integrations WHERE integration_id = ?", (record.integration_id,)):
                raise NotFound(record.integration_id)
            self._write([(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?)",
                (record.integration_id, record.key_id, record.secret_sha256, record.tier,
                 record.description, record.status, self.clock.seconds()),
            )])

        return self._run(add)

    def get_api_key(self, integration_id: str, key_id: str) -> Deferred[ApiKeyRecord]:
        def get() -> ApiKeyRecord:
            rows = self._read(
                "SELECT * FROM api_keys WHERE integration_id = ? AND key_id = ?", (integration_id, key_id)
            )
            if not rows:
                raise NotFound(key_id)
            return _key(rows[0])

        return self._run(get)

    def revoke_api_key(self, integration_id: str, key_id: str) -> Deferred[bool]:
        return self._run(
            self._write,
            [("UPDATE api_keys SET status = 'revoked' WHERE integration_id = ? AND key_id = ?",
              (integration_id, key_id))],
        ).addCallback(lambda counts: counts[0] > 0)

    # -- optional interfaces ----------------------------------------------------

    def record_token_id(self, issuer: str, token_id: str, expires_at: float) -> Deferred[bool]:
        now = self.clock.seconds()

        def record() -> bool:
            try:
                self._write([
                    ("DELETE FROM token_ids WHERE expires_at <= ?", (now,)),
                    ("INSERT INTO token_ids VALUES (?, ?, ?)", (issuer, token_id, expires_at)),
                ])
            except sqlite3.IntegrityError:
                return False
            return True

        return self._run(record)

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def check_ready(self) -> Deferred[None]:
        def probe() -> None:
            self._read("SELECT 1")

        return self._run(probe)


def _bool(options: Mapping[str, Any], key: str, default: bool, problems: list[str]) -> bool:
    value = options.get(key, default)
    if not isinstance(value, bool):
        problems.append(f"{key}: must be true or false")
        return default
    return value


@implementer(IPlugin, IMappingStoreFactory)
@attrs.frozen
class SQLiteStoreFactory:
    name: str = "sqlite"
    description: str = "keeps mappings in a local SQLite file (WAL, durable; the embedded default)"

    def build(self, options: Mapping[str, Any], context: PluginContext) -> SQLiteStore:
        problems = [f"{key}: unknown key" for key in options if key not in ("path", "run_migrations_on_startup")]
        path = options.get("path", str(Path(context.data_dir) / "jwtlet.sqlite3"))
        if not isinstance(path, str) or not path:
            problems.append("path: must be a file path")
        migrations = _bool(options, "run_migrations_on_startup", True, problems)
        if problems:
            raise PluginConfigError(*problems)
        return SQLiteStore(Path(path), context.reactor, context.clock, run_migrations=migrations)


sqlite = SQLiteStoreFactory()
