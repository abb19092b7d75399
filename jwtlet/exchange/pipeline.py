"""
The token exchange as one pipeline: validate → resolve → check → claims →
sign, for every credential kind and every front (``POST /token``,
``POST /v0/token/{profile}``, the ext_authz ``jwt`` exchange).

What differs between credentials is a :class:`Grant`: the validator that
checks the credential and the terms its token gets (a resource mapping from
the store for Kubernetes tokens, a configured profile for API keys).
Decisions live in :mod:`jwtlet.policy`; this module orders the I/O around
them, limits rates, logs and counts.  Errors are the domain's
(:class:`~jwtlet.policy.Refusal`, :class:`~jwtlet.policy.RateLimited`,
:class:`~jwtlet.policy.ServerError`, :class:`DependencyUnavailable`); each
port says them in its own words.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, Optional, Protocol, Sequence, Union

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel

from jwtlet import policy, tracing
from jwtlet.audiences import validate_for_any
from jwtlet.config import ApiKeyProfile, Config
from jwtlet.exchange.apikeys import ApiKeyValidator, ApiKeyVerifier, bound_to
from jwtlet.interfaces import DependencyUnavailable, NotFound, TokenRejected
from jwtlet.logs import emit
from jwtlet.metrics import Metrics
from jwtlet.model import Identity, JSONObject
from jwtlet.policy import ExchangeRequest, IssueParameters, RateLimited, Refusal, ServerError, Terms
from jwtlet.providers import Signer, Store, Validator, adapt
from jwtlet.ratelimit import RateLimiter

log = Logger(namespace="jwtlet.exchange")

#: Every way an exchange can end other than with a token.
Failure = Union[Refusal, RateLimited, ServerError, DependencyUnavailable]
FAILURES = (Refusal, RateLimited, ServerError, DependencyUnavailable)


def failure_code(error: Failure) -> str:
    """The RFC 6749 style code a failure is logged and counted as."""
    if isinstance(error, Refusal):
        return error.code
    if isinstance(error, RateLimited):
        return "rate_limited"
    if isinstance(error, DependencyUnavailable):
        return "temporarily_unavailable"
    return "server_error"


def new_token_id() -> str:
    """
    A random UUID (version 4, RFC 9562 §5.4) in its usual text form, made from
    16 random bytes directly: ``str(uuid.uuid4())`` goes through a 128-bit
    integer and cost about 2.5 µs of every exchange.
    """
    data = bytearray(os.urandom(16))
    data[6] = data[6] & 0x0F | 0x40  # version 4
    data[8] = data[8] & 0x3F | 0x80  # the RFC variant
    digits = data.hex()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


@attrs.frozen
class IssuedToken:
    access_token: str = attrs.field(repr=False)
    expires_in: int
    scope: Optional[str]


@attrs.frozen
class Signing:
    """Claims to a signed JWT, timed and with its failures classified."""

    signer: Signer
    clock: IReactorTime
    metrics: Metrics
    #: the signer plugin's name, for traces
    name: str = ""

    async def sign(self, claims: JSONObject) -> str:
        started = self.clock.seconds()
        try:
            with tracing.current().span("sign", {tracing.SIGNER_ATTRIBUTE: self.name}):
                return await self.signer.sign({"typ": "JWT"}, claims)
        except DependencyUnavailable:
            raise  # the port says it (503) and logs it
        except Exception:
            log.failure("signing failed")
            raise ServerError() from None
        finally:
            self.metrics.signer_duration.observe(max(0.0, self.clock.seconds() - started))


class Grant(Protocol):
    """How one kind of credential becomes a token."""

    @property
    def validator(self) -> Validator:
        """Checks the credential."""

    @property
    def audiences(self) -> tuple[str, ...]:
        """The credential must have been issued for one of these (none: for any)."""

    @property
    def takes_actor(self) -> bool:
        """Whether an ``actor_token`` takes part (RFC 8693 delegation)."""

    @property
    def validator_name(self) -> str:
        """The validator plugin's name, for traces."""

    def check_target(self, request: ExchangeRequest) -> None:
        """Refuse, before any I/O, a target that cannot exist."""

    async def terms(self, subject: Identity, actor: Optional[Identity], request: ExchangeRequest) -> Terms:
        """Resolve and check: what the token for ``subject`` gets."""

    def count(self, request: ExchangeRequest, outcome: str, error: str) -> None:
        """Count one decision in this grant's metric."""


