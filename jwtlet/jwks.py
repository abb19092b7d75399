"""
JSON Web Key Sets of the issuers a validator trusts: which keys of a set may
verify which algorithms, and where a set comes from (a file re-read when it
changes, or an HTTP fetch with caching, bounded refetching, backoff and stale
serving).  :mod:`jwtlet.jwtverify` checks tokens against them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Protocol

import attrs
from jwcrypto.common import JWException
from jwcrypto.jwk import JWK
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from jwtlet import strictjson
from jwtlet.config.reader import https_url
from jwtlet.interfaces import DependencyUnavailable
from jwtlet.model import JSONValue
from jwtlet.outbound import RequestHeaders, SingleFlight, TokenFile, on_clock, read_answer

if TYPE_CHECKING:
    from jwtlet.metrics import Metrics

UNKNOWN_KID_REFETCH_SECS = 10.0
BACKOFF_FIRST_SECS = 1.0
BACKOFF_MAX_SECS = 30.0
FETCH_TIMEOUT_SECS = 5.0

_RSA = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_BY_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "Ed25519": "EdDSA", "Ed448": "EdDSA"}
_PUBLIC_MEMBERS = frozenset({"kty", "kid", "use", "alg", "n", "e", "crv", "x", "y"})


def algorithms_for(key: Mapping[str, JSONValue]) -> frozenset[str]:
    """
    The JWS algorithms a JWK may verify, pinned by its type (and curve): a
    token's ``alg`` only chooses among these, so ``none`` and HMAC never pass.
    """
    kty = key.get("kty")
    crv = key.get("crv")
    if kty == "RSA":
        return _RSA
    if kty in ("EC", "OKP") and isinstance(crv, str) and crv in _BY_CURVE:
        return frozenset({_BY_CURVE[crv]})
    return frozenset()


@attrs.frozen
class KeySet:
    """Usable keys of one JWKS document by ``kid`` (``None`` for a key without one)."""

    keys: Mapping[Optional[str], tuple[JWK, frozenset[str]]]

    @classmethod
    def parse(cls, document: JSONValue) -> KeySet:
        if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
            raise ValueError("not a JWKS document")
        keys: dict[Optional[str], tuple[JWK, frozenset[str]]] = {}
        for entry in document["keys"]:
            if not isinstance(entry, Mapping) or entry.get("use", "sig") != "sig":
                continue
            kid = entry.get("kid")
            algorithms = algorithms_for(entry)
            if not algorithms or (kid is not None and not isinstance(kid, str)):
                continue
            try:
                key = JWK(**{k: v for k, v in entry.items() if k in _PUBLIC_MEMBERS})
            except (JWException, ValueError, TypeError, AttributeError):
                continue  # a key that does not import is skipped, as RFC 7517 §5 asks
            if key.has_private:
                continue
            keys[kid] = (key, algorithms)
        return cls(keys)

    def find(self, kid: Optional[str]) -> Optional[tuple[JWK, frozenset[str]]]:
        if kid is None:
            # Without a kid a token is only acceptable where there is no choice.
            return next(iter(self.keys.values())) if len(self.keys) == 1 else None
        return self.keys.get(kid)


class KeySource(Protocol):
    """Where one issuer's keys come from."""

    async def current(self, now: float) -> KeySet:
        """The keys to verify with now; :class:`DependencyUnavailable` when there are none usable."""

    async def refetch(self, now: float) -> Optional[KeySet]:
        """For a ``kid`` the current set lacks: a fresher set, or ``None`` when refetching is not allowed yet."""

    @property
    def origin(self) -> Optional[str]:
        """
        Where the keys are taken from when it is not the issuer's own
        discovery document: two validators trusting one issuer name with
        keys from different places may be seeing two clusters.
        """


@attrs.define
class StaticKeys:
    """A JWKS file, re-read when it changes (the ``--dev`` issuer writes one)."""

    path: Path
    _keys: Optional[KeySet] = None
    _signature: Optional[tuple[int, int]] = None

    @property
    def origin(self) -> Optional[str]:
        return self.path.resolve().as_uri()

    async def current(self, now: float) -> KeySet:
        try:
            stat = self.path.stat()
            signature = (stat.st_mtime_ns, stat.st_size)
            if self._keys is None or signature != self._signature:
                self._keys = KeySet.parse(strictjson.loads(self.path.read_bytes()))
                self._signature = signature
        except (OSError, ValueError) as error:
            raise DependencyUnavailable(f"JWKS file {self.path}: {error}") from None
        return self._keys

    async def refetch(self, now: float) -> Optional[KeySet]:
        return await self.current(now)


class RefusedJwksUri(DependencyUnavailable):
    """The discovery document names a ``jwks_uri`` jwtlet must not connect to."""


