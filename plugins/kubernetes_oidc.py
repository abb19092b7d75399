"""
The ``kubernetes-oidc`` validator: service-account tokens checked against the
JWKS of configured issuers, with no API-server call per token.

A token's ``iss`` only selects one of the configured issuers; it never causes
a fetch from anywhere else.  Keys come from a static JWKS file, a configured
``jwks_uri``, or the ``jwks_uri`` of the issuer's discovery document.
Algorithms are pinned by key type; ``none`` and HMAC are never accepted.

An identity is the issuer's ``username_prefix`` plus the service account's
username, so the same account name in two trusted clusters is two callers.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import attrs
import treq
from jwcrypto.common import JWException, base64url_decode
from jwcrypto.jwk import JWK
from jwcrypto.jws import JWS
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from jwtlet.interfaces import (
    DependencyUnavailable,
    IReadiness,
    IValidator,
    IValidatorFactory,
    PluginConfigError,
    PluginContext,
    TokenRejected,
)
from jwtlet.kubernetes import identity as k8s_identity
from jwtlet.model import Identity
from jwtlet.outbound import TokenFile, build_http_client

log = Logger(namespace="jwtlet.validator.oidc")

MAX_TOKEN_BYTES = 16 * 1024
VALIDATED_CACHE_SECS = 60.0
VALIDATED_CACHE_ENTRIES = 10_000
UNKNOWN_KID_REFETCH_SECS = 10.0
BACKOFF_FIRST_SECS = 1.0
BACKOFF_MAX_SECS = 30.0
FETCH_TIMEOUT_SECS = 5.0
#: Discovery documents and JWKS are a few KiB; a peer sending more is not
#: buffered past this.
MAX_DOCUMENT_BYTES = 1024 * 1024

_RSA = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_BY_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "Ed25519": "EdDSA", "Ed448": "EdDSA"}


def algorithms_for(key: Mapping[str, Any]) -> frozenset[str]:
    """The JWS algorithms a JWK may verify, by its type (and curve)."""
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
    def parse(cls, document: Any) -> KeySet:
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


_PUBLIC_MEMBERS = frozenset({"kty", "kid", "use", "alg", "n", "e", "crv", "x", "y"})


@attrs.define
class StaticKeys:
    """A JWKS file, re-read when it changes (the ``--dev`` issuer writes one)."""

    path: Path
    _keys: Optional[KeySet] = None
    _signature: Optional[tuple[int, int]] = None

    async def current(self, now: float) -> KeySet:
        try:
            stat = self.path.stat()
            signature = (stat.st_mtime_ns, stat.st_size)
            if self._keys is None or signature != self._signature:
                self._keys = KeySet.parse(k8s_identity.strict_json(self.path.read_bytes()))
                self._signature = signature
        except (OSError, ValueError) as error:
            raise DependencyUnavailable(f"JWKS file {self.path}: {error}") from None
        return self._keys

    async def refetch(self, now: float) -> Optional[KeySet]:
        return await self.current(now)


@attrs.define
class RemoteKeys:
    """
    A JWKS fetched over HTTP(S): cached for ``ttl``, refetched at most once per
    10 s for an unknown ``kid``, served stale up to ``2 × ttl`` while fetches
    fail (retried with backoff 1 s doubling to 30 s).

    A discovered ``jwks_uri`` that breaks the outbound rule (plain http to a
    host that is not loopback, outside ``--dev``) makes the issuer unusable:
    it is never fetched (so the bearer token never goes there), cached keys
    are dropped, and the refusal is logged once per URI.
    """

    issuer: str
    jwks_uri: Optional[str]
    http_client: Any
    reactor: Any
    ttl: float
    bearer: Optional[TokenFile] = None
    dev: bool = False
    on_refresh: Callable[[str], None] = lambda outcome: None
    _keys: Optional[KeySet] = None
    _refused_uri: Optional[str] = None
    _fetched_at: float = -1e18
    _refetched_at: float = -1e18
    _failures: int = 0
    _next_attempt: float = -1e18
    _waiters: Optional[list[Deferred[KeySet]]] = None

    async def current(self, now: float) -> KeySet:
        if self._keys is not None and now < self._fetched_at + self.ttl:
            return self._keys
        return await self._fetch_or_stale(now)

    async def refetch(self, now: float) -> Optional[KeySet]:
        """For an unknown kid: fetch again, at most once per 10 s."""
        if now < self._refetched_at + UNKNOWN_KID_REFETCH_SECS:
            return None
        self._refetched_at = now
        return await self._fetch_or_stale(now)

    async def _fetch_or_stale(self, now: float) -> KeySet:
        if now >= self._next_attempt:
            try:
                return await self._fetch_once(now)
            except DependencyUnavailable:
                pass
        if self._keys is not None and now < self._fetched_at + 2 * self.ttl:
            return self._keys
        raise DependencyUnavailable(f"no usable JWKS for {self.issuer}")

    async def _fetch_once(self, now: float) -> KeySet:
        # Concurrent callers wait for the one fetch under way.
        if self._waiters is not None:
            waiter: Deferred[KeySet] = Deferred()
            self._waiters.append(waiter)
            return await waiter
        self._waiters = []
        try:
            keys = await self._fetch()
        except DependencyUnavailable as error:
            waiters, self._waiters = self._waiters, None
            for waiting in waiters:
                waiting.errback(DependencyUnavailable(str(error)))
            raise
        waiters, self._waiters = self._waiters, None
        for waiting in waiters:
            waiting.callback(keys)
        return keys

    async def _fetch(self) -> KeySet:
        try:
            uri = self.jwks_uri or await self._discover()
            keys = KeySet.parse(await self._get_json(uri))
        except (DependencyUnavailable, ValueError) as error:
            self._failures += 1
            delay = min(BACKOFF_MAX_SECS, BACKOFF_FIRST_SECS * 2 ** (self._failures - 1))
            self._next_attempt = self.reactor.seconds() + delay
            self.on_refresh("failure")
            if not isinstance(error, RefusedJwksUri):  # that one was logged when first seen
                log.warn("JWKS fetch for {issuer} failed ({reason}); next try in {delay}s",
                         issuer=self.issuer, reason=str(error), delay=delay)
            raise DependencyUnavailable(f"JWKS of {self.issuer}: {error}") from None
        self._keys = keys
        self._fetched_at = self.reactor.seconds()
        self._failures = 0
        self._next_attempt = -1e18
        self.on_refresh("success")
        return keys

    async def _discover(self) -> str:
        document = await self._get_json(f"{self.issuer.rstrip('/')}/.well-known/openid-configuration")
        uri = document.get("jwks_uri") if isinstance(document, Mapping) else None
        if not isinstance(uri, str):
            raise ValueError("the discovery document has no jwks_uri")
        problem = k8s_identity.outbound_url_problem(uri, self.dev)
        if problem is not None:
            self._keys = None
            if uri != self._refused_uri:
                self._refused_uri = uri
                log.error("the discovery document of {issuer} names jwks_uri {uri!r}, which {problem}: "
                          "tokens of this issuer are refused until it is fixed",
                          issuer=self.issuer, uri=uri, problem=problem)
            raise RefusedJwksUri(f"discovered jwks_uri {problem}")
        self._refused_uri = None
        return uri

    async def _get_json(self, url: str) -> Any:
        headers = {"Accept": ["application/json, application/jwk-set+json"]}
        if self.bearer is not None:
            try:
                headers["Authorization"] = [f"Bearer {self.bearer.read()}"]
            except (OSError, ValueError) as error:
                raise DependencyUnavailable(f"bearer token file: {error}") from None
        chunks: list[bytes] = []
        received = 0

        def collect(data: bytes) -> None:
            nonlocal received
            received += len(data)
            if received > MAX_DOCUMENT_BYTES:
                raise ValueError("document too large")
            chunks.append(data)

        try:
            response = await self.http_client.get(
                url, headers=headers, timeout=FETCH_TIMEOUT_SECS, reactor=self.reactor
            )
            # Read even an error's body, so the connection can go back to the pool.
            await treq.collect(response, collect)
        except CancelledError:
            raise DependencyUnavailable(f"{url}: timed out") from None
        except Exception as error:
            raise DependencyUnavailable(f"{url}: {type(error).__name__}") from None
        if response.code != 200:
            raise DependencyUnavailable(f"{url}: HTTP {response.code}")
        try:
            return k8s_identity.strict_json(b"".join(chunks))
        except ValueError as error:
            raise ValueError(f"{url}: not usable JSON ({error})") from None


class RefusedJwksUri(DependencyUnavailable):
    """The discovery document names a ``jwks_uri`` jwtlet must not connect to."""


@attrs.frozen
class Issuer:
    issuer: str
    keys: Any
    username_prefix: str = ""


def _unverified(token: str) -> tuple[JWS, Mapping[str, Any], Mapping[str, Any]]:
    """
    Header and claims, read strictly before jwcrypto sees the token: whatever
    a hostile token holds (nesting past the recursion limit, huge integers,
    invalid UTF-8, duplicate members, NaN) is a rejection, never a crash.
    """
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenRejected("token too large")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenRejected("not a compact JWS")
    signed = JWS()
    try:
        header = k8s_identity.strict_json(base64url_decode(parts[0]))
        claims = k8s_identity.strict_json(base64url_decode(parts[1]))
        signed.deserialize(token)
    except (JWException, ValueError) as error:
        raise TokenRejected(f"malformed token ({type(error).__name__})") from None
    if not isinstance(header, Mapping) or not isinstance(claims, Mapping):
        raise TokenRejected("malformed token (not a JSON object)")
    return signed, header, claims


def check_claims(
    claims: Mapping[str, Any], audience: Optional[str], now: float, leeway: float, max_age: float
) -> float:
    """
    Registered claims against an injected clock (jwcrypto would read the wall
    clock); returns the instant the token stops being usable, before leeway.
    """
    usable_until = k8s_identity.usable_until(claims, now, leeway, max_age)
    if audience is not None:
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if audience not in audiences:
            raise TokenRejected("audience not accepted")
    return usable_until


@implementer(IValidator, IReadiness)
@attrs.define
class OIDCValidator:
    """
    Validated tokens are remembered by their SHA-256 for at most
    ``VALIDATED_CACHE_SECS`` (and never past ``exp``): a workload that
    refreshes with the same token is not verified again each time.
    """

    issuers: Mapping[str, Issuer]
    reactor: Any
    leeway: float
    max_age: float
    on_jwks_refresh: Callable[[str], None] = lambda outcome: None
    _validated: OrderedDict[bytes, tuple[Identity, float]] = attrs.field(factory=OrderedDict)

    def __attrs_post_init__(self) -> None:
        for issuer in self.issuers.values():
            if isinstance(issuer.keys, RemoteKeys):
                issuer.keys.on_refresh = lambda outcome: self.on_jwks_refresh(outcome)

    def validate(self, token: str, audience: Optional[str]) -> Deferred[Identity]:
        now = self.reactor.seconds()
        cache_key = hashlib.sha256(f"{audience}\0{token}".encode()).digest()
        cached = self._validated.get(cache_key)
        if cached is not None and now < cached[1]:
            return succeed(cached[0])
        return ensureDeferred(self._validate(token, audience, now, cache_key))

    async def _validate(self, token: str, audience: Optional[str], now: float, cache_key: bytes) -> Identity:
        identity = await self._verify(token, audience, now)
        accepted_until = identity.accepted_until if identity.accepted_until is not None else now
        self._validated[cache_key] = (identity, min(accepted_until, now + VALIDATED_CACHE_SECS))
        self._validated.move_to_end(cache_key)
        while len(self._validated) > VALIDATED_CACHE_ENTRIES:
            self._validated.popitem(last=False)
        return identity

    async def _verify(self, token: str, audience: Optional[str], now: float) -> Identity:
        signed, header, claims = _unverified(token)
        named = claims.get("iss")
        issuer = self.issuers.get(named) if isinstance(named, str) else None
        if issuer is None:
            raise TokenRejected("issuer not trusted")
        algorithm = header.get("alg")
        kid = header.get("kid")
        if not isinstance(algorithm, str) or (kid is not None and not isinstance(kid, str)):
            raise TokenRejected("malformed header")
        keys = await issuer.keys.current(now)
        found = keys.find(kid)
        if found is None and kid is not None:
            refreshed = await issuer.keys.refetch(now)
            found = refreshed.find(kid) if refreshed is not None else None
        if found is None:
            raise TokenRejected("no key for this token")
        key, algorithms = found
        if algorithm not in algorithms:
            raise TokenRejected(f"algorithm {algorithm!r} not allowed for this key")
        try:
            signed.verify(key, alg=algorithm)
        except JWException:
            raise TokenRejected("bad signature") from None
        usable_until = check_claims(claims, audience, now, self.leeway, self.max_age)
        account = k8s_identity.from_claims(claims)
        if account is None:
            raise TokenRejected("not a service account token")
        token_id = claims.get("jti") if isinstance(claims.get("jti"), str) else None
        return Identity(
            username=issuer.username_prefix + account.username,
            issuer=issuer.issuer,
            uid=account.uid,
            namespace=account.namespace,
            name=account.name,
            groups=account.groups,
            expires_at=usable_until,
            token_id=token_id,
            accepted_until=usable_until + self.leeway,
        )

    def check_ready(self) -> Deferred[None]:
        return ensureDeferred(self._check_ready())

    async def _check_ready(self) -> None:
        """Ready while every issuer has keys it may use (fetching them if need be)."""
        now = self.reactor.seconds()
        broken = []
        for name, issuer in self.issuers.items():
            try:
                await issuer.keys.current(now)
            except DependencyUnavailable:
                broken.append(name)
        if broken:
            raise DependencyUnavailable(f"no usable JWKS for {', '.join(broken)}")


# -- options ------------------------------------------------------------------

_ISSUER_KEYS = frozenset({"issuer", "jwks_uri", "jwks_file", "bearer_token_file", "ca_file", "username_prefix"})
_TOP_KEYS = frozenset({"issuers", "jwks_cache_ttl_secs", "leeway_secs", "api_server_url", "token_file", "ca_file"})


def _url(value: Any, path: str, dev: bool, problems: list[str]) -> Optional[str]:
    problem = k8s_identity.outbound_url_problem(value, dev)
    if problem is not None:
        problems.append(f"{path}: {problem}")
        return None
    return str(value)


def _keys(entry: Mapping[str, Any], name: str, path: str, ttl: float, context: PluginContext,
          problems: list[str]) -> Any:
    """Where one issuer's keys come from, or ``None`` (with the problems noted)."""
    jwks_file = entry.get("jwks_file")
    jwks_uri = entry.get("jwks_uri")
    if jwks_file is not None and jwks_uri is not None:
        problems.append(f"{path}: give jwks_file or jwks_uri, not both")
        return None
    if jwks_file is not None:
        if not isinstance(jwks_file, str) or not jwks_file:
            problems.append(f"{path}.jwks_file: must be a path")
            return None
        return StaticKeys(Path(jwks_file))
    if jwks_uri is not None and _url(jwks_uri, f"{path}.jwks_uri", context.config.dev, problems) is None:
        return None
    bearer_file = entry.get("bearer_token_file")
    if bearer_file is not None and (not isinstance(bearer_file, str) or not bearer_file):
        problems.append(f"{path}.bearer_token_file: must be a path")
        return None
    ca_file = entry.get("ca_file", getattr(getattr(context.config, "k8s", None), "ca_file", None))
    client = (
        build_http_client(context.reactor, ca_file=ca_file)
        if entry.get("ca_file") is not None or context.http_client is None
        else context.http_client
    )
    return RemoteKeys(
        issuer=name,
        jwks_uri=jwks_uri,
        http_client=client,
        reactor=context.reactor,
        ttl=ttl,
        bearer=TokenFile(bearer_file) if bearer_file else None,
        dev=context.config.dev,
    )


