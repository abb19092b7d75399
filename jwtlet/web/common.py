"""
What both Klein apps share: JSON responses, the one place where errors become
HTTP, health and readiness, and a Site that bounds what clients may send
(body size while it arrives, time to send a request, open connections) and
can drain in-flight requests on shutdown.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from io import BytesIO
from typing import Any, Mapping, Optional, cast
from urllib.parse import unquote

import attrs
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.server import Request, Site
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from jwtlet._async import as_deferred
from jwtlet.config.schema import LimitsConfig
from jwtlet.interfaces import DependencyUnavailable, IReadiness

log = Logger(namespace="jwtlet.web")

JSON = "application/json"
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


@attrs.define(auto_exc=True)
class APIError(Exception):
    """An HTTP error with a JSON body, raised by handlers, rendered in one place."""

    status: int
    body: Mapping[str, Any]
    headers: Mapping[str, str] = attrs.field(factory=dict)


def json_response(
    request: IRequest,
    body: Any,
    status: int = 200,
    headers: Optional[Mapping[str, str]] = None,
) -> bytes:
    """Set status, ``Content-Type`` and extra headers; return the encoded body."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", JSON.encode())
    for name, value in (headers or {}).items():
        request.setHeader(name.encode(), value.encode())
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def unavailable_headers(retry_after: int) -> dict[str, str]:
    return {"Retry-After": str(max(1, int(retry_after)))}


def add_error_handlers(app: Klein) -> None:
    """
    Map every failure to a JSON response, in order: our errors, a dependency
    down, werkzeug's 404/405, a cancelled request, anything else (logged, 500).

    ``app`` is the class attribute of an API class, so Klein passes the API
    instance first (as ``self``); these handlers do not need it.
    """
    # An empty path segment ("//") is a 404 here, not a redirect to a merged path.
    app.url_map.merge_slashes = False

    @app.handle_errors(APIError)
    def api_error(self: Any, request: IRequest, failure: Failure) -> bytes:
        error = cast(APIError, failure.value)
        return json_response(request, error.body, error.status, error.headers)

    @app.handle_errors(DependencyUnavailable)
    def dependency_down(self: Any, request: IRequest, failure: Failure) -> bytes:
        log.warn("dependency unavailable: {reason}", reason=str(failure.value))
        return json_response(
            request,
            {"error": "temporarily_unavailable"},
            503,
            unavailable_headers(cast(DependencyUnavailable, failure.value).retry_after),
        )

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self: Any, request: IRequest, failure: Failure) -> bytes:
        allowed = sorted(set(cast(MethodNotAllowed, failure.value).valid_methods or ()))
        return json_response(
            request, {"error": "method_not_allowed"}, 405, {"Allow": ", ".join(allowed)}
        )

    @app.handle_errors(NotFound)
    def not_found(self: Any, request: IRequest, failure: Failure) -> bytes:
        return json_response(request, {"error": "not_found"}, 404)

    @app.handle_errors(RequestRedirect)
    def redirect(self: Any, request: IRequest, failure: Failure) -> bytes:
        target = cast(RequestRedirect, failure.value).new_url
        return json_response(request, {"error": "moved", "location": target}, 308, {"Location": target})

    @app.handle_errors(HTTPException)
    def http_exception(self: Any, request: IRequest, failure: Failure) -> bytes:
        error = cast(HTTPException, failure.value)
        return json_response(request, {"error": (error.name or "error").lower().replace(" ", "_")}, error.code or 400)

    @app.handle_errors(CancelledError)
    def cancelled(self: Any, request: IRequest, failure: Failure) -> bytes:
        # The client went away; nobody reads this.
        return b""

    @app.handle_errors(Exception)
    def internal(self: Any, request: IRequest, failure: Failure) -> bytes:
        log.failure("unhandled error in {method} {path}", failure,
                    method=_text(request.method), path=_text(request.path))
        return json_response(request, {"error": "server_error"}, 500)


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def method_not_allowed(*allowed: str) -> MethodNotAllowed:
    return MethodNotAllowed(valid_methods=list(allowed))


def read_body(request: IRequest, limit: int) -> bytes:
    """
    The request body, refusing more than ``limit`` bytes (413).  The site has
    already refused an oversized body while it arrived; the check here keeps
    a handler's limit whatever serves it.
    """
    announced = request.getHeader(b"content-length")
    if announced is not None:
        try:
            if int(announced) > limit:
                raise APIError(413, {"error": "request_too_large"})
        except ValueError:
            raise APIError(400, {"error": "invalid content-length"}) from None
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    body: bytes = content.read(limit + 1)
    if len(body) > limit:
        raise APIError(413, {"error": "request_too_large"})
    return body


def media_type(request: IRequest) -> str:
    """The media type of the body, without parameters, lower-cased."""
    header = request.getHeader(b"content-type") or b""
    return header.split(b";", 1)[0].strip().decode("latin-1").lower()


def path_segments(request: IRequest, prefix: str) -> list[str]:
    """
    The segments of the request path after ``prefix``, each percent-decoded on
    its own, so that an encoded ``/`` (``%2F``) stays inside its segment.
    """
    raw = request.path.decode("ascii", "replace")
    rest = raw[len(prefix):] if raw.startswith(prefix) else ""
    return [unquote(segment, errors="strict") for segment in rest.split("/") if segment != ""]


# -- health and readiness -------------------------------------------------------


READY_CHECK_TIMEOUT_SECS = 0.8
OK = "ok"
UNAVAILABLE = "unavailable"


