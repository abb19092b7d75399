"""
The tracer's life in the daemon: installed when the daemon starts, flushed
and stopped when it stops, without ever blocking the reactor on the
collector.
"""

from __future__ import annotations

import threading
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, ensureDeferred, succeed
from twisted.logger import Logger

from jwtlet import tracing

log = Logger(namespace="jwtlet.tracing")

#: How long the daemon's stop waits for the last spans to reach the collector.
FLUSH_TIMEOUT_SECS = 5.0


@attrs.define
class TracingService(Service):
    """
    Installs ``tracer`` as the process's tracer while the daemon runs.  On
    stop, the exporter flushes in a thread of its own (a daemon thread: a
    collector that hangs can neither block the reactor nor keep the process
    alive), and the stop waits for it at most ``timeout`` seconds.
    """

    tracer: tracing.Tracing
    reactor: Any
    timeout: float = FLUSH_TIMEOUT_SECS

    def startService(self) -> None:
        Service.startService(self)
        tracing.install(self.tracer)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        tracing.uninstall(self.tracer)
        if not self.tracer.enabled:
            return succeed(None)
        return ensureDeferred(self._flush())

    async def _flush(self) -> None:
        flushed: Deferred[None] = Deferred()

        def done() -> None:
            if not flushed.called:  # not after the timeout gave up on it
                flushed.callback(None)

        def shut_down() -> None:
            try:
                self.tracer.shutdown()()
            finally:
                self.reactor.callFromThread(done)

        threading.Thread(target=shut_down, name="jwtlet-trace-flush", daemon=True).start()
        flushed.addTimeout(self.timeout, self.reactor)
        try:
            await flushed
        except TimeoutError:
            log.warn("spans not flushed to the collector within {timeout}s; dropped", timeout=self.timeout)
