"""
A JWT checked against the issuers a validator trusts: read strictly (a
hostile token is a rejection, never a crash), the issuer picked by ``iss``
among the configured ones only (``iss`` never causes a fetch from anywhere
else), the algorithm pinned by the key, and the registered claims checked on
the injected clock (jwcrypto would read the wall clock).

What the verified claims say about who is calling is the validator's business:
``kubernetes-oidc`` reads a service account from them.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

import attrs
from jwcrypto.common import JWException, base64url_decode
from jwcrypto.jws import JWS

from jwtlet import strictjson
from jwtlet.config.reader import SectionReader, as_number, in_range, positive
from jwtlet.interfaces import DependencyUnavailable, TokenRejected
from jwtlet.jwks import KeySource
from jwtlet.model import JSONValue

#: A JOSE header or a JWT claims set.
Claims = Mapping[str, JSONValue]

MAX_TOKEN_BYTES = 16 * 1024
#: NumericDates past this (year 2286) are nonsense, and would make float
#: arithmetic on them meaningless.
_LAST_DATE = 1e13


def parse(token: str) -> tuple[JWS, Claims, Claims]:
    """
    The signed object, its header and its claims, read strictly before
    jwcrypto sees the token: whatever a hostile token holds (nesting past the
    recursion limit, huge integers, invalid UTF-8, duplicate members, NaN) is
    a :class:`TokenRejected`.
    """
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenRejected("token too large")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenRejected("not a compact JWS")
    signed = JWS()
    try:
        header = strictjson.loads(base64url_decode(parts[0]))
        claims = strictjson.loads(base64url_decode(parts[1]))
        signed.deserialize(token)
    except (JWException, ValueError) as error:
        raise TokenRejected(f"malformed token ({type(error).__name__})") from None
    if not isinstance(header, Mapping) or not isinstance(claims, Mapping):
        raise TokenRejected("malformed token (not a JSON object)")
    return signed, header, claims


def unverified_claims(token: str) -> Claims:
    """
    The payload of a JWT without checking its signature, for a token a peer
    has already vouched for.  Anything unreadable is no claims.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        claims = strictjson.loads(base64url_decode(parts[1]))
    except ValueError:
        return {}
    return claims if isinstance(claims, Mapping) else {}


def numeric_date(claims: Claims, name: str) -> Optional[float]:
    """A NumericDate claim, ``None`` when absent; anything else is a rejection."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < _LAST_DATE:
        raise TokenRejected(f"'{name}' is not a NumericDate")
    return float(value)


def usable_until(
    claims: Claims, now: float, leeway: float, max_age: float,
    limits: Iterable[tuple[float, str]] = (),
) -> float:
    """
    The instant a token's claims stop it being usable (leeway not included),
    or :class:`TokenRejected` when it is not usable at ``now``.

    That is the earliest of ``exp``, ``iat`` plus ``max_age``, and any further
    ``(instant, reason)`` in ``limits``.  A token without ``iat`` is refused:
    its age cannot be bounded, and the tokens that lack it (legacy
    secret-based Kubernetes ones, which have no ``exp`` either) are exactly
    the never-expiring credentials the bound is for.
    """
    expires = numeric_date(claims, "exp")
    if expires is None:
        raise TokenRejected("no 'exp'")
    issued = numeric_date(claims, "iat")
    if issued is None:
        raise TokenRejected("no 'iat'")
    if now + leeway < issued:
        raise TokenRejected("issued in the future")
    not_before = numeric_date(claims, "nbf")
    if not_before is not None and now + leeway < not_before:
        raise TokenRejected("not yet valid")
    checked = [(expires, "expired"), (issued + max_age, "older than token.max_subject_token_age_secs"), *limits]
    for limit, reason in checked:
        if now > limit + leeway:
            raise TokenRejected(reason)
    return min(limit for limit, _ in checked)


def token_audiences(claims: Claims) -> list[JSONValue]:
    """The ``aud`` claim as a list (RFC 7519 allows one string or an array)."""
    aud = claims.get("aud")
    return [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []


def check_audience(claims: Claims, audience: Optional[str]) -> None:
    """``audience`` (when asked for) must be the ``aud`` claim or one of its members."""
    if audience is not None and audience not in token_audiences(claims):
        raise TokenRejected("audience not accepted")


Lifetime = Callable[[Claims, float, float, float], float]


@attrs.frozen
class TrustedIssuer:
    """An issuer a validator accepts tokens of, where its keys come from, and how its usernames are prefixed."""

    issuer: str
    keys: KeySource
    username_prefix: str = ""


@attrs.frozen
class Verified:
    """A token whose signature and registered claims passed."""

    issuer: TrustedIssuer
    claims: Claims
    usable_until: float


@attrs.frozen
class Verifier:
    """
    Tokens of ``issuers`` verified at an instant: ``lifetime`` says until when
    the claims allow a token (:func:`usable_until`, or a validator's stricter
    version of it).
    """

    issuers: Mapping[str, TrustedIssuer]
    leeway: float
    max_age: float
    lifetime: Lifetime = usable_until

    async def verify(self, token: str, audience: Optional[str], now: float) -> Verified:
        signed, header, claims = parse(token)
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
        until = self.lifetime(claims, now, self.leeway, self.max_age)
        check_audience(claims, audience)
        return Verified(issuer, claims, until)

    async def check_ready(self, now: float) -> None:
        """Ready while every issuer has keys it may use (fetching them if need be)."""
        broken = []
        for name, issuer in self.issuers.items():
            try:
                await issuer.keys.current(now)
            except DependencyUnavailable:
                broken.append(name)
        if broken:
            raise DependencyUnavailable(f"no usable JWKS for {', '.join(broken)}")


@attrs.frozen
class Timing:
    """The options every JWT validator reads the same way: JWKS cache lifetime and clock leeway."""

    jwks_cache_ttl_secs: float
    leeway_secs: float

    @classmethod
    def read(cls, section: SectionReader) -> Timing:
        return cls(
            jwks_cache_ttl_secs=section.get("jwks_cache_ttl_secs", as_number, 3600.0, check=positive),
            leeway_secs=section.get("leeway_secs", as_number, 30.0, check=in_range(0, 300)),
        )
