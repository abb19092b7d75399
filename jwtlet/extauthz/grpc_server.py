"""
Envoy ext_authz gRPC mode: ``envoy.service.auth.v3.Authorization/Check`` and
``grpc.health.v1.Health``, served by grpcio on its own listener.

Why a thread bridge rather than ``grpc.aio``: the daemon runs on Twisted's
default reactor (``grpc.aio`` would need the asyncio reactor for the whole
process, stores and HTTP clients included).  grpcio's synchronous server
runs each RPC on a worker thread, which hands the decision to the reactor
with ``blockingCallFromThread`` and only waits; the reactor never blocks.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import grpc
from google.rpc import code_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import blockingCallFromThread, deferToThread

from jwtlet import tracing
from jwtlet.extauthz.decide import Decision, ExtAuthz, failed
from jwtlet.extauthz.envoy_api import envoy_config_core_v3_base_pb2 as base_pb2
from jwtlet.extauthz.envoy_api import envoy_service_auth_v3_external_auth_pb2 as external_auth_pb2
from jwtlet.extauthz.envoy_api import envoy_service_auth_v3_external_auth_pb2_grpc as external_auth_pb2_grpc
from jwtlet.extauthz.envoy_api import envoy_type_v3_http_status_pb2 as http_status_pb2
from jwtlet.interfaces import DependencyUnavailable, PluginConfigError

AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"
LOOPBACK = "127.0.0.1"
_TCP = re.compile(r"^tcp:(?P<port>\d+)(?::interface=(?P<interface>[^:]+))?$")


def grpc_address(description: str) -> str:
    """
    A Twisted ``tcp:PORT[:interface=ADDR]`` description as grpcio's
    ``ADDR:PORT``.  Without ``interface=`` the listener binds loopback, not
    Twisted's all-interfaces default: Envoy runs beside jwtlet in the pod
    (the sidecar model), and nobody else should reach the check.
    """
    match = _TCP.match(description)
    if match is None:
        raise PluginConfigError(
            f"ext_authz.grpc_endpoint: {description!r} is not supported (use tcp:PORT[:interface=ADDR])")
    interface = match.group("interface") or LOOPBACK
    return f"{interface}:{match.group('port')}"


def check_response(decision: Decision) -> external_auth_pb2.CheckResponse:
    response = external_auth_pb2.CheckResponse()
    if decision.allowed:
        response.status.code = code_pb2.OK
        option = response.ok_response.headers.add()
        option.header.key = "authorization"
        option.header.value = f"Bearer {decision.token}"
        option.append_action = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        return response
    unauthenticated = decision.status == 401
    response.status.code = code_pb2.UNAUTHENTICATED if unauthenticated else code_pb2.PERMISSION_DENIED
    response.denied_response.status.code = (
        http_status_pb2.Unauthorized if unauthenticated else http_status_pb2.Forbidden)
    response.denied_response.body = json.dumps({"error": "unauthorized" if unauthenticated else "forbidden"})
    return response


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, decider: ExtAuthz, reactor: IReactorFromThreads):
        self.decider = decider
        self.reactor = reactor

    def Check(  # noqa: N802 - gRPC name
        self, request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        http = request.attributes.request.http
        headers = {name.lower(): value for name, value in http.headers.items()}
        extensions = dict(request.attributes.context_extensions)
        # Envoy's gRPC metadata carries the mesh's traceparent: the check joins its trace.
        span = tracing.current().server_span(CHECK_SPAN, CHECK_ATTRIBUTES, metadata_of(context))

        def decide() -> Deferred[Decision]:
            # On the reactor thread: the check's coroutine starts inside the span.
            with span.activate():
                return ensureDeferred(self.decider.check(headers, "grpc", extensions))

        try:
            decision: Decision = blockingCallFromThread(self.reactor, decide)  # type: ignore[arg-type]
        except DependencyUnavailable as error:
            span.failed(error)
            span.end()
            # An RPC error, not a CheckResponse: Envoy applies its failure policy.
            context.abort(grpc.StatusCode.UNAVAILABLE, "a dependency is unavailable")
        except Exception as error:
            # ExtAuthz.check denies its own failures; this is the bridge to the
            # reactor failing (the daemon stopping).  grpcio would answer
            # UNKNOWN with the exception's text: a deny instead.
            decision = failed(error, "grpc")
        span.end()
        return check_response(decision)


CHECK_SPAN = f"{AUTHORIZATION_SERVICE}/Check"
CHECK_ATTRIBUTES: tracing.Attributes = {
    "rpc.system": "grpc", "rpc.service": AUTHORIZATION_SERVICE, "rpc.method": "Check"}


def metadata_of(context: grpc.ServicerContext) -> tracing.HeaderLookup:
    """A call's gRPC metadata as a header lookup, read only if a tracer asks."""

    def header(name: str) -> Optional[str]:
        for key, value in context.invocation_metadata() or ():
            if key == name and isinstance(value, str):
                return value
        return None

    return header


class GrpcService(Service):
    """The gRPC listener, started and stopped with the daemon."""

    def __init__(self, decider: ExtAuthz, description: str, reactor: IReactorFromThreads, workers: int = 8):
        self.address = grpc_address(description)
        self.decider = decider
        self.reactor = reactor
        self.workers = workers
        self.server: Optional[grpc.Server] = None
        self.port: Optional[int] = None

    def startService(self) -> None:
        Service.startService(self)
        server = grpc.server(ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="jwtlet-grpc"))
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
            AuthorizationServicer(self.decider, self.reactor), server)
        checker = health.HealthServicer()
        for service in ("", AUTHORIZATION_SERVICE):
            checker.set(service, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checker, server)
        self.port = server.add_insecure_port(self.address)
        server.start()
        self.server = server

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        server, self.server = self.server, None
        if server is None:
            return succeed(None)
        stopped = server.stop(grace=5)
        return deferToThread(stopped.wait, 10).addCallback(lambda _: None)
