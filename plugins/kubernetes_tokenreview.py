"""
The ``kubernetes-tokenreview`` validator: each token is reviewed by the
Kubernetes API server (so a deleted service account stops its tokens at
once), with jwtlet's own service-account token as the caller's credential.

The API server vouches for the token; jwtlet then also holds it to its own
age rules (``kubernetes.io.warnafter`` and ``token.max_subject_token_age_secs``),
which the API server does not apply.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar, Mapping, Optional, Sequence, cast

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from jwtlet.cache import ExpiringCache
from jwtlet.config.reader import SectionReader, as_nonempty_str, as_number, as_str, https_url
from jwtlet.config.schema import ClusterAccess
from jwtlet.interfaces import (
    DependencyUnavailable,
    IReadiness,
    ITrustedIssuers,
    IValidator,
    IValidatorFactory,
    PluginConfigError,
    PluginContext,
    TokenRejected,
    TrustedIssuer,
)
from jwtlet.jwtverify import MAX_TOKEN_BYTES, unverified_claims
from jwtlet.kubernetes import identity, kubeconfig
from jwtlet.kubernetes.apiserver import APIServer
from jwtlet.model import Identity

log = Logger(namespace="jwtlet.validator.tokenreview")

MAX_CACHE_TTL_SECS = 10.0
MAX_CACHE_ENTRIES = 10_000
TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
#: The API server accepts a service-account token up to a minute past its
#: ``exp`` (go-jose's default leeway), so a reviewed token must be remembered
#: for replay that long after it.
API_SERVER_LEEWAY_SECS = 60.0


@implementer(IValidator, IReadiness, ITrustedIssuers)
@attrs.define
class TokenReviewValidator:
    """
    Positive reviews are remembered by the token's SHA-256 for ``cache_ttl``
    (at most 10 s) and never past the token's ``exp``.

    Without an audience the API server checks its own, so a token minted for
    another relying party is refused all the same: no audience is needed.
    """

    needs_explicit_audience: ClassVar[bool] = False

    api: APIServer
    reactor: IReactorTime
    issuer: str
    max_age: float
    username_prefix: str = ""
    cache_ttl: float = MAX_CACHE_TTL_SECS
    _reviewed: ExpiringCache[str, Identity] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._reviewed = ExpiringCache(MAX_CACHE_ENTRIES, self.reactor)

    def validate(self, token: str, audience: Optional[str]) -> Deferred[Identity]:
        if not token or len(token) > MAX_TOKEN_BYTES:
            return fail(TokenRejected("empty or oversized token"))
        # A bearer token is visible ASCII (RFC 6750); anything else is never
        # sent on to the API server, which would answer it back to us.
        if not (token.isascii() and token.isprintable()):
            return fail(TokenRejected("a token holds characters no bearer token has"))
        return ensureDeferred(self._validate(token, audience))

    async def _validate(self, token: str, audience: Optional[str]) -> Identity:
        key = hashlib.sha256(f"{audience}\0{token}".encode("utf-8", "surrogatepass")).hexdigest()
        cached = self._reviewed.get(key)
        if cached is not None:
            return cached
        now = self.reactor.seconds()
        spec: dict[str, Any] = {"token": token}
        if audience is not None:
            spec["audiences"] = [audience]
        status = await self._review({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec})
        caller = self._identity(status, audience, token, now)
        until = now + self.cache_ttl
        if caller.expires_at is not None:
            until = min(until, caller.expires_at)
        self._reviewed.put(key, caller, until)
        return caller
    def _identity(self, status: Any, audience: Optional[str], token: str, now: float) -> Identity:
        if not isinstance(status, Mapping) or status.get("authenticated") is not True:
            error = status.get("error") if isinstance(status, Mapping) else None
            raise TokenRejected(f"TokenReview: {error or 'not authenticated'}")
        user = status.get("user")
        if not isinstance(user, Mapping):
            raise TokenRejected("TokenReview: no user")
        confirmed = status.get("audiences")
        if audience is not None and not (isinstance(confirmed, list) and audience in confirmed):
            raise TokenRejected("TokenReview: the audience was not confirmed")
        account = identity.from_username(user.get("username"))
        listed = user.get("groups")
        groups: list[Any] = listed if isinstance(listed, list) else []
        if account is None or "system:serviceaccounts" not in groups:
            raise TokenRejected("not a service account")
        claims = unverified_claims(token)  # the API server has vouched for the token
        usable_until = identity.usable_until(claims, now, API_SERVER_LEEWAY_SECS, self.max_age)
        token_id = claims.get("jti")
        given = user.get("extra")
        extra: Mapping[str, Any] = given if isinstance(given, Mapping) else {}
        return Identity(
            username=self.username_prefix + account.username,
            issuer=self.issuer,
            uid=user.get("uid") if isinstance(user.get("uid"), str) else None,
            namespace=account.namespace,
            name=account.name,
            groups=tuple(str(group) for group in groups),
            extra=dict(extra),
            expires_at=usable_until,
            token_id=token_id if isinstance(token_id, str) else None,
            accepted_until=usable_until + API_SERVER_LEEWAY_SECS,
        )

    async def _review(self, body: dict[str, Any]) -> Any:
        code, answer = await self.api.post(TOKENREVIEW_PATH, body, "TokenReview")
        if code in (200, 201) and isinstance(answer, Mapping):
            return answer.get("status")
        if code in (401, 403):
            log.error("the API server refused jwtlet's own credentials for TokenReview (HTTP {code})", code=code)
        raise DependencyUnavailable(f"TokenReview: HTTP {code}")

    def check_ready(self) -> Deferred[None]:
        """Ready when jwtlet has a credential to present (its token file readable, its exec plugin working)."""
        return ensureDeferred(self.api.token()).addCallback(lambda _: None)

    def trusted_issuers(self) -> Sequence[TrustedIssuer]:
        """
        The one cluster it asks: its identities carry ``k8s.cluster_issuer``
        whichever API server vouched, so that server is named as well.
        """
        return (TrustedIssuer(self.issuer, self.username_prefix, "username_prefix", authority=self.api.url),)


def _timeout(value: float) -> Optional[str]:
    return None if 0 < value <= 60 else "must be between 0 and 60"


def _fails_check(path: Optional[str], context: Optional[str]) -> bool:
    """Whether the k8s table's kubeconfig fails the check the core config runs on it."""
    if path is None:
        return False
    try:
        kubeconfig.check(path, context)
    except kubeconfig.KubeconfigError:
        return True
    return False


