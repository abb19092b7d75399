"""
``workers`` (config.md, issue 16): N processes serving the same ports under a
supervising twistd.  A dead worker is replaced within 5 s while the port
keeps answering, SIGTERM stops everything within 10 s, no worker outlives the
supervisor (not even one killed with SIGKILL), a management change through
any worker is used by every worker within 1 s (SQLite and PostgreSQL), and
``workers: auto`` is one per CPU core.  The supervisor's own decisions
(restart, give up, SIGKILL after the stop timeout) are also tested on a fake
reactor.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import select
import signal
import socket
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Optional

import attrs
import pytest
import pytest_twisted
import yaml
from postgres_fixtures import postgres_server, postgres_url  # noqa: F401 - fixtures
from twisted.internet import reactor
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from jwtlet import config
from jwtlet.config import ConfigError
from jwtlet.daemon import dev, workers
from jwtlet.model import ResourceMapping, ScopeMapping
from jwtlet.plugins.sqlite_store import CHANGE_CHECK_SECS, sqlite
from jwtlet.policy import GRANT_TYPE_TOKEN_EXCHANGE as GRANT
from jwtlet.testing.process import DaemonProcess

MINIMAL = {
    "issuer": "https://jwtlet.example.com",
    "k8s": {"api_server_url": "https://kubernetes.default.svc"},
    "token": {"client_audience": "https://kubernetes.default.svc.cluster.local", "audience": "svc"},
    "signer": {"type": "local-key"},
}


# -- the setting ------------------------------------------------------------------------


def test_workers_auto_is_one_per_cpu_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert config.parse(dict(MINIMAL, workers="auto")).workers == 7
    assert config.parse(dict(MINIMAL, workers=3)).workers == 3
    assert config.parse(MINIMAL).workers == 1


@pytest.mark.parametrize("value", [0, -2, "many", True, 1.5])
def test_workers_is_a_count_of_at_least_one_or_auto(value: object) -> None:
    with pytest.raises(ConfigError) as raised:
        config.parse(dict(MINIMAL, workers=value))
    assert [problem for problem in raised.value.problems if problem.startswith("workers:")]


def test_only_endpoints_whose_socket_can_be_shared_are_accepted_with_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert workers.problems(config.parse(dict(MINIMAL, workers=2, management_endpoint="unix:/tmp/m.sock"))) == []
    # An endpoint that listens some other way (here systemd's inherited socket) cannot be bound for workers.
    parse = workers.serverFromString
    monkeypatch.setattr(workers, "serverFromString", lambda reactor, description: (
        AdoptedStreamServerEndpoint(reactor, 3, socket.AF_UNIX) if description.startswith("unix:")
        else parse(reactor, description)))
    shared = config.parse(dict(MINIMAL, workers=2, management_endpoint="unix:/tmp/m.sock"))
    assert workers.problems(shared) == [
        "management_endpoint: with workers above 1 only tcp:, ssl: and unix: endpoints can be shared"]
    assert workers.problems(attrs.evolve(shared, workers=1)) == []


# -- the supervisor's decisions, on a fake reactor ----------------------------------------


class FakeProcess:
    """A spawned worker: records signals; ends when the test says so."""

    def __init__(self, protocol: Any, pid: int):
        self.protocol = protocol
        self.pid: Optional[int] = pid
        self.signals: list[str] = []
        protocol.makeConnection(self)

    def signalProcess(self, name: str) -> None:  # noqa: N802 - Twisted's name
        if self.pid is None:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def ready(self) -> None:
        self.protocol.childDataReceived(workers.STATUS_FD, workers.READY)

    def end(self, reason: Any = None) -> None:
        self.pid = None
        self.protocol.processEnded(Failure(reason or ProcessTerminated(signal=signal.SIGKILL)))


class FakePort:
    def __init__(self, fd: int):
        self.fd = fd
        self.closed = False

    def fileno(self) -> int:
        return self.fd

    def stopListening(self) -> None:  # noqa: N802 - Twisted's name
        self.closed = True


class SupervisorReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[FakeProcess] = []
        self.stopped = False

    def spawnProcess(self, protocol: Any, executable: str, args: Any, env: Any = None,  # noqa: N802
                     childFDs: Any = None) -> FakeProcess:  # noqa: N803
        process = FakeProcess(protocol, 1000 + len(self.spawned))
        self.spawned.append(process)
        return process

    def stop(self) -> None:
        self.stopped = True


@pytest.fixture
def supervised() -> Iterator[tuple[workers.Supervisor, SupervisorReactor]]:
    fake = SupervisorReactor()
    supervisor = workers.Supervisor(["tcp:8080", "tcp:8081"], 3, ["worker"], fake)
    supervisor.ports = [FakePort(10), FakePort(11)]  # what privilegedStartService binds (tested for real below)
    supervisor.startService()
    yield supervisor, fake


def live(fake: SupervisorReactor) -> list[FakeProcess]:
    return [process for process in fake.spawned if process.pid is not None]


def test_the_first_worker_starts_alone_and_the_rest_once_it_is_ready(supervised: Any) -> None:
    supervisor, fake = supervised
    assert len(fake.spawned) == 1, "one-time work (migrations, a generated key) is done by one process"
    fake.spawned[0].ready()
    assert len(live(fake)) == 3


def test_a_dead_worker_is_replaced_after_the_restart_delay(supervised: Any) -> None:
    supervisor, fake = supervised
    fake.spawned[0].ready()
    fake.spawned[1].end()
    assert len(live(fake)) == 2
    fake.advance(workers.RESTART_DELAY_SECS)
    assert len(live(fake)) == 3
    assert workers.RESTART_DELAY_SECS <= 1, "a replacement must be serving within 5 s, its own startup included"
    assert not fake.stopped


def test_replacements_that_die_before_ready_wait_longer_each_time_and_a_ready_one_resets_it(supervised: Any) -> None:
    """A broken edit of the config must not become a restart loop at 4 Hz per slot."""
    supervisor, fake = supervised
    fake.spawned[0].ready()
    delays = []
    for _ in range(6):
        spawned = len(fake.spawned)
        live(fake)[-1].end(ProcessDone(1))
        waited = 0.0
        while len(fake.spawned) == spawned:
            fake.advance(0.125)
            waited += 0.125
        delays.append(waited)
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0, 4.0]
    live(fake)[-1].ready()
    live(fake)[-1].end(ProcessDone(1))
    spawned = len(fake.spawned)
    fake.advance(workers.RESTART_DELAY_SECS)
    assert len(fake.spawned) == spawned + 1, "ready once, the slot starts over at the first delay"


def test_a_worker_that_cannot_start_before_any_was_ready_stops_the_supervisor(supervised: Any) -> None:
    supervisor, fake = supervised
    fake.spawned[0].end(ProcessDone(1))
    assert fake.stopped, "a broken deployment is not retried forever"
    assert len(fake.spawned) == 1
    assert fake.triggers["after"]["shutdown"] == [(workers.exit_with, (1,), {})], "and the exit status is 1"


def test_sigterm_then_sigkill_after_the_stop_timeout(supervised: Any) -> None:
    supervisor, fake = supervised
    fake.spawned[0].ready()
    stopping = supervisor.stopService()
    assert [process.signals for process in fake.spawned] == [["TERM"]] * 3
    fake.spawned[0].end()
    fake.advance(workers.STOP_TIMEOUT_SECS)
    assert [process.signals for process in fake.spawned[1:]] == [["TERM", "KILL"]] * 2
    assert workers.STOP_TIMEOUT_SECS < 10
    for process in fake.spawned[1:]:
        process.end()
    assert stopping.called
    fake.advance(workers.RESTART_DELAY_SECS)
    assert len(fake.spawned) == 3, "no worker is started once the supervisor stops"
    assert not supervisor.ports, "the listening sockets close once every worker ended"


# -- a store's change is seen by every process on the same file ---------------------------


@pytest_twisted.ensureDeferred
async def test_sqlite_notices_another_connections_change_within_a_second(tmp_path: Path) -> None:
    """Two stores on one file stand for two workers: each has its own connection and resolve cache."""
    context = types.SimpleNamespace(reactor=reactor, clock=reactor, data_dir=tmp_path)
    one = sqlite.build({"path": str(tmp_path / "jwtlet.sqlite3")}, context)
    two = sqlite.build({"path": str(tmp_path / "jwtlet.sqlite3")}, context)
    one.startService()
    two.startService()
    try:
        await one.add_scope(ScopeMapping("read", {"v": 1}))
        await one.add_mapping(ResourceMapping("client", "ctx", scopes=("read",)))
        assert (await two.resolve("client", "ctx", ["read"])).scopes["read"].claims == {"v": 1}
        await one.update_scope(ScopeMapping("read", {"v": 2}))
        started = reactor.seconds()
        while (await two.resolve("client", "ctx", ["read"])).scopes["read"].claims != {"v": 2}:
            assert reactor.seconds() - started < 1.0, "a worker served a changed scope for over a second"
            await deferLater(reactor, 0.05, lambda: None)
        assert CHANGE_CHECK_SECS <= 0.5
    finally:
        await one.stopService()
        await two.stopService()


# -- the real daemon --------------------------------------------------------------------

pytest_slow = pytest.mark.slow


def write_config(tmp_path: Path, storage: dict[str, Any], count: int = 2) -> Path:
    dev.ensure(tmp_path)
    raw = {
        "issuer": "http://127.0.0.1:8080",
        "bind": "127.0.0.1",
        "workers": count,
        "storage_backend": storage,
        "validator": dev.defaults(tmp_path)["validator"],
        "token": {"client_audience": dev.CLIENT_AUDIENCE, "audience": "svc"},
        "signer": {"type": "local-key", "key_file": str(tmp_path / "signing.jwk"), "generate": True},
        "service_accounts": {"system:serviceaccount:ops:admin": ["management:write"]},
    }
    path = tmp_path / "jwtlet.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def sqlite_storage(tmp_path: Path) -> dict[str, Any]:
    return {"type": "sqlite", "path": str(tmp_path / "jwtlet.sqlite3")}


def request(method: str, url: str, data: Optional[bytes] = None,
            headers: Optional[dict[str, str]] = None) -> int:
    """One request on a connection of its own, so the kernel may hand it to any worker."""
    sent = urllib.request.Request(url, data=data, method=method, headers={"Connection": "close", **(headers or {})})
    try:
        with urllib.request.urlopen(sent, timeout=10) as response:  # noqa: S310 - loopback
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def exchange(daemon: DaemonProcess, tmp_path: Path) -> int:
    form = urllib.parse.urlencode({"grant_type": GRANT, "resource": "shared-ctx",
                                   "subject_token": dev.mint(tmp_path, "apps", "web", int(time.time()))})
    return request("POST", f"{daemon.token_url}/token", form.encode(),
                   {"Content-Type": "application/x-www-form-urlencoded"})


def worker_pids(parent: int) -> set[int]:
    """Every process (from /proc) started as a worker of ``parent``, zombies excluded."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"--worker-of" in arguments and arguments[arguments.index(b"--worker-of") + 1] == str(parent).encode() \
                and state != "Z":
            found.add(int(entry.name))
    return found


