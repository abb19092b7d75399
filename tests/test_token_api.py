"""POST /token and the documents of the token exchange port, in memory (StubTreq)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import attrs
import jwt as pyjwt
import pytest
from apps import ADMIN, CLIENT_AUDIENCE, WORKLOAD, Apps, Reply, call, make_apps
from twisted.logger import globalLogPublisher

from jwtlet import policy
from jwtlet.exchange.pipeline import LOGGED_ITEMS, LOGGED_TEXT, new_token_id
from jwtlet.interfaces import DependencyUnavailable
from jwtlet.model import ResourceMapping, ScopeMapping
from jwtlet.testing.fakes import service_account
from jwtlet.web import errors

URL = "http://jwtlet.test"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def settled(deferred: Any) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "expected an already-fired Deferred"
    return results[0]


@pytest.fixture
def apps(tmp_path: Path) -> Apps:
    apps = make_apps(tmp_path)
    store = apps.store()
    settled(store.add_scope(ScopeMapping("read", {"role": "reader", "level": 1})))
    settled(store.add_scope(ScopeMapping("write", {"role": "writer"})))
    settled(store.add_scope(ScopeMapping("same-level", {"level": 1})))
    settled(store.add_mapping(ResourceMapping(
        WORKLOAD.username, "ctx", scopes=("read", "write", "same-level"), audiences=("edc", "default-aud")
    )))
    return apps


def exchange(apps: Apps, **fields: Any) -> Reply:
    data: dict[str, Any] = {"grant_type": policy.GRANT_TYPE_TOKEN_EXCHANGE, "subject_token": "token-workload",
                            "resource": "ctx"}
    data.update(fields)
    data = {k: v for k, v in data.items() if v is not None}
    return call(apps.token, "POST", f"{URL}/token", data=data)


def jwks_key(apps: Apps, token: str) -> Any:
    document = call(apps.token, "GET", f"{URL}/.well-known/jwks.json").json()
    kid = pyjwt.get_unverified_header(token)["kid"]
    (entry,) = [k for k in document["keys"] if k["kid"] == kid]
    return pyjwt.PyJWK.from_dict(entry)


def assert_refused(reply: Reply, status: int, code: str) -> None:
    assert (reply.code, reply.json()["error"]) == (status, code), reply.body
    assert reply.header("Cache-Control") == "no-store"
    assert reply.header("Pragma") == "no-cache"
    assert reply.header("Content-Type") == "application/json"
    assert set(reply.json()) == {"error", "error_description"}


def test_edc_style_exchange_issues_a_token_that_verifies_from_the_jwks(apps: Apps) -> None:
    reply = exchange(apps, scope="read read", audience="edc", client_id="edc")
    assert reply.code == 200, reply.body
    assert reply.header("Cache-Control") == "no-store"
    assert reply.header("Pragma") == "no-cache"
    body = reply.json()
    assert set(body) == {"access_token", "issued_token_type", "token_type", "expires_in", "scope"}
    assert body["issued_token_type"] == policy.TOKEN_TYPE_JWT
    assert (body["token_type"], body["expires_in"], body["scope"]) == ("Bearer", 600, "read")
    token = body["access_token"]
    claims = pyjwt.decode(token, key=jwks_key(apps, token), algorithms=["EdDSA"], audience="edc",
                          options={"verify_exp": False, "verify_iat": False, "verify_nbf": False})
    now = int(apps.clock.seconds())
    assert claims == {
        "iss": "https://jwtlet.test", "sub": "ctx", "jwtlet_pc": "ctx", "aud": "edc",
        "iat": now, "nbf": now, "exp": now + 600, "jti": claims["jti"],
        "act": {"sub": WORKLOAD.username, "iss": WORKLOAD.issuer, "k8s_uid": WORKLOAD.uid},
        "role": "reader", "level": 1,
    }
    header = pyjwt.get_unverified_header(token)
    assert header["typ"] == "JWT" and header["alg"] == "EdDSA"


def test_no_scope_and_no_audience_gives_the_default_audience_and_no_scope_member(apps: Apps) -> None:
    reply = exchange(apps)
    assert reply.code == 200
    assert "scope" not in reply.json()
    claims = pyjwt.decode(reply.json()["access_token"], options={"verify_signature": False})
    assert claims["aud"] == "default-aud"
    assert "role" not in claims


def test_several_audiences_make_an_array(apps: Apps) -> None:
    reply = exchange(apps, audience=["edc", "default-aud"])
    claims = pyjwt.decode(reply.json()["access_token"], options={"verify_signature": False})
    assert claims["aud"] == ["edc", "default-aud"]


def test_a_token_id_is_a_version_4_uuid_in_its_usual_form() -> None:
    for _ in range(200):
        token_id = new_token_id()
        parsed = uuid.UUID(token_id)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, token_id)


def test_each_jti_is_fresh(apps: Apps) -> None:
    ids = {pyjwt.decode(exchange(apps).json()["access_token"], options={"verify_signature": False})["jti"]
           for _ in range(5)}
    assert len(ids) == 5


def test_actor_token_becomes_the_current_actor(apps: Apps) -> None:
    reply = exchange(apps, actor_token="token-admin", actor_token_type=policy.TOKEN_TYPE_JWT)
    claims = pyjwt.decode(reply.json()["access_token"], options={"verify_signature": False})
    assert claims["act"] == {
        "sub": ADMIN.username, "iss": ADMIN.issuer, "k8s_uid": ADMIN.uid,
        "act": {"sub": WORKLOAD.username, "iss": WORKLOAD.issuer, "k8s_uid": WORKLOAD.uid},
    }
    assert_refused(exchange(apps, actor_token="bogus", actor_token_type=policy.TOKEN_TYPE_JWT), 400,
                   "invalid_grant")


def test_the_decision_order_and_its_codes(apps: Apps) -> None:
    rejected = exchange(apps, subject_token="forged")
    assert_refused(rejected, 400, "invalid_grant")
    assert rejected.json()["error_description"] == "subject token rejected"
    apps.validator.add("token-stranger", service_account("ns", "stranger"), CLIENT_AUDIENCE)
    assert_refused(exchange(apps, subject_token="token-stranger"), 403, "unauthorized_client")
    assert_refused(exchange(apps, resource="other"), 403, "unauthorized_client")
    assert_refused(exchange(apps, scope="read admin"), 403, "unauthorized_client")
    assert_refused(exchange(apps, scope="read write"), 400, "invalid_scope")
    assert exchange(apps, scope="read same-level").code == 200
    assert_refused(exchange(apps, audience="elsewhere"), 403, "unauthorized_client")
    apps.validator.add("token-wrong-aud", WORKLOAD, "another-audience")
    assert_refused(exchange(apps, subject_token="token-wrong-aud"), 400, "invalid_grant")


def test_a_validator_outage_is_503_with_retry_after_and_never_a_token(apps: Apps) -> None:
    apps.validator.down = True
    reply = exchange(apps)
    assert_refused(reply, 503, "temporarily_unavailable")
    assert reply.header("Retry-After") == "5"


@pytest.mark.parametrize(
    "fields, status, code",
    [
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"subject_token": None}, 400, "invalid_request"),
        ({"resource": None}, 400, "invalid_request"),
        ({"resource": ["a", "b"]}, 400, "invalid_target"),
        ({"scope": ["read", "write"]}, 400, "invalid_request"),
        ({"subject_token_type": "urn:unknown"}, 400, "invalid_request"),
        ({"subject_token_type": policy.TOKEN_TYPE_API_KEY}, 400, "invalid_request"),
        ({"requested_token_type": "urn:ietf:params:oauth:token-type:saml1"}, 400, "invalid_request"),
        ({"actor_token_type": policy.TOKEN_TYPE_JWT}, 400, "invalid_request"),
    ],
)
def test_malformed_requests(apps: Apps, fields: dict[str, Any], status: int, code: str) -> None:
    assert_refused(exchange(apps, **fields), status, code)


def test_require_subject_token_type(tmp_path: Path) -> None:
    apps = make_apps(tmp_path, {"token": {"require_subject_token_type": True}})
    assert_refused(exchange(apps), 400, "invalid_request")


def test_only_urlencoded_bodies_and_at_most_64_kib(apps: Apps) -> None:
    as_json = call(apps.token, "POST", f"{URL}/token", json={"grant_type": policy.GRANT_TYPE_TOKEN_EXCHANGE})
    assert_refused(as_json, 400, "invalid_request")
    big = call(apps.token, "POST", f"{URL}/token", headers=FORM, data=b"a=" + b"x" * (64 * 1024))
    assert big.code == 413
    assert big.json() == {"error": "request_too_large"}
    assert big.header("Cache-Control") == "no-store"
    garbage = call(apps.token, "POST", f"{URL}/token", headers=FORM, data=b"\xff\xfe=\x00")
    assert_refused(garbage, 400, "invalid_request")


def test_unknown_paths_and_wrong_methods_are_json(apps: Apps) -> None:
    missing = call(apps.token, "GET", f"{URL}/nowhere")
    assert (missing.code, missing.json()) == (404, {"error": "not_found"})
    wrong = call(apps.token, "GET", f"{URL}/token")
    assert wrong.code == 405
    assert wrong.header("Allow") == "POST"
    assert wrong.header("Content-Type") == "application/json"


def test_jwks_and_metadata_documents(apps: Apps) -> None:
    jwks = call(apps.token, "GET", f"{URL}/.well-known/jwks.json")
    assert jwks.header("Cache-Control") == "public, max-age=300"
    assert jwks.header("Content-Type") == "application/json"
    (key,) = jwks.json()["keys"]
    assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
    assert "d" not in key
    expected = {
        "issuer": "https://jwtlet.test",
        "token_endpoint": "https://jwtlet.test/token",
        "jwks_uri": "https://jwtlet.test/.well-known/jwks.json",
        "grant_types_supported": [policy.GRANT_TYPE_TOKEN_EXCHANGE],
        "token_endpoint_auth_methods_supported": ["none"],
        "response_types_supported": ["token"],
        "id_token_signing_alg_values_supported": ["EdDSA"],
    }
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
        assert call(apps.token, "GET", URL + path).json() == expected


def test_health_and_readiness(apps: Apps) -> None:
    health = call(apps.token, "GET", f"{URL}/health")
    assert (health.code, health.body) == (200, b"OK")
    assert health.header("Content-Type").startswith("text/plain")
    ready = call(apps.token, "GET", f"{URL}/ready")
    assert (ready.code, ready.json()) == (200, {"status": "ready"})


def test_metrics_count_decisions(apps: Apps) -> None:
    exchange(apps)
    exchange(apps, subject_token="forged")
    text = apps.metrics.exposition().decode()
    assert 'jwtlet_exchanges_total{error="",outcome="issued"} 1.0' in text
    assert 'jwtlet_exchanges_total{error="invalid_grant",outcome="refused"} 1.0' in text


def test_rate_limits_answer_429_with_retry_after(tmp_path: Path) -> None:
    apps = make_apps(tmp_path, {"rate_limits": {"per_client_per_sec": 2}})
    settled(apps.store().add_mapping(ResourceMapping(WORKLOAD.username, "ctx")))
    assert [exchange(apps).code for _ in range(2)] == [200, 200]
    limited = exchange(apps)
    assert (limited.code, limited.json()) == (429, {"error": "rate_limited"})
    assert limited.header("Retry-After") == "1"
    apps.clock.advance(1)
    assert exchange(apps).code == 200
    assert exchange(apps, subject_token="forged").code == 400, "invalid tokens are not counted per client"


def test_global_rate_limit_counts_only_validated_tokens(tmp_path: Path) -> None:
    apps = make_apps(tmp_path, {"rate_limits": {"global_per_sec": 1}})
    settled(apps.store().add_mapping(ResourceMapping(WORKLOAD.username, "ctx")))
    assert [exchange(apps, subject_token="forged").code for _ in range(3)] == [400, 400, 400]
    assert exchange(apps).code == 200, "rejected tokens never use up the budget of valid clients"
    assert exchange(apps).code == 429


def test_replayed_subject_tokens_are_refused_when_configured(tmp_path: Path) -> None:
    apps = make_apps(tmp_path, {"token": {"reject_replayed_subject_tokens": True}})
    settled(apps.store().add_mapping(ResourceMapping(WORKLOAD.username, "ctx")))
    once = attrs.evolve(WORKLOAD, token_id="jti-1", expires_at=apps.clock.seconds() + 60)
    apps.validator.add("token-once", once, CLIENT_AUDIENCE)
    assert exchange(apps, subject_token="token-once").code == 200
    assert_refused(exchange(apps, subject_token="token-once"), 400, "invalid_grant")
    assert exchange(apps).code == 200, "tokens without a jti are not subject to replay detection"
    assert exchange(apps).code == 200


def test_query_string_parameters_are_not_mixed_into_the_form(apps: Apps) -> None:
    reply = call(apps.token, "POST", f"{URL}/token?resource=other&scope=admin", data={
        "grant_type": policy.GRANT_TYPE_TOKEN_EXCHANGE, "subject_token": "token-workload", "resource": "ctx"})
    assert reply.code == 200, reply.body
    too_many = "&".join(f"f{index}=x" for index in range(100))
    reply = call(apps.token, "POST", f"{URL}/token", data=too_many.encode(), headers=FORM)
    assert_refused(reply, 400, "invalid_request")


def test_an_api_key_present_but_not_a_string_is_a_malformed_body(tmp_path: Path) -> None:
    apps = make_apps(tmp_path, {"api_keys": {"profiles": {"integration": {"audience": "integration"}}}})

    def v0(body: bytes) -> Reply:
        return call(apps.token, "POST", f"{URL}/v0/token/integration", data=body,
                    headers={"Content-Type": "application/json"})

    for body in (b'{"api_key": null}', b'{"api_key": 5}', b'{"api_key": ["k"]}'):
        reply = v0(body)
        assert (reply.code, reply.json()) == (400, {"error": "invalid request body"}), body
    absent = v0(b'{"key": "jwtk.a.b.c"}')
    assert (absent.code, absent.json()) == (401, {"error": "invalid API key"}), "a missing key is a bad key"


@pytest.mark.parametrize(
    "error, oauth, m_lab",
    [
        (policy.invalid_request("x"), (400, {"error": "invalid_request", "error_description": "x"}),
         (400, {"error": "invalid_request"})),
        (policy.unauthorized_client("x"), (403, {"error": "unauthorized_client", "error_description": "x"}),
         (400, {"error": "unauthorized_client"})),
        (policy.invalid_grant(), (400, {"error": "invalid_grant", "error_description": "subject token rejected"}),
         (401, {"error": "invalid API key"})),
        (policy.invalid_target("unknown API-key profile"),
         (400, {"error": "invalid_target", "error_description": "unknown API-key profile"}),
         (404, {"error": "unknown profile"})),
        (policy.RateLimited(7), (429, {"error": "rate_limited"}), (429, {"error": "rate_limited"})),
        (DependencyUnavailable("vault down", 9),
         (503, {"error": "temporarily_unavailable", "error_description": "a dependency is unavailable, retry later"}),
         (503, {"error": "temporarily_unavailable"})),
        (policy.ServerError(), (500, {"error": "server_error", "error_description": "internal error"}),
         (500, {"error": "server_error"})),
    ],
)
def test_the_token_port_says_each_domain_error_one_way_per_contract(
    error: Exception, oauth: tuple[int, dict[str, str]], m_lab: tuple[int, dict[str, str]]
) -> None:
    """Policy raises statuses nowhere: the port's one mapping gives RFC 6749 and M-Lab answers, never cached."""
    for answer, expected in ((errors.oauth_error(error), oauth), (errors.api_key_error(error), m_lab)):  # type: ignore[arg-type]
        assert (answer.status, dict(answer.body)) == expected
        assert answer.headers["Cache-Control"] == "no-store"
        retry_after = getattr(error, "retry_after", None)
        assert answer.headers.get("Retry-After") == (str(retry_after) if retry_after else None)


def test_a_refusal_logs_what_an_unauthenticated_client_sent_only_in_part(apps: Apps) -> None:
    """A garbage token with a 40 KiB resource and a thousand scopes must not become a 40 KiB log line."""
    refused: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("jwtlet_event") == "token.refused":
            refused.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        reply = exchange(apps, subject_token="garbage", resource="r" * 40_000,
                         scope=" ".join(f"scope-{index}" for index in range(1000)))
    finally:
        globalLogPublisher.removeObserver(observe)
    assert reply.code in (400, 401)
    (event,) = refused
    assert len(event["resource"]) == LOGGED_TEXT
    assert len(event["scopes"]) == LOGGED_ITEMS