@attrs.define
class Readiness:
    """
    Asks every provider that provides :class:`IReadiness`, named by the role it
    plays (``store``, ``signer``, ``validator``), all at once and each for at
    most ``timeout`` seconds, so that ``/ready`` answers within a second
    whatever a dependency does.  Each answer is only ``ok`` or
    ``unavailable``: ``/ready`` needs no auth, so why a dependency is down
    (error text, URLs, paths) goes to the log, never into the answer.
    """

    providers: Mapping[str, Any]
    clock: IReactorTime
    timeout: float = READY_CHECK_TIMEOUT_SECS

    async def check(self) -> dict[str, str]:
        # Every check starts before the first is awaited: they run side by side.
        started = {name: ensureDeferred(self._check(name, provider))
                   for name, provider in sorted(self.providers.items())}
        return {name: await state for name, state in started.items()}

    async def _check(self, name: str, provider: Any) -> str:
        if not IReadiness.providedBy(provider):
            return OK
        try:
            await within(as_deferred(provider.check_ready()), self.timeout, self.clock)
        except TimeoutError:
            log.warn("readiness check of {name} did not answer within {secs}s", name=name, secs=self.timeout)
            return UNAVAILABLE
        except DependencyUnavailable as error:
            log.warn("{name} is not ready: {reason}", name=name, reason=str(error))
            return UNAVAILABLE
        except CancelledError:
            # The probe went away (nobody reads this answer), or the provider
            # cancelled its own call: never let it become an empty 200.
            log.info("readiness check of {name} was cancelled", name=name)
            return UNAVAILABLE
        except Exception:
            log.failure("readiness check of {name} failed", name=name)
            return UNAVAILABLE
        return OK


def within(answer: Deferred[Any], timeout: float, clock: IReactorTime) -> Deferred[Any]:
    """
    The outcome of ``answer``, or :class:`TimeoutError` once ``timeout``
    seconds have passed.  Unlike ``Deferred.addTimeout`` this does not wait
    for ``answer`` to give in: a coroutine that catches its cancellation and
    goes on waiting still times out on time.  A late outcome is dropped.
    """

    def cancel(_: Deferred[Any]) -> None:
        if timer.active():
            timer.cancel()
        answer.cancel()

    bounded: Deferred[Any] = Deferred(cancel)

    def settle(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if bounded.called:
            return
        if isinstance(result, Failure):
            bounded.errback(result)
        else:
            bounded.callback(result)

    def expire() -> None:
        bounded.errback(TimeoutError(f"no answer within {timeout}s"))
        answer.cancel()

    timer = clock.callLater(timeout, expire)
    answer.addBoth(settle)
    return bounded


def add_health_routes(app: Klein) -> None:
    """
    ``GET /health`` (liveness) and ``GET /ready`` (dependencies) on the class
    attribute ``app`` of an API class whose instances have ``readiness``.
    """

    @app.route("/health", methods=["GET"])
    def health(self: Any, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"OK"

    @app.route("/ready", methods=["GET"])
    async def ready(self: Any, request: IRequest) -> bytes:
        readiness: Readiness = self.readiness
        checks = await readiness.check()
        if all(state == OK for state in checks.values()):
            return json_response(request, {"status": "ready"})
        return json_response(
            request, {"status": "unavailable", "checks": checks}, 503, unavailable_headers(5)
        )


# -- the HTTP server: body limits, request deadlines, connection cap, draining --

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
    is off (it ran in the reactor thread over the whole body): routes that
    take a form parse their bounded body themselves.  Query strings are
    still parsed into ``args``.
    """

    channel: DeadlineHTTPChannel
    _limit = 0
    _received = 0

    def __init__(self, channel: DeadlineHTTPChannel, *args: Any, **kwargs: Any):
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(channel, *args, **kwargs)

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
    _linger: Optional[IDelayedCall] = None

    def connectionMade(self) -> None:
        self.site.connection_opened()
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return  # read and dropped, see refuse()
        if self._deadline is None and not self._handlingRequest:
            self._deadline = self.callLater(self.request_deadline, self._too_slow)
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        if self.refused:
            return  # the body after the headers of a request refused on its length
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        self._cancel_deadline()
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
        resource: Any,
        *,
        body_limits: BodyLimits = NO_BODY,
        max_connections: int = MAX_CONNECTIONS,
        **kwargs: Any,
    ):
        kwargs.setdefault("timeout", IDLE_TIMEOUT_SECS)
        super().__init__(resource, **kwargs)
        self.body_limits = body_limits
        self.max_connections = max_connections
        self.connections = 0
        self._refusing_connections = False
        self.in_flight = 0
        self._idle: list[Deferred[None]] = []

    def log(self, request: Any) -> None:
        """
        No per-request access log: under twistd it would become a second log
        event for every request (about a tenth of an exchange's cost), while
        exchanges and management changes already log structured events and
        every request is counted in the metrics.
        """

    def buildProtocol(self, addr: Any) -> Any:
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

    def getResourceFor(self, request: Request) -> Any:
        self.in_flight += 1
        request.notifyFinish().addBoth(self._finished)
        return super().getResourceFor(request)

    def _finished(self, _: object) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            waiting, self._idle = self._idle, []
            for waiter in waiting:
                waiter.callback(None)

    def drain(self) -> Deferred[None]:
        """Fires when no request is in flight."""
        if self.in_flight == 0:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle.append(waiter)
        return waiter
