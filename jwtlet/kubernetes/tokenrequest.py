"""
TokenRequest in a target cluster: a token for the same namespace and
service-account name there, cached per workload service account (its
issuer and UID) until shortly before it expires.
"""

from __future__ import annotations

import calendar
import time
from collections import OrderedDict
from typing import Any, Optional

import attrs
from twisted.logger import Logger

from jwtlet.interfaces import DependencyUnavailable
from jwtlet.outbound import TokenFile, post_json

log = Logger(namespace="jwtlet.tokenrequest")

MAX_CACHED = 10_000


class Denied(Exception):
    """The target cluster will not issue a token for that account (missing, refused)."""


@attrs.frozen
class TargetToken:
    token: str = attrs.field(repr=False)
    expires_at: float


def parse_timestamp(text: str) -> float:
    """``2026-01-01T12:00:00Z`` (RFC 3339 as Kubernetes writes it) as epoch seconds."""
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


@attrs.define
class TokenRequestClient:
    api_server_url: str
    own_token: TokenFile
    http_client: Any
    clock: Any
    audiences: tuple[str, ...]
    expiration_secs: int
    timeout: float = 5.0
    _cache: OrderedDict[tuple[str, str], TargetToken] = attrs.field(factory=OrderedDict)

    def fresh(self, cached: TargetToken, now: float) -> bool:
        # Refresh when a tenth of the lifetime (at least a minute) is left.
        margin = max(60.0, self.expiration_secs / 10)
        return now < cached.expires_at - margin

    async def token_for(
        self, issuer: str, namespace: str, name: str, uid: Optional[str]
    ) -> tuple[TargetToken, bool]:
        """
        The target-cluster token and whether it came from the cache.  The
        issuer is part of the key: two clusters' accounts never share an
        entry, even where their UIDs or names agree.
        """
        key = (issuer, uid or f"{namespace}/{name}")
        now = self.clock.seconds()
        cached = self._cache.get(key)
        if cached is not None and self.fresh(cached, now):
            self._cache.move_to_end(key)
            return cached, True
        issued = await self._request(namespace, name)
        self._cache[key] = issued
        self._cache.move_to_end(key)
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)
        return issued, False

    async def _request(self, namespace: str, name: str) -> TargetToken:
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": list(self.audiences), "expirationSeconds": self.expiration_secs}}
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"
        code, answer = await self._post(path, body, refresh=False)
        if code == 401:
            code, answer = await self._post(path, body, refresh=True)
        if code == 201:
            status: Any = answer.get("status") if isinstance(answer, dict) else None
            try:
                return TargetToken(str(status["token"]), parse_timestamp(status["expirationTimestamp"]))
            except (KeyError, TypeError, ValueError):
                raise DependencyUnavailable("TokenRequest: malformed answer") from None
        if code in (403, 404, 422, 400):
            raise Denied(f"TokenRequest for {namespace}/{name}: HTTP {code}")
        raise DependencyUnavailable(f"TokenRequest: HTTP {code}")

    async def _post(self, path: str, body: dict[str, Any], refresh: bool) -> tuple[int, Any]:
        try:
            own = self.own_token.refused() if refresh else self.own_token.read()
        except (OSError, ValueError) as error:
            raise DependencyUnavailable(f"target cluster token: {error}") from None
        return await post_json(self.http_client, self.api_server_url + path, body, own, self.timeout, self.clock,
                               "TokenRequest")
