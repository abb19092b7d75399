"""The kubernetes-tokenreview validator against the fake API server over loopback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from k8s_fixtures import CLIENT_AUDIENCE, Cluster, plugin_context
from twisted.internet.task import Clock

from jwtlet.config.schema import K8sConfig
from jwtlet.interfaces import DependencyUnavailable, PluginConfigError, TokenRejected
from jwtlet.outbound import close_http_client
from jwtlet.plugins.kubernetes_tokenreview import MAX_TOKEN_BYTES, kubernetes_tokenreview


def build(tmp_path: Path, cluster: Cluster, clock: Clock, **options: Any) -> Any:
    return kubernetes_tokenreview.build(options, plugin_context(tmp_path, cluster, clock))


@pytest_twisted.ensureDeferred
async def test_a_reviewed_token_yields_its_service_account(tmp_path: Path, cluster: Cluster, clock: Clock) -> None:
    validator = build(tmp_path, cluster, clock)
    identity = await validator.validate(cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE], pod="app-1"),
                                        CLIENT_AUDIENCE)
    assert identity.username == "system:serviceaccount:ns:app"
    assert identity.uid == cluster.fake.accounts[("ns", "app")]
    assert identity.issuer == cluster.fake.issuer
    assert identity.extra["authentication.kubernetes.io/pod-name"] == ["app-1"]
    assert identity.token_id is not None and identity.expires_at is not None
    await validator.check_ready()


@pytest_twisted.ensureDeferred
async def test_rejections(tmp_path: Path, cluster: Cluster, clock: Clock) -> None:
    validator = build(tmp_path, cluster, clock)
    fake = cluster.fake
    good = fake.projected_claims("ns", "app", [CLIENT_AUDIENCE])
    for bad in (
        fake.sign(dict(good, aud=["elsewhere"])),
        fake.sign(dict(good, exp=int(clock.seconds()) - 1)),
        fake.sign(dict(good, iss="https://other-cluster")),
        fake.mint_legacy("ns", "app"),
        "not-a-jwt",
    ):
        with pytest.raises(TokenRejected):
            await validator.validate(bad, CLIENT_AUDIENCE)


@pytest_twisted.ensureDeferred
async def test_a_deleted_service_account_stops_its_tokens(tmp_path: Path, cluster: Cluster, clock: Clock) -> None:
    validator = build(tmp_path, cluster, clock, cache_ttl_secs=10)
    token = cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE])
    await validator.validate(token, CLIENT_AUDIENCE)
    cluster.fake.delete_service_account("ns", "app")
    await validator.validate(token, CLIENT_AUDIENCE)  # cached for at most 10 s
    assert cluster.fake.requests["tokenreviews"] == 1
    clock.advance(10.5)
    with pytest.raises(TokenRejected) as raised:
        await validator.validate(token, CLIENT_AUDIENCE)
    assert "invalidated" in str(raised.value)


@pytest_twisted.ensureDeferred
async def test_the_cache_never_outlives_the_token(tmp_path: Path, cluster: Cluster, clock: Clock) -> None:
    validator = build(tmp_path, cluster, clock, cache_ttl_secs=10)
    token = cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE], ttl=3)
    await validator.validate(token, CLIENT_AUDIENCE)
    clock.advance(4)
    with pytest.raises(TokenRejected):
        await validator.validate(token, CLIENT_AUDIENCE)
    assert cluster.fake.requests["tokenreviews"] == 2


@pytest_twisted.ensureDeferred
async def test_a_non_service_account_user_is_refused(tmp_path: Path, cluster: Cluster, clock: Clock) -> None:
    validator = build(tmp_path, cluster, clock)
    cluster.fake.users["token-of-a-person"] = {"username": "alice@example.com", "groups": ["system:authenticated"]}
    cluster.fake.users["sa-name-without-the-group"] = {
        "username": "system:serviceaccount:ns:app", "groups": ["system:authenticated"]}
    for token in ("token-of-a-person", "sa-name-without-the-group"):
        with pytest.raises(TokenRejected) as raised:
            await validator.validate(token, CLIENT_AUDIENCE)
        assert str(raised.value) == "not a service account"


@pytest_twisted.ensureDeferred
async def test_our_own_token_is_reread_after_a_401_then_retried_once(
    tmp_path: Path, cluster: Cluster, clock: Clock
) -> None:
    validator = build(tmp_path, cluster, clock)
    await validator.validate(cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE]), CLIENT_AUDIENCE)
    own = tmp_path / "own-token"
    before = own.stat()
    # A rotation the stat cannot see (same size, same mtime): only the 401 reveals it.
    own.write_text("jwtlet-own-toke2")
    os.utime(own, ns=(before.st_atime_ns, before.st_mtime_ns))
    cluster.fake.caller_tokens = {"jwtlet-own-toke2"}
    reviews = cluster.fake.requests["tokenreviews"]
    await validator.validate(cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE]), CLIENT_AUDIENCE)
    assert cluster.fake.requests["tokenreviews"] == reviews + 2, "one 401, one retry"
    cluster.fake.caller_tokens = {"something-else"}
    with pytest.raises(DependencyUnavailable):
        await validator.validate(cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE]), CLIENT_AUDIENCE)
    assert cluster.fake.requests["tokenreviews"] == reviews + 4, "retried once, not more"


@pytest_twisted.ensureDeferred
async def test_the_api_server_down_is_503_never_a_token(tmp_path: Path, cluster: Cluster, clock: Clock) -> None:
    validator = build(tmp_path, cluster, clock)
    token = cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE])
    for status in (500, 503, 429):
        cluster.fake.failure_status = status
        with pytest.raises(DependencyUnavailable):
            await validator.validate(token, CLIENT_AUDIENCE)
    cluster.fake.failure_status = None
    await cluster.server.stop()
    await close_http_client(cluster.client)  # kept-alive connections would outlive the listener
    with pytest.raises(DependencyUnavailable):
        await validator.validate(token, CLIENT_AUDIENCE)


def test_option_problems(tmp_path: Path) -> None:
    import types

    ctx = types.SimpleNamespace(
        reactor=Clock(), clock=Clock(), http_client=object(), data_dir=tmp_path,
        config=types.SimpleNamespace(dev=False, token=types.SimpleNamespace(max_subject_token_age_secs=86400),
                                     k8s=K8sConfig(api_server_url=None, token_file="/t", ca_file="/c",
                                                   cluster_issuer="https://k")),
    )
    with pytest.raises(PluginConfigError) as raised:
        kubernetes_tokenreview.build({"cache_ttl_secs": 60, "timeout_secs": 0, "bogus": 1}, ctx)
    assert sorted(raised.value.messages) == [
        "api_server_url: required (an https URL; k8s.api_server_url is the default)",
        "bogus: unknown key",
        "cache_ttl_secs: must be between 0 and 10",
        "timeout_secs: must be between 0 and 60",
    ]


@pytest_twisted.ensureDeferred
async def test_prefix_and_replay_window(tmp_path: Path, cluster: Cluster, clock: Clock) -> None:
    """
    The username carries ``username_prefix``; ``accepted_until`` covers the
    API server's own minute of leeway past ``exp``.
    """
    validator = build(tmp_path, cluster, clock, username_prefix="cluster-b:")
    claims = cluster.fake.projected_claims("ns", "app", [CLIENT_AUDIENCE], ttl=600)
    identity = await validator.validate(cluster.fake.sign(claims), CLIENT_AUDIENCE)
    assert identity.username == "cluster-b:system:serviceaccount:ns:app"
    assert (identity.namespace, identity.name) == ("ns", "app")
    assert (identity.expires_at, identity.accepted_until) == (claims["exp"], claims["exp"] + 60)
    with pytest.raises(PluginConfigError) as raised:
        build(tmp_path, cluster, clock, username_prefix=["x"])
    assert raised.value.messages == ("username_prefix: must be a string, not list",)


def test_a_plaintext_api_server_url_is_reported_once(tmp_path: Path, cluster: Cluster) -> None:
    """
    An operator points ``k8s.api_server_url`` at plain http: the core reports
    it where the k8s table is read, so the validator that defaults to it does
    not say it again; an ``api_server_url`` of the validator's own is its own
    to check.
    """
    kubernetes_tokenreview.build({}, plugin_context(tmp_path, cluster, api_server_url="http://kubernetes.example"))
    with pytest.raises(PluginConfigError) as raised:
        kubernetes_tokenreview.build({"api_server_url": "http://kubernetes.example"}, plugin_context(tmp_path, cluster))
    assert raised.value.messages == (
        "api_server_url: must be https (http is allowed only for loopback hosts or with --dev)",)


@pytest_twisted.ensureDeferred
async def test_tokens_no_bearer_could_be_are_refused_without_asking_the_api_server(
    tmp_path: Path, cluster: Cluster, clock: Clock
) -> None:
    """Oversized, non-ASCII or control-character tokens never reach the API server (which would echo them back)."""
    validator = build(tmp_path, cluster, clock)
    good = cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE])
    for token in ("x" * (MAX_TOKEN_BYTES + 1), "\ud800" * 32, "ü" * 64, good + "\r\nX-Injected: 1", good + "\x00"):
        with pytest.raises(TokenRejected):
            await validator.validate(token, CLIENT_AUDIENCE)
    assert cluster.fake.requests["tokenreviews"] == 0
