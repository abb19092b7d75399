"""
Where errors become HTTP: one mapping per port, and the handlers both ports
install in the same order (domain errors, werkzeug's 404/405, a cancelled
request, anything else as a logged 500).

The core raises domain errors without statuses (:mod:`jwtlet.policy`,
:class:`DependencyUnavailable`); this module alone decides what a client of
each port reads for them.  The ext_authz fronts say their decisions
themselves (Envoy's contract, not an HTTP API's).
"""

from __future__ import annotations

from typing import Callable, Mapping, cast

import attrs
from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from jwtlet.interfaces import DependencyUnavailable
from jwtlet.model import JSONValue
from jwtlet.policy import RateLimited, Refusal, ServerError
from jwtlet.web.responses import NO_STORE, json_response, retry_after

log = Logger(namespace="jwtlet.web")


@attrs.define(auto_exc=True)
class APIError(Exception):
    """An HTTP error with a JSON body, raised by handlers, rendered as it is."""

    status: int
    body: Mapping[str, JSONValue]
    headers: Mapping[str, str] = attrs.field(factory=dict)


#: What a port maps: its domain errors, rendered by :data:`PortMapping`.
PORT_ERRORS = (APIError, Refusal, RateLimited, ServerError, DependencyUnavailable)
PortError = APIError | Refusal | RateLimited | ServerError | DependencyUnavailable
PortMapping = Callable[[IRequest, PortError], APIError]


# -- the token exchange port ----------------------------------------------------

#: The routes whose answers, errors included, carry ``Cache-Control: no-store``.
TOKEN_PATH = b"/token"
INTROSPECT_PATH = b"/introspect"
API_KEY_PREFIX = b"/v0/token/"
_UNAVAILABLE = "a dependency is unavailable, retry later"
#: RFC 6749 codes answered with another status than 400.
_OAUTH_STATUS = {"unauthorized_client": 403}


def oauth_error(error: PortError) -> APIError:
    """``POST /token``: RFC 6749 §5.2 bodies, never cached."""
    if isinstance(error, APIError):
        return attrs.evolve(error, headers={**error.headers, **NO_STORE})
    if isinstance(error, Refusal):
        body = {"error": error.code}
        if error.description:
            body["error_description"] = error.description
        return APIError(_OAUTH_STATUS.get(error.code, 400), body, NO_STORE)
    if isinstance(error, RateLimited):
        return APIError(429, {"error": "rate_limited"}, {**NO_STORE, **retry_after(error.retry_after)})
    if isinstance(error, DependencyUnavailable):
        return APIError(503, {"error": "temporarily_unavailable", "error_description": _UNAVAILABLE},
                        {**NO_STORE, **retry_after(error.retry_after)})
    return APIError(500, {"error": "server_error", "error_description": "internal error"}, NO_STORE)


#: The M-Lab contract's words for the refusals an API key can meet.
_API_KEY_REFUSALS = {
    "invalid_target": (404, "unknown profile"),
    "invalid_grant": (401, "invalid API key"),
}


def api_key_error(error: PortError) -> APIError:
    """``POST /v0/token/{profile}``: the M-Lab contract's ``{"error": ...}``, never cached."""
    if isinstance(error, Refusal):
        status, text = _API_KEY_REFUSALS.get(error.code, (400, error.code))
        return APIError(status, {"error": text}, NO_STORE)
    answer = oauth_error(error)
    return attrs.evolve(answer, body={"error": answer.body["error"]})


def token_port_error(request: IRequest, error: PortError) -> APIError:
    """The token exchange port's mapping: by route, RFC 6749 or the M-Lab contract."""
    path = request.path
    if path.startswith(API_KEY_PREFIX):
        return api_key_error(error)
    if path == TOKEN_PATH:
        return oauth_error(error)
    if path == INTROSPECT_PATH:
        # RFC 7662 §2.2: answers about tokens are not cached, refusals included.
        answer = plain_error(request, error)
        return attrs.evolve(answer, headers={**answer.headers, **NO_STORE})
    return plain_error(request, error)


# -- the management port, and the token port's documents ------------------------


def plain_error(request: IRequest, error: PortError) -> APIError:
    """
    The management port's mapping, also the token port's for its other routes
    (JWKS, metadata, health): ``{"error": ...}`` with the status the handler
    chose, 503 for a dependency down.
    """
    if isinstance(error, APIError):
        return error
    if isinstance(error, DependencyUnavailable):
        return APIError(503, {"error": "temporarily_unavailable"}, retry_after(error.retry_after))
    if isinstance(error, RateLimited):
        return APIError(429, {"error": "rate_limited"}, retry_after(error.retry_after))
    if isinstance(error, Refusal):
        return APIError(400, {"error": error.code})
    return APIError(500, {"error": "server_error"})


# -- the handlers ---------------------------------------------------------------


def add_error_handlers(app: Klein, mapping: PortMapping) -> None:
    """
    Map every failure to a JSON response, in order: the port's domain errors
    through ``mapping``, werkzeug's 404/405, a cancelled request, anything
    else (logged, 500).

    ``app`` is the class attribute of an API class, so Klein passes the API
    instance first (as ``self``); these handlers do not need it.
    """
    # An empty path segment ("//") is a 404 here, not a redirect to a merged path.
    app.url_map.merge_slashes = False

    @app.handle_errors(*PORT_ERRORS)
    def domain(self: object, request: IRequest, failure: Failure) -> bytes:
        error = cast(PortError, failure.value)
        if isinstance(error, DependencyUnavailable):
            # The one place a dependency outage is logged: its message names it.
            log.warn("dependency unavailable: {reason}", reason=str(error))
        answer = mapping(request, error)
        return json_response(request, answer.body, answer.status, answer.headers)

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self: object, request: IRequest, failure: Failure) -> bytes:
        allowed = sorted(set(cast(MethodNotAllowed, failure.value).valid_methods or ()))
        return json_response(
            request, {"error": "method_not_allowed"}, 405, {"Allow": ", ".join(allowed)}
        )

    @app.handle_errors(NotFound)
    def not_found(self: object, request: IRequest, failure: Failure) -> bytes:
        return json_response(request, {"error": "not_found"}, 404)

    @app.handle_errors(RequestRedirect)
    def redirect(self: object, request: IRequest, failure: Failure) -> bytes:
        target = cast(RequestRedirect, failure.value).new_url
        return json_response(request, {"error": "moved", "location": target}, 308, {"Location": target})

    @app.handle_errors(HTTPException)
    def http_exception(self: object, request: IRequest, failure: Failure) -> bytes:
        error = cast(HTTPException, failure.value)
        return json_response(request, {"error": (error.name or "error").lower().replace(" ", "_")}, error.code or 400)

    @app.handle_errors(CancelledError)
    def cancelled(self: object, request: IRequest, failure: Failure) -> bytes:
        # The client went away; nobody reads this.
        return b""

    @app.handle_errors(Exception)
    def internal(self: object, request: IRequest, failure: Failure) -> bytes:
        log.failure("unhandled error in {method} {path}", failure,
                    method=_text(request.method), path=_text(request.path))
        return json_response(request, {"error": "server_error"}, 500)


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def method_not_allowed(*allowed: str) -> MethodNotAllowed:
    return MethodNotAllowed(valid_methods=list(allowed))
