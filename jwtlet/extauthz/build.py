"""
Assembling the ext_authz front from the config: its own validator, the
exchanger the config names, and the transports that are on.  The wiring
calls this; the decision (:mod:`.decide`) knows neither transport.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, cast

import attrs
from twisted.internet.interfaces import IReactorFromThreads, IReactorProcess
from twisted.web.resource import IResource

from jwtlet.config import Config, ExtAuthzConfig, TargetCluster
from jwtlet.discovery import Discovered, build
from jwtlet.exchange.pipeline import Exchange
from jwtlet.extauthz.decide import Exchanger, ExtAuthz, JwtExchange, TokenRequestExchange
from jwtlet.extauthz.http_front import ExtAuthzHTTP
from jwtlet.extauthz.trust import source_issuers
from jwtlet.interfaces import ITrustedIssuers, PluginConfigError, PluginContext
from jwtlet.kubernetes import kubeconfig
from jwtlet.kubernetes.tokenrequest import TokenRequestClient
from jwtlet.metrics import Metrics
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


def target_cluster(target: TargetCluster, context: PluginContext) -> kubeconfig.Cluster:
    """
    The target cluster's server and jwtlet's credential there: the table's
    keys, then its kubeconfig, then in-cluster (never the ``k8s`` table: that
    is the cluster whose tokens are checked).
    """
    try:
        return kubeconfig.resolve((target.access, kubeconfig.IN_CLUSTER),
                                  cast(IReactorProcess, context.reactor), context.clock)
    except kubeconfig.KubeconfigError as error:
        raise PluginConfigError(f"ext_authz.target_cluster.kubeconfig: {error}") from None


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
        cluster = target_cluster(target, context)
        assert cluster.url is not None  # the schema requires api_server_url unless a kubeconfig names the server
        exchanger = TokenRequestExchange(
            TokenRequestClient(
                api_server_url=cluster.url,
                own_token=cluster.credential,
                http_client=kubeconfig.http_client(context.reactor, cluster.tls),
                clock=context.clock,
                audiences=target.audiences,
                expiration_secs=target.expiration_secs,
            ),
            metrics,
            source_issuers(settings, ITrustedIssuers(validator.provider, None)),
        )
    else:
        exchanger = JwtExchange(exchange)
    decider = ExtAuthz(validator, settings.audience, exchanger, settings.resource_header, metrics,
                       validator_name=settings.validator.type)
    http_resource = ExtAuthzHTTP(decider).app.resource() if settings.http else None
    grpc_service = None
    if settings.grpc_endpoint:
        from jwtlet.extauthz.grpc_server import GrpcService  # grpcio loads only when the gRPC front is on

        # The daemon's reactor runs threads; PluginContext types only its timers.
        grpc_service = GrpcService(decider, settings.grpc_endpoint, cast(IReactorFromThreads, context.reactor))
    return ExtAuthzParts(decider, http_resource, grpc_service)
