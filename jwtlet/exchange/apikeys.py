"""
The API-key exchange (the M-Lab token-exchange contract): a key is checked
against its stored digest and, for an active key, turned into a short-lived
JWT for a profile's audience.  Every kind of bad key is the same refusal, so
nobody can learn which part was wrong.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import attrs
from twisted.logger import Logger, LogLevel

from jwtlet._async import as_deferred
from jwtlet.apikeys import keys as apikeys
from jwtlet.config.schema import ApiKeyProfile, ApiKeysConfig
from jwtlet.exchange.pipeline import Signing, new_token_id
from jwtlet.interfaces import NotFound
from jwtlet.logs import emit
from jwtlet.metrics import Metrics
from jwtlet.model import ApiKeyRecord
from jwtlet.policy import rate_limited
from jwtlet.ratelimit import RateLimiter

log = Logger(namespace="jwtlet.apikey")

# Compared against when a key id is unknown, so that both paths do the same work.
_ABSENT_DIGEST = bytes(32)


class InvalidKey(Exception):
    """Missing, malformed, unknown, revoked or wrong: deliberately one error."""


class UnknownProfile(Exception):
    """No such profile in ``api_keys.profiles``."""


@attrs.define
class ApiKeyVerifier:
    """Checks a presented key against the store."""

    store: Any
    prefix: str

    async def verify(self, text: Optional[str]) -> ApiKeyRecord:
        parsed = apikeys.parse_key(text or "", self.prefix)
        if parsed is None:
            raise InvalidKey()
        try:
            record: ApiKeyRecord = await as_deferred(self.store.get_api_key(parsed.integration_id, parsed.key_id))
        except NotFound:
            apikeys.secret_matches(parsed.secret, _ABSENT_DIGEST)
            raise InvalidKey() from None
        if not apikeys.secret_matches(parsed.secret, record.secret_sha256) or not record.active:
            raise InvalidKey()
        return record


@attrs.define
class ApiKeyExchange:
    """API key in, signed JWT out, for one of the configured profiles."""

    verifier: ApiKeyVerifier
    config: ApiKeysConfig
    issuer: str
    signing: Signing
    clock: Any
    metrics: Metrics
    limiter: RateLimiter
    make_token_id: Callable[[], str] = new_token_id

    def profile(self, name: str) -> ApiKeyProfile:
        profile = self.config.profiles.get(name)
        if profile is None:
            raise UnknownProfile(name)
        return profile

    async def exchange(self, profile_name: str, key: Optional[str]) -> str:
        """
        The token for ``key`` under ``profile_name``.  Raises UnknownProfile,
        InvalidKey, an ``ExchangeError`` (429, 503, 500) from limits or signing,
        or ``DependencyUnavailable`` from the store.
        """
        profile = self.profile(profile_name)
        outcome = "refused"
        try:
            record = await self.verifier.verify(key)
            # The global budget is spent only by keys that verified (security.md):
            # a flood of bad keys must not lock out the good ones.
            retry_after = self.limiter.check_global()
            if retry_after is None:
                retry_after = self.limiter.check(f"apikey:{record.integration_id}:{record.key_id}")
            if retry_after is not None:
                raise rate_limited(retry_after)
            now = int(self.clock.seconds())
            token_id = self.make_token_id()
            claims = {
                "iss": self.issuer,
                "aud": profile.audience,
                "iat": now,
                "nbf": now,
                "exp": now + profile.ttl_secs,
                "jti": token_id,
                "int_id": record.integration_id,
                "key_id": record.key_id,
                "tier": int(record.tier),
            }
            token = await self.signing.sign(claims)
            outcome = "issued"
            emit(log, "token.issued", LogLevel.info, client=f"apikey:{record.integration_id}:{record.key_id}",
                 resource=profile.name, audience=profile.audience, jti=token_id)
            return token
        except InvalidKey:
            emit(log, "token.refused", LogLevel.info, resource=profile.name, error="invalid_api_key")
            raise
        finally:
            self.metrics.apikey_exchanges.labels(profile.name, outcome).inc()
