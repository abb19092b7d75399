"""
``POST /introspect`` (RFC 7662) and ``client_audience`` lists: what a
Mozambigue user gets instead of linking a validation library (migration.md,
"Mozambigue").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import attrs
import jsonschema
import pytest
import yaml
from apps import ADMIN, CLIENT_AUDIENCE, WORKLOAD, Apps, Reply, call, make_apps
from jwcrypto.common import base64url_encode
from twisted.internet.defer import Deferred, fail
from zope.interface import implementer

from jwtlet.interfaces import DependencyUnavailable, IValidator
from jwtlet.model import Identity
from jwtlet.providers import adapt
from jwtlet.testing.fakes import StaticValidator, service_account

INTROSPECTOR = service_account("platform", "introspector")
NO_ROLE = service_account("platform", "nobody")
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
URL = "http://jwtlet.test/introspect"
ROLES = {
    INTROSPECTOR.username: ["jwtlet:introspect"],
    ADMIN.username: ["management:write"],
}
ISSUED_AT = 1_799_999_000
EXPIRES_AT = 1_800_003_600


def jwt_shaped(claims: dict[str, Any]) -> str:
    """A token with these claims in its payload (the validator fake vouches for it, signature or not)."""
    def part(document: dict[str, Any]) -> str:
        return base64url_encode(json.dumps(document).encode())

    return f"{part({'alg': 'RS256', 'kid': 'k'})}.{part(claims)}.c2lnbmF0dXJl"


SUBJECT_CLAIMS = {
    "iss": "https://kubernetes.test", "sub": WORKLOAD.username, "aud": [CLIENT_AUDIENCE, "https://other"],
    "iat": ISSUED_AT, "exp": EXPIRES_AT,
}
SUBJECT_TOKEN = jwt_shaped(SUBJECT_CLAIMS)


@pytest.fixture
def apps(tmp_path: Path) -> Apps:
    return introspecting_apps(tmp_path)


def introspecting_apps(tmp_path: Path, overrides: Optional[dict[str, Any]] = None) -> Apps:
    built = make_apps(tmp_path, {"service_accounts": ROLES, **(overrides or {})})
    for identity in (INTROSPECTOR, NO_ROLE):
        built.validator.add(f"token-{identity.name}", identity, CLIENT_AUDIENCE)
    built.validator.add(SUBJECT_TOKEN, attrs.evolve(WORKLOAD, expires_at=float(EXPIRES_AT)), CLIENT_AUDIENCE)
    return built


def introspect(apps: Apps, token: Optional[str] = SUBJECT_TOKEN, caller: Optional[str] = "token-introspector",
               body: Optional[bytes] = None, headers: Optional[dict[str, str]] = None) -> Reply:
    sent = dict(FORM, **(headers or {}))
    if caller is not None:
        sent["Authorization"] = f"Bearer {caller}"
    if body is None:
        body = b"" if token is None else f"token={token}&token_type_hint=access_token".encode()
    return call(apps.token, "POST", URL, data=body, headers=sent)


def test_an_accepted_token_is_active_and_says_whose_it_is(apps: Apps) -> None:
    reply = introspect(apps)
    assert reply.code == 200
    assert reply.header("Cache-Control") == "no-store"
    assert reply.json() == {
        "active": True,
        "iss": "https://kubernetes.test",
        "sub": WORKLOAD.username,
        "aud": [CLIENT_AUDIENCE, "https://other"],
        "exp": EXPIRES_AT,
        "iat": ISSUED_AT,
        "username": WORKLOAD.username,
        "namespace": "ns",
        "serviceAccount": "workload",
        "uid": "uid-ns-workload",
    }


def test_exp_is_when_jwtlet_stops_accepting_the_token(apps: Apps) -> None:
    """A maximum token age can end acceptance before the token's own ``exp``: the answer says the earlier."""
    token = jwt_shaped(dict(SUBJECT_CLAIMS, exp=EXPIRES_AT + 10_000))
    apps.validator.add(token, attrs.evolve(WORKLOAD, expires_at=float(EXPIRES_AT)), CLIENT_AUDIENCE)
    assert introspect(apps, token).json()["exp"] == EXPIRES_AT


def test_a_token_that_is_not_a_jwt_is_described_by_its_identity(apps: Apps) -> None:
    reply = introspect(apps, "token-workload")
    assert reply.json() == {
        "active": True, "iss": "https://kubernetes.test", "sub": WORKLOAD.username, "aud": CLIENT_AUDIENCE,
        "username": WORKLOAD.username, "namespace": "ns", "serviceAccount": "workload", "uid": "uid-ns-workload",
    }


