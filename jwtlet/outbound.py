"""
Everything jwtlet needs to call other services: HTTP clients with one
persistent connection pool per peer, TLS that trusts the system store plus an
optional extra CA file, no redirect for a request carrying a credential; and
the bearer tokens those requests carry, read from files that something else
rotates.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Generic, Iterable, Mapping, Optional, TypeVar, Union, cast
from urllib.parse import urlsplit

import attrs
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot  # the trust-root interface; ssl does not re-export it
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from jwtlet import tracing

if TYPE_CHECKING:
    from treq._types import _ITreqReactor

T = TypeVar("T")

#: Request headers as treq takes them.
RequestHeaders = dict[Union[bytes, str], list[Union[bytes, str]]]


def tls_policy(ca_file: Optional[str]) -> IPolicyForHTTPS:
    """
    Trust the platform's CAs, plus those in ``ca_file`` when it exists (the
    in-cluster ``ca.crt`` is optional outside a pod).  Plus, not instead:
    the daemon's shared client trusts the cluster's CA and still reaches
    public issuers (a CI system's, a cloud's OIDC endpoint).
    """
    if ca_file and Path(ca_file).is_file():
        pem = Path(ca_file).read_bytes()
        authorities = tuple(ssl.Certificate.loadPEM(block) for block in _pem_blocks(pem))
        return BrowserLikePolicyForHTTPS(trustRoot=_PlatformAnd(authorities))
    return BrowserLikePolicyForHTTPS()


@implementer(IOpenSSLTrustRoot)
@attrs.frozen
class _PlatformAnd:
    """The platform's trust store (as ``platformTrust()`` loads it) and ``authorities`` besides."""

    authorities: tuple[ssl.Certificate, ...]

    def _addCACertsToContext(self, context: SSL.Context) -> None:  # noqa: N802 - Twisted's interface
        context.set_default_verify_paths()
        store = context.get_cert_store()
        assert store is not None, "a context always has a store"
        for authority in self.authorities:
            store.add_cert(authority.original)


def _pem_blocks(pem: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [
        chunk + marker
        for chunk in pem.split(marker)
        if b"-----BEGIN CERTIFICATE-----" in chunk
    ]


#: What jwtlet reads of a peer's answer (a JWKS, a discovery document, a
#: TokenReview, a Vault key): far more than any real one.
MAX_ANSWER_BYTES = 1024 * 1024


class AnswerTooLarge(ValueError):
    """A peer's answer grew past the limit its reader set."""


class _BoundedBody(Protocol):
    """Collects a response body up to ``limit`` bytes; past it, stops reading and fails."""

    def __init__(self, finished: Deferred[bytes], limit: int):
        self.finished = finished
        self.limit = limit
        self.chunks: list[bytes] = []
        self.received = 0

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        if self.finished.called:
            return
        self.received += len(data)
        if self.received > self.limit:
            self.finished.errback(AnswerTooLarge(f"answer over {self.limit} bytes"))
            self.stop()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802 - Twisted's name
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.chunks))
        else:
            self.finished.errback(reason)

    def stop(self) -> None:
        if self.transport is not None:
            # A response body's transport is its producer; stopping it drops
            # the connection, so what is left is never read.
            cast(IPushProducer, self.transport).stopProducing()


def read_answer(
    response: IResponse, timeout: float, clock: IReactorTime, limit: int = MAX_ANSWER_BYTES
) -> Deferred[bytes]:
    """
    The body of a peer's ``response``, at most ``limit`` bytes and within
    ``timeout`` seconds on ``clock``: treq's own ``timeout`` ends with the
    response's headers, and a peer that then trickles or stalls its body
    would otherwise hold the call (and everyone waiting on it) forever.
    Fails with :class:`AnswerTooLarge`, ``CancelledError`` at the timeout,
    or the connection's failure; either way the connection is dropped.
    """
    body: Optional[_BoundedBody] = None

    def cancel(_: Deferred[bytes]) -> None:
        if body is not None:
            body.stop()

    finished: Deferred[bytes] = Deferred(cancel)
    body = _BoundedBody(finished, limit)
    response.deliverBody(body)
    return finished.addTimeout(timeout, clock)


class SingleFlight(Generic[T]):
    """
    One call to a peer under way at a time, shared by every caller that asks
    meanwhile (twenty first signs are one key read, not twenty).  The call
    runs apart from its callers and each waits on a Deferred of its own, so
    one that gives up (a /ready probe's bound, a client hanging up) cancels
    its own wait, never the call the others wait for.
    """

    def __init__(self) -> None:
        self._waiting: Optional[list[Deferred[T]]] = None

    def __call__(self, start: Callable[[], Coroutine[Any, Any, T]]) -> Deferred[T]:
        waiter: Deferred[T] = Deferred()
        if self._waiting is not None:
            self._waiting.append(waiter)
        else:
            self._waiting = [waiter]
            ensureDeferred(start()).addBoth(self._settle)
        return waiter

    def _settle(self, result: Union[T, Failure]) -> None:
        waiting, self._waiting = self._waiting or [], None
        for waiter in waiting:
            if waiter.called:
                continue  # a caller that gave up
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


#: Headers that carry a credential: a request with one never follows a redirect.
CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-vault-token"})