def ready_workers(daemon: DaemonProcess) -> dict[int, int]:
    """slot -> pid of the latest ``worker.ready`` of each slot."""
    return {event["slot"]: event["pid"] for event in daemon.events() if event.get("event") == "worker.ready"}


def wait_two_workers_ready(daemon: DaemonProcess) -> None:
    for _ in range(2):
        daemon.wait_event("worker.ready", timeout=60)


def wait_exited(pids: set[int], timeout: float) -> set[int]:
    """Wait (bounded) until every process in ``pids`` has exited; those that have not."""
    handles = {}
    for pid in pids:
        try:
            handles[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            continue  # gone already
    deadline = time.monotonic() + timeout
    try:
        while handles and time.monotonic() < deadline:
            # A process's pidfd becomes readable when it exits.
            exited, _, _ = select.select(list(handles), [], [], deadline - time.monotonic())
            for handle in exited:
                os.close(handle)
                del handles[handle]
        return set(handles.values())
    finally:
        for handle in handles:
            os.close(handle)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess.start(["--config", str(write_config(tmp_path, sqlite_storage(tmp_path)))], cwd=tmp_path)
    try:
        wait_two_workers_ready(process)
        process.wait_listening()
        yield process
    finally:
        if process.process.poll() is None:
            process.stop(signal.SIGKILL)


@pytest_slow
def test_sigterm_to_the_supervisor_stops_every_worker_within_10s(daemon: DaemonProcess) -> None:
    parent = daemon.process.pid
    assert worker_pids(parent) == set(ready_workers(daemon).values())
    started = time.monotonic()
    status = daemon.stop(signal.SIGTERM, timeout=10)
    assert time.monotonic() - started < 10
    assert status in (0, -signal.SIGTERM)
    assert worker_pids(parent) == set(), "a worker outlived its supervisor"


@pytest_slow
def test_sigkill_to_the_supervisor_kills_every_worker(daemon: DaemonProcess) -> None:
    """The supervisor gets no chance to stop anything: the kernel's parent-death signal must."""
    parent = daemon.process.pid
    running = worker_pids(parent)
    assert len(running) == 2
    daemon.stop(signal.SIGKILL)
    assert wait_exited(running, 5) == set(), "a worker outlived a supervisor killed with SIGKILL"
    assert worker_pids(parent) == set()


@pytest_slow
def test_a_killed_worker_is_replaced_within_5s_and_the_port_keeps_answering(daemon: DaemonProcess) -> None:
    before = ready_workers(daemon)
    os.kill(before[1], signal.SIGKILL)
    codes = []
    with concurrent.futures.ThreadPoolExecutor(1) as waiting:
        replaced = waiting.submit(daemon.wait_event, "worker.ready",
                                  lambda event: event.get("slot") == 1 and event.get("pid") != before[1], 5)
        while not replaced.done():
            codes.append(request("GET", f"{daemon.token_url}/health"))
            # Paced, to leave the cores to the starting worker; over as soon as it is ready.
            concurrent.futures.wait([replaced], timeout=0.05)
        replaced.result()  # the AssertionError of a worker not replaced within 5 s
    assert set(codes) == {200}, "the port stopped answering while a worker was replaced"
    assert worker_pids(daemon.process.pid) == set(ready_workers(daemon).values())
    assert request("GET", f"{daemon.token_url}/health") == 200


def change_is_used_by_every_worker_within_a_second(daemon: DaemonProcess, tmp_path: Path) -> None:
    admin = {"Authorization": f"Bearer {dev.mint(tmp_path, 'ops', 'admin', int(time.time()))}",
             "Content-Type": "application/json"}
    mapping = json.dumps({"clientIdentifier": "system:serviceaccount:apps:web", "participantContext": "shared-ctx",
                          "scopes": []}).encode()
    assert request("POST", f"{daemon.management_url}/api/v1/mappings", mapping, admin) == 201
    # Fresh connections land on either worker: both resolve (and cache) the mapping.
    assert {exchange(daemon, tmp_path) for _ in range(20)} == {200}
    assert request("DELETE", f"{daemon.management_url}/api/v1/mappings/"
                   "system%3Aserviceaccount%3Aapps%3Aweb/shared-ctx", headers=admin) == 204
    deleted = time.monotonic()
    late = []
    while time.monotonic() - deleted < 1.5:
        code = exchange(daemon, tmp_path)
        if time.monotonic() - deleted > 1.0:
            late.append(code)
    assert late and set(late) == {403}, "a worker served a deleted mapping for over a second"


@pytest_slow
def test_a_change_through_one_worker_is_used_by_every_worker_within_1s_sqlite(daemon: DaemonProcess,
                                                                             tmp_path: Path) -> None:
    change_is_used_by_every_worker_within_a_second(daemon, tmp_path)


@pytest_slow
@pytest.mark.postgres
def test_a_change_through_one_worker_is_used_by_every_worker_within_1s_postgres(
        tmp_path: Path, postgres_url: str) -> None:  # noqa: F811
    storage = {"type": "postgres", "url": postgres_url, "pool": {"max_connections": 4}}
    process = DaemonProcess.start(["--config", str(write_config(tmp_path, storage))], cwd=tmp_path)
    try:
        wait_two_workers_ready(process)
        change_is_used_by_every_worker_within_a_second(process, tmp_path)
    finally:
        process.stop(signal.SIGTERM)


@pytest_slow
def test_a_port_in_use_stops_the_supervisor_with_status_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        process = DaemonProcess.start(["--config", str(write_config(tmp_path, sqlite_storage(tmp_path)))],
                                      cwd=tmp_path, token_port=taken.getsockname()[1])
        assert process.process.wait(timeout=60) == 1
    assert "cannot listen" in process.output()  # twistd logs what was written to stderr once it logs
    assert worker_pids(process.process.pid) == set()

