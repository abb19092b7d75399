"""
The token exchange as one sequence of awaits: validate, resolve, apply the
policy, sign.  Decisions live in :mod:`jwtlet.policy`; this module only
orders the I/O around them and turns provider errors into refusals.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Optional

import attrs
from twisted.logger import Logger, LogLevel

from jwtlet import policy
from jwtlet._async import as_deferred
from jwtlet.interfaces import DependencyUnavailable, IReplayRecord, NotFound, TokenRejected
from jwtlet.logs import emit
from jwtlet.metrics import Metrics
from jwtlet.model import Identity, Resolution
from jwtlet.policy import ExchangeError, IssueParameters, TokenRequest
from jwtlet.ratelimit import RateLimiter

log = Logger(namespace="jwtlet.exchange")


def new_token_id() -> str:
    return str(uuid.uuid4())


@attrs.frozen
class IssuedToken:
    access_token: str = attrs.field(repr=False)
    expires_in: int
    scope: Optional[str]
    token_id: str


@attrs.define
class Signing:
    """Claims to a signed JWT, timed and with its failures classified."""

    signer: Any
    clock: Any
    metrics: Metrics

    async def sign(self, claims: dict[str, Any]) -> str:
        started = self.clock.seconds()
        try:
            token: str = await as_deferred(self.signer.sign({"typ": "JWT"}, claims))
        except DependencyUnavailable as error:
            log.warn("signer unavailable: {reason}", reason=str(error))
            raise policy.temporarily_unavailable(error.retry_after) from None
        except Exception:
            log.failure("signing failed")
            raise policy.server_error() from None
        finally:
            self.metrics.signer_duration.observe(max(0.0, self.clock.seconds() - started))
        return token


@attrs.define
class TokenIssuer:
    """Decides RFC 8693 exchanges and issues the tokens."""

    validator: Any
    store: Any
    signing: Signing
    parameters: IssueParameters
    client_audience: str
    default_audience: str
    reject_replays: bool
    clock: Any
    metrics: Metrics
    limiter: RateLimiter
    make_token_id: Callable[[], str] = new_token_id

    def limit(self, retry_after: Optional[int]) -> None:
        if retry_after is not None:
            raise policy.rate_limited(retry_after)

    async def validate(self, token: str, audience: Optional[str]) -> Identity:
        """Step 1, for subject and actor tokens alike."""
        started = self.clock.seconds()
        try:
            identity: Identity = await as_deferred(self.validator.validate(token, audience))
        except TokenRejected as error:
            log.info("token rejected: {reason}", reason=str(error))
            raise policy.invalid_grant() from None
        except DependencyUnavailable as error:
            log.warn("validator unavailable: {reason}", reason=str(error))
            raise policy.temporarily_unavailable(error.retry_after) from None
        finally:
            self.metrics.validator_duration.observe(max(0.0, self.clock.seconds() - started))
        return identity

    async def resolve(self, client: str, request: TokenRequest) -> Resolution:
        """Step 2's lookup: the mapping and scope mappings in one round trip."""
        try:
            resolution: Resolution = await as_deferred(
                self.store.resolve(client, request.resource, request.scopes)
            )
        except NotFound:
            raise policy.unauthorized_client("no mapping for this client and resource") from None
        except DependencyUnavailable as error:
            log.warn("store unavailable: {reason}", reason=str(error))
            raise policy.temporarily_unavailable(error.retry_after) from None
        except Exception:
            log.failure("store failed to resolve a mapping")
            raise policy.server_error() from None
        return resolution

    async def check_replay(self, identity: Identity) -> None:
        if not (self.reject_replays and identity.token_id):
            return
        if not IReplayRecord.providedBy(self.store):
            raise policy.server_error()
        # Remembered for as long as the validator would still accept the token
        # (exp plus its leeway): forgetting it at exp would let it be replayed
        # inside the leeway.
        remember_until = identity.accepted_until or identity.expires_at or (self.clock.seconds() + 3600)
        try:
            first = await as_deferred(
                self.store.record_token_id(identity.issuer, identity.token_id, remember_until)
            )
        except DependencyUnavailable as error:
            raise policy.temporarily_unavailable(error.retry_after) from None
        if not first:
            log.info("subject token replayed")
            raise policy.invalid_grant()

    async def exchange(self, request: TokenRequest) -> IssuedToken:
        """The whole RFC 8693 decision for a request from ``POST /token``."""
        started = self.clock.seconds()
        client: Optional[str] = None
        try:
            subject = await self.validate(request.subject_token, self.client_audience)
            client = subject.username
            actor = None
            if request.actor_token is not None:
                actor = await self.validate(request.actor_token, self.client_audience)
            # Counted only once the tokens validated, so that a flood of
            # rejected tokens never uses up the budget of valid clients.
            self.limit(self.limiter.check_global())
        except ExchangeError as refusal:
            self.refused(client, request, refusal)
            raise
        try:
            return await self.issue_for(subject, request, actor)
        finally:
            self.metrics.exchange_duration.observe(max(0.0, self.clock.seconds() - started))

    async def issue_for(
        self, subject: Identity, request: TokenRequest, actor: Optional[Identity] = None
    ) -> IssuedToken:
        """
        Steps 2 to 5 for an identity already validated (by ``/token`` or by the
        ext_authz front, which has its own validator).
        """
        client = subject.username
        try:
            self.limit(self.limiter.check(client))
            resolution = await self.resolve(client, request)
            policy.check_scopes_allowed(resolution.mapping, request.scopes)
            reserved = policy.reserved_claims(self.parameters.participant_context_claim)
            scope_claims = policy.expand_scopes(request.scopes, resolution.scopes, reserved)
            audience = policy.choose_audience(
                request.audiences, resolution.mapping.audiences, self.default_audience
            )
            await self.check_replay(subject)
            token_id = self.make_token_id()
            claims = policy.token_claims(
                self.parameters,
                request.resource,
                audience,
                scope_claims,
                policy.actor_claim(subject, actor),
                int(self.clock.seconds()),
                token_id,
            )
            token = await self.signing.sign(claims)
        except ExchangeError as refusal:
            self.refused(client, request, refusal)
            raise
        self.metrics.exchanges.labels("issued", "").inc()
        emit(
            log, "token.issued", LogLevel.info,
            client=client, resource=request.resource, scopes=list(request.scopes),
            audience=audience, jti=token_id,
        )
        return IssuedToken(
            access_token=token,
            expires_in=self.parameters.ttl_secs,
            scope=policy.granted_scope(request.scopes),
            token_id=token_id,
        )

    def refused(self, client: Optional[str], request: TokenRequest, refusal: ExchangeError) -> None:
        self.metrics.exchanges.labels("refused", refusal.code).inc()
        emit(
            log, "token.refused", LogLevel.info,
            client=client, resource=request.resource, scopes=list(request.scopes),
            audience=list(request.audiences), error=refusal.code,
        )
