"""
Identity is the issuer plus the name: with two trusted clusters, the same
``system:serviceaccount:<ns>:<name>`` in each is two callers, told apart by
each issuer's ``username_prefix``.  The reviewer's reproductions, against the
in-memory apps with a real ``kubernetes-oidc`` validator trusting two
clusters (static JWKS files, so no network).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Iterator

import attrs
import jwt as pyjwt
import pytest
from apps import BASE_CONFIG, CLIENT_AUDIENCE, Reply, call
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from jwtlet import config as configuration
from jwtlet import keys, policy
from jwtlet.daemon.plugins import Providers
from jwtlet.daemon.wiring import build_apis
from jwtlet.discovery import build, discover
from jwtlet.interfaces import PluginConfigError, PluginContext
from jwtlet.metrics import Metrics
from jwtlet.model import ResourceMapping
from jwtlet.testing.kubernetes import FakeKubernetes

URL = "http://jwtlet.test"
ADMIN = "system:serviceaccount:platform:jwtlet-admin"
WORKLOAD = "system:serviceaccount:ns:workload"


@attrs.frozen
class TwoClusters:
    """jwtlet trusting cluster A (prefix ``a:``) and cluster B (prefix ``b:``)."""

    a: FakeKubernetes
    b: FakeKubernetes
    token: StubTreq
    management: StubTreq
    providers: Providers


def issuers(tmp_path: Path, clusters: dict[str, FakeKubernetes]) -> list[dict[str, Any]]:
    entries = []
    for prefix, cluster in clusters.items():
        jwks = tmp_path / f"{prefix}-jwks.json"
        jwks.write_text(json.dumps(cluster.jwks()))
        entries.append({"issuer": cluster.issuer, "jwks_file": str(jwks), "username_prefix": prefix})
    return entries


def context_for(tmp_path: Path, raw: dict[str, Any], clock: Clock) -> tuple[configuration.Config, PluginContext]:
    keys.write_new(tmp_path / "signing.jwk", keys.generate("EdDSA"))
    raw = configuration.merge(BASE_CONFIG, configuration.merge({"signer": {"key_file": str(tmp_path / "signing.jwk")}},
                                                               raw))
    config = configuration.parse(raw, data_dir=tmp_path)
    return config, PluginContext(reactor=clock, clock=clock, http_client=None, config=config, data_dir=tmp_path)


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[TwoClusters]:
    """Roles and the mapping are configured for cluster A's accounts only."""
    clock = Clock()
    clock.advance(1_800_000_000)
    a = FakeKubernetes(issuer="https://cluster-a.example", clock=clock)
    b = FakeKubernetes(issuer="https://cluster-b.example", clock=clock)
    for cluster in (a, b):
        cluster.add_service_account("platform", "jwtlet-admin")
        cluster.add_service_account("ns", "workload")
    config, context = context_for(tmp_path, {
        "validator": {"type": "kubernetes-oidc", "issuers": issuers(tmp_path, {"a:": a, "b:": b})},
        "service_accounts": {f"a:{ADMIN}": ["management:write"]},
    }, clock)
    discovered = discover()
    store = build(discovered, "store", config.storage_backend, context)
    providers = Providers(store=store, signer=build(discovered, "signer", config.signer, context),
                          validator=build(discovered, "validator", config.validator, context))
    store.add_mapping(ResourceMapping(f"a:{WORKLOAD}", "ctx-a", scopes=(), audiences=("default-aud",)))
    apis = build_apis(config, providers, clock, Metrics(), random_bytes=lambda n: bytes(range(n)))
    yield TwoClusters(a, b, StubTreq(apis.token_api.app.resource()), StubTreq(apis.management_api.app.resource()),
                      providers)


def token_of(cluster: FakeKubernetes, namespace: str, name: str) -> str:
    return cluster.mint(namespace, name, [CLIENT_AUDIENCE])