def _cache_ttl(value: float) -> Optional[str]:
    return None if 0 <= value <= MAX_CACHE_TTL_SECS else f"must be between 0 and {MAX_CACHE_TTL_SECS:g}"


@implementer(IPlugin, IValidatorFactory)
@attrs.frozen
class TokenReviewValidatorFactory:
    name: str = "kubernetes-tokenreview"
    description: str = "asks the Kubernetes API server (TokenReview) about every service-account token"

    def build(self, options: Mapping[str, Any], context: PluginContext) -> TokenReviewValidator:
        k8s = context.config.k8s
        problems: list[str] = []
        section = SectionReader(options, "", problems)
        # The API server named here gets jwtlet's own token: the outbound
        # rule holds for it.  ``k8s.api_server_url``, the default, is checked
        # where the k8s table is read, so a problem there is reported once.
        # Each key here wins over this section's kubeconfig, which wins over
        # the k8s table (its keys, then its kubeconfig), then in-cluster.
        ca_file: Optional[str] = section.get("ca_file", as_str, None)
        kubeconfig_path, kubeconfig_context = kubeconfig.read_keys(section, context.config.dev)
        own = ClusterAccess(
            api_server_url=section.get("api_server_url", as_nonempty_str, None, check=https_url(context.config.dev)),
            token_file=section.get("token_file", as_nonempty_str, None),
            ca_file=ca_file,
            kubeconfig=kubeconfig_path,
            context=kubeconfig_context,
        )
        cluster = None
        if not problems:
            try:
                cluster = kubeconfig.resolve((own, k8s.access(), kubeconfig.IN_CLUSTER),
                                             cast(IReactorProcess, context.reactor), context.clock)
            except kubeconfig.KubeconfigError as error:
                # The k8s table's kubeconfig is checked where that table is
                # read; a problem it reports there is not said twice.
                if error.layer is own or not _fails_check(k8s.kubeconfig, k8s.context):
                    section.problem("kubeconfig", str(error))
        if cluster is not None and not cluster.url:
            section.problem("api_server_url", "required (an https URL; k8s.api_server_url is the default)")
        timeout = section.get("timeout_secs", as_number, 5.0, check=_timeout)
        ttl = section.get("cache_ttl_secs", as_number, MAX_CACHE_TTL_SECS, check=_cache_ttl)
        prefix = section.get("username_prefix", as_str, "")
        section.finish()
        if problems or cluster is None or not cluster.url:
            raise PluginConfigError(*problems)
        # The daemon's shared client trusts the k8s table's CA; anything else needs its own TLS.
        client = (
            kubeconfig.http_client(context.reactor, cluster.tls)
            if cluster.from_kubeconfig or ca_file is not None or context.http_client is None
            else context.http_client
        )
        return TokenReviewValidator(
            api=APIServer(cluster.url.rstrip("/"), cluster.credential, client, context.reactor, timeout),
            reactor=context.reactor,
            issuer=k8s.cluster_issuer,
            max_age=identity.max_subject_token_age(context.config),
            username_prefix=prefix,
            cache_ttl=ttl,
        )


kubernetes_tokenreview = TokenReviewValidatorFactory()
