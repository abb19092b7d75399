"""
The HTTP server of both ports: a Site that bounds what clients may send (body
size while it arrives, time to send a request, open connections) and can
drain in-flight requests on shutdown.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from io import BytesIO
from typing import Mapping, Optional

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from jwtlet.config import LimitsConfig
from jwtlet.web.responses import JSON, NO_STORE

log = Logger(namespace="jwtlet.web")

REQUEST_DEADLINE_SECS = 30.0
IDLE_TIMEOUT_SECS = 60.0
# How long a refused upload may go on being read (and dropped) so that the
# client can read the refusal before the connection closes.
LINGER_SECS = 2.0
TOO_LARGE = {"error": "request_too_large"}
_TOO_SLOW = {"error": "request_timeout"}


@attrs.frozen
class BodyLimits:
    """
    How many body bytes a site accepts: the limit of the longest ``prefixes``
    entry the request path starts with, else ``default``.
    """

    default: int
    prefixes: Mapping[bytes, int] = attrs.field(factory=dict)

    def for_path(self, path: bytes) -> int:
        path = path.split(b"?", 1)[0]
        matching = [prefix for prefix in self.prefixes if path.startswith(prefix)]
        if not matching:
            return self.default
        return self.prefixes[max(matching, key=len)]


NO_BODY = BodyLimits(0)
MAX_CONNECTIONS = LimitsConfig().max_connections


def closing_response(code: int, body: Mapping[str, str]) -> bytes:
    """
    A whole JSON error response that a channel writes itself, for a request
    that never reaches a resource (too slow, too large), before it closes.
    """
    content = json.dumps(body, separators=(",", ":")).encode("utf-8")
    head = [
        f"HTTP/1.1 {code} {HTTPStatus(code).phrase}".encode(),
        b"Content-Type: " + JSON.encode(),
        *(f"{name}: {value}".encode() for name, value in NO_STORE.items()),
        b"Content-Length: %d" % len(content),
        b"Connection: close",
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + content


class BoundedRequest(Request):
    """
    A request that never holds more than its route's body limit: an announced
    ``Content-Length`` above it, or a body (chunked ones too) growing past
    it, is answered 413 at once and the rest of the body is never buffered.

    Twisted's own parsing of urlencoded and multipart bodies into ``args``
    is off (:class:`DrainingSite` turns it off: it ran in the reactor thread
    over the whole body): routes that take a form parse their bounded body
    themselves.  Query strings are still parsed into ``args``.
    """

    channel: DeadlineHTTPChannel
    _limit = 0
    _received = 0

    def gotLength(self, length: Optional[int]) -> None:
        self._limit = self.channel.body_limit()
        if length is not None and length > self._limit:
            self.channel.refuse(closing_response(413, TOO_LARGE))
            return
        # At most the limit (1 MiB or less) is ever kept: memory, never a
        # temporary file as Twisted uses for announced large bodies.
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self.channel.refused:
            return  # the rest of a read that held the refused part
        self._received += len(data)
        if self._received > self._limit:
            self.channel.refuse(closing_response(413, TOO_LARGE))
            return
        assert self.content is not None, "gotLength set it or refused the request"
        self.content.write(data)


class DeadlineHTTPChannel(HTTPChannel):
    """
    An ``HTTPChannel`` that gives a client a fixed time to send a whole
    request (Twisted's idle timeout restarts with every byte, so a client
    trickling one byte a second would otherwise hold its connection forever),
    that can refuse a request before its body has arrived, and that tells
    its site when it opens and closes.
    """

    request_deadline = REQUEST_DEADLINE_SECS
    refused = False
    site: DrainingSite
    _deadline: Optional[IDelayedCall] = None
    #: A request has begun to arrive and has not arrived whole.
    _receiving = False
    _linger: Optional[IDelayedCall] = None
    _local_address: Optional[IAddress] = None

    def connectionMade(self) -> None:
        self.site.connection_opened()
        super().connectionMade()

    def getHost(self) -> IAddress:  # noqa: N802 - Twisted's name
        # Every request asks (Request.__init__), and Twisted's TCP transport
        # asks the kernel each time; a connection's own address never changes.
        if self._local_address is None:
            self._local_address = super().getHost()
        return self._local_address

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return  # read and dropped, see refuse()
        if not self._receiving and not self._handlingRequest:
            self._receiving = True
            self._start_deadline()
        super().dataReceived(data)

    def _start_deadline(self) -> None:
        # One timer per connection, moved on for each request: moving a timer
        # later costs the reactor nothing until it comes due, where a new
        # timer per request and its cancellation cost every request a heap
        # insertion, and heap rebuilds in bulk.
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(self.request_deadline)
        else:
            self._deadline = self.callLater(self.request_deadline, self._too_slow)

    def rawDataReceived(self, data: bytes) -> None:
        if self.refused:
            return  # the body after the headers of a request refused on its length
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        self._receiving = False
        if self.refused:
            return  # answered already; the request is never processed
        super().allContentReceived()

    def _send100Continue(self) -> None:
        # A request refused on its announced length must not invite its body.
        if not self.refused:
            super()._send100Continue()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_deadline()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        super().connectionLost(reason)
        self.site.connection_closed()

    def body_limit(self) -> int:
        """The body limit of the request being received (its request line is known by then)."""
        return self.site.body_limits.for_path(self._path)

    def refuse(self, response: bytes) -> None:
        """
        Answer the request being received with ``response`` and close.

        Whatever the client still sends is read and dropped rather than left
        unread: closing a socket with unread data makes the kernel reset the
        connection, and the client would lose the answer.  Our side is shut
        after the answer; the client's after it stops sending or after
        ``LINGER_SECS``.
        """
        self.refused = True
        self._cancel_deadline()
        assert self.transport is not None
        self.transport.write(response)
        close_write = getattr(self.transport, "loseWriteConnection", None)
        if close_write is None:  # TLS cannot half-close
            self.loseConnection()
            return
        close_write()
        self._linger = self.callLater(LINGER_SECS, self.loseConnection)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self._receiving:
            return  # every request came in time; the connection is idle (Twisted's idle timeout's affair)
        log.info("request not received within {secs}s; closing", secs=self.request_deadline)
        assert self.transport is not None
        self.transport.write(closing_response(408, _TOO_SLOW))
        self.loseConnection()


class DrainingSite(Site):
    """
    A ``Site`` that bounds what a client may send (body size per path,
    time to send a request, open connections), and counts requests in flight
    so shutdown can wait for them (listening stops first, then :meth:`drain`
    waits, bounded by its caller).

    Without ``body_limits`` a site accepts no body at all.
    """

    displayTracebacks = False
    # A plain HTTP/1.1 channel instead of Twisted's HTTP/2-negotiating wrapper.
    protocol = DeadlineHTTPChannel  # type: ignore[assignment]
    requestFactory = BoundedRequest

    def __init__(
        self,
        resource: IResource,
        *,
        body_limits: BodyLimits = NO_BODY,
        max_connections: int = MAX_CONNECTIONS,
        timeout: float = IDLE_TIMEOUT_SECS,
        reactor: Optional[IReactorTime] = None,
    ):
        super().__init__(resource, parsePOSTFormSubmission=False, timeout=timeout, reactor=reactor)
        self.body_limits = body_limits
        self.max_connections = max_connections
        self.connections = 0
        self._refusing_connections = False
        self.in_flight = 0
        self._idle: list[Deferred[None]] = []

    def log(self, request: http.Request) -> None:
        """
        No per-request access log: under twistd it would become a second log
        event for every request (about a tenth of an exchange's cost), while
        exchanges and management changes already log structured events and
        every request is counted in the metrics.
        """

    # The channel is the plain HTTP/1.1 one (see ``protocol``), not the
    # HTTP/2-negotiating wrapper Twisted's signature names.
    def buildProtocol(self, addr: Optional[IAddress]) -> Optional[DeadlineHTTPChannel]:  # type: ignore[override]
        """A channel, or ``None`` (the port closes the connection at once) when all are in use."""
        if self.connections >= self.max_connections:
            if not self._refusing_connections:
                log.warn("{count} connections open: refusing new ones", count=self.connections)
                self._refusing_connections = True
            return None
        return super().buildProtocol(addr)

    def connection_opened(self) -> None:
        self.connections += 1

    def connection_closed(self) -> None:
        self.connections -= 1
        self._refusing_connections = False

    def getResourceFor(self, request: Request) -> IResource:
        self.in_flight += 1
        request.notifyFinish().addBoth(self._finished)
        return super().getResourceFor(request)

    def _finished(self, _: object) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            waiting, self._idle = self._idle, []
            for waiter in waiting:
                if not waiter.called:  # one whose drain gave up at its timeout
                    waiter.callback(None)

    def drain(self) -> Deferred[None]:
        """Fires when no request is in flight."""
        if self.in_flight == 0:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle.append(waiter)
        return waiter
