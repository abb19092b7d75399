"""
The SQLite store: the conformance suite, durability across SIGKILL, and disk
errors that become 503s without half-written rows.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted

from jwtlet.interfaces import DependencyUnavailable, PluginConfigError
from jwtlet.model import ResourceMapping, ScopeMapping
from jwtlet.plugins.sql_store import SCHEMA
from jwtlet.plugins.sqlite_store import migrate, sqlite
from jwtlet.testing.conformance.store import StoreConformance


def context(tmp_path: Path) -> types.SimpleNamespace:
    from twisted.internet import reactor

    return types.SimpleNamespace(reactor=reactor, clock=reactor, data_dir=tmp_path)


@pytest.fixture
def clock() -> Any:
    from twisted.internet import reactor

    return reactor


class TestSQLiteStore(StoreConformance):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Any]:
        store = sqlite.build({"path": str(tmp_path / "db" / "jwtlet.sqlite3")}, context(tmp_path))
        store.startService()
        yield store
        pytest_twisted.blockon(store.stopService())


def test_defaults_and_option_problems(tmp_path: Path) -> None:
    assert sqlite.build({}, context(tmp_path)).path == tmp_path / "jwtlet.sqlite3"
    with pytest.raises(PluginConfigError) as raised:
        sqlite.build({"path": 3, "run_migrations_on_startup": "yes", "url": "x"}, context(tmp_path))
    assert sorted(raised.value.messages) == [
        "path: must be a string, not int",
        "run_migrations_on_startup: must be true or false, not str",
        "url: unknown key",
    ]


def test_migrations_are_idempotent(tmp_path: Path) -> None:
    connection = sqlite3.connect(tmp_path / "m.sqlite3", isolation_level=None)
    assert migrate(connection) == len(SCHEMA)
    assert migrate(connection) == len(SCHEMA)
    versions = connection.execute("SELECT version FROM schema_version").fetchall()
    assert versions == [(v,) for v in range(1, len(SCHEMA) + 1)]


WRITER = textwrap.dedent(
    """
    import sys, types
    from twisted.internet import reactor, task
    from twisted.internet.defer import Deferred
    from jwtlet.model import ResourceMapping
    from jwtlet.plugins.sqlite_store import sqlite

    async def main(_):
        store = sqlite.build({"path": sys.argv[1]}, types.SimpleNamespace(reactor=reactor, clock=reactor, data_dir="."))
        store.startService()
        for index in range(int(sys.argv[2])):
            await store.add_mapping(ResourceMapping("client", f"ctx-{index}"))
            print(f"ACK {index}", flush=True)
        await Deferred()  # until the test's SIGKILL

    task.react(lambda r: __import__("twisted.internet.defer", fromlist=["x"]).ensureDeferred(main(r)))
    """
)


def test_an_acknowledged_write_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "kill.sqlite3"
    acknowledged = 0
    for round_ in range(3):
        process = subprocess.Popen(  # noqa: S603
            [sys.executable, "-c", WRITER.replace('f"ctx-{index}"', f'f"r{round_}-{{index}}"'), str(path), "5"],
            stdout=subprocess.PIPE, text=True, cwd=tmp_path,  # not the repo: its jwtlet/ would shadow the wheel
        )
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(5)]
        assert lines[-1].startswith("ACK 4"), lines
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        acknowledged += 5
    connection = sqlite3.connect(path)
    count = connection.execute("SELECT COUNT(*) FROM resource_mappings").fetchone()[0]
    assert count == acknowledged
    assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest_twisted.ensureDeferred
async def test_a_read_only_database_is_503_and_leaves_nothing_half_written(tmp_path: Path) -> None:
    path = tmp_path / "ro.sqlite3"
    store = sqlite.build({"path": str(path)}, context(tmp_path))
    await store.add_scope(ScopeMapping("read", {"a": 1}))
    await store.stopService()
    # File modes do not stop root (which CI is), so the database is opened the
    # way SQLite itself enforces read-only access.
    store = sqlite.build({"path": str(path)}, context(tmp_path))
    store._open = lambda: _read_only(path)  # type: ignore[method-assign]
    try:
        with pytest.raises(DependencyUnavailable):
            await store.add_mapping(ResourceMapping("client", "ctx"))
        with pytest.raises(DependencyUnavailable):
            await store.update_scope(ScopeMapping("read", {"a": 2}))
        assert (await store.get_scope("read")).claims == {"a": 1}, "reads still work"
    finally:
        await store.stopService()
    check = sqlite3.connect(path)
    assert check.execute("SELECT COUNT(*) FROM resource_mappings").fetchone() == (0,)
    assert check.execute("SELECT claims FROM scope_mappings").fetchall() == [('{"a": 1}',)]


def _read_only(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    connection.row_factory = sqlite3.Row
    return connection


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
@pytest_twisted.ensureDeferred
async def test_the_database_and_its_sidecars_are_created_mode_0600_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    """Mappings and API key digests are nobody else's business, even with a permissive (or odd) umask."""
    path = tmp_path / "data" / "jwtlet.sqlite3"
    store = sqlite.build({"path": str(path)}, context(tmp_path))
    previous = os.umask(umask)
    try:
        await store.add_mapping(ResourceMapping("client", "ctx"))
        modes = {file.name: stat.S_IMODE(file.stat().st_mode) for file in path.parent.iterdir()}
    finally:
        os.umask(previous)
        await store.stopService()
    assert modes == {"jwtlet.sqlite3": 0o600, "jwtlet.sqlite3-wal": 0o600, "jwtlet.sqlite3-shm": 0o600}


@pytest_twisted.ensureDeferred
async def test_a_database_that_cannot_be_created_is_503(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    store = sqlite.build({"path": str(blocker / "jwtlet.sqlite3")}, context(tmp_path))
    try:
        with pytest.raises(DependencyUnavailable):
            await store.check_ready()
    finally:
        await store.stopService()


def test_building_for_check_config_creates_nothing(tmp_path: Path) -> None:
    """``jwtlet check-config`` builds the store only to check its options."""
    checking = types.SimpleNamespace(reactor=None, clock=None, data_dir=tmp_path / "data", check_only=True)
    store = sqlite.build({}, checking)
    assert store.path == tmp_path / "data" / "jwtlet.sqlite3"
    assert list(tmp_path.iterdir()) == [] and not store._threads.started