@pytest.mark.parametrize("token", ["garbage", jwt_shaped({"sub": "forged", "aud": CLIENT_AUDIENCE})])
def test_a_token_the_validator_rejects_is_inactive_and_never_says_why(apps: Apps, token: str) -> None:
    """An attacker asking about a forged token learns one bit: not active."""
    reply = introspect(apps, token)
    assert (reply.code, reply.json()) == (200, {"active": False})
    assert reply.header("Cache-Control") == "no-store"


def test_a_token_for_another_audience_is_inactive(apps: Apps) -> None:
    """A token minted for some other relying party does not pass as one for jwtlet's client audience."""
    other = jwt_shaped(dict(SUBJECT_CLAIMS, aud="https://other"))
    apps.validator.add(other, WORKLOAD, "https://other")
    assert introspect(apps, other).json() == {"active": False}


def test_a_repeated_rejected_token_is_not_sent_to_the_validator_again(apps: Apps) -> None:
    """A caller flooding introspection with garbage costs one validator call per token, not one per request."""
    introspect(apps, "garbage")
    before = apps.validator.calls
    for _ in range(5):
        assert introspect(apps, "garbage").json() == {"active": False}
    # One call per request, for the caller's own token: the garbage one was remembered as rejected.
    assert apps.validator.calls == before + 5


@pytest.mark.parametrize("caller", [None, "not-a-token", "token-bogus"])
def test_a_caller_without_a_valid_bearer_token_gets_401(apps: Apps, caller: Optional[str]) -> None:
    """Anyone on the network asking whether a stolen token is live is refused before it is looked at."""
    before = apps.validator.calls
    reply = introspect(apps, caller=caller)
    assert (reply.code, reply.json()) == (401, {"error": "unauthorized"})
    assert reply.header("WWW-Authenticate") == "Bearer"
    assert reply.header("Cache-Control") == "no-store"
    assert SUBJECT_TOKEN not in reply.body.decode()
    assert apps.validator.calls <= before + 1, "the subject token was never validated"


@pytest.mark.parametrize("caller", ["token-nobody", "token-admin", "token-workload"])
def test_a_caller_without_the_introspect_role_gets_403(apps: Apps, caller: str) -> None:
    """Not even ``management:write``: introspection is its own role."""
    reply = introspect(apps, caller=caller)
    assert (reply.code, reply.json()) == (403, {"error": "forbidden"})
    assert reply.header("Cache-Control") == "no-store"


def test_the_caller_is_validated_against_the_management_audience(tmp_path: Path) -> None:
    """A caller token good only for the client audience does not authenticate where management has its own."""
    apps = introspecting_apps(tmp_path, {"management": {"client_audience": "jwtlet-management"}})
    assert introspect(apps).code == 401
    apps.validator.add("token-introspector-mgmt", INTROSPECTOR, "jwtlet-management")
    assert introspect(apps, caller="token-introspector-mgmt").json()["active"] is True


@pytest.mark.parametrize(
    "body, headers",
    [
        (b"", {}),
        (b"token=", {}),
        (b"token=a&token=b", {}),
        (b"token_type_hint=access_token", {}),
        (b"token=a&token_type_hint=x&token_type_hint=y", {}),
        (b"token=a", {"Content-Type": "application/json"}),
    ],
)
def test_a_malformed_request_is_400_invalid_request(apps: Apps, body: bytes, headers: dict[str, str]) -> None:
    reply = introspect(apps, body=body, headers=headers)
    assert (reply.code, reply.json()["error"]) == (400, "invalid_request")
    assert reply.header("Cache-Control") == "no-store"


def test_only_post(apps: Apps) -> None:
    reply = call(apps.token, "GET", URL, headers={"Authorization": "Bearer token-introspector"})
    assert reply.code == 405 and "POST" in (reply.header("Allow") or "")


def test_a_body_over_the_token_port_limit_is_413(apps: Apps) -> None:
    reply = introspect(apps, body=b"token=" + b"a" * (64 * 1024))
    assert reply.code == 413


def test_the_token_endpoints_rate_limits_apply(tmp_path: Path) -> None:
    """A caller hammering introspection is limited as a client hammering /token is."""
    apps = introspecting_apps(tmp_path, {"rate_limits": {"per_client_per_sec": 1}})
    assert introspect(apps).code == 200
    reply = introspect(apps)
    assert (reply.code, reply.json()) == (429, {"error": "rate_limited"})
    assert reply.header("Retry-After") == "1" and reply.header("Cache-Control") == "no-store"
    apps.clock.advance(1)
    assert introspect(apps).code == 200


