"""
The JWT attack catalogue, in one place, against the kubernetes-oidc validator
(and TokenReview where only the API server can know): every forged, confused,
oversized or replayed token is refused, and nothing a token says makes jwtlet
fetch anything.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from jwcrypto.common import json_encode
from jwcrypto.jwe import JWE
from jwcrypto.jwk import JWK
from jwcrypto.jws import JWS
from k8s_fixtures import CLIENT_AUDIENCE, Cluster, plugin_context
from twisted.internet.task import Clock

from jwtlet.interfaces import TokenRejected
from jwtlet.plugins.kubernetes_oidc import kubernetes_oidc
from jwtlet.plugins.kubernetes_tokenreview import kubernetes_tokenreview


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture
def validator(tmp_path: Path, cluster: Cluster, clock: Clock) -> Any:
    bearer = tmp_path / "bearer"
    bearer.write_text("jwtlet-own-token")
    return kubernetes_oidc.build(
        {"issuers": [{"issuer": cluster.fake.issuer, "bearer_token_file": str(bearer)}]},
        plugin_context(tmp_path, cluster, clock))


def signed_raw(cluster: Cluster, header: Any, payload: bytes) -> str:
    """RS256 over arbitrary header and payload bytes (what jwcrypto would refuse to build)."""
    header_part = b64(header if isinstance(header, bytes) else json.dumps(header).encode())
    signing_input = f"{header_part}.{b64(payload)}"
    key = cluster.fake.keys[0].key._get_private_key()
    return f"{signing_input}.{b64(key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()))}"


def good_claims(cluster: Cluster) -> dict[str, Any]:
    return cluster.fake.projected_claims("ns", "app", [CLIENT_AUDIENCE])


async def refused(validator: Any, token: str, audience: str = CLIENT_AUDIENCE) -> None:
    with pytest.raises(TokenRejected):
        await validator.validate(token, audience)


@pytest_twisted.ensureDeferred
async def test_alg_none_in_any_case(validator: Any, cluster: Cluster) -> None:
    payload = b64(json.dumps(good_claims(cluster)).encode())
    for alg in ("none", "None", "NONE", "nOnE"):
        header = b64(json.dumps({"alg": alg, "kid": cluster.fake.keys[0].kid}).encode())
        await refused(validator, f"{header}.{payload}.")


@pytest_twisted.ensureDeferred
async def test_hs256_signed_with_the_public_key(validator: Any, cluster: Cluster) -> None:
    for public in (cluster.fake.keys[0].key.export_to_pem(), json.dumps(cluster.fake.jwks()["keys"][0]).encode()):
        forged = JWS(json_encode(good_claims(cluster)).encode())
        forged.add_signature(JWK(kty="oct", k=b64(public)), alg="HS256",
                             protected=json_encode({"alg": "HS256", "kid": cluster.fake.keys[0].kid}))
        await refused(validator, forged.serialize(compact=True))


@pytest_twisted.ensureDeferred
async def test_kid_injection_and_key_headers_never_fetch(validator: Any, cluster: Cluster) -> None:
    stranger = JWK.generate(kty="RSA", size=2048)
    attacks = [
        {"kid": "../../../../etc/passwd"},
        {"kid": "' OR '1'='1"},
        {"kid": "x", "jku": f"{cluster.url}/evil-jwks"},
        {"kid": "x", "x5u": f"{cluster.url}/evil-cert"},
        {"kid": "x", "jwk": json.loads(stranger.export_public())},
    ]
    before = dict(cluster.fake.requests)
    for extra in attacks:
        forged = JWS(json_encode(good_claims(cluster)).encode())
        forged.add_signature(stranger, alg="RS256", protected=json_encode({"alg": "RS256", **extra}))
        await refused(validator, forged.serialize(compact=True))
    fetched = {k: v - before.get(k, 0) for k, v in cluster.fake.requests.items() if v - before.get(k, 0)}
    assert set(fetched) <= {"discovery", "jwks"}, fetched
    assert fetched.get("jwks", 0) <= 2, "the first fetch and one unknown-kid refetch, nothing more"


@pytest_twisted.ensureDeferred
async def test_crit_nested_jws_and_jwe(validator: Any, cluster: Cluster) -> None:
    kid = cluster.fake.keys[0].kid
    await refused(validator, signed_raw(cluster, {"alg": "RS256", "kid": kid, "crit": ["x-unknown"],
                                                  "x-unknown": 1}, json.dumps(good_claims(cluster)).encode()))
    inner = cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE])
    await refused(validator, signed_raw(cluster, {"alg": "RS256", "kid": kid, "cty": "JWT"}, inner.encode()))
    encryption_key = JWK.generate(kty="oct", size=256)
    jwe = JWE(json_encode(good_claims(cluster)).encode(), json_encode({"alg": "dir", "enc": "A256GCM"}))
    jwe.add_recipient(encryption_key)
    await refused(validator, jwe.serialize(compact=True))


@pytest_twisted.ensureDeferred
async def test_duplicate_members_in_header_or_claims(validator: Any, cluster: Cluster) -> None:
    kid = cluster.fake.keys[0].kid
    claims = json.dumps(good_claims(cluster))
    duplicated_claims = claims[:-1] + ', "sub": "system:serviceaccount:kube-system:admin"}'
    await refused(validator, signed_raw(cluster, {"alg": "RS256", "kid": kid}, duplicated_claims.encode()))
    duplicated_header = f'{{"alg": "RS256", "kid": "{kid}", "alg": "none"}}'.encode()
    await refused(validator, signed_raw(cluster, duplicated_header, claims.encode()))
    assert (await validator.validate(signed_raw(cluster, {"alg": "RS256", "kid": kid}, claims.encode()),
                                     CLIENT_AUDIENCE)).name == "app", "the same token without duplicates passes"


@pytest_twisted.ensureDeferred
async def test_enormous_tokens_and_nonsense_dates(validator: Any, cluster: Cluster) -> None:
    await refused(validator, "a" * 1_000_000)
    padded = dict(good_claims(cluster), padding="x" * 20_000)
    await refused(validator, cluster.fake.sign(padded))
    for exp in ("never", 1e300, 2**80, -1, None, True, [1]):
        await refused(validator, cluster.fake.sign(dict(good_claims(cluster), exp=exp)))


@pytest_twisted.ensureDeferred
async def test_right_issuer_wrong_audience(validator: Any, cluster: Cluster) -> None:
    await refused(validator, cluster.fake.mint("ns", "app", ["another-service"]))
    await refused(validator, cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE]), audience="another-service")


@pytest_twisted.ensureDeferred
async def test_replay_after_the_service_account_was_deleted(tmp_path: Path, cluster: Cluster, clock: Clock) -> None:
    reviewer = kubernetes_tokenreview.build({"cache_ttl_secs": 0}, plugin_context(tmp_path, cluster, clock))
    token = cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE])
    await reviewer.validate(token, CLIENT_AUDIENCE)
    cluster.fake.delete_service_account("ns", "app")
    await refused(reviewer, token)
