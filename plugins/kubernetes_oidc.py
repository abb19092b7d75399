"""
The ``kubernetes-oidc`` validator: service-account tokens checked against the
JWKS of configured issuers, with no API-server call per token.

The JWT and JWKS machinery (strict parsing, algorithm pinning, key caching
and refetch limits, the outbound URL rule) is :mod:`jwtlet.jwtverify` and
:mod:`jwtlet.jwks`; this module adds what is Kubernetes about it: the
identity is the issuer's ``username_prefix`` plus the service account's
username (so the same account name in two trusted clusters is two callers),
read from the ``kubernetes.io`` claim, the legacy flat claims or ``sub``, and
``kubernetes.io.warnafter`` bounds a token's life.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Sequence

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from jwtlet import interfaces
from jwtlet.cache import ExpiringCache
from jwtlet.config.reader import SectionReader, as_nonempty_str, as_str, https_url
from jwtlet.interfaces import (
    IReadiness,
    ITrustedIssuers,
    IValidator,
    IValidatorFactory,
    PluginConfigError,
    PluginContext,
    TokenRejected,
)
from jwtlet.jwks import RemoteKeys, StaticKeys
from jwtlet.jwtverify import MAX_TOKEN_BYTES, Timing, TrustedIssuer, Verifier
from jwtlet.kubernetes import identity
from jwtlet.model import Identity
from jwtlet.outbound import TokenFile, build_http_client

__all__ = ["MAX_TOKEN_BYTES", "OIDCValidator", "OIDCValidatorFactory", "kubernetes_oidc"]

log = Logger(namespace="jwtlet.validator.oidc")

VALIDATED_CACHE_SECS = 60.0
VALIDATED_CACHE_ENTRIES = 10_000


@implementer(IValidator, IReadiness, ITrustedIssuers)
@attrs.define
class OIDCValidator:
    """
    Validated tokens are remembered by their SHA-256 for at most
    ``VALIDATED_CACHE_SECS`` (and never past the instant they stop being
    accepted): a workload that refreshes with the same token is not verified
    again each time.

    Without an audience it accepts a token minted for any relying party
    (``aud`` is checked only against one given), hence
    ``needs_explicit_audience``.
    """

    needs_explicit_audience: ClassVar[bool] = True

    verifier: Verifier
    reactor: IReactorTime
    trusted: tuple[interfaces.TrustedIssuer, ...] = ()
    _validated: ExpiringCache[bytes, Identity] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._validated = ExpiringCache(VALIDATED_CACHE_ENTRIES, self.reactor)

    def validate(self, token: str, audience: Optional[str]) -> Deferred[Identity]:
        cache_key = hashlib.sha256(f"{audience}\0{token}".encode("utf-8", "surrogatepass")).digest()
        cached = self._validated.get(cache_key)
        if cached is not None:
            return succeed(cached)
        return ensureDeferred(self._validate(token, audience, cache_key))

    async def _validate(self, token: str, audience: Optional[str], cache_key: bytes) -> Identity:
        now = self.reactor.seconds()
        verified = await self.verifier.verify(token, audience, now)
        account = identity.from_claims(verified.claims)
        if account is None:
            raise TokenRejected("not a service account token")
        token_id = verified.claims.get("jti")
        accepted_until = verified.usable_until + self.verifier.leeway
        caller = Identity(
            username=verified.issuer.username_prefix + account.username,
            issuer=verified.issuer.issuer,
            uid=account.uid,
            namespace=account.namespace,
            name=account.name,
            groups=account.groups,
            extra=bound_object_extra(verified.claims),
            claims=verified.claims,
            expires_at=verified.usable_until,
            token_id=token_id if isinstance(token_id, str) else None,
            accepted_until=accepted_until,
        )
        self._validated.put(cache_key, caller, min(accepted_until, now + VALIDATED_CACHE_SECS))
        return caller

    def check_ready(self) -> Deferred[None]:
        return ensureDeferred(self.verifier.check_ready(self.reactor.seconds()))

    def trusted_issuers(self) -> Sequence[interfaces.TrustedIssuer]:
        return self.trusted


#: Where TokenReview's ``status.user.extra`` names what a token is bound to,
#: by the ``kubernetes.io`` member it comes from.
BOUND_OBJECT_EXTRA = {
    ("pod", "name"): "authentication.kubernetes.io/pod-name",
    ("pod", "uid"): "authentication.kubernetes.io/pod-uid",
    ("node", "name"): "authentication.kubernetes.io/node-name",
    ("node", "uid"): "authentication.kubernetes.io/node-uid",
}
CREDENTIAL_ID = "authentication.kubernetes.io/credential-id"


def bound_object_extra(claims: Mapping[str, Any]) -> dict[str, list[str]]:
    """
    What the API server would put in a TokenReview's ``extra`` for this
    token (claims.md): the pod and node it is bound to, from the
    ``kubernetes.io`` claim, and ``JTI=<jti>`` as its credential id, so that
    an expression reads the same keys whichever validator is configured.
    """
    extra: dict[str, list[str]] = {}
    nested = claims.get("kubernetes.io")
    if isinstance(nested, Mapping):
        for (kind, member), key in BOUND_OBJECT_EXTRA.items():
            bound = nested.get(kind)
            value = bound.get(member) if isinstance(bound, Mapping) else None
            if isinstance(value, str) and value:
                extra[key] = [value]
    token_id = claims.get("jti")
    if isinstance(token_id, str) and token_id:
        extra[CREDENTIAL_ID] = [f"JTI={token_id}"]
    return extra


# -- options ------------------------------------------------------------------


def _url(section: SectionReader, key: str, dev: bool, required: bool = False) -> Optional[str]:
    """The outbound URL at ``key``, or ``None`` (absent, or reported as a problem)."""
    url: Optional[str] = section.get(key, as_str) if required else section.get(key, as_str, None)
    if url is None:
        return None
    problem = https_url(dev)(url)
    if problem is not None:
        section.problem(key, problem)
        return None
    return url


def _issuer(entry: SectionReader, prefix: str, ttl: float, context: PluginContext) -> Optional[TrustedIssuer]:
    """One ``issuers`` entry, or ``None`` (with its problems noted)."""
    dev = context.config.dev
    name = _url(entry, "issuer", dev, required=True)
    jwks_file: Optional[str] = entry.get("jwks_file", as_nonempty_str, None)
    jwks_uri = _url(entry, "jwks_uri", dev)
    bearer_file: Optional[str] = entry.get("bearer_token_file", as_nonempty_str, None)
    ca_file: Optional[str] = entry.get("ca_file", as_str, None)
    entry.finish()
    if jwks_file is not None and entry.present("jwks_uri"):
        entry.problem("", "give jwks_file or jwks_uri, not both")
        return None
    if name is None:
        return None
    if jwks_file is not None:
        return TrustedIssuer(name, StaticKeys(Path(jwks_file)), prefix)
    client = (
        build_http_client(context.reactor, ca_file=ca_file if ca_file is not None else context.config.k8s.ca_file)
        if ca_file is not None or context.http_client is None
        else context.http_client
    )
    keys = RemoteKeys(issuer=name, jwks_uri=jwks_uri, http_client=client, reactor=context.reactor, ttl=ttl,
                      bearer=TokenFile(bearer_file) if bearer_file else None, dev=dev, metrics=context.metrics, log=log)
    return TrustedIssuer(name, keys, prefix)


@attrs.frozen
class _Issuers:
    """The issuers a validator verifies tokens of, and the same as the config rules see them."""

    keyed: dict[str, TrustedIssuer]
    trusted: tuple[interfaces.TrustedIssuer, ...]


def _issuers(section: SectionReader, ttl: float, context: PluginContext) -> _Issuers:
    entries = section.get("issuers", _as_list, [])
    if not entries:
        section.problem("issuers", "must list at least one issuer")
    issuers: dict[str, TrustedIssuer] = {}
    trusted: list[interfaces.TrustedIssuer] = []
    prefixes: list[tuple[str, str]] = []
    for index, raw in enumerate(entries):
        path = f"issuers[{index}]"
        if not isinstance(raw, Mapping):
            section.problem(path, "must be a table")
            continue
        entry = SectionReader(raw, section.key_path(path), section.problems)
        prefix: str = entry.get("username_prefix", as_str, "")
        prefixes.append((entry.key_path("username_prefix"), prefix))
        issuer = _issuer(entry, prefix, ttl, context)
        if issuer is not None and issuer.issuer in issuers:
            entry.problem("issuer", "listed twice")
        elif issuer is not None:
            issuers[issuer.issuer] = issuer
            trusted.append(interfaces.TrustedIssuer(issuer.issuer, prefix, entry.key_path("username_prefix"),
                                                    authority=issuer.keys.origin))
    section.problems.extend(identity.distinct_prefix_problems(prefixes))
    return _Issuers(issuers, tuple(trusted))


def _as_list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError("must list at least one issuer")
    return value


@implementer(IPlugin, IValidatorFactory)
@attrs.frozen
class OIDCValidatorFactory:
    name: str = "kubernetes-oidc"
    description: str = "validates service-account tokens with the JWKS of configured issuers"

    def build(self, options: Mapping[str, Any], context: PluginContext) -> OIDCValidator:
        problems: list[str] = []
        section = SectionReader(options, "", problems)
        timing = Timing.read(section)
        ttl, leeway = timing.jwks_cache_ttl_secs, timing.leeway_secs
        # Accepted so that switching ``type`` from kubernetes-tokenreview
        # needs no other edit; kubernetes-oidc calls no API server.
        for unused in ("api_server_url", "token_file", "ca_file"):
            section.get(unused, as_str, None)
        issuers = _issuers(section, ttl, context)
        section.finish()
        if problems:
            raise PluginConfigError(*problems)
        verifier = identity.verifier(issuers.keyed, leeway, context.config)
        return OIDCValidator(verifier, context.reactor, issuers.trusted)


kubernetes_oidc = OIDCValidatorFactory()
