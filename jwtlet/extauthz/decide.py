"""
The Envoy ext_authz front, independent of transport: check the workload's
``authorization`` header, then swap its token for one valid in the target
cluster (``kubernetes-tokenrequest``) or for a jwtlet-signed JWT (``jwt``).
Dependencies down raise :class:`DependencyUnavailable`: the transports turn
that into 503 / UNAVAILABLE, never into an allow.  Nothing else ever leaves
:meth:`ExtAuthz.check` as an error: Envoy applies ``failure_mode_allow`` to
errors, so a credential that makes something fail must still be a deny.
"""

from __future__ import annotations

import traceback
from typing import Any, Mapping, Optional

import attrs
from twisted.logger import Logger, LogLevel

from jwtlet._async import as_deferred
from jwtlet.config.schema import Config, ExtAuthzConfig
from jwtlet.discovery import Discovered, build
from jwtlet.exchange.pipeline import TokenIssuer
from jwtlet.interfaces import DependencyUnavailable, PluginContext, TokenRejected
from jwtlet.kubernetes.tokenrequest import Denied, TokenRequestClient
from jwtlet.logs import emit
from jwtlet.metrics import Metrics
from jwtlet.model import Identity
from jwtlet.outbound import TokenFile, build_http_client
from jwtlet.policy import ExchangeError, TokenRequest
from jwtlet.web.management_api import bearer_token

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
            issued, cached = await self.client.token_for(
                identity.issuer, identity.namespace, identity.name, identity.uid)
        except Denied:
            return Decision.deny(403, "no such service account in the target cluster")
        if cached:
            self.metrics.ext_authz_cache_hits.inc()
        return Decision.allow(issued.token)


@attrs.define
class JwtExchange:
    issuer: TokenIssuer

    async def exchange(self, identity: Identity, resource: Optional[str]) -> Decision:
        if not resource:
            return Decision.deny(403, "no participant context requested")
        request = TokenRequest(subject_token="", subject_token_type=None, resource=resource)
        try:
            issued = await self.issuer.issue_for(identity, request)
        except ExchangeError as refusal:
            if refusal.status == 503:
                raise DependencyUnavailable(refusal.description, refusal.retry_after or 5) from None
            return Decision.deny(403, refusal.code)
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
    validator: Any
    audience: Optional[str]
    exchanger: Any
    resource_header: str
    metrics: Metrics

    async def check(self, headers: Mapping[str, str], mode: str,
                    context_extensions: Optional[Mapping[str, str]] = None) -> Decision:
        """``headers`` with lower-cased names, as Envoy sends them."""
        try:
            decision = await self._decide(headers, context_extensions or {})
        except DependencyUnavailable:
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
            identity = await as_deferred(self.validator.validate(token, self.audience))
        except TokenRejected as error:
            log.info("ext_authz token rejected: {reason}", reason=str(error))
            return Decision.deny(401, "token rejected")
        resource = extensions.get("resource") or headers.get(self.resource_header)
        decision: Decision = await self.exchanger.exchange(identity, resource)
        return decision


@attrs.frozen
class ExtAuthzParts:
    """What the daemon mounts: the decision, and the HTTP resource / gRPC service when on."""

    decider: ExtAuthz
    http_resource: Any
    grpc_service: Any


def build_ext_authz_validator(settings: ExtAuthzConfig, discovered: Discovered, context: PluginContext) -> Any:
    """The front's own validator; option problems raise ``PluginConfigError`` naming ``ext_authz.validator``."""
    section = attrs.evolve(settings.validator, section="ext_authz.validator")
    return build(discovered, "validator", section, context)


def build_ext_authz(
    config: Config, discovered: Discovered, context: PluginContext, issuer: TokenIssuer, metrics: Metrics
) -> ExtAuthzParts:
    from jwtlet.extauthz.grpc_server import GrpcService
    from jwtlet.extauthz.http_front import ExtAuthzHTTP

    settings = config.ext_authz
    assert settings is not None
    validator = build_ext_authz_validator(settings, discovered, context)
    exchanger: Any
    if settings.exchange == "kubernetes-tokenrequest":
        target = settings.target_cluster
        assert target is not None
        exchanger = TokenRequestExchange(
            TokenRequestClient(
                api_server_url=target.api_server_url,
                own_token=TokenFile(target.token_file),
                http_client=build_http_client(context.reactor, ca_file=target.ca_file),
                clock=context.clock,
                audiences=target.audiences,
                expiration_secs=target.expiration_secs,
            ),
            metrics,
            frozenset(settings.source_issuers) if settings.source_issuers is not None else None,
        )
    else:
        exchanger = JwtExchange(issuer)
    decider = ExtAuthz(validator, settings.audience, exchanger, settings.resource_header, metrics)
    http_resource = ExtAuthzHTTP(decider).app.resource() if settings.http else None
    grpc_service = (GrpcService(decider, settings.grpc_endpoint, context.reactor)
                    if settings.grpc_endpoint else None)
    return ExtAuthzParts(decider, http_resource, grpc_service)
