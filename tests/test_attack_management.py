"""
Attacks on the management port (and on the defences it shares with the token
port), each written as what the attacker does and what must happen: HEAD
smuggling a write, garbage bearer tokens flooding the validator, callers
without the role, store outages mid-change, and a replayed subject token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional

import attrs
import pytest
from apps import CLIENT_AUDIENCE, WORKLOAD, Apps, Reply, call, make_apps
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from jwtlet import policy
from jwtlet.interfaces import DependencyUnavailable, TokenRejected
from jwtlet.model import Identity, ResourceMapping
from jwtlet.providers import adapt
from jwtlet.testing.fakes import StaticValidator
from jwtlet.web.callers import MAX_REJECTED, REJECTED_TTL_SECS, RejectionCache

URL = "http://jwtlet.test"
SCOPE = {"scope": "smuggled", "claims": {"role": "admin"}}
MAPPING = {"clientIdentifier": "system:serviceaccount:ns:evil", "participantContext": "ctx", "scopes": ["read"]}


@pytest.fixture
def apps(tmp_path: Path) -> Apps:
    """The in-memory apps, the management API on the test's Clock."""
    built = make_apps(tmp_path)
    management_api = attrs.evolve(built.management_api, clock=built.clock)
    return attrs.evolve(built, management_api=management_api,
                        management=StubTreq(management_api.app.resource()))


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """Every named log event (audit and exchange decisions) while the test runs."""
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "jwtlet_event" in event:
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [event for event in events if event["jwtlet_event"] == name]


def api(apps: Apps, method: str, path: str, body: Any = None, who: Optional[str] = "admin",
        token: Optional[str] = None) -> Reply:
    headers = {"Content-Type": "application/json"}
    if who is not None or token is not None:
        headers["Authorization"] = f"Bearer {token or f'token-{who}'}"
    data = json.dumps(body).encode() if body is not None else None
    return call(apps.management, method, f"{URL}/api/v1{path}", headers=headers, data=data)


def allowed(reply: Reply) -> set[str]:
    return set((reply.header("Allow") or "").split(", "))


# -- HEAD is GET without a body -------------------------------------------------


@pytest.mark.parametrize(("path", "body"), [
    ("/scopes", SCOPE),
    ("/mappings", MAPPING),
    ("/integrations", {"integrationId": "smuggled"}),
])
def test_head_with_a_create_body_on_a_collection_writes_nothing(
    apps: Apps, events: list[dict[str, Any]], path: str, body: Any
) -> None:
    """An admin's HEAD carrying a create body is answered as a GET: nothing is created or audited."""
    reply = api(apps, "HEAD", path, body)
    assert (reply.code, reply.body) == (200, b"")
    assert api(apps, "GET", path).json() == []
    assert events == [], "no scope.created / mapping.created / integration.created"


def test_head_needs_the_read_role_not_a_write_role(apps: Apps) -> None:
    """A caller with only a write role cannot use HEAD to reach the write branch."""
    assert api(apps, "HEAD", "/mappings", MAPPING, who="writer").code == 403
    assert api(apps, "GET", "/mappings").json() == []


def test_head_on_an_object_reads_it_and_never_replaces_or_deletes_it(apps: Apps) -> None:
    assert api(apps, "POST", "/scopes", SCOPE).code == 201
    replaced = dict(SCOPE, claims={"role": "nobody"})
    assert (api(apps, "HEAD", "/scopes/smuggled", replaced).code, api(apps, "HEAD", "/scopes/missing").code) == (
        200, 404)
    assert api(apps, "GET", "/scopes/smuggled").json() == SCOPE


@pytest.mark.parametrize(("path", "expected"), [
    ("/mappings/system%3Aserviceaccount%3Ans%3Aevil", {"DELETE"}),
    ("/integrations/acme/keys", {"POST"}),
    ("/integrations/acme/keys/k1", {"DELETE"}),
])
def test_head_on_a_write_only_route_is_405_and_changes_nothing(
    apps: Apps, events: list[dict[str, Any]], path: str, expected: set[str]
) -> None:
    assert api(apps, "POST", "/mappings", MAPPING).code == 201
    assert api(apps, "POST", "/integrations", {"integrationId": "acme"}).code == 201
    assert api(apps, "POST", "/integrations/acme/keys", {"tier": 1, "keyId": "k1"}).code == 201
    before = len(events)
    reply = api(apps, "HEAD", path, {"tier": 1})
    assert reply.code == 405
    assert allowed(reply) == expected
    assert events[before:] == []
    assert len(api(apps, "GET", "/mappings").json()) == 1
    assert api(apps, "GET", "/integrations").json()[0]["keys"][0]["status"] == "active"


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("PATCH", "/scopes", {"GET", "HEAD", "POST"}),
    ("DELETE", "/mappings", {"GET", "HEAD", "POST"}),
    ("OPTIONS", "/integrations", {"GET", "HEAD", "POST"}),
    ("PATCH", "/scopes/x", {"GET", "HEAD", "PUT", "DELETE"}),
    ("POST", "/mappings/a/b", {"GET", "HEAD", "PUT", "DELETE"}),
    ("GET", "/mappings/a", {"DELETE"}),
    ("GET", "/integrations/acme/keys", {"POST"}),
    ("PUT", "/integrations/acme/keys/k1", {"DELETE"}),
])
def test_methods_a_route_does_not_serve_are_405_with_allow_before_auth(
    apps: Apps, method: str, path: str, expected: set[str]
) -> None:
    reply = api(apps, method, path, who=None)
    assert (reply.code, reply.json()) == (405, {"error": "method_not_allowed"})
    assert allowed(reply) == expected