@attrs.frozen
class MappingGrant:
    """RFC 8693 for a Kubernetes identity: the store's resource mapping decides."""

    validator: Validator
    store: Store
    parameters: IssueParameters
    client_audience: tuple[str, ...]
    default_audience: str
    reject_replays: bool
    clock: IReactorTime
    metrics: Metrics
    takes_actor: bool = True
    validator_name: str = ""

    @property
    def audiences(self) -> tuple[str, ...]:
        return self.client_audience

    def check_target(self, request: ExchangeRequest) -> None:
        """Any participant context may be asked for; the mapping decides."""

    async def terms(self, subject: Identity, actor: Optional[Identity], request: ExchangeRequest) -> Terms:
        tracing.current().annotate(tracing.PARTICIPANT_CONTEXT_ATTRIBUTE, request.resource)
        try:
            with tracing.current().span("store.resolve"):
                resolution = await self.store.resolve(subject.username, request.resource, request.scopes)
        except NotFound:
            raise policy.unauthorized_client("no mapping for this client and resource") from None
        except DependencyUnavailable:
            raise  # the port says it (503) and logs it
        except Exception:
            log.failure("store failed to resolve a mapping")
            raise ServerError() from None
        terms = policy.mapping_terms(
            self.parameters, resolution, request, self.default_audience, subject, actor, now=self.clock.seconds())
        await self.check_replay(subject)
        return terms

    async def check_replay(self, identity: Identity) -> None:
        if not (self.reject_replays and identity.token_id):
            return
        if not self.store.records_token_ids:
            raise ServerError()
        # Remembered for as long as the validator would still accept the token
        # (exp plus its leeway): forgetting it at exp would let it be replayed
        # inside the leeway.
        remember_until = identity.accepted_until or identity.expires_at or (self.clock.seconds() + 3600)
        if not await self.store.record_token_id(identity.issuer, identity.token_id, remember_until):
            log.info("subject token replayed")
            raise policy.invalid_grant()

    def count(self, request: ExchangeRequest, outcome: str, error: str) -> None:
        self.metrics.count(self.metrics.exchanges, outcome, error)


@attrs.frozen
class ApiKeyGrant:
    """An API key for one of the configured profiles (the M-Lab contract)."""

    validator: Validator
    profiles: Mapping[str, ApiKeyProfile]
    metrics: Metrics
    audiences: tuple[str, ...] = ()
    takes_actor: bool = False
    validator_name: str = "api-key"

    def check_target(self, request: ExchangeRequest) -> None:
        # Before the key is looked at: an unknown profile is the answer
        # whatever the key, and never becomes a metric label.
        if request.resource not in self.profiles:
            raise policy.invalid_target("unknown API-key profile")

    async def terms(self, subject: Identity, actor: Optional[Identity], request: ExchangeRequest) -> Terms:
        # A key of an integration bound to other profiles is refused as any bad key is:
        # M-Lab kept each profile's keys in a namespace of its own.
        if not bound_to(subject, request.resource):
            raise policy.invalid_grant()
        profile = self.profiles[request.resource]
        return policy.api_key_terms(profile.audience, profile.ttl_secs, subject, profile.issuer, profile.claims)

    def count(self, request: ExchangeRequest, outcome: str, error: str) -> None:
        self.metrics.count(self.metrics.apikey_exchanges, request.resource, outcome)