@attrs.define
class RemoteKeys:
    """
    A JWKS fetched over HTTP(S): cached for ``ttl``, refetched at most once per
    10 s for an unknown ``kid``, served stale up to ``2 × ttl`` while fetches
    fail (retried with backoff 1 s doubling to 30 s).  Without a ``jwks_uri``
    the issuer's discovery document names it.

    ``discovery_url`` (Kubernetes' ``issuer.discoveryURL``) is where the
    discovery document is read instead of ``{issuer}/.well-known/...``, for
    issuers whose endpoints are served elsewhere; the document's ``issuer``
    must then be ``issuer``, as Kubernetes requires, so a document served at
    that URL cannot vouch for a different issuer's keys.

    A discovered ``jwks_uri`` that breaks the outbound rule (plain http to a
    host that is not loopback, outside ``--dev``) makes the issuer unusable:
    it is never fetched (so the bearer token never goes there), cached keys
    are dropped, and the refusal is logged once per URI.

    Every fetch is counted in ``metrics.jwks_refresh`` by outcome; failures
    are logged to ``log`` (the validator's, so operators see whose keys).
    """

    issuer: str
    jwks_uri: Optional[str]
    http_client: HTTPClient
    reactor: IReactorTime
    ttl: float
    bearer: Optional[TokenFile] = None
    dev: bool = False
    metrics: Optional[Metrics] = None
    log: Logger = attrs.field(factory=lambda: Logger(namespace="jwtlet.jwks"))
    discovery_url: Optional[str] = None
    _keys: Optional[KeySet] = None
    _refused_uri: Optional[str] = None
    _fetched_at: float = -1e18
    _refetched_at: float = -1e18
    _failures: int = 0
    _next_attempt: float = -1e18
    _fetching: SingleFlight[KeySet] = attrs.field(factory=SingleFlight, init=False)

    @property
    def origin(self) -> Optional[str]:
        return self.jwks_uri or self.discovery_url

    async def current(self, now: float) -> KeySet:
        if self._keys is not None and now < self._fetched_at + self.ttl:
            return self._keys
        return await self._fetch_or_stale(now)

    async def refetch(self, now: float) -> Optional[KeySet]:
        if now < self._refetched_at + UNKNOWN_KID_REFETCH_SECS:
            return None
        self._refetched_at = now
        return await self._fetch_or_stale(now)

    async def _fetch_or_stale(self, now: float) -> KeySet:
        if now >= self._next_attempt:
            try:
                return await self._fetch_once()
            except DependencyUnavailable:
                pass
        if self._keys is not None and now < self._fetched_at + 2 * self.ttl:
            return self._keys
        raise DependencyUnavailable(f"no usable JWKS for {self.issuer}")

    async def _fetch_once(self) -> KeySet:
        # Concurrent callers wait for the one fetch under way.
        return await self._fetching(self._fetch)

    async def _fetch(self) -> KeySet:
        try:
            uri = self.jwks_uri or await self._discover()
            keys = KeySet.parse(await self._get_json(uri))
        except (DependencyUnavailable, ValueError) as error:
            self._failures += 1
            delay = min(BACKOFF_MAX_SECS, BACKOFF_FIRST_SECS * 2 ** (self._failures - 1))
            self._next_attempt = self.reactor.seconds() + delay
            self._count("failure")
            if not isinstance(error, RefusedJwksUri):  # that one was logged when first seen
                self.log.warn("JWKS fetch for {issuer} failed ({reason}); next try in {delay}s",
                         issuer=self.issuer, reason=str(error), delay=delay)
            raise DependencyUnavailable(f"JWKS of {self.issuer}: {error}") from None
        self._keys = keys
        self._fetched_at = self.reactor.seconds()
        self._failures = 0
        self._next_attempt = -1e18
        self._count("success")
        return keys

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.jwks_refresh.labels(outcome).inc()

    async def _discover(self) -> str:
        url = self.discovery_url or f"{self.issuer.rstrip('/')}/.well-known/openid-configuration"
        document = await self._get_json(url)
        uri = document.get("jwks_uri") if isinstance(document, Mapping) else None
        if not isinstance(uri, str):
            raise ValueError("the discovery document has no jwks_uri")
        if self.discovery_url is not None and document.get("issuer") != self.issuer:
            raise ValueError("the discovery document names another issuer")
        problem = https_url(self.dev)(uri)
        if problem is not None:
            self._keys = None
            if uri != self._refused_uri:
                self._refused_uri = uri
                self.log.error("the discovery document of {issuer} names jwks_uri {uri!r}, which {problem}: "
                          "tokens of this issuer are refused until it is fixed",
                          issuer=self.issuer, uri=uri, problem=problem)
            raise RefusedJwksUri(f"discovered jwks_uri {problem}")
        self._refused_uri = None
        return uri

    async def _get_json(self, url: str) -> JSONValue:
        headers: RequestHeaders = {"Accept": ["application/json, application/jwk-set+json"]}
        if self.bearer is not None:
            try:
                headers["Authorization"] = [f"Bearer {self.bearer.read()}"]
            except (OSError, ValueError) as error:
                raise DependencyUnavailable(f"bearer token file: {error}") from None
        try:
            response = await self.http_client.get(
                url, headers=headers, timeout=FETCH_TIMEOUT_SECS, reactor=on_clock(self.reactor)
            )
            # Read even an error's body, so the connection can go back to the pool.
            content = await read_answer(response, FETCH_TIMEOUT_SECS, self.reactor)
        except CancelledError:
            raise DependencyUnavailable(f"{url}: timed out") from None
        except Exception as error:
            raise DependencyUnavailable(f"{url}: {type(error).__name__}") from None
        if response.code != 200:
            raise DependencyUnavailable(f"{url}: HTTP {response.code}")
        try:
            return strictjson.loads(content)
        except ValueError as error:
            raise ValueError(f"{url}: not usable JSON ({error})") from None
