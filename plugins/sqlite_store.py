"""
The ``sqlite`` store, the embedded default: one file, WAL journal, every write
in a transaction, all database work on one dedicated thread so the reactor
never waits on the disk.  Schema, queries and the resolve cache are shared
with ``postgres`` (:mod:`jwtlet.plugins.sql_store`); this module is the
SQLite side: the file, its connection, its errors.

Resolves are answered from memory once read.  A change made through this
store empties that cache at once; a change made by another process on the
same file (another worker, ``workers`` above 1) is noticed by asking SQLite's
``PRAGMA data_version`` every :data:`CHANGE_CHECK_SECS` on the store's
thread, so every worker uses it within a second.

Durability: ``synchronous=FULL`` makes each commit reach the disk before it is
acknowledged, so neither a killed process nor a crashed machine loses a write
that was answered 201.  (WAL with ``NORMAL`` would survive a killed process
but may lose the last commits on power loss.)
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TypeVar, cast

import attrs
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.plugin import IPlugin
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from jwtlet.config.reader import SectionReader, as_bool, as_nonempty_str
from jwtlet.files import PRIVATE_MODE, write_private
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

T = TypeVar("T")

DIALECT = sql_store.Dialect(
    placeholder="?", json_type="TEXT", real_type="REAL", bytes_type="BLOB",
    # no arrays in SQLite: a list of strings is a JSON array, as before
    list_type="TEXT", empty_list="'[]'", list_from_json="{column}",
    version_table="schema_version",
)
SIDECARS = ("-wal", "-shm")
#: how often the file is asked whether another connection committed to it
CHANGE_CHECK_SECS = 0.25


def migrate(connection: sqlite3.Connection) -> int:
    """Apply the migrations not yet applied, in one transaction that holds the write lock."""
    cursor = connection.cursor()
    cursor.row_factory = sqlite3.Row
    cursor.execute("BEGIN IMMEDIATE")
    try:
        version = sql_store.migrate(cursor, DIALECT)
        cursor.execute("COMMIT")
    except BaseException:
        cursor.execute("ROLLBACK")
        raise
    return version


def create_private(path: Path) -> None:
    """
    Create the database file mode 0600 before SQLite opens it (SQLite would
    create it with 0644 minus the umask); an existing file is left as it is.
    """
    try:
        write_private(path, b"", exclusive=True)
    except FileExistsError:
        pass


def make_sidecars_private(path: Path) -> None:
    """SQLite's WAL and shared-memory files hold the same rows: 0600 too."""
    for suffix in SIDECARS:
        sidecar = path.with_name(path.name + suffix)
        if sidecar.exists():
            os.chmod(sidecar, PRIVATE_MODE)


@implementer(IMappingStore, IReplayRecord, IReadiness, IService)
class SQLiteStore(SQLStore):
    """A MappingStore in one SQLite file, worked on by one thread."""

    dialect = DIALECT

    def __init__(self, path: Path, reactor: SQLReactor, clock: IReactorTime, run_migrations: bool = True):
        super().__init__(reactor, clock, ThreadPool(minthreads=1, maxthreads=1, name="jwtlet-sqlite"))
        self.path = path
        self.run_migrations = run_migrations
        self._connection: Optional[sqlite3.Connection] = None
        #: the connection's ``data_version`` when last asked (store thread only); None: not asked yet
        self._data_version: Optional[int] = None
        self._change_check = LoopingCall(self._check_changes)
        self._change_check.clock = clock

    def _opened(self) -> None:
        self._change_check.start(CHANGE_CHECK_SECS, now=True)

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        if self._change_check.running:
            self._change_check.stop()
        return super().stopService()

    def _check_changes(self) -> Deferred[None]:
        # A check that failed proves nothing: forget what was cached (the next tick asks again).
        return self._run(self._changed_elsewhere).addCallbacks(self._forget_if, lambda _: self._invalidate())

    def _forget_if(self, changed: bool) -> None:
        if changed:
            self._invalidate()

    def _changed_elsewhere(self, connection: Connection) -> bool:
        """
        Whether another connection committed since the last ask (on the store
        thread).  ``data_version`` counts other connections' commits, not this
        one's, and only per connection: a new connection counts as a change.
        """
        version = int(connection.execute("PRAGMA data_version", ()).fetchone()["data_version"])
        changed = version != self._data_version
        self._data_version = version
        return changed

    def _open(self) -> sqlite3.Connection:
        if self._connection is None:
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
            self._data_version = None
        return self._connection

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _transaction(self, work: Callable[[Connection], T], access: Access) -> T:
        connection = self._open()
        if access is Access.READ:
            return work(connection)
        connection.execute("BEGIN IMMEDIATE")
        try:
            result = work(connection)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return result

    def _translate(self, error: Exception) -> Optional[Exception]:
        if isinstance(error, sqlite3.IntegrityError):
            return Conflict(str(error))
        if isinstance(error, sqlite3.OperationalError):
            # read-only file, disk full, locked past the timeout, cannot open
            self._close()
            return DependencyUnavailable(f"sqlite: {error}")
        if isinstance(error, OSError):
            # the directory or the file could not be created
            self._close()
            return DependencyUnavailable(f"sqlite: {error.strerror}")
        return None


@implementer(IPlugin, IMappingStoreFactory)
@attrs.frozen
class SQLiteStoreFactory:
    name: str = "sqlite"
    description: str = "keeps mappings in a local SQLite file (WAL, durable; the embedded default)"

    def build(self, options: Mapping[str, Any], context: PluginContext) -> SQLiteStore:
        problems: list[str] = []
        section = SectionReader(options, "", problems)
        path = section.get("path", as_nonempty_str, str(Path(context.data_dir) / "jwtlet.sqlite3"))
        migrations = section.get("run_migrations_on_startup", as_bool, True)
        section.finish()
        if problems:
            raise PluginConfigError(*problems)
        # Nothing is opened here: ``jwtlet check-config`` builds stores only to check them.
        return SQLiteStore(Path(path), cast(SQLReactor, context.reactor), context.clock, run_migrations=migrations)


sqlite = SQLiteStoreFactory()
