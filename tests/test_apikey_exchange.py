"""POST /v0/token/{profile} and the API-key branch of POST /token, in memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import jwt as pyjwt
import pytest
from apps import Apps, Reply, call, make_apps
from twisted.internet.defer import fail
from twisted.logger import globalLogPublisher

from jwtlet import policy
from jwtlet.apikeys import keys as apikeys
from jwtlet.interfaces import DependencyUnavailable
from jwtlet.model import ApiKeyRecord, Integration
from jwtlet.plugins.api_key import api_key as api_key_factory

URL = "http://jwtlet.test"
PROFILES = {"api_keys": {"profiles": {"integration": {"audience": "integration", "ttl_secs": 20},
                                      "autojoin": {"audience": "autojoin", "ttl_secs": 3600}}}}


def settled(deferred: Any) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    return results[0]


@pytest.fixture
def apps(tmp_path: Path) -> Apps:
    return make_apps(tmp_path, PROFILES)


def new_key(apps: Apps, key_id: str = "k1", tier: int = 2) -> str:
    store = apps.store()
    if not any(i.integration_id == "acme" for i in settled(store.list_integrations())):
        settled(store.add_integration(Integration("acme")))
    made = apikeys.make_key("jwtk", "acme", key_id, lambda n: bytes([len(key_id)] * n))
    settled(store.add_api_key(ApiKeyRecord("acme", made.key_id, made.secret_sha256, tier=tier)))
    return made.text


def v0(apps: Apps, profile: str, body: Any, raw: bytes | None = None) -> Reply:
    data = raw if raw is not None else json.dumps(body).encode()
    return call(apps.token, "POST", f"{URL}/v0/token/{profile}", data=data,
                headers={"Content-Type": "application/json"})


def verified(apps: Apps, token: str, audience: str) -> dict[str, Any]:
    jwks = call(apps.token, "GET", f"{URL}/.well-known/jwks.json").json()
    (key,) = jwks["keys"]
    return pyjwt.decode(token, pyjwt.PyJWK.from_dict(key), algorithms=["EdDSA"], audience=audience,
                        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False})


def test_a_key_becomes_a_token_with_the_profile_claims(apps: Apps) -> None:
    key = new_key(apps)
    reply = v0(apps, "integration", {"api_key": key})
    assert reply.code == 200 and reply.header("Cache-Control") == "no-store"
    claims = verified(apps, reply.json()["token"], "integration")
    now = int(apps.clock.seconds())
    assert claims == {"iss": "https://jwtlet.test", "aud": "integration", "iat": now, "nbf": now, "exp": now + 20,
                      "jti": claims["jti"], "int_id": "acme", "key_id": "k1", "tier": 2}
    autojoin = verified(apps, v0(apps, "autojoin", {"api_key": key}).json()["token"], "autojoin")
    assert autojoin["exp"] - autojoin["iat"] == 3600


def test_every_bad_key_is_the_same_401(apps: Apps) -> None:
    key = new_key(apps)
    prefix, integration, key_id, secret = key.split(".")
    bad = [None, "", "garbage", f"other.{integration}.{key_id}.{secret}", f"{prefix}.{integration}.nope.{secret}",
           f"{prefix}.{integration}.{key_id}.{'A' * 43}", key + ".x", key[:-1] + "\u00e9", "x" * 400]
    for candidate in bad:
        reply = v0(apps, "integration", {} if candidate is None else {"api_key": candidate})
        assert (reply.code, reply.json()) == (401, {"error": "invalid API key"}), candidate
    body = json.dumps(v0(apps, "integration", {"api_key": "x"}).json())
    assert secret not in body


def test_revocation_takes_effect_on_the_next_request(apps: Apps) -> None:
    key = new_key(apps)
    assert v0(apps, "integration", {"api_key": key}).code == 200
    settled(apps.store().revoke_api_key("acme", "k1"))
    assert v0(apps, "integration", {"api_key": key}).code == 401


def test_bad_bodies_profiles_and_methods(apps: Apps) -> None:
    # A present api_key that is not a string (null included) is a bad body; an absent one is a bad key.
    for raw in (b"not json", b"[1,2]", b'"text"', b'{"api_key": 5}', b'{"api_key": null}', b"[[[[[[[[[[",
                b"[" * 30_000 + b"]" * 30_000, b'{"api_key": "a", "api_key": "b"}'):
        reply = v0(apps, "integration", None, raw=raw)
        assert (reply.code, reply.json()) == (400, {"error": "invalid request body"}), raw
    absent = v0(apps, "integration", {})
    assert (absent.code, absent.json()) == (401, {"error": "invalid API key"})
    missing = v0(apps, "nope", {"api_key": new_key(apps)})
    assert (missing.code, missing.json()) == (404, {"error": "unknown profile"})
    wrong = call(apps.token, "GET", f"{URL}/v0/token/integration")
    assert wrong.code == 405 and wrong.header("Allow") == "POST"


def test_a_store_outage_is_503_never_401(apps: Apps, monkeypatch: pytest.MonkeyPatch) -> None:
    key = new_key(apps)
    monkeypatch.setattr(type(apps.store().provider), "get_api_key", lambda *_: fail(DependencyUnavailable("db down")))
    reply = v0(apps, "integration", {"api_key": key})
    assert (reply.code, reply.json()["error"]) == (503, "temporarily_unavailable")
    assert reply.header("Retry-After") == "5"


def test_the_route_is_absent_without_api_keys(tmp_path: Path) -> None:
    apps = make_apps(tmp_path)
    reply = v0(apps, "integration", {"api_key": "jwtk.a.b.c"})
    assert (reply.code, reply.json()) == (404, {"error": "not_found"})


def test_the_same_exchange_through_the_token_endpoint(apps: Apps) -> None:
    key = new_key(apps, tier=7)

    def form(**fields: str) -> Reply:
        data = {"grant_type": policy.GRANT_TYPE_TOKEN_EXCHANGE, "subject_token": key,
                "subject_token_type": policy.TOKEN_TYPE_API_KEY, "resource": "autojoin"}
        data.update(fields)
        return call(apps.token, "POST", f"{URL}/token", data=data)

    reply = form()
    assert reply.code == 200 and reply.json()["expires_in"] == 3600
    assert verified(apps, reply.json()["access_token"], "autojoin")["tier"] == 7
    assert (form(resource="nope").code, form(resource="nope").json()["error"]) == (400, "invalid_target")
    assert (form(subject_token="jwtk.x.y.z").code, form(subject_token="jwtk.x.y.z").json()["error"]) == \
        (400, "invalid_grant")


def test_the_api_key_validator_plugin(apps: Apps) -> None:
    import types

    key = new_key(apps, tier=3)
    validator = api_key_factory.build({}, types.SimpleNamespace(
        store=apps.store(), config=types.SimpleNamespace(api_keys=None)))
    identity = settled(validator.validate(key, None))
    assert (identity.username, identity.extra["tier"]) == ("apikey:acme:k1", 3)
    assert settled(validator.validate("jwtk.acme.k1.wrong", None)).check(Exception)


def test_a_stored_key_is_never_readable_through_management(apps: Apps) -> None:
    created = call(apps.management, "POST", f"{URL}/api/v1/integrations/acme/keys",
                   data=json.dumps({"tier": 1}).encode(),
                   headers={"Authorization": "Bearer token-admin", "Content-Type": "application/json"})
    assert created.code == 404, "the integration must exist first"
    # Two profiles are configured: an integration names the ones its keys may use (migration.md, M-Lab).
    call(apps.management, "POST", f"{URL}/api/v1/integrations",
         data=json.dumps({"integrationId": "acme", "profiles": ["integration"]}).encode(),
         headers={"Authorization": "Bearer token-admin", "Content-Type": "application/json"})
    created = call(apps.management, "POST", f"{URL}/api/v1/integrations/acme/keys",
                   data=json.dumps({"tier": 1}).encode(),
                   headers={"Authorization": "Bearer token-admin", "Content-Type": "application/json"})
    key = created.json()["apiKey"]
    secret = key.rsplit(".", 1)[1]
    assert v0(apps, "integration", {"api_key": key}).code == 200
    admin = {"Authorization": "Bearer token-admin"}
    listing = call(apps.management, "GET", f"{URL}/api/v1/integrations", headers=admin)
    assert secret not in listing.body.decode()
    digest = apikeys.digest(secret)
    assert digest.hex() not in listing.body.decode()


def test_a_flood_of_bad_keys_does_not_spend_the_global_budget_of_good_ones(tmp_path: Path) -> None:
    """An attacker sprays invalid keys under a global limit: the integration's valid key still works."""
    apps = make_apps(tmp_path, {**PROFILES, "rate_limits": {"global_per_sec": 2}})
    key = new_key(apps)
    for attempt in range(50):
        assert v0(apps, "integration", {"api_key": f"jwtk.acme.k1.forged{attempt}"}).code == 401
    assert v0(apps, "integration", {"api_key": key}).code == 200


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def decisions(events: list[dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    return [(e["jwtlet_event"], e.get("client"), e.get("error")) for e in events
            if e.get("jwtlet_event") in ("token.issued", "token.refused")]


def test_a_key_spraying_client_is_limited_per_key_like_any_other_client(tmp_path: Path) -> None:
    """One valid key hammered past the per-client limit: 429 with Retry-After, on both routes alike."""
    apps = make_apps(tmp_path, {**PROFILES, "rate_limits": {"per_client_per_sec": 1}})
    key = new_key(apps)
    assert v0(apps, "integration", {"api_key": key}).code == 200
    limited = v0(apps, "integration", {"api_key": key})
    assert (limited.code, limited.json(), limited.header("Retry-After")) == (429, {"error": "rate_limited"}, "1")
    through_token = call(apps.token, "POST", f"{URL}/token", data={
        "grant_type": policy.GRANT_TYPE_TOKEN_EXCHANGE, "subject_token": key,
        "subject_token_type": policy.TOKEN_TYPE_API_KEY, "resource": "integration"})
    assert (through_token.code, through_token.json()["error"]) == (429, "rate_limited")
    assert through_token.header("Cache-Control") == "no-store"


def test_key_exchanges_are_logged_and_counted_as_the_one_pipeline_does(apps: Apps, events: list[Any]) -> None:
    """Issued and refused keys leave the same token.issued / token.refused events as any exchange, never the key."""
    key = new_key(apps)
    assert v0(apps, "integration", {"api_key": key}).code == 200
    assert v0(apps, "integration", {"api_key": key + "x"}).code == 401
    assert decisions(events) == [("token.issued", "apikey:acme:k1", None), ("token.refused", None, "invalid_grant")]
    assert all(key not in repr(event) for event in events)
    exposition = apps.metrics.exposition().decode()
    assert 'jwtlet_apikey_exchanges_total{outcome="issued",profile="integration"} 1.0' in exposition
    assert 'jwtlet_apikey_exchanges_total{outcome="refused",profile="integration"} 1.0' in exposition


def test_an_unknown_profile_never_becomes_a_metric_label(apps: Apps) -> None:
    """An attacker inventing profile names must not grow the metrics without bound."""
    key = new_key(apps)
    for index in range(5):
        assert v0(apps, f"invented-{index}", {"api_key": key}).code == 404
    assert "invented" not in apps.metrics.exposition().decode()
