"""
What both Klein apps share: JSON responses, the one place where errors become
HTTP, body limits, health and readiness, and a Site that can drain in-flight
requests on shutdown.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, cast
from urllib.parse import unquote

import attrs
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.server import Request, Site
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from jwtlet._async import as_deferred
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
    The request body, refusing more than ``limit`` bytes (413) whether or not
    the client announced its length.
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


@attrs.define
class Readiness:
    """
    Asks every provider that provides :class:`IReadiness`, named by the role it
    plays (``store``, ``signer``, ``validator``).
    """

    providers: Mapping[str, Any]

    async def check(self) -> dict[str, str]:
        results: dict[str, str] = {}
        for name, provider in sorted(self.providers.items()):
            if not IReadiness.providedBy(provider):
                results[name] = "ok"
                continue
            try:
                await as_deferred(provider.check_ready())
                results[name] = "ok"
            except DependencyUnavailable as error:
                results[name] = f"unavailable: {error}"
            except Exception:
                log.failure("readiness check of {name} failed", name=name)
                results[name] = "unavailable: check failed"
        return results


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
        if all(result == "ok" for result in checks.values()):
            return json_response(request, {"status": "ready"})
        return json_response(
            request, {"status": "unavailable", "checks": checks}, 503, unavailable_headers(5)
        )


# -- the HTTP server: request deadlines and draining ---------------------------

REQUEST_DEADLINE_SECS = 30.0
IDLE_TIMEOUT_SECS = 60.0
_TOO_SLOW_BODY = b'{"error":"request_timeout"}'


class DeadlineHTTPChannel(HTTPChannel):
    """
    An ``HTTPChannel`` that gives a client a fixed time to send a whole
    request.  Twisted's idle timeout restarts with every byte, so a client
    trickling one byte a second would otherwise hold its connection forever.
    """

    request_deadline = REQUEST_DEADLINE_SECS
    _deadline: Optional[IDelayedCall] = None

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is None and not self._handlingRequest:
            self._deadline = self.callLater(self.request_deadline, self._too_slow)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        super().allContentReceived()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_deadline()
        super().connectionLost(reason)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        log.info("request not received within {secs}s; closing", secs=self.request_deadline)
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_TOO_SLOW_BODY), _TOO_SLOW_BODY)
        )
        self.loseConnection()


class DrainingSite(Site):
    """
    A ``Site`` that counts requests in flight so shutdown can wait for them
    (listening stops first, then :meth:`drain` waits, bounded by its caller),
    and that bounds how long a client may take to send a request.
    """

    displayTracebacks = False
    # A plain HTTP/1.1 channel instead of Twisted's HTTP/2-negotiating wrapper.
    protocol = DeadlineHTTPChannel  # type: ignore[assignment]

    def __init__(self, resource: Any, **kwargs: Any):
        kwargs.setdefault("timeout", IDLE_TIMEOUT_SECS)
        super().__init__(resource, **kwargs)
        self.in_flight = 0
        self._idle: list[Deferred[None]] = []

    def log(self, request: Any) -> None:
        """
        No per-request access log: under twistd it would become a second log
        event for every request (about a tenth of an exchange's cost), while
        exchanges and management changes already log structured events and
        every request is counted in the metrics.
        """

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

