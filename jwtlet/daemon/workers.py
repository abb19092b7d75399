"""
Every core (``workers``, issue 16): with ``workers`` above 1 the twistd
process becomes a supervisor that binds both listening sockets, never
accepts on them, and runs that many worker processes, each a whole daemon
serving the inherited sockets.

Why one shared socket rather than ``SO_REUSEPORT``: the socket outlives any
worker, so connections that arrive while a worker is being replaced wait in
its backlog for a live worker instead of being reset, an idle worker takes
the next connection (the kernel hands it to whoever calls ``accept`` first),
and ``ssl:`` and ``unix:`` endpoints work the same way (a port number cannot
be shared by a UNIX socket).

The supervisor's promises (config.md): a worker that dies is replaced after
:data:`RESTART_DELAY_SECS` (well within 5 s, startup included); SIGTERM
stops every worker within 10 s (SIGKILL after :data:`STOP_TIMEOUT_SECS`);
no worker outlives it: each worker runs under ``setpriv --pdeathsig KILL``
(the kernel kills it when the supervisor dies, even by SIGKILL; setting this
needs no Python between fork and exec, see machine-notes), and a worker
whose parent is already gone when it starts exits at once (the window
before ``setpriv`` ran).

The first worker starts alone and the others once it is ready, so one-time
start-up work (a generated key, the dev issuer) is done by one process.
Store migrations may run later (SQLite's on its store thread, PostgreSQL's
at the first request) and in several workers at once: each holds the
database's own lock (SQLite's write lock, PostgreSQL's advisory lock) and
finds the work done when the first is through.
A worker that cannot start before any worker was ever ready is a broken
deployment, not a crash to retry: the supervisor exits with status 1.

Over 400 lines because the supervisor, the parent's and the worker's sides of
the shared sockets, and the checks of ``workers`` are one protocol: split,
each half would have to be read with the other.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence, cast

import attrs
from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet import tcp, unix
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorCore,
    IReactorProcess,
    IReactorSocket,
    IReactorTCP,
    IReactorTime,
    IReactorUNIX,
)
from twisted.internet.protocol import Factory, ProcessProtocol, ServerFactory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.testing import MemoryReactor
from twisted.logger import Logger, LogLevel
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from jwtlet.config import Config, ConfigError
from jwtlet.discovery import Discovered
from jwtlet.logs import emit

if TYPE_CHECKING:
    from jwtlet.daemon.tap import Options

log = Logger(namespace="jwtlet.daemon")

#: short: a worker needs 1 to 3 s to start on a busy machine, and its replacement must serve within 5 s
RESTART_DELAY_SECS = 0.25
#: A slot whose replacements die before they are ready waits twice as long
#: each time, up to this: a broken config edit is not a restart loop at 4 Hz.
MAX_RESTART_DELAY_SECS = 4.0
#: SIGTERM to a worker, then SIGKILL after this: a worker drains for up to 10 s
#: itself, but the supervisor promises that everything stops within 10 s.
STOP_TIMEOUT_SECS = 8.0
#: the descriptors a worker finds its pipes and sockets at
STATUS_FD = 3
LISTENING_FDS = (4, 5)  # the token site's, the management site's
READY = b"ready\n"
#: the endpoints whose listening socket can be bound here and served there
SHAREABLE_ENDPOINTS = (TCP4ServerEndpoint, TCP6ServerEndpoint, SSL4ServerEndpoint, UNIXServerEndpoint)
_TWISTD = "from twisted.scripts.twistd import run; run()"


class SupervisorReactor(IReactorCore, IReactorProcess, IReactorTime, IReactorTCP, IReactorUNIX):
    """The reactor parts the supervisor uses (the daemon's reactor provides them all)."""


class WorkerReactor(IReactorSocket, IReactorCore):
    """The reactor parts a worker's listeners use."""


#: how the daemon listens on one endpoint description with one site (``jwtlet.daemon.wiring``)
Listen = Callable[[str, IProtocolFactory], IService]


class MakeService(Protocol):
    def __call__(
        self, config: Config, discovered: Discovered, reactor: WorkerReactor, listen: Optional[Listen] = None
    ) -> MultiService: ...


def descriptions(config: Config) -> tuple[str, str]:
    """The two sites' endpoint descriptions, in the order of :data:`LISTENING_FDS`."""
    return config.token_exchange_description(), config.management_description()


def problems(config: Config) -> list[str]:
    """What stops ``workers`` above 1 from working with this config on this machine."""
    if config.workers == 1:
        return []
    found = []
    for key, description in zip(("token_exchange_endpoint", "management_endpoint"), descriptions(config),
                                strict=True):
        try:
            endpoint = serverFromString(MemoryReactor(), description)
        except Exception:  # noqa: S112 - an unparseable description is reported by the endpoint check
            continue
        if not isinstance(endpoint, SHAREABLE_ENDPOINTS):
            found.append(f"{key}: with workers above 1 only tcp:, ssl: and unix: endpoints can be shared")
    if shutil.which("setpriv") is None:
        found.append("workers: above 1 needs setpriv (util-linux), so that no worker outlives the supervisor")
    return found


# -- the supervisor's side --------------------------------------------------------------


class _Unserved(TwistedProtocol):
    """Never built: the supervisor binds sockets but does not accept on them."""


@attrs.frozen
class BindingReactor:
    """
    What an endpoint calls to listen, answered for the supervisor: the socket
    is bound and listening, but never read, so only the workers accept on it.
    TLS is the workers' business (each wraps its site with the endpoint's
    certificate), so ``listenSSL`` binds a plain TCP socket.
    """

    reactor: SupervisorReactor

    def listenTCP(  # noqa: N802 - the name endpoints call
        self, port: int, factory: ServerFactory, backlog: int = 50, interface: str = ""
    ) -> IListeningPort:
        return _held(self.reactor.listenTCP(port, factory, backlog, interface))

    def listenSSL(  # noqa: N802 - the name endpoints call
        self, port: int, factory: ServerFactory, contextFactory: IOpenSSLServerConnectionCreator, backlog: int = 50,  # noqa: N803
        interface: str = "",
    ) -> IListeningPort:
        return self.listenTCP(port, factory, backlog, interface)

    def listenUNIX(  # noqa: N802 - the name endpoints call
        self, address: str, factory: ServerFactory, backlog: int = 50, mode: int = 0o666,
        wantPID: bool = False,  # noqa: N803
    ) -> IListeningPort:
        return _held(self.reactor.listenUNIX(address, factory, backlog, mode, wantPID))


def _held(port: IListeningPort) -> IListeningPort:
    port.stopReading()  # type: ignore[attr-defined]  # a tcp.Port or unix.Port, both FileDescriptors
    return port


def bind(description: str, reactor: SupervisorReactor) -> IListeningPort:
    """Bind ``description`` for the workers; raises what listening raised (``CannotListenError``)."""
    listening = serverFromString(BindingReactor(reactor), description).listen(Factory.forProtocol(_Unserved))
    result: list[IListeningPort | Failure] = []
    listening.addBoth(result.append)  # these endpoints listen at once: the Deferred has fired
    if isinstance(result[0], Failure):
        result[0].raiseException()
    return result[0]


class _Worker(ProcessProtocol):
    """One worker process as its supervisor sees it (its pid is kept: the transport forgets it at exit)."""

    def __init__(self, supervisor: Supervisor, slot: int):
        self.supervisor = supervisor
        self.slot = slot
        self.pid: Optional[int] = None
        self._status = b""

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        assert self.transport is not None
        self.pid = self.transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:  # noqa: N802, N803 - Twisted's names
        if childFD == STATUS_FD and self._status != READY:
            self._status += data
            if self._status == READY:
                self.supervisor.worker_ready(self.slot)

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 - Twisted's name
        self.supervisor.worker_ended(self.slot, reason)


@attrs.define(eq=False)
class Supervisor(Service):
    """
    Binds ``descriptions`` and keeps ``count`` workers serving them, each run
    as ``command`` with the sockets at :data:`LISTENING_FDS`.
    """

    descriptions: Sequence[str]
    count: int
    command: Sequence[str]
    reactor: SupervisorReactor
    restart_delay: float = RESTART_DELAY_SECS
    stop_timeout: float = STOP_TIMEOUT_SECS
    ports: list[IListeningPort] = attrs.field(init=False, factory=list)
    processes: dict[int, _Worker] = attrs.field(init=False, factory=dict)
    restarts: dict[int, IDelayedCall] = attrs.field(init=False, factory=dict)
    #: per slot, the workers that died since one was last ready there
    failures: dict[int, int] = attrs.field(init=False, factory=dict)
    ever_ready: bool = attrs.field(init=False, default=False)
    _stopped: Optional[Deferred[None]] = attrs.field(init=False, default=None)

    def privilegedStartService(self) -> None:  # noqa: N802 - Twisted's name
        # Before the reactor runs, so a port in use ends startup with a message, not a log line.
        try:
            self.ports = [bind(description, self.reactor) for description in self.descriptions]
        except Exception as error:
            sys.stderr.write(f"jwtlet: cannot listen: {error}\n")
            raise SystemExit(1) from None
        Service.privilegedStartService(self)

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        Service.startService(self)
        self.spawn(0)

    def spawn(self, slot: int) -> None:
        self.restarts.pop(slot, None)
        child_fds: dict[int, int | str] = {0: 0, 1: 1, 2: 2, STATUS_FD: "r"}
        for target, port in zip(LISTENING_FDS, self.ports, strict=True):
            child_fds[target] = port.fileno()  # type: ignore[attr-defined]
        worker = _Worker(self, slot)
        self.reactor.spawnProcess(worker, self.command[0], list(self.command), env=dict(os.environ),
                                  childFDs=child_fds)
        self.processes[slot] = worker
        emit(log, "worker.started", slot=slot, pid=worker.pid)

    def worker_ready(self, slot: int) -> None:
        emit(log, "worker.ready", slot=slot, pid=self.processes[slot].pid)
        self.failures.pop(slot, None)
        if not self.ever_ready:
            self.ever_ready = True
            for other in range(1, self.count):
                if self.running and other not in self.processes:
                    self.spawn(other)

    def worker_ended(self, slot: int, reason: Failure) -> None:
        worker = self.processes.pop(slot)
        expected = reason.check(ProcessDone) or not self.running
        emit(log, "worker.exited", level=LogLevel.info if expected else LogLevel.warn, slot=slot, pid=worker.pid,
             exit_code=getattr(reason.value, "exitCode", None), signal=getattr(reason.value, "signal", None))
        if not self.running:
            if not self.processes and self._stopped is not None:
                self._stopped.callback(None)
            return
        if not self.ever_ready:
            self.give_up()
            return
        failures = self.failures.get(slot, 0)
        self.failures[slot] = failures + 1
        delay = min(MAX_RESTART_DELAY_SECS, self.restart_delay * 2 ** failures)
        self.restarts[slot] = self.reactor.callLater(delay, self.spawn, slot)

    def give_up(self) -> None:
        """No worker could start: stop, and end the process with status 1 once the reactor stopped."""
        emit(log, "workers.failed", level=LogLevel.critical,
             reason="a worker exited before any worker was ready; see its output above")
        self.reactor.addSystemEventTrigger("after", "shutdown", exit_with, 1)
        self.reactor.stop()

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        Service.stopService(self)
        for pending in self.restarts.values():
            pending.cancel()
        self.restarts.clear()
        stopped: Deferred[None] = Deferred() if self.processes else succeed(None)
        self._stopped = stopped if self.processes else None
        for worker in self.processes.values():
            _signal(worker, "TERM")
        if self.processes:
            killing = self.reactor.callLater(self.stop_timeout, self._kill)
            stopped.addBoth(_cancelling(killing))
        return stopped.addBoth(self._close_ports)

    def _kill(self) -> None:
        for slot, worker in self.processes.items():
            emit(log, "worker.killed", level=LogLevel.warn, slot=slot, pid=worker.pid,
                 reason=f"still running {self.stop_timeout}s after SIGTERM")
            _signal(worker, "KILL")

    def _close_ports(self, result: object) -> object:
        for port in self.ports:
            port.stopListening()
        self.ports = []
        return result


def _signal(worker: _Worker, name: str) -> None:
    assert worker.transport is not None
    try:
        worker.transport.signalProcess(name)
    except ProcessExitedAlready:
        pass  # its end is on its way to worker_ended


def _cancelling(call: IDelayedCall) -> Callable[[object], object]:
    def cancel(result: object) -> object:
        if call.active():
            call.cancel()
        return result

    return cancel


def exit_with(status: int) -> None:
    # twistd would exit 0 after a clean stop; the log observers flushed in an earlier trigger.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def worker_command(options: Options, parent_pid: int) -> list[str]:
    """A worker's argv: the same daemon options, under ``setpriv --pdeathsig KILL``."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:  # checked with the config; the machine may have changed since
        raise ConfigError(problems(options.config))
    command = [setpriv, "--pdeathsig", "KILL", "--", sys.executable, "-c", _TWISTD, "-n", "--pidfile=", "jwtlet"]
    if options["config"]:
        command += ["--config", str(options["config"])]
    if options["dev"]:
        command.append("--dev")
    if options["data-dir"]:
        command += ["--data-dir", str(options["data-dir"])]
    return [*command, "--worker-of", str(parent_pid)]


# -- the worker's side ------------------------------------------------------------------


class _SharedUNIXPort(unix.Port):
    """An inherited UNIX socket: the supervisor owns its file, so a worker that stops must not unlink it."""

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802 - Twisted's name
        tcp.Port.connectionLost(self, reason)


@attrs.frozen
class InheritedReactor:
    """
    What an endpoint calls to listen, answered for a worker with the socket
    the supervisor bound (at ``fd``): the endpoint still decides the rest,
    such as wrapping the site in TLS for ``ssl:``.
    """

    reactor: WorkerReactor
    fd: int

    def listenTCP(  # noqa: N802 - the name endpoints call
        self, port: int, factory: ServerFactory, backlog: int = 50, interface: str = ""
    ) -> IListeningPort:
        with socket.socket(fileno=os.dup(self.fd)) as probe:
            family = probe.family
        listening = self.reactor.adoptStreamPort(self.fd, family, factory)
        os.close(self.fd)  # adopting took a duplicate
        return listening

    def listenSSL(  # noqa: N802 - the name endpoints call
        self, port: int, factory: ServerFactory, contextFactory: IOpenSSLServerConnectionCreator, backlog: int = 50,  # noqa: N803
        interface: str = "",
    ) -> IListeningPort:
        # The same wrapping as the reactor's own listenSSL.
        tls = cast(ServerFactory, TLSMemoryBIOFactory(contextFactory, False, factory))
        return self.listenTCP(port, tls, backlog, interface)

    def listenUNIX(  # noqa: N802 - the name endpoints call
        self, address: str, factory: ServerFactory, backlog: int = 50, mode: int = 0o666,
        wantPID: bool = False,  # noqa: N803
    ) -> IListeningPort:
        listening = _SharedUNIXPort._fromListeningDescriptor(self.reactor, self.fd, factory)
        listening.startListening()
        os.close(self.fd)
        return listening


@attrs.define(eq=False)
class ReadyNotice(Service):
    """Tells the supervisor, once every service before it started, that this worker serves."""

    fd: int = STATUS_FD

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        Service.startService(self)
        os.write(self.fd, READY)
        os.close(self.fd)


def inherited_listen(config: Config, reactor: WorkerReactor) -> Listen:
    """How a worker listens: each site on the socket the supervisor bound for its description."""
    fds = dict(zip(descriptions(config), LISTENING_FDS, strict=True))

    def listen(description: str, site: IProtocolFactory) -> IService:
        # Endpoints only call listenTCP, listenSSL or listenUNIX on it (``SHAREABLE_ENDPOINTS``).
        inherited = cast(IReactorCore, InheritedReactor(reactor, fds[description]))
        return strports.service(description, site, reactor=inherited)

    return listen


# -- which of the three the twistd process is -------------------------------------------


# ``reactor``: the same reason as ``wiring.make_service``'s, which it is handed to.
def daemon_service(  # type: ignore[explicit-any]
    options: Options, reactor: Any, make_service: MakeService
) -> IService:
    """
    The service of this twistd process: a worker (``--worker-of PID``), the
    supervisor of ``workers`` workers, or with one worker the daemon itself.
    """
    config = options.config
    if options["worker-of"] is not None:
        if os.getppid() != int(options["worker-of"]):
            # Started, but the supervisor died before setpriv could tie this process to it.
            raise SystemExit("jwtlet: the supervising process is gone")
        daemon = make_service(config, options.discovered, reactor, inherited_listen(config, reactor))
        ReadyNotice().setServiceParent(daemon)
        return daemon
    if config.workers > 1:
        return Supervisor(descriptions(config), config.workers, worker_command(options, os.getpid()), reactor)
    return make_service(config, options.discovered, reactor)