@implementer(IValidator)
@attrs.frozen
class DownForOneToken:
    """The validator's backing service failing while it checks one token (the caller's still passes)."""

    validator: StaticValidator
    token: str

    def validate(self, token: str, audience: Optional[str]) -> Deferred[Identity]:
        if token == self.token:
            return fail(DependencyUnavailable("TokenReview: the API server is down"))
        return self.validator.validate(token, audience)


def test_a_validator_outage_is_503_never_inactive(apps: Apps) -> None:
    """``active: false`` would tell a relying party a good token is bad; an outage is said as one."""
    introspection = apps.token_api.introspection
    apps.token_api.introspection = attrs.evolve(
        introspection, validator=adapt("validator", DownForOneToken(apps.validator, SUBJECT_TOKEN)))
    reply = introspect(apps)
    assert reply.code == 503 and reply.json() == {"error": "temporarily_unavailable"}
    assert reply.header("Cache-Control") == "no-store"


# -- client_audience: a string or a list ------------------------------------------------------


MOZAMBIGUE_AUDIENCES = ["https://kubernetes.default.svc", "api-gateway"]


def several_audiences(tmp_path: Path) -> Apps:
    apps = introspecting_apps(tmp_path, {"token": {"client_audience": MOZAMBIGUE_AUDIENCES}})
    gateway = service_account("ns", "gateway")
    apps.validator.add("token-gateway", gateway, "api-gateway")
    apps.validator.add("token-introspector-gw", INTROSPECTOR, "api-gateway")
    apps.validator.add("token-admin-gw", ADMIN, "api-gateway")
    return apps


def test_a_token_for_any_listed_audience_is_active(tmp_path: Path) -> None:
    apps = several_audiences(tmp_path)
    reply = introspect(apps, "token-gateway", caller="token-introspector-gw")
    assert reply.json()["active"] is True and reply.json()["aud"] == "api-gateway"
    assert introspect(apps, "token-workload", caller="token-introspector-gw").json()["active"] is False, (
        "issued for the old single audience, which is no longer listed")


@pytest.mark.parametrize("token", ["token-gateway", "token-workload"])
def test_the_exchange_accepts_a_token_for_any_listed_audience(tmp_path: Path, token: str) -> None:
    apps = several_audiences(tmp_path)
    apps.validator.add("token-workload", WORKLOAD, MOZAMBIGUE_AUDIENCES[0])
    subject = service_account("ns", token.removeprefix("token-"))
    created = call(apps.management, "POST", "http://jwtlet.test/api/v1/mappings",
                   json={"clientIdentifier": subject.username, "participantContext": "ctx", "scopes": []},
                   headers={"Authorization": "Bearer token-admin-gw"})
    assert created.code == 201, "the management caller's token is for a listed audience too"
    reply = call(apps.token, "POST", "http://jwtlet.test/token", headers=FORM, data={
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange", "subject_token": token, "resource": "ctx"})
    assert reply.code == 200, reply.body


def test_a_token_for_no_listed_audience_is_refused_by_the_exchange(tmp_path: Path) -> None:
    apps = several_audiences(tmp_path)
    apps.validator.add("token-elsewhere", WORKLOAD, "https://elsewhere")
    reply = call(apps.token, "POST", "http://jwtlet.test/token", headers=FORM, data={
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange", "subject_token": "token-elsewhere",
        "resource": "ctx"})
    assert (reply.code, reply.json()["error"]) == (400, "invalid_grant")


def test_an_outage_while_trying_audiences_is_said_at_once(tmp_path: Path) -> None:
    """A dependency down is not a rejection: the next audience is not tried and the answer is 503."""
    apps = several_audiences(tmp_path)
    apps.validator.down = True
    before = apps.validator.calls
    reply = call(apps.token, "POST", "http://jwtlet.test/token", headers=FORM, data={
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange", "subject_token": "token-gateway",
        "resource": "ctx"})
    assert reply.code == 503
    assert apps.validator.calls == before + 1


@pytest.mark.parametrize("value", [[], [""], ["ok", 3], {"a": 1}, ""])
def test_client_audience_must_be_a_string_or_a_list_of_them(tmp_path: Path, value: Any) -> None:
    from jwtlet.config import ConfigError

    with pytest.raises(ConfigError) as raised:
        make_apps(tmp_path, {"token": {"client_audience": value}})
    assert "token.client_audience: must be a non-empty string or a non-empty list of them" in (
        raised.value.problems)


def test_answers_match_the_openapi_document(apps: Apps) -> None:
    document = yaml.safe_load((Path(__file__).resolve().parent.parent / "openapi" / "token-exchange.yaml").read_text())
    schema = document["components"]["schemas"]["Introspection"]
    for token in (SUBJECT_TOKEN, "token-workload", "garbage"):
        jsonschema.validate(introspect(apps, token).json(), schema)
