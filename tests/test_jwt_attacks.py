"""
The JWT attack catalogue, in one place, against both JWT validators --
kubernetes-oidc and jwt-authenticator, which share the JWT and JWKS code and
must refuse the same tokens -- (and TokenReview where only the API server can
know): every forged, confused,
oversized, stale or replayed token is refused, nothing a token says makes
jwtlet fetch anything, hostile JSON from a client or an issuer endpoint is a
rejection or a 503 and never a crash, and keys and bearer tokens never travel
over plain http to a routable host.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import attrs
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from jwcrypto.common import json_encode
from jwcrypto.jwe import JWE
from jwcrypto.jwk import JWK
from jwcrypto.jws import JWS
from k8s_fixtures import CLIENT_AUDIENCE, Cluster, plugin_context
from treq.client import HTTPClient
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from jwtlet.interfaces import DependencyUnavailable, PluginConfigError, TokenRejected
from jwtlet.plugins.jwt_authenticator import jwt_authenticator
from jwtlet.plugins.kubernetes_oidc import MAX_TOKEN_BYTES, kubernetes_oidc
from jwtlet.plugins.kubernetes_tokenreview import kubernetes_tokenreview
from jwtlet.testing.memory import MemoryNetwork


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


#: A JWT validator trusting one issuer: ``(issuer, context, bearer file or None, options) -> validator``.
Trusting = Callable[[str, Any, Any, dict[str, Any]], Any]


def kubernetes_oidc_trusting(issuer: str, context: Any, bearer: Any, options: dict[str, Any]) -> Any:
    entry = {"issuer": issuer, **({"bearer_token_file": str(bearer)} if bearer else {})}
    return kubernetes_oidc.build({"issuers": [entry], **options}, context)


def jwt_authenticator_trusting(issuer: str, context: Any, bearer: Any, options: dict[str, Any]) -> Any:
    """Service-account tokens mapped as Kubernetes maps them with username.claim sub and no prefix."""
    entry = {"issuer": {"url": issuer, "audiences": [CLIENT_AUDIENCE]},
             "claimMappings": {"username": {"claim": "sub", "prefix": ""}}}
    return jwt_authenticator.build({"jwt": [entry], **options}, context)


JWT_VALIDATORS: dict[str, Trusting] = {
    "kubernetes-oidc": kubernetes_oidc_trusting,
    "jwt-authenticator": jwt_authenticator_trusting,
}


@pytest.fixture(params=sorted(JWT_VALIDATORS))
def trust(request: pytest.FixtureRequest, tmp_path: Path, cluster: Cluster) -> Callable[..., Any]:
    """Builds the validator under test: ``trust(issuer, context, bearer=True, **options)``."""
    bearer = tmp_path / "bearer"
    bearer.write_text("jwtlet-own-token")
    if request.param == "jwt-authenticator":
        # Kubernetes' authenticators send no credential for discovery: the fake's endpoints must be public.
        cluster.fake.discovery_requires_auth = False
    trusting = JWT_VALIDATORS[request.param]

    def build(issuer: str, context: Any, bearer_token: bool = True, **options: Any) -> Any:
        return trusting(issuer, context, bearer if bearer_token else None, options)

    return build


@pytest.fixture
def validator(trust: Callable[..., Any], tmp_path: Path, cluster: Cluster, clock: Clock) -> Any:
    return trust(cluster.fake.issuer, plugin_context(tmp_path, cluster, clock))


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
                                     CLIENT_AUDIENCE)).username == "system:serviceaccount:ns:app", \
        "the same token without duplicates passes"


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


# -- hostile JSON: every parse path refuses, none crashes -------------------------------------

NESTED = b"[" * 11_000
HUGE_INTEGER = b"1" * 5_000


def hostile_payloads(cluster: Cluster) -> dict[str, bytes]:
    """Claims a hostile client signs with a trusted key (or sends unsigned: it must not matter)."""
    claims = json.dumps(good_claims(cluster))

    def with_exp(literal: bytes) -> bytes:
        return json.dumps(dict(good_claims(cluster), exp=0)).encode().replace(b'"exp": 0', b'"exp": ' + literal)

    return {
        "nested arrays past the recursion limit": NESTED,
        "nested objects past the recursion limit": b'{"":' * 2_000 + b"1" + b"}" * 2_000,
        "an integer past the int-digits limit": claims[:-1].encode() + b', "big": ' + HUGE_INTEGER + b"}",
        "invalid UTF-8": claims[:-1].encode() + b', "name": "\xff\xfe"}',
        "a JSON array": b"[" + claims.encode() + b"]",
        "a JSON string": b'"system:serviceaccount:ns:app"',
        "JSON null": b"null",
        "NaN": claims[:-1].encode() + b', "extra": NaN}',
        "Infinity as exp": with_exp(b"Infinity"),
        "exp past float range": with_exp(b"1e400"),
        "not JSON at all": b"\x00\x01garbage",
    }


@pytest_twisted.ensureDeferred
async def test_hostile_claims_are_rejections_never_crashes(validator: Any, cluster: Cluster) -> None:
    """
    An attacker holding (or not needing) a signing key puts payloads in the
    claims that make naive parsers raise RecursionError, ValueError or
    UnicodeDecodeError, or read NaN: every one is a TokenRejected.
    """
    kid = cluster.fake.keys[0].kid
    for what, payload in hostile_payloads(cluster).items():
        token = signed_raw(cluster, {"alg": "RS256", "kid": kid}, payload)
        assert len(token) < MAX_TOKEN_BYTES, f"{what}: must reach the parser, not the size limit"
        with pytest.raises(TokenRejected):
            await validator.validate(token, CLIENT_AUDIENCE)


@pytest_twisted.ensureDeferred
async def test_hostile_headers_are_rejections_never_crashes(validator: Any, cluster: Cluster) -> None:
    """The same hostile JSON in the JOSE header, which is parsed before any key is chosen."""
    claims = json.dumps(good_claims(cluster)).encode()
    kid = cluster.fake.keys[0].kid
    for header in (NESTED, b'{"alg": "RS256", "kid": "' + kid.encode() + b'", "x": ' + HUGE_INTEGER + b"}",
                   b'{"alg": "RS256", "kid": "\xff"}', b'{"alg": "RS256", "kid": "' + kid.encode() + b'", "x": NaN}',
                   b'["RS256"]', b'"RS256"', b"{"):
        await refused(validator, signed_raw(cluster, header, claims))


@pytest_twisted.ensureDeferred
async def test_hostile_token_vouched_for_by_the_api_server_is_refused_not_a_crash(
    tmp_path: Path, cluster: Cluster, clock: Clock
) -> None:
    """
    TokenReview reads the claims only after the API server said yes; even a
    token the API server accepted (a misbehaving authenticator) whose payload
    is hostile is a rejection.
    """
    reviewer = kubernetes_tokenreview.build({}, plugin_context(tmp_path, cluster, clock))
    account = {"username": "system:serviceaccount:ns:app", "groups": ["system:serviceaccounts"]}
    for payload in hostile_payloads(cluster).values():
        token = f"{b64(b'{}')}.{b64(payload)}.{b64(b'sig')}"
        cluster.fake.users[token] = account
        await refused(reviewer, token)


# -- hostile issuer endpoints ---------------------------------------------------------------------


class Documents(Resource):
    """A hostile issuer: answers each path with the bytes it was given."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: dict[bytes, bytes] = {}

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return self.bodies.get(request.path, b"{}")