def test_head_on_the_token_endpoint_is_405_and_issues_nothing(apps: Apps, events: list[dict[str, Any]]) -> None:
    """A HEAD carrying a complete exchange form gets no token and costs no validation."""
    form = {"grant_type": policy.GRANT_TYPE_TOKEN_EXCHANGE, "subject_token": "token-workload", "resource": "ctx"}
    calls = apps.validator.calls
    reply = call(apps.token, "HEAD", f"{URL}/token", data=form)
    assert reply.code == 405
    assert allowed(reply) == {"POST"}
    assert apps.validator.calls == calls
    assert named(events, "token.issued") == []


# -- garbage bearer tokens cannot flood the validator -------------------------


def test_one_garbage_bearer_sent_a_thousand_times_costs_one_validator_call(apps: Apps) -> None:
    calls = apps.validator.calls
    replies = {api(apps, "GET", "/scopes", token="garbage").code for _ in range(1000)}
    assert replies == {401}
    assert apps.validator.calls == calls + 1
    apps.clock.advance(REJECTED_TTL_SECS - 1)
    assert api(apps, "GET", "/scopes", token="garbage").code == 401
    assert apps.validator.calls == calls + 1, "still remembered just before a minute has passed"
    apps.clock.advance(1)
    assert api(apps, "GET", "/scopes", token="garbage").code == 401
    assert apps.validator.calls == calls + 2, "asked again once a minute has passed"


def test_one_garbage_bearer_sent_to_both_ports_that_take_management_callers_costs_one_validator_call(
    apps: Apps
) -> None:
    """/introspect takes the management port's callers: a token rejected on one is rejected on the other."""
    calls = apps.validator.calls
    assert api(apps, "GET", "/scopes", token="garbage").code == 401
    introspected = call(apps.token, "POST", f"{URL}/introspect", data=b"token=anything",
                        headers={"Authorization": "Bearer garbage",
                                 "Content-Type": "application/x-www-form-urlencoded"})
    assert introspected.code == 401
    assert apps.validator.calls == calls + 1


def test_a_validator_outage_is_not_remembered_as_a_rejection(apps: Apps) -> None:
    """An admin whose token met an outage is let in as soon as the validator is back."""
    apps.validator.down = True
    assert [api(apps, "GET", "/scopes").code for _ in range(3)] == [503, 503, 503]
    apps.validator.down = False
    assert api(apps, "GET", "/scopes").code == 200


def test_a_thousand_distinct_garbage_tokens_keep_memory_bounded() -> None:
    validator = StaticValidator()
    cache = RejectionCache(adapt("validator", validator), Clock(), max_entries=100)
    for index in range(1000):
        cache.validate(f"garbage-{index}", CLIENT_AUDIENCE).addErrback(lambda f: f.trap(TokenRejected))
    assert validator.calls == 1000
    assert len(cache) == 100
    assert cache._in_flight == {}
    assert MAX_REJECTED == 10_000


@attrs.define
class PendingValidator:
    """A validator whose answers wait until the test gives them."""

    calls: list[Deferred[Identity]] = attrs.field(factory=list)

    def validate(self, token: str, audience: Optional[str]) -> Deferred[Identity]:
        self.calls.append(Deferred())
        return self.calls[-1]


def outcomes(deferreds: list[Deferred[Identity]]) -> list[Any]:
    results: list[Any] = []
    for deferred in deferreds:
        deferred.addBoth(lambda result: results.append(result.type if isinstance(result, Failure) else result))
    return results


def test_a_burst_of_one_garbage_token_in_flight_at_once_is_one_validator_call() -> None:
    validator = PendingValidator()
    cache = RejectionCache(adapt("validator", validator), Clock())
    burst = [cache.validate("garbage", CLIENT_AUDIENCE) for _ in range(50)]
    assert len(validator.calls) == 1
    results = outcomes(burst)
    validator.calls[0].errback(TokenRejected("bad signature"))
    assert results == [TokenRejected] * 50
    assert len(cache) == 1


def test_a_caller_who_goes_away_mid_validation_does_not_break_the_others() -> None:
    validator = PendingValidator()
    cache = RejectionCache(adapt("validator", validator), Clock())
    gone, waiting = cache.validate("token", CLIENT_AUDIENCE), cache.validate("token", CLIENT_AUDIENCE)
    gone.addErrback(lambda f: None)
    gone.cancel()
    results = outcomes([waiting])
    validator.calls[0].callback(WORKLOAD)
    assert results == [WORKLOAD]
    assert len(cache) == 0, "a valid token is not remembered as rejected"