@attrs.define
class Exchange:
    """Decides exchanges and issues the tokens, whatever the credential."""

    mappings: MappingGrant
    signing: Signing
    issuer: str
    participant_context_claim: str
    clock: IReactorTime
    metrics: Metrics
    limiter: RateLimiter
    api_keys: Optional[ApiKeyGrant] = None
    make_token_id: Callable[[], str] = new_token_id

    def grant_for(self, request: ExchangeRequest) -> Grant:
        if not request.is_api_key:
            return self.mappings
        if self.api_keys is None:
            raise policy.invalid_request("unsupported subject_token_type")
        return self.api_keys

    async def exchange(self, request: ExchangeRequest) -> IssuedToken:
        """The whole decision for a request from ``POST /token`` or ``/v0/token``."""
        grant = self.grant_for(request)
        grant.check_target(request)
        started = self.clock.seconds()
        client: Optional[str] = None
        try:
            subject = await self.validate(grant, request.subject_token)
            client = subject.username
            tracing.current().annotate(tracing.CLIENT_ATTRIBUTE, client)
            actor = None
            if request.actor_token is not None and grant.takes_actor:
                actor = await self.validate(grant, request.actor_token)
            # Spent only once the credentials validated, so that a flood of
            # rejected ones never uses up the budget of valid clients.
            self.limit(self.limiter.check_global())
        except FAILURES as error:
            self.refused(grant, client, request, error)
            raise
        try:
            return await self.issue(grant, subject, request, actor)
        finally:
            self.metrics.exchange_duration.observe(max(0.0, self.clock.seconds() - started))

    async def issue_for(self, subject: Identity, request: ExchangeRequest) -> IssuedToken:
        """
        A resource mapping's token for an identity already validated (by the
        ext_authz front, which has its own validator).
        """
        return await self.issue(self.mappings, subject, request)

    async def validate(self, grant: Grant, token: str) -> Identity:
        """Step 1, for subject and actor credentials alike."""
        started = self.clock.seconds()
        try:
            with tracing.current().span("validate", {tracing.VALIDATOR_ATTRIBUTE: grant.validator_name}):
                return (await validate_for_any(grant.validator, token, grant.audiences)).identity
        except TokenRejected as error:
            log.info("token rejected: {reason}", reason=str(error))
            raise policy.invalid_grant() from None
        finally:
            self.metrics.validator_duration.observe(max(0.0, self.clock.seconds() - started))

    async def issue(
        self, grant: Grant, subject: Identity, request: ExchangeRequest, actor: Optional[Identity] = None
    ) -> IssuedToken:
        """Steps 2 to 5: resolve, check, claims, sign."""
        client = subject.username
        try:
            self.limit(self.limiter.check(client))
            terms = await grant.terms(subject, actor, request)
            token_id = self.make_token_id()
            claims = policy.token_claims(
                self.issuer, self.participant_context_claim, terms, int(self.clock.seconds()), token_id)
            token = await self.signing.sign(claims)
        except FAILURES as error:
            self.refused(grant, client, request, error)
            raise
        grant.count(request, "issued", "")
        tracing.current().annotate(tracing.OUTCOME_ATTRIBUTE, "issued")
        emit(
            log, "token.issued", LogLevel.info,
            client=client, resource=request.resource, scopes=list(terms.scopes),
            audience=terms.audience, jti=token_id,
        )
        return IssuedToken(
            access_token=token,
            expires_in=terms.ttl_secs,
            scope=policy.granted_scope(terms.scopes),
        )

    def limit(self, retry_after: Optional[int]) -> None:
        if retry_after is not None:
            raise RateLimited(retry_after)

    def refused(self, grant: Grant, client: Optional[str], request: ExchangeRequest, error: Failure) -> None:
        code = failure_code(error)
        grant.count(request, "refused", code)
        tracing.current().annotate(tracing.OUTCOME_ATTRIBUTE, code)
        # A refusal by a mapping's rule says which rule, in this one event.
        detail = error.log_fields if isinstance(error, Refusal) else {}
        emit(
            log, "token.refused", LogLevel.info,
            client=client, resource=request.resource[:LOGGED_TEXT], scopes=_as_sent(request.scopes),
            audience=_as_sent(request.audiences), error=code, **detail,
        )


#: Of what a client asked for, a refusal's line keeps this much: the request
#: may come before any credential was checked, and fill a 64 KiB body.
LOGGED_TEXT = 256
LOGGED_ITEMS = 16


def _as_sent(values: Sequence[str]) -> list[str]:
    return [value[:LOGGED_TEXT] for value in values[:LOGGED_ITEMS]]


def build_exchange(
    config: Config,
    store: Store,
    signer: Signer,
    validator: Validator,
    clock: IReactorTime,
    metrics: Metrics,
) -> Exchange:
    """The exchange the config describes, over built providers; API keys only when ``api_keys`` is set."""
    api_keys = None
    if config.api_keys is not None:
        api_keys = ApiKeyGrant(
            validator=adapt("validator", ApiKeyValidator(ApiKeyVerifier(store, config.api_keys.prefix))),
            profiles=config.api_keys.profiles,
            metrics=metrics,
        )
    return Exchange(
        mappings=MappingGrant(
            validator=validator,
            store=store,
            parameters=IssueParameters(
                issuer=config.issuer,
                participant_context_claim=config.token.participant_context_claim,
                ttl_secs=config.token.token_ttl_secs,
            ),
            client_audience=config.token.client_audience,
            default_audience=config.token.audience,
            reject_replays=config.token.reject_replayed_subject_tokens,
            clock=clock,
            metrics=metrics,
            validator_name=config.validator.type,
        ),
        signing=Signing(signer, clock, metrics, name=config.signer.type),
        issuer=config.issuer,
        participant_context_claim=config.token.participant_context_claim,
        clock=clock,
        metrics=metrics,
        limiter=RateLimiter(clock, config.rate_limits.per_client_per_sec, config.rate_limits.global_per_sec),
        api_keys=api_keys,
    )