@attrs.frozen
class HostileIssuer:
    """The hostile issuer, served in memory at ``url``, and a client that reaches it (and nothing else)."""

    documents: Documents
    url: str
    client: HTTPClient


@pytest.fixture
def hostile_issuer() -> HostileIssuer:
    network = MemoryNetwork()
    documents = Documents()
    server = network.serve("https://issuer.attacker.example", documents)
    return HostileIssuer(documents, server.url, network.client())


def hostile_documents() -> list[bytes]:
    return [
        NESTED, b'{"keys": ' + NESTED + b"}", b'{"keys": [{"kty": "RSA", "e": ' + HUGE_INTEGER + b"}]}",
        b'{"keys": []}\xff', b'{"keys": [], "keys": []}', b'{"keys": NaN}', b"[]", b"null", b"x" * (2 * 1024 * 1024),
        json.dumps({"keys": [{"kty": "EC", "crv": ["P-256"]}, {"kty": "RSA", "kid": ["k"], "n": "AQAB", "e": "AQAB"},
                             {"kty": "RSA", "n": 1, "e": {}}, {"kty": "OKP", "crv": "Ed25519", "x": None},
                             {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}, "not a key"]}).encode(),
    ]


@pytest_twisted.ensureDeferred
async def test_a_hostile_jwks_endpoint_never_crashes_the_validator(
    tmp_path: Path, cluster: Cluster, clock: Clock, hostile_issuer: HostileIssuer
) -> None:
    """
    The JWKS endpoint answers deeply nested, oversized, non-UTF-8, duplicated
    or nonsensical documents: tokens are refused or jwtlet is unavailable
    (503), never an unhandled exception.
    """
    token = cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE])
    context = plugin_context(tmp_path, cluster, clock, http_client=hostile_issuer.client)
    for body in hostile_documents():
        hostile_issuer.documents.bodies[b"/jwks"] = body
        validator = kubernetes_oidc.build(
            {"issuers": [{"issuer": cluster.fake.issuer, "jwks_uri": f"{hostile_issuer.url}/jwks"}]}, context)
        with pytest.raises((DependencyUnavailable, TokenRejected)):
            await validator.validate(token, CLIENT_AUDIENCE)


