"""
Attacks on the Envoy ext_authz front.  Envoy applies ``failure_mode_allow``
to errors, so a credential that makes jwtlet fail must still be a deny: 401 /
UNAUTHENTICATED for a token nobody can parse, 403 / PERMISSION_DENIED for
anything unexpected, never a 500, an HTML page or a gRPC UNKNOWN.  And with
two trusted clusters, only the source cluster's service accounts are swapped
for the same-named account of the target cluster.

The front is wired as the daemon wires it (``build_ext_authz`` over a parsed
config), with a ``kubernetes-oidc`` validator trusting clusters A and B from
static JWKS files and a fake target cluster answering TokenRequests; both
transports are served on loopback and asked by real clients (treq, grpcio).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Optional

import attrs
import grpc
import pytest
import pytest_twisted
import treq
from k8s_fixtures import Cluster, start_cluster, stopping
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs

from jwtlet import config as configuration
from jwtlet.daemon.wiring import find_problems
from jwtlet.discovery import discover
from jwtlet.extauthz.build import ExtAuthzParts, build_ext_authz
from jwtlet.extauthz.decide import ExtAuthz
from jwtlet.extauthz.envoy_api import envoy_service_auth_v3_external_auth_pb2_grpc as external_auth_pb2_grpc
from jwtlet.extauthz.grpc_server import GrpcService
from jwtlet.extauthz.http_front import ExtAuthzHTTP
from jwtlet.interfaces import PluginContext
from jwtlet.logs import to_json
from jwtlet.metrics import Metrics
from jwtlet.outbound import close_http_client
from jwtlet.testing.envoy import EnvoyOutcome, check_request, http_check
from jwtlet.testing.kubernetes import FakeKubernetes
from jwtlet.testing.loopback import serve

AUDIENCE = "https://workload-cluster"
UNAUTHENTICATED, PERMISSION_DENIED = 16, 7


@attrs.define
class Served:
    """One decider behind both transports, as Envoy reaches them."""

    http_url: str
    channel: grpc.Channel

    async def http(self, headers: Mapping[str, str]) -> EnvoyOutcome:
        return await http_check(treq, self.http_url, "GET", "/api/v1/namespaces", headers)

    async def grpc(self, headers: Mapping[str, str]) -> Any:
        stub = external_auth_pb2_grpc.AuthorizationStub(self.channel)
        return await deferToThread(stub.Check, check_request(headers), timeout=10)


async def serving(decider: ExtAuthz) -> AsyncIterator[Served]:
    server = await serve(reactor, ExtAuthzHTTP(decider).app.resource())
    service = GrpcService(decider, "tcp:0", reactor)  # the default interface: loopback
    service.startService()
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        yield Served(server.url, channel)
    finally:
        channel.close()
        await service.stopService()
        await server.stop()


@attrs.define
class Clusters:
    """Workload clusters A (the source) and B, and the target cluster."""

    a: FakeKubernetes
    b: FakeKubernetes
    target: Cluster
    tmp_path: Path

    def config(self, **ext_authz: Any) -> configuration.Config:
        own = self.tmp_path / "own-token"
        own.write_text("jwtlet-own-token")
        entries = []
        for prefix, cluster in (("a", self.a), ("b", self.b)):
            jwks = self.tmp_path / f"{prefix}.jwks.json"
            jwks.write_text(json.dumps(cluster.jwks()))
            entries.append({"issuer": cluster.issuer, "jwks_file": str(jwks), "username_prefix": f"{prefix}:"})
        validator = {"type": "kubernetes-oidc", "issuers": entries}
        section = {
            "validator": validator,
            "audience": AUDIENCE,
            "source_issuers": [self.a.issuer],
            "target_cluster": {"api_server_url": self.target.url, "token_file": str(own)},
            **ext_authz,
        }
        return configuration.parse({
            "issuer": "https://jwtlet.test",
            "storage_backend": {"type": "memory"},
            "validator": validator,
            "token": {"client_audience": AUDIENCE, "audience": "svc"},
            "signer": {"type": "local-key"},
            "ext_authz": section,
        })

    async def front(self) -> AsyncIterator[ExtAuthz]:
        """The decider the daemon would build from this config."""
        config = self.config()
        context = PluginContext(reactor=reactor, clock=reactor, http_client=None, config=config,
                                data_dir=self.tmp_path)
        parts: ExtAuthzParts = build_ext_authz(config, discover(), context, None, Metrics())  # type: ignore[arg-type]
        try:
            yield parts.decider
        finally:
            await close_http_client(parts.decider.exchanger.client.http_client)


@pytest_twisted.async_yield_fixture
async def clusters(tmp_path: Path) -> AsyncIterator[Clusters]:
    async for target in stopping(await start_cluster()):
        a = FakeKubernetes(issuer="https://cluster-a.example")
        b = FakeKubernetes(issuer="https://cluster-b.example")
        for cluster in (a, b, target.fake):
            cluster.add_service_account("apps", "web")
        yield Clusters(a, b, target, tmp_path)


@pytest_twisted.async_yield_fixture
async def served(clusters: Clusters) -> AsyncIterator[tuple[Clusters, Served]]:
    async for decider in clusters.front():
        async for both in serving(decider):
            yield clusters, both


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def nested_brackets_token(kid: str, part: str) -> str:
    """A token whose header or payload is ~11,000 nested JSON arrays (a RecursionError in a naive parser)."""
    hostile = b"[" * 11_000
    header = hostile if part == "header" else json.dumps({"alg": "RS256", "kid": kid}).encode()
    payload = hostile if part == "payload" else b"{}"
    return f"{b64(header)}.{b64(payload)}.{b64(b'x' * 256)}"


@pytest.mark.parametrize("part", ["payload", "header"])
@pytest_twisted.ensureDeferred
async def test_nested_brackets_token_is_a_401_over_http_and_unauthenticated_over_grpc(
    served: tuple[Clusters, Served], part: str
) -> None:
    """An attacker sends a token of 11,000 nested '[': a deny, never an error Envoy might let through."""
    clusters, front = served
    token = nested_brackets_token(clusters.a.keys[0].kid, part)
    outcome = await front.http(bearer(token))
    assert (outcome.allowed, outcome.status) == (False, 401)
    assert json.loads(outcome.body) == {"error": "unauthorized"}
    answer = await front.grpc(bearer(token))
    assert (answer.status.code, answer.denied_response.status.code) == (UNAUTHENTICATED, 401)
    assert clusters.target.fake.requests["tokenrequests"] == 0


class ExplodingValidator:
    """A validator with a bug a crafted credential reaches: the error quotes the token."""

    def validate(self, token: str, audience: Optional[str]) -> Any:
        raise RecursionError(f"maximum recursion depth exceeded while decoding {token}")


class ExplodingExchange:
    """An exchange with a bug on some path an identity reaches."""

    async def exchange(self, identity: Any, resource: Optional[str]) -> Any:
        raise KeyError("status")


BREAKAGES: dict[str, dict[str, Any]] = {
    "validator": {"validator": ExplodingValidator()},
    "exchange": {"exchanger": ExplodingExchange()},
}


@pytest.mark.parametrize("broken", sorted(BREAKAGES))
@pytest_twisted.ensureDeferred
async def test_an_unexpected_exception_is_a_403_and_never_leaks_the_token(clusters: Clusters, broken: str) -> None:
    """
    A credential drives the validator or the exchange into an exception
    nobody anticipated: the check is denied 403 / PERMISSION_DENIED with the
    usual JSON body (no 500, no HTML, no gRPC UNKNOWN), and the log names the
    failure without quoting the token.
    """
    token = clusters.a.mint("apps", "web", [AUDIENCE])
    async for decider in clusters.front():
        async for front in serving(attrs.evolve(decider, **BREAKAGES[broken])):
            with capturedLogs() as events:
                outcome = await front.http(bearer(token))
                answer = await front.grpc(bearer(token))
    assert (outcome.allowed, outcome.status) == (False, 403)
    assert json.loads(outcome.body) == {"error": "forbidden"}
    assert (answer.status.code, answer.denied_response.status.code) == (PERMISSION_DENIED, 403)
    failures = [event for event in events if event.get("jwtlet_event") == "ext_authz.failed"]
    assert [event["mode"] for event in failures] == ["http", "grpc"]
    assert not any(token in to_json(event) for event in events)


class BrokenBridge:
    """The decision never comes back: the reactor side fails (as when the daemon stops mid-check)."""

    async def check(self, headers: Mapping[str, str], mode: str, extensions: Any = None) -> Any:
        raise RuntimeError(f"reactor stopped with {headers['authorization']} in flight")


@pytest_twisted.ensureDeferred
async def test_a_failing_grpc_bridge_is_a_deny_never_unknown_with_the_token() -> None:
    """grpcio answers UNKNOWN with the exception's text when a handler raises: the servicer must deny instead."""
    async for front in serving(BrokenBridge()):  # type: ignore[arg-type]
        answer = await front.grpc(bearer("secret-token"))
    assert (answer.status.code, answer.denied_response.status.code) == (PERMISSION_DENIED, 403)
    assert "secret-token" not in answer.denied_response.body


