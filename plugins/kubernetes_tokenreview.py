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
from collections import OrderedDict
from typing import Any, Mapping, Optional

import attrs
from jwcrypto.common import base64url_decode
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
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
from jwtlet.outbound import TokenFile, build_http_client, post_json

log = Logger(namespace="jwtlet.validator.tokenreview")

MAX_CACHE_TTL_SECS = 10.0
MAX_CACHE_ENTRIES = 10_000
MAX_TOKEN_BYTES = 16 * 1024
TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
#: The API server accepts a service-account token up to a minute past its
#: ``exp`` (go-jose's default leeway), so a reviewed token must be remembered
#: for replay that long after it.
API_SERVER_LEEWAY_SECS = 60.0


def unverified_claims(token: str) -> Mapping[str, Any]:
    """
    The payload of a JWT without checking its signature: only read once the
    API server has vouched for the token.  Anything unreadable is no claims.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        claims = k8s_identity.strict_json(base64url_decode(parts[1]))
    except ValueError:
        return {}
    return claims if isinstance(claims, Mapping) else {}


@implementer(IValidator, IReadiness)
@attrs.define
class TokenReviewValidator:
    api_server_url: str
    own_token: TokenFile
    http_client: Any
    reactor: Any
    issuer: str
    max_age: float
    username_prefix: str = ""
    timeout: float = 5.0
    cache_ttl: float = MAX_CACHE_TTL_SECS
    max_entries: int = MAX_CACHE_ENTRIES
    _cache: OrderedDict[str, tuple[Identity, float]] = attrs.field(factory=OrderedDict)

    def validate(self, token: str, audience: Optional[str]) -> Deferred[Identity]:
        if not token or len(token) > MAX_TOKEN_BYTES:
            return fail(TokenRejected("empty or oversized token"))
        return ensureDeferred(self._validate(token, audience))

    async def _validate(self, token: str, audience: Optional[str]) -> Identity:
        key = hashlib.sha256(f"{audience}\0{token}".encode()).hexdigest()
        now = self.reactor.seconds()
        cached = self._cache.get(key)
        if cached is not None and now < cached[1]:
            return cached[0]
        spec: dict[str, Any] = {"token": token}
        if audience is not None:
            spec["audiences"] = [audience]
        status = await self._review({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec})
        identity = self._identity(status, audience, token, now)
        until = now + self.cache_ttl
        if identity.expires_at is not None:
            until = min(until, identity.expires_at)
        self._cache[key] = (identity, until)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return identity

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
        account = k8s_identity.from_username(user.get("username"))
        listed = user.get("groups")
        groups: list[Any] = listed if isinstance(listed, list) else []
        if account is None or "system:serviceaccounts" not in groups:
            raise TokenRejected("not a service account")
        claims = unverified_claims(token)
        usable_until = k8s_identity.usable_until(claims, now, API_SERVER_LEEWAY_SECS, self.max_age)
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
        code, answer = await self._post(body, self._own_token(refresh=False))
        if code == 401:
            # Our own token may have been rotated under us: read it again, once.
            code, answer = await self._post(body, self._own_token(refresh=True))
        if code in (200, 201) and isinstance(answer, Mapping):
            return answer.get("status")
        if code in (401, 403):
            log.error("the API server refused jwtlet's own credentials for TokenReview (HTTP {code})", code=code)
        raise DependencyUnavailable(f"TokenReview: HTTP {code}")

    def _own_token(self, refresh: bool) -> str:
        try:
            return self.own_token.refused() if refresh else self.own_token.read()
        except (OSError, ValueError) as error:
            raise DependencyUnavailable(f"own service account token: {error}") from None

    async def _post(self, body: dict[str, Any], own_token: str) -> tuple[int, Any]:
        return await post_json(self.http_client, self.api_server_url + TOKENREVIEW_PATH, body, own_token,
                               self.timeout, self.reactor, "TokenReview")

    def check_ready(self) -> Deferred[None]:
        try:
            self.own_token.read()
        except (OSError, ValueError) as error:
            return fail(DependencyUnavailable(f"own service account token: {error}"))
        return succeed(None)


_OPTIONS = frozenset({"api_server_url", "token_file", "ca_file", "timeout_secs", "cache_ttl_secs", "username_prefix"})


@implementer(IPlugin, IValidatorFactory)
@attrs.frozen
class TokenReviewValidatorFactory:
    name: str = "kubernetes-tokenreview"
    description: str = "asks the Kubernetes API server (TokenReview) about every service-account token"

    def build(self, options: Mapping[str, Any], context: PluginContext) -> TokenReviewValidator:
        k8s = context.config.k8s
        problems = [f"{key}: unknown key" for key in options if key not in _OPTIONS]
        url = options.get("api_server_url", k8s.api_server_url)
        if url is None:
            problems.append("api_server_url: required (an https URL; k8s.api_server_url is the default)")
        elif (url_problem := k8s_identity.outbound_url_problem(url, context.config.dev)) is not None:
            problems.append(f"api_server_url: {url_problem}")
        token_file = options.get("token_file", k8s.token_file)
        if not isinstance(token_file, str) or not token_file:
            problems.append("token_file: must be a path")
        timeout = options.get("timeout_secs", 5)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 60:
            problems.append("timeout_secs: must be between 0 and 60")
        ttl = options.get("cache_ttl_secs", MAX_CACHE_TTL_SECS)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 <= ttl <= MAX_CACHE_TTL_SECS:
            problems.append(f"cache_ttl_secs: must be between 0 and {MAX_CACHE_TTL_SECS:g}")
        prefix = options.get("username_prefix", "")
        prefix_problem = k8s_identity.prefix_problem(prefix)
        if prefix_problem is not None:
            problems.append(f"username_prefix: {prefix_problem}")
        if problems:
            raise PluginConfigError(*problems)
        ca_file = options.get("ca_file")
        client = (
            build_http_client(context.reactor, ca_file=ca_file)
            if ca_file is not None or context.http_client is None
            else context.http_client
        )
        return TokenReviewValidator(
            api_server_url=url.rstrip("/"),
            own_token=TokenFile(token_file),
            http_client=client,
            reactor=context.reactor,
            issuer=k8s.cluster_issuer,
            max_age=k8s_identity.max_subject_token_age(context.config),
            username_prefix=prefix,
            timeout=float(timeout),
            cache_ttl=float(ttl),
        )


kubernetes_tokenreview = TokenReviewValidatorFactory()