@pytest_twisted.ensureDeferred
async def test_a_hostile_discovery_document_never_crashes_the_validator(
    tmp_path: Path, cluster: Cluster, clock: Clock, hostile_issuer: HostileIssuer, trust: Callable[..., Any]
) -> None:
    """The same for the issuer's discovery document: 503 and /ready down, never a crash."""
    token = cluster.fake.sign(dict(good_claims(cluster), iss=hostile_issuer.url))
    context = plugin_context(tmp_path, cluster, clock, http_client=hostile_issuer.client)
    for body in [*hostile_documents(), b'{"jwks_uri": ["http://127.0.0.1:1/"]}', b'{"jwks_uri": "http://[::1"}']:
        hostile_issuer.documents.bodies[b"/.well-known/openid-configuration"] = body
        validator = trust(hostile_issuer.url, context, bearer_token=False)
        with pytest.raises(DependencyUnavailable):
            await validator.validate(token, CLIENT_AUDIENCE)
        with pytest.raises(DependencyUnavailable):
            await validator.check_ready()


# -- tokens that live too long ----------------------------------------------------------------------


def long_lived_pod_token(cluster: Cluster, issued_ago: int, warn_after: int = 3607) -> tuple[str, int]:
    """
    What the kubelet mounts for old clients: ``exp`` a year out, the real
    limit in ``warnafter`` (returned too).
    """
    issued = int(cluster.fake.now()) - issued_ago
    claims = cluster.fake.projected_claims("ns", "app", [CLIENT_AUDIENCE], ttl=365 * 86400, issued_at=issued)
    claims["kubernetes.io"]["warnafter"] = issued + warn_after
    return cluster.fake.sign(claims), issued + warn_after


@pytest_twisted.ensureDeferred
async def test_a_stolen_pod_token_past_warnafter_is_expired(validator: Any, cluster: Cluster) -> None:
    """
    An attacker replays a pod token taken from a node an hour and a half ago:
    its ``exp`` is a year out, but its ``warnafter`` (the real limit) has
    passed, so it is refused as expired.  Within the leeway it still passes.
    """
    stolen, _ = long_lived_pod_token(cluster, issued_ago=5400)
    with pytest.raises(TokenRejected, match="warnafter"):
        await validator.validate(stolen, CLIENT_AUDIENCE)
    recent, warn_after = long_lived_pod_token(cluster, issued_ago=3607 + 29)
    identity = await validator.validate(recent, CLIENT_AUDIENCE)
    assert identity.accepted_until == warn_after + 30, "warnafter plus leeway, not a year"


@pytest_twisted.ensureDeferred
async def test_a_token_older_than_the_maximum_age_is_refused(
    tmp_path: Path, cluster: Cluster, clock: Clock, trust: Callable[..., Any]
) -> None:
    """
    An attacker replays a long-lived token (``exp`` far out, no warnafter)
    issued longer ago than ``token.max_subject_token_age_secs``: refused.
    """
    context = plugin_context(tmp_path, cluster, clock, max_age=600)
    validator = trust(cluster.fake.issuer, context, leeway_secs=30)
    issued = int(clock.seconds())
    old = cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE], ttl=86400, issued_at=issued - 631)
    with pytest.raises(TokenRejected, match="max_subject_token_age_secs"):
        await validator.validate(old, CLIENT_AUDIENCE)
    recent = await validator.validate(cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE], ttl=86400,
                                                        issued_at=issued - 629), CLIENT_AUDIENCE)
    assert recent.accepted_until == issued - 629 + 600 + 30

    reviewer = kubernetes_tokenreview.build({"cache_ttl_secs": 0}, context)
    with pytest.raises(TokenRejected, match="max_subject_token_age_secs"):
        await reviewer.validate(cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE], ttl=86400,
                                                  issued_at=issued - 661), CLIENT_AUDIENCE)


@pytest_twisted.ensureDeferred
async def test_the_api_server_accepting_a_token_past_warnafter_does_not_make_it_acceptable(
    tmp_path: Path, cluster: Cluster, clock: Clock
) -> None:
    """The API server only warns about stale pod tokens; TokenReview mode still refuses them."""
    reviewer = kubernetes_tokenreview.build({"cache_ttl_secs": 0}, plugin_context(tmp_path, cluster, clock))
    await refused(reviewer, long_lived_pod_token(cluster, issued_ago=5400)[0])
    assert cluster.fake.requests["tokenreviews"] == 1, "the API server said yes; jwtlet said no"


