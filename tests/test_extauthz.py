"""
The ext_authz front over real sockets: HTTP mode with an Envoy-like client,
gRPC mode with grpcio's AuthorizationStub, against a fake workload cluster
(TokenReview) and a fake target cluster (TokenRequest).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import pytest
import pytest_twisted
from grpc_health.v1 import health_pb2, health_pb2_grpc
from k8s_fixtures import Cluster, plugin_context, start_cluster, stopping
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from jwtlet.extauthz.decide import ExtAuthz, JwtExchange, TokenRequestExchange
from jwtlet.extauthz.envoy_api import envoy_service_auth_v3_external_auth_pb2_grpc as external_auth_pb2_grpc
from jwtlet.extauthz.grpc_server import GrpcService, grpc_address
from jwtlet.extauthz.http_front import ExtAuthzHTTP
from jwtlet.interfaces import PluginConfigError
from jwtlet.kubernetes.tokenrequest import TokenRequestClient
from jwtlet.metrics import Metrics
from jwtlet.model import Identity
from jwtlet.outbound import TokenFile, build_http_client, close_http_client
from jwtlet.plugins.kubernetes_tokenreview import kubernetes_tokenreview
from jwtlet.providers import adapt
from jwtlet.testing.envoy import check_request, http_check
from jwtlet.testing.loopback import serve

AUDIENCE = "https://workload-cluster"


class Front:
    def __init__(self, workload: Cluster, target: Cluster, clock: Any, tmp_path: Path):
        self.workload, self.target = workload, target
        self.metrics = Metrics()
        validator = adapt("validator", kubernetes_tokenreview.build({}, plugin_context(tmp_path, workload, clock)))
        own = tmp_path / "target-token"
        own.write_text("jwtlet-own-token")
        self.client = TokenRequestClient(target.url, TokenFile(own), target.client, clock,
                                         ("https://kubernetes.default.svc",), 3600)
        self.decider = ExtAuthz(validator, AUDIENCE, TokenRequestExchange(self.client, self.metrics),
                                "x-jwtlet-resource", self.metrics)


@pytest_twisted.async_yield_fixture
async def front(tmp_path: Path, clock: Clock) -> AsyncIterator[Front]:
    async for workload in stopping(await start_cluster(clock)):
        async for target in stopping(await start_cluster(clock)):
            workload.fake.add_service_account("apps", "web")
            workload.fake.add_service_account("apps", "ghost")
            target.fake.add_service_account("apps", "web")
            yield Front(workload, target, clock, tmp_path)


@pytest_twisted.async_yield_fixture
async def http_front(front: Front) -> AsyncIterator[Any]:
    server = await serve(reactor, ExtAuthzHTTP(front.decider).app.resource())
    client = build_http_client(reactor)
    try:
        yield front, server.url, client
    finally:
        await close_http_client(client)
        await server.stop()


def bearer(front: Front, name: str = "web") -> dict[str, str]:
    return {"authorization": f"Bearer {front.workload.fake.mint('apps', name, [AUDIENCE])}", "host": "mgmt:6443"}


@pytest_twisted.ensureDeferred
async def test_http_mode_allows_with_a_target_cluster_token(http_front: Any) -> None:
    front, url, client = http_front
    outcome = await http_check(client, url, "GET", "/api/v1/namespaces", bearer(front))
    assert outcome.allowed and outcome.status == 200
    upstream = outcome.upstream_headers["authorization"]
    assert upstream.startswith("Bearer ")
    review = front.target.fake.review(upstream.split(" ", 1)[1], ["https://kubernetes.default.svc"])
    assert review["user"]["username"] == "system:serviceaccount:apps:web", "valid in the target cluster"
    again = await http_check(client, url, "GET", "/api/v1/pods", bearer(front))
    assert again.upstream_headers["authorization"] == upstream
    assert front.target.fake.requests["tokenrequests"] == 1, "the second call hit the cache"
    assert 'jwtlet_ext_authz_cache_hits_total 1.0' in front.metrics.exposition().decode()


@pytest_twisted.ensureDeferred
async def test_http_mode_denials(http_front: Any) -> None:
    front, url, client = http_front
    for headers in ({}, {"authorization": "Basic abc"}, {"authorization": "Bearer "},
                    {"authorization": "Bearer not-a-token"}):
        outcome = await http_check(client, url, "GET", "/x", headers)
        assert (outcome.allowed, outcome.status) == (False, 401), headers
        assert json.loads(outcome.body) == {"error": "unauthorized"}
    missing = await http_check(client, url, "GET", "/x", bearer(front, "ghost"))
    assert (missing.allowed, missing.status) == (False, 403)


@pytest_twisted.ensureDeferred
async def test_http_mode_target_down_is_an_error_never_an_allow(http_front: Any) -> None:
    front, url, client = http_front
    front.target.fake.failure_status = 503
    outcome = await http_check(client, url, "GET", "/x", bearer(front))
    assert (outcome.allowed, outcome.status) == (False, 403), "Envoy's status_on_error, not an allow"
    response = await client.get(url + "/ext_authz/x", headers={"authorization": bearer(front)["authorization"]})
    assert response.code == 503 and response.headers.getRawHeaders("retry-after") == ["5"]
    await response.content()


@pytest_twisted.ensureDeferred
async def test_expiry_refresh_with_an_injected_clock(front: Front, clock: Clock) -> None:
    await front.decider.check(bearer(front), "http")
    clock.advance(3600 - 400)  # still more than a tenth of the lifetime left
    await front.decider.check(bearer(front), "http")
    assert front.target.fake.requests["tokenrequests"] == 1
    clock.advance(100)  # within the refresh margin: a new TokenRequest
    await front.decider.check(bearer(front), "http")
    assert front.target.fake.requests["tokenrequests"] == 2


@pytest_twisted.async_yield_fixture
async def grpc_front(front: Front) -> AsyncIterator[Any]:
    service = GrpcService(front.decider, "tcp:0:interface=127.0.0.1", reactor)
    service.startService()
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        yield front, channel
    finally:
        channel.close()
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_grpc_mode(grpc_front: Any) -> None:
    front, channel = grpc_front
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)

    def check(headers: dict[str, str]) -> Any:
        return stub.Check(check_request(headers), timeout=10)

    allowed = await deferToThread(check, {"authorization": bearer(front)["authorization"]})
    assert allowed.status.code == 0
    (option,) = allowed.ok_response.headers
    assert option.header.key == "authorization" and option.header.value.startswith("Bearer ")
    missing = await deferToThread(check, {})
    assert (missing.status.code, missing.denied_response.status.code) == (16, 401)
    ghost = await deferToThread(check, {"authorization": bearer(front, "ghost")["authorization"]})
    assert (ghost.status.code, ghost.denied_response.status.code) == (7, 403)
    front.target.fake.failure_status = 500
    front.workload.fake.add_service_account("apps", "api")  # not cached: the target must be asked
    with pytest.raises(grpc.RpcError) as raised:
        await deferToThread(check, {"authorization": bearer(front, "api")["authorization"]})
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, "an RPC error, never a CheckResponse"

    def health_check() -> Any:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)

    assert (await deferToThread(health_check)).status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_binds_loopback_unless_told_otherwise() -> None:
    """The sidecar model: Envoy beside jwtlet in the pod is the only one who needs the check."""
    assert grpc_address("tcp:9001") == "127.0.0.1:9001"
    assert grpc_address("tcp:9001:interface=0.0.0.0") == "0.0.0.0:9001"
    assert grpc_address("tcp:9001:interface=127.0.0.1") == "127.0.0.1:9001"
    with pytest.raises(PluginConfigError):
        grpc_address("unix:/run/jwtlet.sock")


def test_jwt_exchange_needs_a_participant_context() -> None:
    exchange = JwtExchange(pipeline=None)  # type: ignore[arg-type]
    result: list[Any] = []
    from twisted.internet.defer import ensureDeferred

    caller = Identity(username="system:serviceaccount:apps:web", issuer="https://workload-cluster")
    ensureDeferred(exchange.exchange(caller, None)).addBoth(result.append)
    assert (result[0].allowed, result[0].status) == (False, 403)


@pytest_twisted.ensureDeferred
async def test_tokenrequest_cache_is_per_issuer(front: Front) -> None:
    """Two clusters' accounts with the same UID (or name) never share a cached target token."""
    first, cached = await front.client.token_for("https://cluster-a", "apps", "web", "uid-1")
    assert not cached
    again, cached = await front.client.token_for("https://cluster-a", "apps", "web", "uid-1")
    assert cached and again == first
    other, cached = await front.client.token_for("https://cluster-b", "apps", "web", "uid-1")
    assert not cached, "another issuer's account is another cache entry"
    assert front.target.fake.requests["tokenrequests"] == 2
