"""
Every built-in validator passes the validator conformance suite:
``kubernetes-oidc`` with a static JWKS file and against the fake API server,
``kubernetes-tokenreview`` against the fake API server, ``api-key`` against
the memory store, and the ``StaticValidator`` the core's tests stand in with.
Everything is in memory: no socket, no global reactor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
import pytest_twisted
from k8s_fixtures import CLIENT_AUDIENCE, Cluster, jwtlet_config, k8s_config, memory_cluster, own_token_file
from twisted.internet.task import Clock

from jwtlet.apikeys.keys import make_key
from jwtlet.interfaces import PluginContext
from jwtlet.model import ApiKeyRecord, Integration
from jwtlet.plugins.api_key import api_key
from jwtlet.plugins.jwt_authenticator import jwt_authenticator
from jwtlet.plugins.kubernetes_oidc import kubernetes_oidc
from jwtlet.plugins.kubernetes_tokenreview import kubernetes_tokenreview
from jwtlet.plugins.memory_store import memory
from jwtlet.testing.conformance.validator import ValidatorConformance, ValidatorHarness
from jwtlet.testing.fakes import Interruptible, StaticValidator, service_account
from jwtlet.testing.memory import MemoryNetwork
from jwtlet.testing.oidc import GITHUB_ISSUER, FakeOIDCIssuer

SERVICE_ACCOUNT = "system:serviceaccount:ns:app"


def context(tmp_path: Path, cluster: Cluster, clock: Clock) -> PluginContext:
    return PluginContext(reactor=clock, clock=clock, http_client=cluster.client,
                         config=k8s_config(tmp_path, cluster), data_dir=tmp_path)


def cluster_with_ns_app(clock: Clock) -> Cluster:
    cluster = memory_cluster(clock)
    cluster.fake.add_service_account("ns", "app")
    return cluster


def kubernetes_harness(validator: object, cluster: Cluster, clock: Clock, asks_the_api_server: bool,
                       peer: bool = True) -> ValidatorHarness:
    """What both Kubernetes validators share: tokens minted by the fake API server."""
    fake = cluster.fake

    def expired() -> str:
        return fake.mint("ns", "app", [CLIENT_AUDIENCE], ttl=3600, issued_at=clock.seconds() - 7200)

    def withdrawn() -> str:
        fake.add_service_account("ns", "gone")
        token = fake.mint("ns", "gone", [CLIENT_AUDIENCE])
        fake.delete_service_account("ns", "gone")
        return token

    def take_down() -> None:
        cluster.server.stop()

    return ValidatorHarness(
        validator=validator,
        clock=clock,
        audience=CLIENT_AUDIENCE,
        username=SERVICE_ACCOUNT,
        good_token=lambda: fake.mint("ns", "app", [CLIENT_AUDIENCE]),
        other_audience_token=lambda: fake.mint("ns", "app", ["https://another-service.example"]),
        expired_token=expired,
        # Only the API server knows an account was deleted; a JWKS does not.
        withdrawn_token=withdrawn if asks_the_api_server else None,
        take_peer_down=take_down if peer else None,
    )


async def oidc_static_jwks(tmp_path: Path, clock: Clock) -> ValidatorHarness:
    cluster = cluster_with_ns_app(clock)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(cluster.fake.jwks()))
    validator = kubernetes_oidc.build({"issuers": [{"issuer": cluster.fake.issuer, "jwks_file": str(jwks)}]},
                                      context(tmp_path, cluster, clock))
    return kubernetes_harness(validator, cluster, clock, asks_the_api_server=False, peer=False)


async def oidc_discovery(tmp_path: Path, clock: Clock) -> ValidatorHarness:
    cluster = cluster_with_ns_app(clock)
    issuer = {"issuer": cluster.fake.issuer, "bearer_token_file": str(own_token_file(tmp_path))}
    validator = kubernetes_oidc.build({"issuers": [issuer]}, context(tmp_path, cluster, clock))
    return kubernetes_harness(validator, cluster, clock, asks_the_api_server=False)


async def tokenreview(tmp_path: Path, clock: Clock) -> ValidatorHarness:
    cluster = cluster_with_ns_app(clock)
    validator = kubernetes_tokenreview.build({}, context(tmp_path, cluster, clock))
    return kubernetes_harness(validator, cluster, clock, asks_the_api_server=True)


async def api_keys(tmp_path: Path, clock: Clock) -> ValidatorHarness:
    def plugin_context(store: Any = None) -> PluginContext:
        return PluginContext(reactor=clock, clock=clock, http_client=None, config=jwtlet_config("api-key"),
                             data_dir=tmp_path, store=store)

    store = Interruptible(memory.build({}, plugin_context()))
    await store.add_integration(Integration("acme"))
    good, revoked = (make_key("jwtk", "acme", key_id, os.urandom) for key_id in ("k1", "k2"))
    for key in (good, revoked):
        await store.add_api_key(ApiKeyRecord("acme", key.key_id, key.secret_sha256))
    await store.revoke_api_key("acme", revoked.key_id)
    validator = api_key.build({}, plugin_context(store))

    def take_down() -> None:
        store.down = True

    return ValidatorHarness(
        validator=validator,
        clock=clock,
        audience=CLIENT_AUDIENCE,
        username="apikey:acme:k1",
        good_token=lambda: good.text,
        withdrawn_token=lambda: revoked.text,
        take_peer_down=take_down,
    )


async def static_fake(tmp_path: Path, clock: Clock) -> ValidatorHarness:
    validator = StaticValidator()
    validator.add("good-token-of-ns-app", service_account("ns", "app"), CLIENT_AUDIENCE)
    validator.add("token-for-another-service", service_account("ns", "app"), "https://another-service.example")

    def take_down() -> None:
        validator.down = True

    return ValidatorHarness(
        validator=validator,
        clock=clock,
        audience=CLIENT_AUDIENCE,
        username=SERVICE_ACCOUNT,
        good_token=lambda: "good-token-of-ns-app",
        other_audience_token=lambda: "token-for-another-service",
        take_peer_down=take_down,
    )


async def jwt_authenticator_github(tmp_path: Path, clock: Clock) -> ValidatorHarness:
    """GitHub Actions tokens from the fake issuer, in memory at GitHub's issuer URL."""
    network = MemoryNetwork()
    github = FakeOIDCIssuer(issuer=GITHUB_ISSUER, clock=clock)
    server = network.serve(GITHUB_ISSUER, github.resource())
    options = {"jwt": [{"issuer": {"url": GITHUB_ISSUER, "audiences": [CLIENT_AUDIENCE]},
                        "claimMappings": {"username": {"expression": '"github:" + claims.repository'}}}]}
    validator = jwt_authenticator.build(options, PluginContext(
        reactor=clock, clock=clock, http_client=network.client(), config=jwtlet_config("jwt-authenticator"),
        data_dir=tmp_path))

    def token(audience: str = CLIENT_AUDIENCE) -> str:
        return github.sign(github.github_actions(audience))

    def expired() -> str:
        claims = github.github_actions(CLIENT_AUDIENCE)
        issued = claims["iat"] - 7200
        return github.sign({**claims, "iat": issued, "nbf": issued, "exp": issued + 300})

    def take_down() -> None:
        server.stop()

    return ValidatorHarness(
        validator=validator,
        clock=clock,
        audience=CLIENT_AUDIENCE,
        username="github:acme/app",
        good_token=token,
        other_audience_token=lambda: token("https://another-service.example"),
        expired_token=expired,
        take_peer_down=take_down,
    )


HARNESSES: dict[str, Callable[[Path, Clock], Awaitable[ValidatorHarness]]] = {
    "kubernetes-oidc (jwks_file)": oidc_static_jwks,
    "kubernetes-oidc (discovery)": oidc_discovery,
    "jwt-authenticator (GitHub Actions)": jwt_authenticator_github,
    "kubernetes-tokenreview": tokenreview,
    "api-key": api_keys,
    "testing.fakes.StaticValidator": static_fake,
}


class TestBuiltInValidators(ValidatorConformance):
    @pytest_twisted.async_fixture(params=sorted(HARNESSES))
    async def harness(self, request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> ValidatorHarness:
        return await HARNESSES[request.param](tmp_path, clock)