@pytest_twisted.ensureDeferred
async def test_a_token_without_iat_is_refused(validator: Any, cluster: Cluster) -> None:
    """
    A token without ``iat`` cannot have its age bounded, so it is refused even
    with a valid signature and ``exp``; legacy secret-based tokens (no ``iat``,
    no ``exp``, never expiring) are refused for the same reason.
    """
    claims = good_claims(cluster)
    del claims["iat"]
    with pytest.raises(TokenRejected, match="no 'iat'"):
        await validator.validate(cluster.fake.sign(claims), CLIENT_AUDIENCE)
    prefix = "kubernetes.io/serviceaccount/"
    legacy = {"iss": cluster.fake.issuer, "aud": CLIENT_AUDIENCE, f"{prefix}namespace": "ns",
              f"{prefix}service-account.name": "app", "sub": "system:serviceaccount:ns:app"}
    await refused(validator, cluster.fake.sign(legacy))


# -- where the validator may connect ------------------------------------------------------------------


def test_plaintext_issuer_and_jwks_uri_are_config_errors(tmp_path: Path, cluster: Cluster) -> None:
    """
    An operator configures an http issuer or jwks_uri on a routable host,
    where anyone on the path could swap the keys or read the bearer token:
    refused at config time, each one reported; loopback and --dev are fine.
    """
    options = {"issuers": [
        {"issuer": "http://kubernetes.example"},
        {"issuer": "https://kubernetes-b.example", "jwks_uri": "http://kubernetes-b.example/openid/v1/jwks",
         "username_prefix": "b:"},
    ]}
    with pytest.raises(PluginConfigError) as raised:
        kubernetes_oidc.build(options, plugin_context(tmp_path, cluster))
    assert raised.value.messages == (
        "issuers[0].issuer: must be https (http is allowed only for loopback hosts or with --dev)",
        "issuers[1].jwks_uri: must be https (http is allowed only for loopback hosts or with --dev)",
    )
    kubernetes_oidc.build(options, plugin_context(tmp_path, cluster, dev=True))
    kubernetes_oidc.build({"issuers": [{"issuer": "http://127.0.0.1:6443", "jwks_uri": "http://[::1]:6443/jwks"}]},
                          plugin_context(tmp_path, cluster))
    with pytest.raises(PluginConfigError) as raised:
        kubernetes_tokenreview.build({"api_server_url": "http://kubernetes.example"}, plugin_context(tmp_path, cluster))
    assert raised.value.messages == (
        "api_server_url: must be https (http is allowed only for loopback hosts or with --dev)",)


@attrs.define
class RecordingClient:
    """
    The validator's HTTP client, recording every URL asked for and the
    Authorization sent (the validators fetch with ``get`` only).
    """

    client: Any
    sent: list[tuple[str, Any]] = attrs.field(factory=list)

    def get(self, url: str, **kwargs: Any) -> Any:
        self.sent.append((url, kwargs.get("headers", {}).get("Authorization")))
        return self.client.get(url, **kwargs)


@pytest.fixture
def errors_logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if str(event.get("log_namespace")).startswith("jwtlet.validator.") and event["log_level"] >= LogLevel.warn:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_a_discovered_plaintext_jwks_uri_makes_the_issuer_unusable(
    tmp_path: Path, cluster: Cluster, clock: Clock, errors_logged: list[dict[str, Any]], trust: Callable[..., Any]
) -> None:
    """
    The issuer's discovery document (changed by an attacker, or misconfigured)
    points jwks_uri at plain http on a routable host: jwtlet never fetches it,
    so the bearer token never goes there; keys it already had are dropped;
    tokens get 503 and /ready is down; the refusal is logged once, not per
    request.
    """
    recording = RecordingClient(cluster.client)
    context = plugin_context(tmp_path, cluster, clock, http_client=recording)  # type: ignore[arg-type]
    validator = trust(cluster.fake.issuer, context, jwks_cache_ttl_secs=60)
    await validator.validate(cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE]), CLIENT_AUDIENCE)

    cluster.fake.url = "http://jwks.attacker.example"
    clock.advance(61)
    for _ in range(5):
        with pytest.raises(DependencyUnavailable):
            await validator.validate(cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE]), CLIENT_AUDIENCE)
        with pytest.raises(DependencyUnavailable):
            await validator.check_ready()
        clock.advance(31)  # past the backoff: discovery is read again each time
    assert [url for url, _ in recording.sent if "attacker" in url] == []
    assert {url for url, _ in recording.sent} == {f"{cluster.url}/.well-known/openid-configuration",
                                                  f"{cluster.url}/openid/v1/jwks"}
    assert len(errors_logged) == 1, [event["log_format"] for event in errors_logged]
    assert "jwks.attacker.example" in errors_logged[0]["uri"]

    cluster.fake.url = cluster.url
    await validator.validate(cluster.fake.mint("ns", "app", [CLIENT_AUDIENCE]), CLIENT_AUDIENCE)
    await validator.check_ready()
