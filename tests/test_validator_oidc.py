"""
The kubernetes-oidc validator against the fake API server in memory:
success, the attack catalogue, key rotation, outages and the JWKS cache.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from jwcrypto.common import json_encode
from jwcrypto.jwk import JWK
from jwcrypto.jws import JWS
from k8s_fixtures import CLIENT_AUDIENCE, Cluster, jwtlet_config, own_token_file, plugin_context
from twisted.internet.task import Clock

from jwtlet.interfaces import DependencyUnavailable, PluginConfigError, PluginContext, TokenRejected
from jwtlet.metrics import Metrics
from jwtlet.plugins.kubernetes_oidc import kubernetes_oidc
from jwtlet.testing.memory import MemoryNetwork


def build(tmp_path: Path, cluster: Cluster, clock: Clock, **options: Any) -> Any:
    bearer = tmp_path / "bearer"
    bearer.write_text("jwtlet-own-token")
    issuer = {"issuer": cluster.fake.issuer, "bearer_token_file": str(bearer)}
    issuer.update(options.pop("issuer_options", {}))
    settings = {"issuers": [issuer], "jwks_cache_ttl_secs": 60, "leeway_secs": 30}
    settings.update(options)
    return kubernetes_oidc.build(settings, plugin_context(tmp_path, cluster, clock))


async def rejected(validator: Any, token: str, audience: str = CLIENT_AUDIENCE) -> str:
    with pytest.raises(TokenRejected) as raised:
        await validator.validate(token, audience)
    return str(raised.value)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest_twisted.ensureDeferred
async def test_a_projected_token_yields_its_service_account(tmp_path: Path, cluster: Cluster, clock: Clock) -> None:
    validator = build(tmp_path, cluster, clock)
    token = cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE, "other"], pod="app-1")
    identity = await validator.validate(token, CLIENT_AUDIENCE)
    assert identity.username == "system:serviceaccount:ns:app"
    assert (identity.namespace, identity.name) == ("ns", "app")
    assert identity.uid == cluster.fake.accounts[("ns", "app")]
    assert identity.issuer == cluster.fake.issuer
    assert "system:serviceaccounts:ns" in identity.groups
    assert identity.token_id is not None
    assert cluster.fake.requests["discovery"] == 1 and cluster.fake.requests["jwks"] == 1
    await validator.validate(cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE]), CLIENT_AUDIENCE)
    assert cluster.fake.requests["jwks"] == 1, "keys are cached"


@pytest_twisted.ensureDeferred
async def test_es256_keys_and_a_configured_jwks_uri(tmp_path: Path, cluster: Cluster, clock: Clock) -> None:
    cluster.fake.rotate_key("ES256", keep_old=False)
    validator = build(tmp_path, cluster, clock, issuer_options={"jwks_uri": f"{cluster.url}/openid/v1/jwks"})
    await validator.validate(cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE]), CLIENT_AUDIENCE)
    assert cluster.fake.requests["discovery"] == 0


@pytest_twisted.ensureDeferred
async def test_identity_from_legacy_flat_claims_and_from_sub(tmp_path: Path, cluster: Cluster, clock: Clock) -> None:
    validator = build(tmp_path, cluster, clock)
    now = int(clock.seconds())
    prefix = "kubernetes.io/serviceaccount/"
    legacy = cluster.fake.sign({
        "iss": cluster.fake.issuer, "aud": CLIENT_AUDIENCE, "iat": now, "exp": now + 60, f"{prefix}namespace": "ns",
        f"{prefix}service-account.name": "app", f"{prefix}service-account.uid": "u-1",
    })
    assert (await validator.validate(legacy, CLIENT_AUDIENCE)).uid == "u-1"
    plain = cluster.fake.sign({"iss": cluster.fake.issuer, "aud": [CLIENT_AUDIENCE], "iat": now, "exp": now + 60,
                               "sub": "system:serviceaccount:ns:app"})
    assert (await validator.validate(plain, CLIENT_AUDIENCE)).username == "system:serviceaccount:ns:app"


@pytest_twisted.ensureDeferred
async def test_attack_catalogue(tmp_path: Path, cluster: Cluster, clock: Clock) -> None:
    validator = build(tmp_path, cluster, clock)
    fake = cluster.fake
    good = fake.projected_claims("ns", "app", [CLIENT_AUDIENCE])
    header, payload, signature = fake.sign(good).split(".")
    await validator.validate(fake.sign(good), CLIENT_AUDIENCE)

    none_header = b64(json.dumps({"alg": "none", "kid": fake.keys[0].kid}).encode())
    for alg in ("none", "None", "NONE"):
        unsigned = b64(json.dumps({"alg": alg, "kid": fake.keys[0].kid}).encode())
        await rejected(validator, f"{unsigned}.{payload}.")
    await rejected(validator, f"{none_header}.{payload}.{signature}")

    # HS256 keyed with the public key's bytes (the RS/HS confusion attack).
    public_pem = fake.keys[0].key.export_to_pem()
    hmac_key = JWK(kty="oct", k=b64(public_pem))
    forged = JWS(json_encode(good).encode())
    forged.add_signature(hmac_key, alg="HS256", protected=json_encode({"alg": "HS256", "kid": fake.keys[0].kid}))
    assert "not allowed" in await rejected(validator, forged.serialize(compact=True))

    stranger = JWK.generate(kty="RSA", size=2048)
    foreign = JWS(json_encode(good).encode())
    foreign.add_signature(stranger, alg="RS256", protected=json_encode({"alg": "RS256", "kid": "not-in-set"}))
    await rejected(validator, foreign.serialize(compact=True))

    tampered = json.loads(base64.urlsafe_b64decode(payload + "=="))
    tampered["sub"] = "system:serviceaccount:kube-system:admin"
    tampered["kubernetes.io"]["namespace"] = "kube-system"
    await rejected(validator, f"{header}.{b64(json.dumps(tampered).encode())}.{signature}")

    assert await rejected(validator, fake.sign(dict(good, iss="https://evil.example"))) == "issuer not trusted"
    before = dict(fake.requests)
    await rejected(validator, fake.sign(dict(good, iss=f"{cluster.url}/other")))
    assert dict(fake.requests) == before, "an unknown iss causes no fetch"

    assert await rejected(validator, fake.sign(dict(good, aud=["someone-else"]))) == "audience not accepted"
    assert await rejected(validator, fake.sign(dict(good, aud="someone-else"))) == "audience not accepted"
    assert (await validator.validate(fake.sign(dict(good, aud=CLIENT_AUDIENCE)), CLIENT_AUDIENCE)).name == "app"
    now = int(clock.seconds())
    assert await rejected(validator, fake.sign(dict(good, exp=now - 31))) == "expired"
    await validator.validate(fake.sign(dict(good, exp=now - 29)), CLIENT_AUDIENCE)
    assert await rejected(validator, fake.sign(dict(good, nbf=now + 31))) == "not yet valid"
    assert await rejected(validator, fake.sign({k: v for k, v in good.items() if k != "exp"})) == "no 'exp'"
    for bad_exp in ("tomorrow", 1e300, True):
        await rejected(validator, fake.sign(dict(good, exp=bad_exp)))
    user = dict(good, sub="admin@example.com")
    user.pop("kubernetes.io")
    assert await rejected(validator, fake.sign(user)) == "not a service account token"
    mismatched = dict(good, sub="system:serviceaccount:other:app")
    assert await rejected(validator, fake.sign(mismatched)) == "not a service account token"

    for header_attack in ({"jku": "http://127.0.0.1:1/jwks"}, {"x5u": "http://127.0.0.1:1/x"}):
        attacked = fake.sign(good, header={"alg": "RS256", "kid": fake.keys[0].kid, **header_attack})
        await validator.validate(attacked, CLIENT_AUDIENCE)  # ignored, never fetched
    await rejected(validator, rs256_by_hand(fake, {"alg": "RS256", "kid": fake.keys[0].kid, "crit": ["exp"]}, good))
    await rejected(validator, "a.b.c.d.e")
    await rejected(validator, "x" * 20000)
    await rejected(validator, "")


@pytest_twisted.ensureDeferred
async def test_several_keys_require_a_kid(tmp_path: Path, cluster: Cluster, clock: Clock) -> None:
    cluster.fake.rotate_key()
    validator = build(tmp_path, cluster, clock)
    claims = cluster.fake.projected_claims("ns", "app", [CLIENT_AUDIENCE])
    without_kid = cluster.fake.sign(claims, header={"alg": "RS256"})
    assert await rejected(validator, without_kid) == "no key for this token"


@pytest_twisted.ensureDeferred
async def test_rotation_at_the_issuer_is_picked_up_without_restart(
    tmp_path: Path, cluster: Cluster, clock: Clock
) -> None:
    validator = build(tmp_path, cluster, clock)
    await validator.validate(cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE]), CLIENT_AUDIENCE)
    cluster.fake.rotate_key()
    rotated = cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE])
    await validator.validate(rotated, CLIENT_AUDIENCE)
    assert cluster.fake.requests["jwks"] == 2, "an unknown kid refetched once"
    stranger = cluster.fake.sign(cluster.fake.projected_claims("ns", "app", [CLIENT_AUDIENCE]),
                                 header={"alg": "RS256", "kid": "unknown-kid"})
    for _ in range(5):
        await rejected(validator, stranger)
    assert cluster.fake.requests["jwks"] == 2, "unknown kids refetch at most once per 10 s"
    clock.advance(11)
    await rejected(validator, stranger)
    assert cluster.fake.requests["jwks"] == 3


@pytest_twisted.ensureDeferred
async def test_issuer_down_serves_cached_keys_then_503(tmp_path: Path, cluster: Cluster, clock: Clock) -> None:
    validator = build(tmp_path, cluster, clock)
    token = cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE], ttl=7200)
    await validator.validate(token, CLIENT_AUDIENCE)
    await validator.check_ready()
    cluster.fake.failure_status = 503
    clock.advance(61)  # past the TTL: a refetch fails, the stale keys still serve
    await validator.validate(token, CLIENT_AUDIENCE)
    await validator.check_ready()
    clock.advance(60)  # past twice the TTL: nothing usable is cached
    with pytest.raises(DependencyUnavailable):
        await validator.validate(token, CLIENT_AUDIENCE)
    with pytest.raises(DependencyUnavailable):
        await validator.check_ready()
    cluster.fake.failure_status = None
    clock.advance(31)  # past the backoff
    await validator.validate(token, CLIENT_AUDIENCE)


@pytest_twisted.ensureDeferred
async def test_jwks_fetches_are_counted_in_the_daemons_metrics(tmp_path: Path, cluster: Cluster, clock: Clock) -> None:
    """Operators alert on ``jwtlet_jwks_refresh_total{outcome="failure"}``: each fetch counts once, by outcome."""
    metrics = Metrics()
    context = plugin_context(tmp_path, cluster, clock, metrics=metrics)
    validator = kubernetes_oidc.build({"issuers": [{"issuer": cluster.fake.issuer, "bearer_token_file": str(
        own_token_file(tmp_path))}], "jwks_cache_ttl_secs": 60}, context)

    def counted(outcome: str) -> float:
        value = metrics.registry.get_sample_value("jwtlet_jwks_refresh_total", {"outcome": outcome})
        return value or 0.0

    token = cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE], ttl=7200)
    await validator.validate(token, CLIENT_AUDIENCE)
    assert (counted("success"), counted("failure")) == (1, 0)
    cluster.fake.failure_status = 503
    clock.advance(61)
    await validator.check_ready()  # stale keys still serve, but the refetch failed
    assert (counted("success"), counted("failure")) == (1, 1)


@pytest_twisted.ensureDeferred
async def test_the_jwks_endpoint_requires_the_bearer_token(tmp_path: Path, cluster: Cluster, clock: Clock) -> None:
    validator = kubernetes_oidc.build({"issuers": [{"issuer": cluster.fake.issuer}]},
                                      plugin_context(tmp_path, cluster, clock))
    with pytest.raises(DependencyUnavailable):
        await validator.validate(cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE]), CLIENT_AUDIENCE)
    assert cluster.fake.requests["discovery"] == 1


@pytest_twisted.ensureDeferred
async def test_a_static_jwks_file_is_reread_when_it_changes(tmp_path: Path, cluster: Cluster, clock: Clock) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(cluster.fake.jwks()))
    validator = build(tmp_path, cluster, clock, issuers=[{"issuer": cluster.fake.issuer, "jwks_file": str(jwks)}])
    await validator.validate(cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE]), CLIENT_AUDIENCE)
    cluster.fake.rotate_key(keep_old=False)
    jwks.write_text(json.dumps(cluster.fake.jwks(), indent=1))
    await validator.validate(cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE]), CLIENT_AUDIENCE)
    assert sum(cluster.fake.requests.values()) == 0, "a static issuer never fetches"
    jwks.unlink()
    with pytest.raises(DependencyUnavailable):
        await validator.check_ready()


def rs256_by_hand(fake: Any, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A correctly signed token whose header jwcrypto would refuse to produce."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    private = fake.keys[0].key._get_private_key()
    signature = private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(signature)}"


def option_context(tmp_path: Path, dev: bool = False) -> PluginContext:
    """For option checks: a network with nobody on it, as nothing is fetched while options are read."""
    clock = Clock()
    return PluginContext(reactor=clock, clock=clock, http_client=MemoryNetwork().client(),
                         config=jwtlet_config("kubernetes-oidc", dev=dev), data_dir=tmp_path)


def test_option_problems_are_reported_together(tmp_path: Path) -> None:
    ctx = option_context(tmp_path)
    with pytest.raises(PluginConfigError) as raised:
        kubernetes_oidc.build({"issuers": [{"issuer": "not a url", "colour": 1}, "x"], "leeway_secs": -1,
                               "jwks_cache_ttl_secs": 0, "extra": True}, ctx)
    assert sorted(raised.value.messages) == sorted([
        "extra: unknown key",
        "jwks_cache_ttl_secs: must be greater than 0",
        "leeway_secs: must be between 0 and 300",
        "issuers[0].colour: unknown key",
        "issuers[0].issuer: must be an absolute https URL",
        "issuers[1]: must be a table",
    ])
    with pytest.raises(PluginConfigError) as raised:
        kubernetes_oidc.build({}, ctx)
    assert raised.value.messages == ("issuers: must list at least one issuer",)


@pytest_twisted.ensureDeferred
async def test_a_validated_token_is_remembered_briefly_and_never_past_exp(
    tmp_path: Path, cluster: Cluster, clock: Clock
) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(cluster.fake.jwks()))
    validator = build(tmp_path, cluster, clock, issuers=[{"issuer": cluster.fake.issuer, "jwks_file": str(jwks)}],
                      leeway_secs=0)
    long_lived = cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE], ttl=3600)
    short_lived = cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE], ttl=5)
    for token in (long_lived, short_lived):
        await validator.validate(token, CLIENT_AUDIENCE)
    jwks.write_text(json.dumps({"keys": []}))  # keys gone: only remembered results can pass now
    await validator.validate(long_lived, CLIENT_AUDIENCE)
    clock.advance(6)
    await rejected(validator, short_lived)
    await validator.validate(long_lived, CLIENT_AUDIENCE)
    clock.advance(60)
    await rejected(validator, long_lived)
    await rejected(validator, long_lived, audience="another-audience")


@pytest_twisted.ensureDeferred
async def test_a_token_is_remembered_for_replay_as_long_as_it_is_accepted(
    tmp_path: Path, cluster: Cluster, clock: Clock
) -> None:
    """``accepted_until`` is ``exp`` plus the leeway: the last instant the same token would pass again."""
    validator = build(tmp_path, cluster, clock)
    claims = cluster.fake.projected_claims("ns", "app", [CLIENT_AUDIENCE], ttl=600)
    identity = await validator.validate(cluster.fake.sign(claims), CLIENT_AUDIENCE)
    assert (identity.expires_at, identity.accepted_until) == (claims["exp"], claims["exp"] + 30)
    clock.advance(claims["exp"] + 30 - clock.seconds())
    await validator.validate(cluster.fake.sign(claims), CLIENT_AUDIENCE)
    clock.advance(0.5)
    await rejected(validator, cluster.fake.sign(claims))


@pytest_twisted.ensureDeferred
async def test_the_username_prefix_is_prepended_to_the_username_only(
    tmp_path: Path, cluster: Cluster, clock: Clock
) -> None:
    validator = build(tmp_path, cluster, clock, issuer_options={"username_prefix": "cluster-b:"})
    identity = await validator.validate(cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE]), CLIENT_AUDIENCE)
    assert identity.username == "cluster-b:system:serviceaccount:ns:app"
    assert (identity.namespace, identity.name, identity.issuer) == ("ns", "app", cluster.fake.issuer)
    assert identity.uid == cluster.fake.accounts[("ns", "app")]


def test_prefix_problems(tmp_path: Path) -> None:
    with pytest.raises(PluginConfigError) as raised:
        kubernetes_oidc.build({"issuers": [
            {"issuer": "https://a.example", "jwks_file": "/a", "username_prefix": 7},
            {"issuer": "https://b.example", "jwks_file": "/b", "username_prefix": "x:"},
            {"issuer": "https://c.example", "jwks_file": "/c", "username_prefix": "x:"},
        ]}, option_context(tmp_path))
    assert raised.value.messages == (
        "issuers[0].username_prefix: must be a string, not int",
        "issuers[2].username_prefix: 'x:' is also the prefix of issuers[1].username_prefix; with several issuers "
        "each needs its own, or one cluster's service accounts act as another's",
    )
