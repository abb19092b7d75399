"""
The services the daemon's tree is made of besides the providers and the
listeners: a ``MultiService`` that stops in order, the drain of in-flight
requests, and the shared HTTP client's pool.
"""

from __future__ import annotations

import attrs
from treq.client import HTTPClient
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from jwtlet.outbound import close_http_client
from jwtlet.web.server import DrainingSite

log = Logger(namespace="jwtlet.daemon")

DRAIN_TIMEOUT_SECS = 10.0


class SequentialMultiService(MultiService):
    """
    A ``MultiService`` that stops its children one at a time, last added
    first, each only after the previous one finished: listeners stop, then
    in-flight requests drain, then pools close.
    """

    def stopService(self) -> Deferred[None]:
        return ensureDeferred(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        Service.stopService(self)
        for child in reversed(list(self)):
            try:
                # IService.stopService may answer a Deferred or None.
                await maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {service} failed", service=child.name or repr(child))


@attrs.define
class DrainService(Service):
    """On stop, waits (bounded) for the requests the sites still serve."""

    sites: list[DrainingSite]
    reactor: IReactorTime
    timeout: float = DRAIN_TIMEOUT_SECS

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return ensureDeferred(self._drain())

    async def _drain(self) -> None:
        # Every site at once, under one bound: cli.md's 10 s are for the whole stop.
        # At the bound, the list cancels every site's wait and fires.
        waiting = DeferredList([site.drain() for site in self.sites], consumeErrors=True)
        await waiting.addTimeout(self.timeout, self.reactor)
        still = sum(site.in_flight for site in self.sites)
        if still:
            log.warn("{count} requests still in flight after {timeout}s", count=still, timeout=self.timeout)


@attrs.define
class HTTPClientService(Service):
    """Closes the shared HTTP client's connection pool when the daemon stops."""

    client: HTTPClient

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return close_http_client(self.client)
