"""The management port in memory (StubTreq): routes, roles, payload rules, audit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pytest
from apps import Apps, Reply, call, make_apps
from twisted.logger import globalLogPublisher

URL = "http://jwtlet.test"
MAPPING = {"clientIdentifier": "system:serviceaccount:ns:a/b", "participantContext": "ctx",
           "scopes": ["write", "read"], "audiences": ["z", "a"]}
ENCODED = "system%3Aserviceaccount%3Ans%3Aa%2Fb/ctx"


@pytest.fixture
def apps(tmp_path: Path) -> Apps:
    return make_apps(tmp_path)


@pytest.fixture
def audit() -> Any:
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "jwtlet.management" and "outcome" in event:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def api(apps: Apps, method: str, path: str, body: Any = None, who: Optional[str] = "admin",
        headers: Optional[dict[str, str]] = None) -> Reply:
    sent = dict(headers or {})
    if who is not None:
        sent.setdefault("Authorization", f"Bearer token-{who}")
    kwargs: dict[str, Any] = {"headers": sent}
    if body is not None:
        sent.setdefault("Content-Type", "application/json")
        kwargs["data"] = json.dumps(body).encode()
    return call(apps.management, method, f"{URL}/api/v1{path}", **kwargs)


def test_mapping_lifecycle_with_encoded_paths(apps: Apps, audit: list[dict[str, Any]]) -> None:
    created = api(apps, "POST", "/mappings", MAPPING)
    assert created.code == 201, created.body
    assert created.json() == dict(MAPPING, scopes=["read", "write"], audiences=["a", "z"])
    assert created.header("Location") == f"/api/v1/mappings/{ENCODED}"
    assert api(apps, "POST", "/mappings", MAPPING).code == 409
    assert api(apps, "GET", f"/mappings/{ENCODED}").json()["scopes"] == ["read", "write"]
    listed = api(apps, "GET", "/mappings?clientIdentifier=system%3Aserviceaccount%3Ans%3Aa%2Fb").json()
    assert [m["participantContext"] for m in listed] == ["ctx"]
    assert api(apps, "GET", "/mappings?clientIdentifier=nobody").json() == []
    changed = dict(MAPPING, scopes=["read"])
    assert api(apps, "PUT", f"/mappings/{ENCODED}", changed).code == 204
    assert api(apps, "GET", f"/mappings/{ENCODED}").json()["scopes"] == ["read"]
    other = dict(MAPPING, participantContext="other")
    assert api(apps, "PUT", f"/mappings/{ENCODED}", other).code == 400
    assert api(apps, "PUT", "/mappings/x/y", dict(MAPPING, clientIdentifier="x", participantContext="y")).code == 404
    assert api(apps, "DELETE", f"/mappings/{ENCODED}").code == 204
    assert api(apps, "DELETE", f"/mappings/{ENCODED}").code == 204
    assert api(apps, "GET", f"/mappings/{ENCODED}").code == 404
    outcomes = [(e["jwtlet_event"], e["outcome"]) for e in audit]
    assert outcomes == [
        ("mapping.created", "success"),
        ("mapping.created", "refused"),
        ("mapping.updated", "success"),
        ("mapping.updated", "refused"),
        ("mapping.updated", "refused"),
        ("mapping.deleted", "success"),
        ("mapping.deleted", "success"),
    ]
    assert audit[0]["actor"] == "system:serviceaccount:platform:admin"
    assert audit[0]["clientIdentifier"] == MAPPING["clientIdentifier"]
    assert audit[0]["participantContext"] == "ctx"


def test_delete_all_mappings_of_a_client(apps: Apps) -> None:
    for context in ("a", "b"):
        assert api(apps, "POST", "/mappings", dict(MAPPING, participantContext=context)).code == 201
    assert api(apps, "DELETE", "/mappings/system%3Aserviceaccount%3Ans%3Aa%2Fb").code == 204
    assert api(apps, "GET", "/mappings").json() == []
    assert api(apps, "GET", "/mappings/only-client").code == 405


def test_scope_lifecycle_and_reserved_claims(apps: Apps) -> None:
    scope = {"scope": "read", "claims": {"role": "reader", "nested": {"a": [1, 2]}}}
    assert api(apps, "POST", "/scopes", scope).code == 201
    assert api(apps, "POST", "/scopes", scope).code == 409
    assert api(apps, "GET", "/scopes/read").json() == scope
    assert api(apps, "GET", "/scopes").json() == [scope]
    for claim in ("sub", "iss", "aud", "exp", "nbf", "iat", "jti", "act", "jwtlet_pc"):
        reply = api(apps, "POST", "/scopes", {"scope": "bad", "claims": {claim: 1}})
        assert (reply.code, reply.json()) == (400, {"error": f"claim '{claim}' is reserved"})
    assert api(apps, "PUT", "/scopes/read", {"scope": "other", "claims": {}}).code == 400
    assert api(apps, "PUT", "/scopes/missing", {"scope": "missing", "claims": {}}).code == 404
    assert api(apps, "PUT", "/scopes/read", {"scope": "read", "claims": {"role": "r2"}}).code == 204
    assert api(apps, "GET", "/scopes/read").json()["claims"] == {"role": "r2"}
    assert api(apps, "DELETE", "/scopes/read").code == 204
    assert api(apps, "DELETE", "/scopes/read").code == 204
    assert api(apps, "GET", "/scopes/read").code == 404


def test_authentication(apps: Apps) -> None:
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"},
                    {"Authorization": "Bearer token-unknown"}):
        reply = api(apps, "GET", "/mappings", who=None, headers=headers)
        assert (reply.code, reply.json()) == (401, {"error": "unauthorized"})
        assert reply.header("WWW-Authenticate") == "Bearer"
    assert api(apps, "GET", "/mappings", who=None,
               headers={"Authorization": "bEaReR token-admin"}).code == 200


def test_roles(apps: Apps) -> None:
    assert api(apps, "GET", "/mappings", who="reader").code == 200
    assert api(apps, "POST", "/mappings", MAPPING, who="reader").code == 403
    assert api(apps, "POST", "/mappings", MAPPING, who="writer").code == 201
    forbidden = api(apps, "GET", "/mappings", who="writer")
    assert (forbidden.code, forbidden.json()) == (403, {"error": "forbidden"})
    assert api(apps, "POST", "/scopes", {"scope": "s", "claims": {}}, who="writer").code == 403
    assert api(apps, "GET", "/scopes", who="workload").code == 403


def test_method_checks_come_before_authentication(apps: Apps) -> None:
    reply = api(apps, "PATCH", "/mappings", who=None)
    assert reply.code == 405
    assert set(reply.header("Allow").split(", ")) >= {"GET", "POST"}


def test_payload_rules(apps: Apps) -> None:
    as_text = api(apps, "POST", "/mappings", MAPPING, headers={"Content-Type": "text/plain"})
    assert as_text.code == 415
    malformed = call(apps.management, "POST", f"{URL}/api/v1/mappings", data=b"{not json",
                     headers={"Authorization": "Bearer token-admin", "Content-Type": "application/json"})
    assert (malformed.code, malformed.json()) == (400, {"error": "malformed JSON"})
    huge = call(apps.management, "POST", f"{URL}/api/v1/mappings", data=b" " * (1024 * 1024 + 1),
                headers={"Authorization": "Bearer token-admin", "Content-Type": "application/json"})
    assert huge.code == 413
    bad_bodies = [
        [],
        dict(MAPPING, clientIdentifier=""),
        dict(MAPPING, clientIdentifier="x" * 1025),
        dict(MAPPING, participantContext="a\x00b"),
        dict(MAPPING, scopes="read"),
        dict(MAPPING, scopes=["has space"]),
        dict(MAPPING, audiences=[""]),
        {k: v for k, v in MAPPING.items() if k != "scopes"},
    ]
    for body in bad_bodies:
        reply = api(apps, "POST", "/mappings", body)
        assert reply.code == 400, body
        assert isinstance(reply.json()["error"], str)
    accepted = api(apps, "POST", "/mappings", dict(MAPPING, unknownField=1, clientIdentifier="x" * 1024))
    assert accepted.code == 201


def test_unknown_paths(apps: Apps) -> None:
    for path in ("/nothing", "/mappings/a/b/c", "/scopes/a/b", "/integrations/x/y"):
        reply = api(apps, "GET" if "integrations" not in path else "POST", path)
        assert (reply.code, reply.json()) == (404, {"error": "not_found"}), path


def test_integrations_and_keys_never_show_secrets(apps: Apps, audit: list[dict[str, Any]]) -> None:
    assert api(apps, "POST", "/integrations", {"integrationId": "acme", "description": "Acme"}).code == 201
    assert api(apps, "POST", "/integrations", {"integrationId": "acme"}).code == 409
    created = api(apps, "POST", "/integrations/acme/keys", {"tier": 2, "description": "ci", "keyId": "k1"})
    assert created.code == 201
    api_key = created.json()["apiKey"]
    assert created.json()["keyId"] == "k1"
    assert api_key.startswith("jwtk.acme.k1.")
    assert api(apps, "POST", "/integrations/acme/keys", {"tier": 2, "keyId": "k1"}).code == 409
    assert api(apps, "POST", "/integrations/ghost/keys", {"tier": 1}).code == 404
    listing = api(apps, "GET", "/integrations")
    secret = api_key.rsplit(".", 1)[1]
    assert secret not in listing.body.decode()
    assert listing.json() == [{"integrationId": "acme", "description": "Acme", "keys": [
        {"keyId": "k1", "tier": 2, "description": "ci", "status": "active"}]}]
    assert api(apps, "DELETE", "/integrations/acme/keys/k1").code == 204
    assert api(apps, "GET", "/integrations").json()[0]["keys"][0]["status"] == "revoked"
    assert all(secret not in json.dumps({k: str(v) for k, v in e.items()}) for e in audit)


def test_metrics_endpoint(apps: Apps) -> None:
    api(apps, "GET", "/mappings")
    reply = call(apps.management, "GET", f"{URL}/metrics")
    assert reply.code == 200
    assert reply.header("Content-Type").startswith("text/plain")
    assert 'jwtlet_management_requests_total{route="/api/v1/mappings",status="200"} 1.0' in reply.body.decode()


def test_key_fields_out_of_range_are_400_not_500(apps: Apps) -> None:
    assert api(apps, "POST", "/integrations", {"integrationId": "acme"}).code == 201
    for body in ({"tier": 2**64}, {"tier": -1}, {"tier": True}, {"description": "x" * 1025}, {"description": 5}):
        reply = api(apps, "POST", "/integrations/acme/keys", body)
        assert reply.code == 400, body
    assert api(apps, "POST", "/integrations/acme/keys", {"tier": 2**31 - 1}).code == 201
