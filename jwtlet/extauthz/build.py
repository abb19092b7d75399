"""
Assembling the ext_authz front from the config: its own validator, the
exchanger the config names, and the transports that are on.  The wiring
calls this; the decision (:mod:`.decide`) knows neither transport.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, cast

import attrs
from twisted.internet.interfaces import IReactorFromThreads
from twisted.web.resource import IResource

from jwtlet.config import Config, ExtAuthzConfig
from jwtlet.discovery import Discovered, build
from jwtlet.exchange.pipeline import Exchange
from jwtlet.extauthz.decide import Exchanger, ExtAuthz, JwtExchange, TokenRequestExchange
from jwtlet.extauthz.http_front import ExtAuthzHTTP
from jwtlet.interfaces import PluginContext
from jwtlet.kubernetes.tokenrequest import TokenRequestClient
from jwtlet.metrics import Metrics
from jwtlet.outbound import TokenFile, build_http_client
from jwtlet.providers import Validator

if TYPE_CHECKING:  # grpcio is imported only when the gRPC front is on (see build_ext_authz)
    from jwtlet.extauthz.grpc_server import GrpcService


@attrs.frozen
class ExtAuthzParts:
    """What the daemon mounts: the decision, and the HTTP resource / gRPC service when on."""

    decider: ExtAuthz
    http_resource: Optional[IResource]
    grpc_service: Optional[GrpcService]


def build_ext_authz_validator(settings: ExtAuthzConfig, discovered: Discovered, context: PluginContext) -> Validator:
    """The front's own validator; option problems raise ``PluginConfigError`` naming ``ext_authz.validator``."""
    section = attrs.evolve(settings.validator, section="ext_authz.validator")
    return build(discovered, "validator", section, context)


def build_ext_authz(
    config: Config, discovered: Discovered, context: PluginContext, exchange: Exchange, metrics: Metrics
) -> ExtAuthzParts:
    settings = config.ext_authz
    assert settings is not None
    validator = build_ext_authz_validator(settings, discovered, context)
    exchanger: Exchanger
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
        exchanger = JwtExchange(exchange)
    decider = ExtAuthz(validator, settings.audience, exchanger, settings.resource_header, metrics)
    http_resource = ExtAuthzHTTP(decider).app.resource() if settings.http else None
    grpc_service = None
    if settings.grpc_endpoint:
        from jwtlet.extauthz.grpc_server import GrpcService  # grpcio loads only when the gRPC front is on

        # The daemon's reactor runs threads; PluginContext types only its timers.
        grpc_service = GrpcService(decider, settings.grpc_endpoint, cast(IReactorFromThreads, context.reactor))
    return ExtAuthzParts(decider, http_resource, grpc_service)