@pytest_twisted.ensureDeferred
async def test_a_same_named_service_account_of_another_trusted_cluster_is_not_swapped(
    served: tuple[Clusters, Served],
) -> None:
    """
    Cluster B's apps/web asks for a token of the target cluster's apps/web:
    only cluster A (source_issuers) maps to the target, so B is denied 403
    and the target cluster is never asked.
    """
    clusters, front = served
    outsider = clusters.b.mint("apps", "web", [AUDIENCE])
    refused = await front.http(bearer(outsider))
    assert (refused.allowed, refused.status) == (False, 403)
    answer = await front.grpc(bearer(outsider))
    assert (answer.status.code, answer.denied_response.status.code) == (PERMISSION_DENIED, 403)
    assert clusters.target.fake.requests["tokenrequests"] == 0
    insider = await front.http(bearer(clusters.a.mint("apps", "web", [AUDIENCE])))
    assert insider.allowed, "the source cluster's account is swapped"
    swapped = insider.upstream_headers["authorization"].split(" ", 1)[1]
    assert clusters.target.fake.review(swapped, None)["user"]["username"] == "system:serviceaccount:apps:web"


@pytest_twisted.ensureDeferred
async def test_a_token_minted_for_another_relying_party_is_not_swapped(served: tuple[Clusters, Served]) -> None:
    """A workload presents its Vault token (aud: vault): the front's audience does not match, deny 401."""
    clusters, front = served
    vault_token = clusters.a.mint("apps", "web", ["vault"])
    outcome = await front.http(bearer(vault_token))
    assert (outcome.allowed, outcome.status) == (False, 401)
    answer = await front.grpc(bearer(vault_token))
    assert answer.status.code == UNAUTHENTICATED
    assert clusters.target.fake.requests["tokenrequests"] == 0