def carries_credential(headers: object) -> bool:
    """Whether ``headers`` (as treq takes them: a mapping or ``Headers``) name a credential."""
    if isinstance(headers, Headers):
        names: Iterable[Union[str, bytes]] = (name for name, _ in headers.getAllRawHeaders())
    elif isinstance(headers, Mapping):
        names = headers
    else:
        return False
    return any(
        (name.encode("latin-1") if isinstance(name, str) else bytes(name)).lower() in CREDENTIAL_HEADERS
        for name in names
    )


class OutboundHTTPClient(HTTPClient):
    """
    The treq client every outbound call goes through.  treq follows GET
    redirects by default, and a redirect's target is chosen by whoever
    answers: a request carrying a credential never follows one, so a token
    cannot be walked to another origin (or to plain http).  The 3xx reaches
    the caller, which treats it like any other unexpected status.
    """

    def __init__(self, agent: IAgent, pool: HTTPConnectionPool):
        super().__init__(agent)
        self.pool = pool

    def request(self, method: str, url: Any, **kwargs: Any) -> Deferred[Any]:
        if kwargs.get("auth") or carries_credential(kwargs.get("headers")):
            kwargs["allow_redirects"] = False
        # treq points its warnings at the caller: one frame more, this one.
        kwargs["_stacklevel"] = kwargs.get("_stacklevel", 2) + 1
        tracer = tracing.current()
        if not tracer.enabled:
            return super().request(method, url, **kwargs)
        # observability.md: every outbound call is a client span and carries its traceparent.
        span, propagated = tracer.client_span(method.upper(), client_span_attributes(method, url))
        kwargs["headers"] = with_headers(kwargs.get("headers"), propagated)

        def ended(result: Any) -> Any:
            if isinstance(result, Failure):
                span.failed(cast(BaseException, result.value))  # a Failure always holds one
                span.end()
            else:
                span.end(result.code)
            return result

        try:
            answer = super().request(method, url, **kwargs)
        except Exception as error:
            span.failed(error)
            span.end()
            raise
        return answer.addBoth(ended)


def client_span_attributes(method: str, url: object) -> tracing.Attributes:
    """
    Who is called, not what is asked: scheme, host and port (a path or a
    query may name more than an operator's trace should hold).
    """
    text = url.decode("ascii", "replace") if isinstance(url, bytes) else str(url)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return {"http.request.method": method.upper()}
    attributes: dict[str, tracing.AttributeValue] = {
        "http.request.method": method.upper(), "url.scheme": parts.scheme, "server.address": parts.hostname or ""}
    if port is not None:
        attributes["server.port"] = port
    return attributes


def with_headers(headers: object, extra: Mapping[str, str]) -> object:
    """Request headers as treq takes them (``None``, a mapping or ``Headers``) plus ``extra``, copied."""
    if isinstance(headers, Headers):
        merged = headers.copy()
        for name, value in extra.items():
            merged.setRawHeaders(name, [value])
        return merged
    combined: dict[Any, Any] = dict(headers) if isinstance(headers, Mapping) else {}
    combined.update({name: [value] for name, value in extra.items()})
    return combined


def build_http_client(
    reactor: Any,
    ca_file: Optional[str] = None,
    max_per_host: int = 16,
    connect_timeout: float = 5.0,
) -> OutboundHTTPClient:
    """A treq client with its own persistent pool; close it with :func:`close_http_client`."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    # A pooled connection the server closed (HTTP/1.0, ``Connection: close``
    # not announced, an idle timeout) fails the next request before any
    # response; Twisted then retries once on a fresh connection, and only
    # idempotent requests without a body (GET of a JWKS, a key read).
    pool.retryAutomatically = True
    agent = Agent(
        reactor,
        contextFactory=tls_policy(ca_file),
        connectTimeout=connect_timeout,
        pool=pool,
    )
    return OutboundHTTPClient(agent, pool)


def on_clock(clock: IReactorTime) -> _ITreqReactor:
    """
    ``clock`` as the ``reactor=`` of a treq request, so its timeout runs on
    the injected clock.  treq schedules only that timeout there (connecting
    goes through the client's agent), though its annotation asks for a whole
    reactor.
    """
    return cast("_ITreqReactor", clock)


def close_http_client(client: HTTPClient) -> Deferred[None]:
    """Close the pooled connections of a client made by :func:`build_http_client`."""
    if isinstance(client, OutboundHTTPClient):
        closing: Deferred[None] = client.pool.closeCachedConnections()
        return closing
    return succeed(None)


# -- bearer tokens kept in files -------------------------------------------------


@attrs.define
class TokenFile:
    """
    Reads a token file and re-reads it when its modification time, size or
    inode changes, or when a caller says the current token was refused.
    Reading is a ``stat`` per use, so a rotated file is picked up at once.
    """

    path: Path = attrs.field(converter=Path)
    _token: Optional[str] = attrs.field(default=None, init=False)
    _signature: Optional[tuple[int, int, int]] = attrs.field(default=None, init=False)

    def read(self) -> str:
        """
        The current token.  Raises ``OSError`` when the file cannot be read
        and ``ValueError`` when it is empty.
        """
        stat = os.stat(self.path)
        signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if self._token is None or signature != self._signature:
            token = self.path.read_text(encoding="utf-8").strip()
            if not token:
                raise ValueError(f"{self.path} is empty")
            self._token = token
            self._signature = signature
        return self._token

    def refused(self) -> str:
        """The token was refused: forget it and read the file again."""
        self._token = None
        self._signature = None
        return self.read()