@implementer(IPlugin, IValidatorFactory)
@attrs.frozen
class OIDCValidatorFactory:
    name: str = "kubernetes-oidc"
    description: str = "validates service-account tokens with the JWKS of configured issuers"

    def build(self, options: Mapping[str, Any], context: PluginContext) -> OIDCValidator:
        problems = [f"{key}: unknown key" for key in options if key not in _TOP_KEYS]
        ttl = options.get("jwks_cache_ttl_secs", 3600)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0:
            problems.append("jwks_cache_ttl_secs: must be a positive number")
            ttl = 3600
        leeway = options.get("leeway_secs", 30)
        if isinstance(leeway, bool) or not isinstance(leeway, (int, float)) or not 0 <= leeway <= 300:
            problems.append("leeway_secs: must be between 0 and 300")
            leeway = 30
        entries = options.get("issuers")
        if not isinstance(entries, list) or not entries:
            problems.append("issuers: must list at least one issuer")
            entries = []
        issuers: dict[str, Issuer] = {}
        prefixes: list[tuple[str, str]] = []
        for index, entry in enumerate(entries):
            path = f"issuers[{index}]"
            if not isinstance(entry, Mapping):
                problems.append(f"{path}: must be a table")
                continue
            problems.extend(f"{path}.{key}: unknown key" for key in entry if key not in _ISSUER_KEYS)
            prefix = entry.get("username_prefix", "")
            prefix_problem = k8s_identity.prefix_problem(prefix)
            if prefix_problem is not None:
                problems.append(f"{path}.username_prefix: {prefix_problem}")
                prefix = ""
            prefixes.append((f"{path}.username_prefix", prefix))
            name = _url(entry.get("issuer"), f"{path}.issuer", context.config.dev, problems)
            if name is None:
                continue
            if name in issuers:
                problems.append(f"{path}.issuer: listed twice")
                continue
            keys = _keys(entry, name, path, float(ttl), context, problems)
            if keys is not None:
                issuers[name] = Issuer(name, keys, prefix)
        problems.extend(k8s_identity.distinct_prefix_problems(prefixes))
        if problems:
            raise PluginConfigError(*problems)
        return OIDCValidator(issuers=issuers, reactor=context.reactor, leeway=float(leeway),
                             max_age=k8s_identity.max_subject_token_age(context.config))


kubernetes_oidc = OIDCValidatorFactory()
