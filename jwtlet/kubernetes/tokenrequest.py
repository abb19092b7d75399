"""
TokenRequest in a target cluster: a token for the same namespace and
service-account name there, cached per workload service account (its
issuer and UID) until shortly before it expires, and never past the expiry
of the workload token it was asked for with (migration.md, Tokensmith).
"""

from __future__ import annotations

from typing import Optional

import attrs
from treq.client import HTTPClient
from twisted.internet.interfaces import IReactorTime

from jwtlet.cache import ExpiringCache
from jwtlet.interfaces import DependencyUnavailable
from jwtlet.kubernetes.apiserver import APIServer
from jwtlet.kubernetes.credentials import Credential, parse_timestamp
from jwtlet.model import JSONValue
from jwtlet.outbound import TokenFile

MAX_CACHED = 10_000


class Denied(Exception):
    """The target cluster will not issue a token for that account (missing, refused)."""


@attrs.frozen
class TargetToken:
    token: str = attrs.field(repr=False)
    expires_at: float


@attrs.define
class TokenRequestClient:
    api_server_url: str
    #: a token file or any :class:`~jwtlet.kubernetes.credentials.Credential` (a kubeconfig's)
    own_token: TokenFile | Credential
    http_client: HTTPClient
    clock: IReactorTime
    audiences: tuple[str, ...]
    expiration_secs: int
    timeout: float = 5.0
    _api: APIServer = attrs.field(init=False)
    _cache: ExpiringCache[tuple[str, str], TargetToken] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._api = APIServer(self.api_server_url, self.own_token, self.http_client, self.clock, self.timeout,
                              credential="target cluster token")
        self._cache = ExpiringCache(MAX_CACHED, self.clock)

    def refresh_at(self, issued: TargetToken) -> float:
        """When a cached token is replaced: a tenth of the lifetime (at least a minute) before it expires."""
        return issued.expires_at - max(60.0, self.expiration_secs / 10)

    def keep_until(self, issued: TargetToken, source_expires_at: Optional[float]) -> float:
        """
        How long a token stays cached: until it is due for replacement, and
        never past the caller's own token, so a later caller whose token
        has expired cannot be handed what an earlier one was.
        """
        due = self.refresh_at(issued)
        return due if source_expires_at is None else min(due, source_expires_at)

    async def token_for(
        self, issuer: str, namespace: str, name: str, uid: Optional[str],
        source_expires_at: Optional[float] = None,
    ) -> tuple[TargetToken, bool]:
        """
        The target-cluster token and whether it came from the cache.  The
        issuer is part of the key: two clusters' accounts never share an
        entry, even where their UIDs or names agree.  ``source_expires_at``:
        when the workload token this is asked with stops being usable.
        """
        key = (issuer, uid or f"{namespace}/{name}")
        cached = self._cache.get(key)
        if cached is not None:
            return cached, True
        issued = await self._request(namespace, name)
        self._cache.put(key, issued, self.keep_until(issued, source_expires_at))
        return issued, False

    async def _request(self, namespace: str, name: str) -> TargetToken:
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": list(self.audiences), "expirationSeconds": self.expiration_secs}}
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"
        code, answer = await self._api.post(path, body, "TokenRequest")
        if code == 201:
            status: JSONValue = answer.get("status") if isinstance(answer, dict) else None
            try:
                return TargetToken(str(status["token"]), parse_timestamp(status["expirationTimestamp"]))
            except (KeyError, TypeError, ValueError):
                raise DependencyUnavailable("TokenRequest: malformed answer") from None
        if code in (403, 404, 422, 400):
            raise Denied(f"TokenRequest for {namespace}/{name}: HTTP {code}")
        raise DependencyUnavailable(f"TokenRequest: HTTP {code}")
