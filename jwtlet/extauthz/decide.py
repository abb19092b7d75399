"""
The Envoy ext_authz front, independent of transport: check the workload's
``authorization`` header, then swap its token for one valid in the target
cluster (``kubernetes-tokenrequest``) or for a jwtlet-signed JWT (``jwt``).
Dependencies down raise :class:`DependencyUnavailable`: the fronts
(:mod:`.http_front`, :mod:`.grpc_server`) turn that into 503 / UNAVAILABLE,
never into an allow.  Nothing else ever leaves
:meth:`ExtAuthz.check` as an error: Envoy applies ``failure_mode_allow`` to
errors, so a credential that makes something fail must still be a deny.
"""

from __future__ import annotations

import traceback
from typing import Mapping, Optional, Protocol

import attrs
from twisted.logger import Logger, LogLevel

from jwtlet import tracing
from jwtlet.exchange.pipeline import Exchange
from jwtlet.interfaces import DependencyUnavailable, TokenRejected
from jwtlet.kubernetes.tokenrequest import Denied, TokenRequestClient
from jwtlet.logs import emit
from jwtlet.metrics import Metrics
from jwtlet.model import Identity
from jwtlet.policy import ExchangeRequest, RateLimited, Refusal, ServerError
from jwtlet.providers import Validator
from jwtlet.web.requests import bearer_token

log = Logger(namespace="jwtlet.ext_authz")


@attrs.frozen
class Decision:
    allowed: bool
    status: int
    token: Optional[str] = attrs.field(default=None, repr=False)
    reason: str = ""

    @classmethod
    def allow(cls, token: str) -> Decision:
        return cls(True, 200, token)

    @classmethod
    def deny(cls, status: int, reason: str) -> Decision:
        return cls(False, status, None, reason)


def from_source_cluster(identity: Identity, source_issuers: Optional[frozenset[str]]) -> bool:
    """
    Whether ``identity`` may be mapped to the same namespace and name in the
    target cluster: ``system:serviceaccount:apps:web`` of another trusted
    cluster is somebody else (security.md).  ``None``: the validator trusts
    one issuer only (the config requires the list otherwise).
    """
    return source_issuers is None or identity.issuer in source_issuers


class Exchanger(Protocol):
    """Swaps a checked identity's token for the one the upstream accepts."""

    async def exchange(self, identity: Identity, resource: Optional[str]) -> Decision:
        """The decision for ``identity`` asking for ``resource`` (a participant context, if any)."""


@attrs.define
class TokenRequestExchange:
    client: TokenRequestClient
    metrics: Metrics
    source_issuers: Optional[frozenset[str]] = None

    async def exchange(self, identity: Identity, resource: Optional[str]) -> Decision:
        if not identity.namespace or not identity.name:
            return Decision.deny(403, "not a service account")
        if not from_source_cluster(identity, self.source_issuers):
            return Decision.deny(403, "not from a source issuer")
        try:
            with tracing.current().span("tokenrequest"):
                issued, cached = await self.client.token_for(
                    identity.issuer, identity.namespace, identity.name, identity.uid, identity.expires_at)
        except Denied:
            return Decision.deny(403, "no such service account in the target cluster")
        if cached:
            self.metrics.ext_authz_cache_hits.inc()
        return Decision.allow(issued.token)


@attrs.define
class JwtExchange:
    """A jwtlet token for the participant context asked for, from the exchange's resource mappings."""

    pipeline: Exchange

    async def exchange(self, identity: Identity, resource: Optional[str]) -> Decision:
        if not resource:
            return Decision.deny(403, "no participant context requested")
        request = ExchangeRequest(subject_token="", subject_token_type=None, resource=resource)
        try:
            issued = await self.pipeline.issue_for(identity, request)
        except Refusal as refusal:
            return Decision.deny(403, refusal.code)
        except RateLimited:
            return Decision.deny(403, "rate_limited")
        except ServerError:
            return Decision.deny(403, "server_error")
        return Decision.allow(issued.access_token)


def failed(error: Exception, mode: str) -> Decision:
    """
    A bug, or a credential nobody anticipated, made the check fail: deny
    (403), never an error Envoy could read as "allow".  The message and the
    traceback's text may quote the token, so only the type and the place
    are logged.
    """
    where = traceback.extract_tb(error.__traceback__)[-1]
    emit(log, "ext_authz.failed", LogLevel.error, mode=mode, error_type=type(error).__name__,
         where=f"{where.filename}:{where.lineno}")
    return Decision.deny(403, "internal error")


@attrs.define
class ExtAuthz:
    validator: Validator
    audience: Optional[str]
    exchanger: Exchanger
    resource_header: str
    metrics: Metrics
    #: the validator plugin's name, for traces
    validator_name: str = ""

    async def check(self, headers: Mapping[str, str], mode: str,
                    context_extensions: Optional[Mapping[str, str]] = None) -> Decision:
        """``headers`` with lower-cased names, as Envoy sends them."""
        try:
            decision = await self._decide(headers, context_extensions or {})
        except DependencyUnavailable as error:
            # Logged here, the one place for both fronts: its message names the dependency.
            log.warn("dependency unavailable: {reason}", reason=str(error))
            self.metrics.ext_authz_checks.labels(mode, "error").inc()
            raise
        except Exception as error:
            decision = failed(error, mode)
        outcome = "allowed" if decision.allowed else "denied"
        self.metrics.ext_authz_checks.labels(mode, outcome).inc()
        emit(log, f"ext_authz.{outcome}", LogLevel.info, mode=mode, status=decision.status,
             reason=decision.reason or None)
        return decision

    async def _decide(self, headers: Mapping[str, str], extensions: Mapping[str, str]) -> Decision:
        token = bearer_token((headers.get("authorization") or "").encode("latin-1", "replace"))
        if token is None:
            return Decision.deny(401, "missing or malformed bearer token")
        try:
            with tracing.current().span("validate", {tracing.VALIDATOR_ATTRIBUTE: self.validator_name}):
                identity = await self.validator.validate(token, self.audience)
        except TokenRejected as error:
            log.info("ext_authz token rejected: {reason}", reason=str(error))
            return Decision.deny(401, "token rejected")
        tracing.current().annotate(tracing.CLIENT_ATTRIBUTE, identity.username)
        resource = extensions.get("resource") or headers.get(self.resource_header)
        return await self.exchanger.exchange(identity, resource)