def test_an_outage_answer_reaches_every_waiter_and_is_not_remembered() -> None:
    validator = PendingValidator()
    cache = RejectionCache(adapt("validator", validator), Clock())
    results = outcomes([cache.validate("token", CLIENT_AUDIENCE) for _ in range(2)])
    validator.calls[0].errback(DependencyUnavailable("TokenReview timed out"))
    assert results == [DependencyUnavailable] * 2
    assert len(cache) == 0
    cache.validate("token", CLIENT_AUDIENCE)
    assert len(validator.calls) == 2


# -- authorisation and change audit -------------------------------------------


def test_a_caller_without_the_role_is_403_with_one_authz_denied_line(
    apps: Apps, events: list[dict[str, Any]]
) -> None:
    reply = api(apps, "POST", "/scopes", SCOPE, who="reader")
    assert (reply.code, reply.json()) == (403, {"error": "forbidden"})
    assert [(e["jwtlet_event"], e["actor"], e["route"], e["method"]) for e in events] == [
        ("authz.denied", "system:serviceaccount:platform:reader", "/api/v1/scopes", "POST")]
    assert api(apps, "GET", "/scopes").json() == []


@pytest.mark.parametrize(("failure", "status", "error"), [
    (DependencyUnavailable("database down", retry_after=7), 503, "temporarily_unavailable"),
    (RuntimeError("store bug"), 500, "server_error"),
])
def test_a_store_failure_during_a_create_is_audited_as_an_error(
    apps: Apps, events: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
    failure: Exception, status: int, error: str,
) -> None:
    # The memory store's instances are slotted: its class takes the failing method.
    monkeypatch.setattr(type(apps.store()), "add_scope", lambda self, scope: fail(failure))
    reply = api(apps, "POST", "/scopes", SCOPE)
    assert (reply.code, reply.json()) == (status, {"error": error})
    audit = named(events, "scope.created")
    assert [(e["outcome"], e["error"], e["actor"], e["scope"]) for e in audit] == [
        ("error", error, "system:serviceaccount:platform:admin", "smuggled")]


def test_a_store_outage_during_a_delete_is_503_with_retry_after_and_outcome_error(
    apps: Apps, events: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(type(apps.store()), "delete_mapping",
                        lambda self, client, context: fail(DependencyUnavailable("database down", retry_after=7)))
    reply = api(apps, "DELETE", "/mappings/a/b")
    assert (reply.code, reply.header("Retry-After")) == (503, "7")
    assert [(e["jwtlet_event"], e["outcome"]) for e in events] == [("mapping.deleted", "error")]


def test_a_refused_change_keeps_outcome_refused_with_its_error(apps: Apps, events: list[dict[str, Any]]) -> None:
    assert api(apps, "POST", "/scopes", SCOPE).code == 201
    assert api(apps, "POST", "/scopes", SCOPE).code == 409
    assert [(e["outcome"], e.get("error")) for e in named(events, "scope.created")] == [
        ("success", None), ("refused", "scope already exists")]


# -- a replayed subject token -------------------------------------------------


def test_a_replay_inside_the_validators_leeway_after_exp_is_refused(tmp_path: Path) -> None:
    """
    The attacker replays a captured subject token after its ``exp`` but while
    the validator's leeway still accepts it: the ``jti`` is still remembered.
    """
    apps = make_apps(tmp_path, {"token": {"reject_replayed_subject_tokens": True}})
    apps.store().add_mapping(ResourceMapping(WORKLOAD.username, "ctx"))
    exp = apps.clock.seconds() + 60
    captured = attrs.evolve(WORKLOAD, token_id="jti-captured", expires_at=exp, accepted_until=exp + 30)
    apps.validator.add("token-captured", captured, CLIENT_AUDIENCE)
    form = {"grant_type": policy.GRANT_TYPE_TOKEN_EXCHANGE, "subject_token": "token-captured", "resource": "ctx"}
    assert call(apps.token, "POST", f"{URL}/token", data=form).code == 200
    apps.clock.advance(75)
    replayed = call(apps.token, "POST", f"{URL}/token", data=form)
    assert (replayed.code, replayed.json()["error"]) == (400, "invalid_grant")


# -- hostile JSON bodies ----------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b'{"scope": "read", "claims": {"n": NaN}}',
    b'{"scope": "read", "claims": {"n": 1e400}}',
    b'{"scope": "read", "scope": "admin", "claims": {}}',
    b'{"scope": "read", "claims": {"n": "\\ud800"}}',
    b'{"scope": "read", "claims": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
], ids=["nan", "beyond-a-double", "duplicate-member", "lone-surrogate", "nested-30000-deep"])
def test_a_scope_written_with_json_no_writer_could_write_back_is_refused_and_nothing_is_stored(
    apps: Apps, raw: bytes
) -> None:
    """Stored, such a scope would break every exchange asking for it (the token's claims cannot be written)."""
    reply = call(apps.management, "POST", f"{URL}/api/v1/scopes", data=raw,
                 headers={"Authorization": "Bearer token-admin", "Content-Type": "application/json"})
    assert (reply.code, reply.json()) == (400, {"error": "malformed JSON"})
    assert api(apps, "GET", "/scopes").json() == []
