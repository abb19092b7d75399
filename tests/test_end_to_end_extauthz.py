"""
The daemon with its ext_authz front on: HTTP mode under /ext_authz/ on the
token port and gRPC mode on its own port, against fake workload and target
clusters; and the jwt exchange through the same front.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import jwt as pyjwt
import pytest
import pytest_twisted
import treq
import yaml
from k8s_fixtures import Cluster, start_cluster, stopping
from twisted.internet.threads import deferToThread

from jwtlet.extauthz.envoy_api import envoy_service_auth_v3_external_auth_pb2_grpc as external_auth_pb2_grpc
from jwtlet.testing.envoy import check_request, http_check
from jwtlet.testing.process import DaemonProcess, free_port

pytestmark = pytest.mark.slow
AUDIENCE = "https://workload-cluster"


@pytest_twisted.async_yield_fixture
async def clusters() -> AsyncIterator[tuple[Cluster, Cluster]]:
    async for workload in stopping(await start_cluster()):
        async for target in stopping(await start_cluster()):
            workload.fake.add_service_account("apps", "web")
            target.fake.add_service_account("apps", "web")
            yield workload, target


def write_config(tmp_path: Path, workload: Cluster, target: Cluster, exchange: str, grpc_port: int) -> Path:
    own = tmp_path / "own-token"
    own.write_text("jwtlet-own-token")
    config: dict[str, Any] = {
        "issuer": "http://127.0.0.1:8080",
        "storage_backend": {"type": "memory"},
        "k8s": {"api_server_url": workload.url, "token_file": str(own), "cluster_issuer": workload.fake.issuer},
        "validator": {"type": "kubernetes-tokenreview"},
        "token": {"client_audience": AUDIENCE, "audience": "mgmt-api"},
        "signer": {"type": "local-key", "key_file": str(tmp_path / "k.jwk"), "generate": True},
        "ext_authz": {
            "grpc_endpoint": f"tcp:{grpc_port}",  # binds loopback by default (the sidecar model)
            "http": True,
            "validator": {"type": "kubernetes-tokenreview", "api_server_url": workload.url, "token_file": str(own)},
            "audience": AUDIENCE,
            "exchange": exchange,
            "target_cluster": {"api_server_url": target.url, "token_file": str(own)},
        },
    }
    if exchange == "jwt":
        del config["ext_authz"]["target_cluster"]
    path = tmp_path / "jwtlet.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest_twisted.ensureDeferred
async def test_tokenrequest_exchange_in_both_modes(tmp_path: Path, clusters: tuple[Cluster, Cluster]) -> None:
    workload, target = clusters
    grpc_port = free_port()
    daemon = DaemonProcess.start(["--config", str(write_config(tmp_path, workload, target,
                                                               "kubernetes-tokenrequest", grpc_port))],
                                 cwd=tmp_path)
    try:
        await deferToThread(daemon.wait_listening)
        token = workload.fake.mint("apps", "web", [AUDIENCE])
        outcome = await http_check(treq, daemon.token_url, "GET", "/api/v1/pods",
                                   {"authorization": f"Bearer {token}", "host": "mgmt:6443"})
        assert outcome.allowed, outcome
        swapped = outcome.upstream_headers["authorization"].split(" ", 1)[1]
        assert target.fake.review(swapped, None)["user"]["username"] == "system:serviceaccount:apps:web"

        def grpc_check() -> Any:
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                grpc.channel_ready_future(channel).result(timeout=10)
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                return stub.Check(check_request({"authorization": f"Bearer {token}"}), timeout=10)

        answer = await deferToThread(grpc_check)
        assert answer.status.code == 0
        assert answer.ok_response.headers[0].header.value == f"Bearer {swapped}", "served from the cache"
        assert target.fake.requests["tokenrequests"] == 1
    finally:
        code = await deferToThread(daemon.stop, signal.SIGTERM)
    assert code in (0, -signal.SIGTERM)


@pytest_twisted.ensureDeferred
async def test_jwt_exchange_through_the_front(tmp_path: Path, clusters: tuple[Cluster, Cluster]) -> None:
    workload, target = clusters
    daemon = DaemonProcess.start(["--config", str(write_config(tmp_path, workload, target, "jwt", free_port()))],
                                 cwd=tmp_path,
                                 env={"JWTLET__SERVICE_ACCOUNTS__SYSTEM:SERVICEACCOUNT:APPS:WEB": "[management:write]"})
    try:
        await deferToThread(daemon.wait_listening)
        token = workload.fake.mint("apps", "web", [AUDIENCE])
        admin = workload.fake.mint("apps", "web", [AUDIENCE])
        response = await treq.post(f"{daemon.management_url}/api/v1/mappings",
                                   headers={"Authorization": f"Bearer {admin}"},
                                   json={"clientIdentifier": "system:serviceaccount:apps:web",
                                         "participantContext": "ctx-1", "scopes": []})
        assert response.code == 201, await response.content()
        headers = {"authorization": f"Bearer {token}", "x-jwtlet-resource": "ctx-1"}
        outcome = await http_check(treq, daemon.token_url, "GET", "/x", headers,
                                   allowed_headers=["x-jwtlet-resource"])
        assert outcome.allowed
        claims = pyjwt.decode(outcome.upstream_headers["authorization"].split(" ", 1)[1],
                              options={"verify_signature": False})
        assert (claims["sub"], claims["aud"]) == ("ctx-1", "mgmt-api")
        refused = await http_check(treq, daemon.token_url, "GET", "/x",
                                   {"authorization": f"Bearer {token}", "x-jwtlet-resource": "ctx-2"},
                                   allowed_headers=["x-jwtlet-resource"])
        assert (refused.allowed, refused.status) == (False, 403)
    finally:
        code = await deferToThread(daemon.stop, signal.SIGTERM)
    assert code in (0, -signal.SIGTERM)
