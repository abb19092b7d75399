"""
A throwaway PostgreSQL server for tests (and for users' own): ``initdb`` in
a temporary directory, a free loopback port, ``pg_ctl`` to start, stop and
restart it.  As root (CI), the server runs as the ``postgres`` user, since
``initdb`` refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import attrs


def find_binary(name: str) -> Optional[str]:
    """``initdb``/``pg_ctl`` from PATH or Debian's versioned directories."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def available() -> Optional[str]:
    """``None`` when a server can be started here, else why not."""
    missing = [name for name in ("initdb", "pg_ctl") if find_binary(name) is None]
    if missing:
        return f"PostgreSQL server binaries not found ({', '.join(missing)}); install the postgresql package"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root needs runuser to start PostgreSQL as the postgres user"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@attrs.define
class PostgresServer:
    """One PostgreSQL cluster in ``directory``, listening on 127.0.0.1:``port``."""

    directory: Path
    port: int
    version: str = ""

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, arguments: Sequence[str], timeout: float = 120) -> str:
        command = list(arguments)
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)  # noqa: S603
        if result.returncode != 0:
            raise RuntimeError(f"{arguments[0]} failed: {result.stderr.strip() or result.stdout.strip()}")
        return result.stdout

    @classmethod
    def create(cls, parent: Optional[Path] = None) -> PostgresServer:
        problem = available()
        if problem:
            raise RuntimeError(problem)
        directory = Path(tempfile.mkdtemp(prefix="jwtlet-pg-", dir=parent))
        if os.geteuid() == 0:
            shutil.chown(directory, "postgres", "postgres")
            directory.chmod(0o700)
        server = cls(directory=directory, port=_free_port())
        initdb = find_binary("initdb")
        assert initdb is not None
        server._run([initdb, "-D", str(server.data), "-A", "trust", "-U", "postgres", "--no-sync"])
        server.version = (server.data / "PG_VERSION").read_text().strip()
        server.start()
        return server

    def start(self) -> None:
        pg_ctl = find_binary("pg_ctl")
        assert pg_ctl is not None
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run([pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.directory / "log"), "-w", "start"])

    def stop(self, mode: str = "fast") -> None:
        pg_ctl = find_binary("pg_ctl")
        assert pg_ctl is not None
        self._run([pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop"])

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass
        shutil.rmtree(self.directory, ignore_errors=True)