def problems(config: configuration.Config) -> list[str]:
    """What the daemon and check-config find about the front (the rules over the built validators)."""
    return [problem for problem in find_problems(config, discover()) if problem.startswith("ext_authz.")]


def test_kubernetes_oidc_front_without_an_audience_is_a_config_error(clusters: Clusters) -> None:
    """An operator leaves ext_authz.audience null with kubernetes-oidc: refused at start, not run open."""
    assert problems(clusters.config()) == []
    assert problems(clusters.config(audience=None)) == [
        "ext_authz.audience: required when the ext_authz validator is kubernetes-oidc "
        "(a token minted for another relying party must never be swapped)"
    ]


def test_two_trusted_clusters_need_source_issuers_that_they_trust(clusters: Clusters) -> None:
    """Without source_issuers every trusted cluster's accounts would map to the target: a config error."""
    assert problems(clusters.config(source_issuers=None)) == [
        "ext_authz.source_issuers: required when the ext_authz validator trusts more than one issuer"
    ]
    assert problems(clusters.config(source_issuers=["https://cluster-c.example"])) == [
        "ext_authz.source_issuers: 'https://cluster-c.example' is not one of ext_authz.validator.issuers"
    ]
    with pytest.raises(configuration.ConfigError) as empty:
        clusters.config(source_issuers=[])
    assert empty.value.problems == ["ext_authz.source_issuers: must name at least one issuer"]