def create_mapping(clusters: TwoClusters, bearer: str) -> Reply:
    body = {"clientIdentifier": "b:system:serviceaccount:ns:intruder", "participantContext": "ctx-a",
            "scopes": [], "audiences": ["default-aud"]}
    return call(clusters.management, "POST", f"{URL}/api/v1/mappings", data=json.dumps(body).encode(),
                headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"})


def exchange(clusters: TwoClusters, subject_token: str) -> Reply:
    return call(clusters.token, "POST", f"{URL}/token", data={
        "grant_type": policy.GRANT_TYPE_TOKEN_EXCHANGE, "subject_token": subject_token, "resource": "ctx-a"})


def test_cluster_b_admin_does_not_get_cluster_a_admin_role(clusters: TwoClusters) -> None:
    """
    An attacker who controls cluster B creates platform/jwtlet-admin there and
    writes to the management API with its token: the role belongs to cluster
    A's account only, so the write is 403.
    """
    assert create_mapping(clusters, token_of(clusters.b, "platform", "jwtlet-admin")).code == 403
    assert create_mapping(clusters, token_of(clusters.a, "platform", "jwtlet-admin")).code == 201


def test_same_named_workload_in_cluster_b_does_not_get_cluster_a_mapping(clusters: TwoClusters) -> None:
    """
    An attacker creates ns/workload in cluster B and exchanges its token for
    cluster A's participant context: 403 unauthorized_client, no token.
    """
    refused = exchange(clusters, token_of(clusters.b, "ns", "workload"))
    assert (refused.code, refused.json()["error"]) == (403, "unauthorized_client")
    assert "access_token" not in refused.json()
    assert exchange(clusters, token_of(clusters.a, "ns", "workload")).code == 200


def test_act_sub_names_the_prefixed_identity(clusters: TwoClusters) -> None:
    """Relying parties see which cluster the caller came from in ``act.sub``."""
    reply = exchange(clusters, token_of(clusters.a, "ns", "workload"))
    claims = pyjwt.decode(reply.json()["access_token"], options={"verify_signature": False})
    assert claims["act"]["sub"] == f"a:{WORKLOAD}"
    assert claims["act"]["iss"] == clusters.a.issuer


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def nested_brackets_token(cluster: FakeKubernetes) -> str:
    """A correctly signed JWS whose payload is 11,000 nested ``[``: past Python's recursion limit."""
    signing_input = f"{b64(json.dumps({'alg': 'RS256', 'kid': cluster.keys[0].kid}).encode())}.{b64(b'[' * 11_000)}"
    signature = cluster.keys[0].key._get_private_key().sign(signing_input.encode(), padding.PKCS1v15(),
                                                            hashes.SHA256())
    return f"{signing_input}.{b64(signature)}"


@pytest.fixture
def critical_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.critical:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def test_a_nested_bracket_token_is_a_rejection_on_both_ports(
    clusters: TwoClusters, critical_events: list[dict[str, Any]]
) -> None:
    """
    An attacker sends a token whose payload nests ``[`` 11,000 deep, to make
    the JSON parser raise RecursionError: /token answers 400 invalid_grant,
    the management API 401, and nothing is logged as a crash.
    """
    hostile = nested_brackets_token(clusters.a)
    refused = exchange(clusters, hostile)
    assert (refused.code, refused.json()["error"]) == (400, "invalid_grant")
    listing = call(clusters.management, "GET", f"{URL}/api/v1/mappings",
                   headers={"Authorization": f"Bearer {hostile}"})
    assert listing.code == 401
    assert b"Traceback" not in refused.body + listing.body
    assert critical_events == []


@pytest.mark.parametrize("prefixes", [("a:", "a:"), ("", "")])
def test_two_issuers_need_distinct_prefixes(tmp_path: Path, prefixes: tuple[str, str]) -> None:
    """
    An operator trusts a second cluster without telling the clusters apart
    (same prefix, or none on both): the config is refused, naming the entry.
    """
    entries = [{"issuer": f"https://cluster-{n}.example", "jwks_file": str(tmp_path / "jwks.json"),
                "username_prefix": prefix} for n, prefix in enumerate(prefixes)]
    config, context = context_for(tmp_path, {"validator": {"type": "kubernetes-oidc", "issuers": entries}}, Clock())
    with pytest.raises(PluginConfigError) as raised:
        build(discover(), "validator", config.validator, context)
    (message,) = raised.value.messages
    assert message.startswith("validator.issuers[1].username_prefix: ")


def test_one_issuer_without_prefix_and_one_with_is_accepted(tmp_path: Path) -> None:
    entries = [{"issuer": "https://cluster-a.example", "jwks_file": str(tmp_path / "jwks.json")},
               {"issuer": "https://cluster-b.example", "jwks_file": str(tmp_path / "jwks.json"),
                "username_prefix": "b:"}]
    config, context = context_for(tmp_path, {"validator": {"type": "kubernetes-oidc", "issuers": entries}}, Clock())
    build(discover(), "validator", config.validator, context)
