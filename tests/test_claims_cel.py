"""
Conditions and claim expressions in CEL (claims.md): the management API
compiles them when they are written, an exchange evaluates them fail-closed,
claims merge in claims.md's order with conflicts refused, reserved claims are
never produced, and both Kubernetes validators hand the expressions what
claims.md lists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import attrs
import jwt as pyjwt
import pytest
import pytest_twisted
from apps import CLIENT_AUDIENCE, Apps, Reply, call, make_apps
from hypothesis import given, settings
from hypothesis import strategies as st
from k8s_fixtures import Cluster, plugin_context
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from jwtlet import cel, claims, policy
from jwtlet.apikeys import keys as apikeys
from jwtlet.cel import MAX_EXPRESSION_LENGTH
from jwtlet.model import ApiKeyRecord, Identity, Integration, Resolution, ResourceMapping, ScopeMapping
from jwtlet.plugins.kubernetes_oidc import bound_object_extra, kubernetes_oidc
from jwtlet.plugins.kubernetes_tokenreview import kubernetes_tokenreview
from jwtlet.policy import IssueParameters, Refusal
from jwtlet.testing.fakes import service_account

URL = "http://jwtlet.test"
POD_NAME = "authentication.kubernetes.io/pod-name"
CALLER = attrs.evolve(
    service_account("payments", "api"),
    extra={POD_NAME: ["api-7d9f-x2"], "authentication.kubernetes.io/pod-uid": ["pod-uid-1"]},
    claims={"iss": "https://kubernetes.test",
            "kubernetes.io": {"namespace": "payments", "pod": {"name": "api-7d9f-x2"}}},
)
UNBOUND = service_account("payments", "batch")
#: The example of claims.md.
EXAMPLE = {
    "clientIdentifier": CALLER.username, "participantContext": "payments", "scopes": ["read"],
    "condition": f"subject.extra['{POD_NAME}'].size() > 0",
    "claimExpressions": {"k8s_ns": "subject.namespace", "pod": f"subject.extra['{POD_NAME}'][0]"},
}
RESERVED = sorted(policy.reserved_claims("jwtlet_pc"))


# -- fixtures and helpers ---------------------------------------------------------


@pytest.fixture
def apps(tmp_path: Path) -> Apps:
    apps = make_apps(tmp_path)
    apps.validator.add("token-pod", CALLER, CLIENT_AUDIENCE)
    apps.validator.add("token-unbound", attrs.evolve(UNBOUND, username=CALLER.username), CLIENT_AUDIENCE)
    return apps


@pytest.fixture
def refusals() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("jwtlet_event") == "token.refused":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def compilations(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every CEL compilation, by source, from an empty program cache and no caller kept."""
    sources: list[str] = []
    real = cel.compile_expression

    def counting(source: object, variables: frozenset[str]) -> cel.Expression:
        sources.append(str(source))
        return real(source, variables)

    claims.compiled.cache_clear()
    claims._prepared.clear()
    monkeypatch.setattr(cel, "compile_expression", counting)
    yield sources
    claims.compiled.cache_clear()


def settled(deferred: Any) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "expected an already-fired Deferred"
    return results[0]


def api(apps: Apps, method: str, path: str, body: Any = None) -> Reply:
    headers = {"Authorization": "Bearer token-admin", "Content-Type": "application/json"}
    data = json.dumps(body).encode() if body is not None else None
    return call(apps.management, method, f"{URL}/api/v1{path}", headers=headers, data=data)


def exchange(apps: Apps, token: str = "token-pod", resource: str = "payments", **fields: str) -> Reply:
    form = {"grant_type": policy.GRANT_TYPE_TOKEN_EXCHANGE, "subject_token": token, "resource": resource, **fields}
    return call(apps.token, "POST", f"{URL}/token", data=form)


def issued_claims(apps: Apps, reply: Reply) -> dict[str, Any]:
    assert reply.code == 200, reply.body
    return pyjwt.decode(reply.json()["access_token"], options={"verify_signature": False})


def mapping_path(client: str, context: str) -> str:
    from urllib.parse import quote

    return f"/mappings/{quote(client, safe='')}/{quote(context, safe='')}"


# -- the management API: round trips and write-time compilation -----------------------


def test_a_mapping_and_a_scope_round_trip_their_expressions(apps: Apps) -> None:
    created = api(apps, "POST", "/mappings", EXAMPLE)
    assert created.code == 201, created.body
    assert created.json() == dict(EXAMPLE, audiences=[])
    path = mapping_path(CALLER.username, "payments")
    assert api(apps, "GET", path).json() == dict(EXAMPLE, audiences=[])
    assert api(apps, "GET", "/mappings").json() == [dict(EXAMPLE, audiences=[])]
    changed = dict(EXAMPLE, condition="true", claimExpressions={"team": "'payments'"})
    assert api(apps, "PUT", path, changed).code == 204
    assert api(apps, "GET", path).json() == dict(changed, audiences=[])
    removed = {key: value for key, value in changed.items() if key not in ("condition", "claimExpressions")}
    assert api(apps, "PUT", path, removed).code == 204
    assert api(apps, "GET", path).json() == dict(removed, audiences=[])

    scope = {"scope": "read", "claims": {"role": "reader"}, "claimExpressions": {"sa": "subject.serviceAccount"}}
    assert api(apps, "POST", "/scopes", scope).json() == scope
    assert api(apps, "GET", "/scopes/read").json() == scope


def test_a_mapping_without_expressions_is_shown_as_before(apps: Apps) -> None:
    """The Rust jwtlet's shape: no ``condition`` or ``claimExpressions`` member unless set."""
    plain = {"clientIdentifier": "c", "participantContext": "p", "scopes": [], "audiences": []}
    assert api(apps, "POST", "/mappings", plain).json() == plain
    assert api(apps, "POST", "/scopes", {"scope": "s", "claims": {}}).json() == {"scope": "s", "claims": {}}


@pytest.mark.parametrize(("change", "error"), [
    ({"condition": "subject.("}, "condition: Failed to parse expression"),
    ({"condition": "secrets.password == ''"}, "condition: undeclared reference to 'secrets'"),
    ({"condition": "subject.namespace"}, "condition: evaluates to string, not bool"),
    ({"condition": "1"}, "condition: evaluates to int, not bool"),
    ({"condition": ""}, "condition: must not be empty"),
    ({"condition": 3}, "condition: must be a string holding a CEL expression"),
    ({"condition": "'" + "a" * MAX_EXPRESSION_LENGTH + "' == ''"}, "condition: longer than 2048 characters"),
    ({"claimExpressions": {"pod": "subject.extra["}}, "claimExpressions.pod: Failed to parse expression"),
    ({"claimExpressions": {"pod": "pod.name"}}, "claimExpressions.pod: undeclared reference to 'pod'"),
    ({"claimExpressions": {"pod": ["subject.uid"]}}, "claimExpressions.pod: must be a string"),
    ({"claimExpressions": ["subject.uid"]}, "claimExpressions must be a JSON object"),
])
def test_expressions_are_compiled_when_written(apps: Apps, change: dict[str, Any], error: str) -> None:
    """A broken expression is a 400 naming the field and what the checker said, and nothing is stored."""
    reply = api(apps, "POST", "/mappings", dict(EXAMPLE, **change))
    assert reply.code == 400
    assert reply.json()["error"].startswith(error), reply.json()
    assert api(apps, "GET", "/mappings").json() == []
    api(apps, "POST", "/mappings", EXAMPLE)
    reply = api(apps, "PUT", mapping_path(CALLER.username, "payments"), dict(EXAMPLE, **change))
    assert reply.code == 400
    assert api(apps, "GET", mapping_path(CALLER.username, "payments")).json() == dict(EXAMPLE, audiences=[])
    if "claimExpressions" in change:
        scope = {"scope": "s", "claims": {}, "claimExpressions": change["claimExpressions"]}
        assert api(apps, "POST", "/scopes", scope).json()["error"].startswith(error)


@pytest.mark.parametrize("claim", RESERVED)
def test_an_attacker_cannot_write_an_expression_for_a_reserved_claim(apps: Apps, claim: str) -> None:
    """A writer who tries to mint ``sub`` (or any reserved claim) from an expression is refused at once."""
    mapping = dict(EXAMPLE, claimExpressions={claim: "'forged'"})
    reply = api(apps, "POST", "/mappings", mapping)
    assert (reply.code, reply.json()) == (400, {"error": f"claim '{claim}' is reserved"})
    scope = {"scope": "s", "claims": {}, "claimExpressions": {claim: "'forged'"}}
    reply = api(apps, "POST", "/scopes", scope)
    assert (reply.code, reply.json()) == (400, {"error": f"claim '{claim}' is reserved"})


# -- the exchange ---------------------------------------------------------------------------


def test_the_example_of_claims_md_puts_namespace_and_pod_in_the_token(apps: Apps) -> None:
    assert api(apps, "POST", "/mappings", EXAMPLE).code == 201
    token = issued_claims(apps, exchange(apps, scope="read"))
    assert (token["k8s_ns"], token["pod"]) == ("payments", "api-7d9f-x2")
    assert (token["sub"], token["jwtlet_pc"]) == ("payments", "payments")


def test_a_token_not_bound_to_a_pod_is_refused_and_the_log_says_the_condition_was_false(
    apps: Apps, refusals: list[dict[str, Any]]
) -> None:
    api(apps, "POST", "/mappings", dict(EXAMPLE, condition=f"'{POD_NAME}' in subject.extra"))
    reply = exchange(apps, "token-unbound", scope="read")
    assert (reply.code, reply.json()["error"]) == (403, "unauthorized_client")
    (event,) = refusals
    assert (event["mapping"], event["rule"], event["rule_outcome"]) == (
        [CALLER.username, "payments"], "condition", "false")
    assert "token-unbound" not in json.dumps(event, default=str)


def test_a_condition_that_fails_to_evaluate_refuses_and_the_log_says_failed(
    apps: Apps, refusals: list[dict[str, Any]]
) -> None:
    """The example condition reads a key an unbound token lacks: an error, never a grant."""
    api(apps, "POST", "/mappings", EXAMPLE)
    reply = exchange(apps, "token-unbound", scope="read")
    assert (reply.code, reply.json()["error"]) == (403, "unauthorized_client")
    (event,) = refusals
    assert (event["rule"], event["rule_outcome"]) == ("condition", "failed")


@pytest.mark.parametrize("expression", [
    "subject.claims['missing']",         # a missing key
    "subject.namespace + 1",             # a type mismatch
    "now",                               # a timestamp is not a JSON value
    "b'raw'",                            # nor are bytes
    "{1: 'a'}",                          # nor a map with other than string keys
])
def test_a_claim_expression_that_fails_refuses_the_exchange(
    apps: Apps, refusals: list[dict[str, Any]], expression: str
) -> None:
    api(apps, "POST", "/mappings", dict(EXAMPLE, claimExpressions={"bad": expression}))
    reply = exchange(apps, scope="read")
    assert (reply.code, reply.json()["error"]) == (403, "unauthorized_client")
    (event,) = refusals
    assert (event["rule"], event["rule_outcome"]) == ("claimExpressions.bad", "failed")


def test_what_an_expression_sees(apps: Apps) -> None:
    expressions = {
        "username": "subject.username", "ns": "subject.namespace", "sa": "subject.serviceAccount",
        "uid": "subject.uid", "issuer": "subject.issuer", "claim_ns": "subject.claims['kubernetes.io'].namespace",
        "resource": "request.resource", "scopes": "request.scopes", "audiences": "request.audiences",
        "year": "now.getFullYear()", "now": "string(now)",
    }
    mapping = dict(EXAMPLE, scopes=["read", "write"], audiences=["edc"], claimExpressions=expressions)
    api(apps, "POST", "/mappings", mapping)
    token = issued_claims(apps, exchange(apps, scope="write read", audience="edc"))
    assert {name: token[name] for name in expressions} == {
        "username": CALLER.username, "ns": "payments", "sa": "api", "uid": CALLER.uid,
        "issuer": CALLER.issuer, "claim_ns": "payments", "resource": "payments", "scopes": ["read", "write"],
        "audiences": ["edc"], "year": 2027, "now": "2027-01-15T08:00:00+00:00",
    }
    assert token["act"]["iss"] == token["issuer"]
    assert token["iat"] == int(apps.clock.seconds())


def test_a_caller_seen_again_sees_the_new_clock_and_its_own_request(apps: Apps) -> None:
    """The activation kept for a caller is the caller's, with this exchange's ``now`` and request."""
    expressions = {"now": "string(now)", "scopes": "request.scopes"}
    api(apps, "POST", "/mappings", dict(EXAMPLE, scopes=["read", "write"], claimExpressions=expressions))
    first = issued_claims(apps, exchange(apps, scope="read"))
    apps.clock.advance(61)
    again = issued_claims(apps, exchange(apps, scope="read"))
    other = issued_claims(apps, exchange(apps, scope="write"))
    assert (first["now"], first["scopes"]) == ("2027-01-15T08:00:00+00:00", ["read"])
    assert (again["now"], again["scopes"]) == ("2027-01-15T08:01:01+00:00", ["read"])
    assert other["scopes"] == ["write"]


def test_claims_merge_static_then_scope_expressions_then_the_mapping(apps: Apps) -> None:
    api(apps, "POST", "/scopes", {"scope": "read", "claims": {"role": "reader", "team": "payments"},
                                  "claimExpressions": {"team": "subject.namespace", "sa": "subject.serviceAccount"}})
    api(apps, "POST", "/mappings", dict(EXAMPLE, claimExpressions={"sa": "'api'", "pod": "'p'"}))
    token = issued_claims(apps, exchange(apps, scope="read"))
    assert {name: token[name] for name in ("role", "team", "sa", "pod")} == {
        "role": "reader", "team": "payments", "sa": "api", "pod": "p"}


@pytest.mark.parametrize(("scope_claims", "scope_expressions", "mapping_expressions"), [
    ({"team": "core"}, {"team": "subject.namespace"}, {}),      # static against a scope expression
    ({}, {"team": "subject.namespace"}, {"team": "'core'"}),    # a scope expression against the mapping's
    ({"team": "core"}, {}, {"team": "subject.namespace"}),      # static against the mapping's
])
def test_two_sources_giving_one_claim_different_values_is_invalid_scope(
    apps: Apps, scope_claims: dict[str, Any], scope_expressions: dict[str, str], mapping_expressions: dict[str, str]
) -> None:
    api(apps, "POST", "/scopes", {"scope": "read", "claims": scope_claims, "claimExpressions": scope_expressions})
    api(apps, "POST", "/mappings", dict(EXAMPLE, claimExpressions=mapping_expressions))
    reply = exchange(apps, scope="read")
    assert (reply.code, reply.json()["error"]) == (400, "invalid_scope")


def test_a_stored_expression_that_no_longer_compiles_refuses_with_one_log_event_and_is_compiled_once(
    apps: Apps, refusals: list[dict[str, Any]], compilations: list[str]
) -> None:
    """
    A mapping stored by an older version (or written to the database by
    hand) whose condition this version cannot compile: 403, never a 500, one
    event naming it, and the broken source compiled only once.
    """
    settled(apps.store().add_mapping(ResourceMapping(CALLER.username, "payments", ("read",), condition="subject.(")))
    for _ in range(3):
        reply = exchange(apps, scope="read")
        assert (reply.code, reply.json()["error"]) == (403, "unauthorized_client")
    assert len(refusals) == 3
    assert (refusals[0]["rule"], refusals[0]["rule_outcome"]) == ("condition", "invalid")
    assert "Syntax error" in refusals[0]["rule_error"]
    assert compilations == ["subject.("]


def test_expressions_are_compiled_once_per_write_never_per_exchange(apps: Apps, compilations: list[str]) -> None:
    api(apps, "POST", "/mappings", EXAMPLE)
    written = sorted(compilations)
    assert written == sorted([EXAMPLE["condition"], *EXAMPLE["claimExpressions"].values()])
    for _ in range(5):
        assert exchange(apps, scope="read").code == 200
    assert sorted(compilations) == written


def test_a_mapping_loaded_from_the_store_is_compiled_on_first_use_only(apps: Apps, compilations: list[str]) -> None:
    settled(apps.store().add_mapping(ResourceMapping(
        CALLER.username, "payments", ("read",), condition=EXAMPLE["condition"],
        claim_expressions=EXAMPLE["claimExpressions"])))
    for _ in range(5):
        assert exchange(apps, scope="read").code == 200
    assert len(compilations) == 3


def test_the_api_key_exchange_does_not_use_the_fields(tmp_path: Path) -> None:
    """A mapping for the key's identity with a false condition and claim expressions changes nothing."""
    apps = make_apps(tmp_path, {"api_keys": {"profiles": {"autojoin": {"audience": "autojoin"}}}})
    store = apps.store()
    settled(store.add_integration(Integration("acme")))
    key = apikeys.make_key("jwtk", "acme", "k1", lambda n: bytes(n))
    settled(store.add_api_key(ApiKeyRecord("acme", key.key_id, key.secret_sha256, tier=1)))
    settled(store.add_mapping(ResourceMapping(
        "apikey:acme:k1", "autojoin", condition="false", claim_expressions={"extra": "'added'"})))
    reply = call(apps.token, "POST", f"{URL}/v0/token/autojoin", data=json.dumps({"api_key": key.text}).encode(),
                 headers={"Content-Type": "application/json"})
    assert reply.code == 200, reply.body
    token = pyjwt.decode(reply.json()["token"], options={"verify_signature": False})
    assert set(token) == {"iss", "aud", "iat", "nbf", "exp", "jti", "int_id", "key_id", "tier"}


# -- properties of the policy -------------------------------------------------------------

PARAMETERS = IssueParameters(issuer="https://jwtlet.test", participant_context_claim="jwtlet_pc", ttl_secs=600)
NOW = 1_800_000_000.0

#: Conditions of every kind: true, false, failing, depending on the caller or the request.
conditions = st.one_of(
    st.sampled_from([
        "true", "false", "subject.namespace == 'payments'", "subject.namespace.startsWith('team-')",
        f"'{POD_NAME}' in subject.extra", f"subject.extra['{POD_NAME}'].size() > 0",
        "request.scopes.all(s, s != 'admin')", "request.audiences.size() == 0", "subject.claims['x'] == 1",
        "now > timestamp('2030-01-01T00:00:00Z')", "subject.uid != ''",
    ]),
    st.text(alphabet="abc'", max_size=4).map(lambda text: f"subject.serviceAccount == {json.dumps(text)}"),
)
callers = st.sampled_from([CALLER, UNBOUND, service_account("team-a", "api"), attrs.evolve(CALLER, uid=None)])


def decide(mapping: ResourceMapping, scopes: list[str], audiences: list[str], caller: Identity) -> Any:
    """The terms of a token, or the code of the refusal."""
    form = {"grant_type": [policy.GRANT_TYPE_TOKEN_EXCHANGE], "subject_token": ["t"], "resource": ["ctx"],
            "scope": [" ".join(scopes)], "audience": audiences}
    request = policy.parse_token_request(form)
    resolution = Resolution(mapping, {"read": ScopeMapping("read", {"role": "reader"})})
    try:
        return policy.mapping_terms(PARAMETERS, resolution, request, "default", caller, now=NOW)
    except Refusal as refusal:
        return refusal.code


@settings(max_examples=300, deadline=None)
@given(
    condition=conditions,
    caller=callers,
    allowed_scopes=st.lists(st.sampled_from(["read", "write", "admin"]), max_size=3),
    scopes=st.lists(st.sampled_from(["read", "write", "admin"]), max_size=3),
    allowed_audiences=st.lists(st.sampled_from(["default", "a", "b"]), max_size=2),
    audiences=st.lists(st.sampled_from(["default", "a", "b"]), max_size=2, unique=True),
)
def test_a_condition_only_narrows_what_a_mapping_allows(
    condition: str, caller: Identity, allowed_scopes: list[str], scopes: list[str],
    allowed_audiences: list[str], audiences: list[str],
) -> None:
    """With a condition, a request gets the same token as without, or is refused 403; never more."""
    plain = ResourceMapping("c", "ctx", allowed_scopes, allowed_audiences)
    without = decide(plain, scopes, audiences, caller)
    with_condition = decide(attrs.evolve(plain, condition=condition), scopes, audiences, caller)
    if isinstance(without, str):
        assert with_condition == without
    else:
        assert with_condition in (without, "unauthorized_client")


#: Expressions of every JSON shape a claim can take, and some that fail.
expressions = st.sampled_from([
    "'forged'", "1", "2.5", "true", "null", "[1, 'a']", "{'sub': 'nested-is-fine', 'iss': 1}",
    "subject.username", "subject.claims", "subject.extra", "request.scopes", "subject.claims['x']",
])
claim_names = st.one_of(st.sampled_from(RESERVED), st.text(alphabet="abcsub_", min_size=1, max_size=4))


@settings(max_examples=300, deadline=None)
@given(
    mapping_expressions=st.dictionaries(claim_names, expressions, max_size=5),
    scope_expressions=st.dictionaries(claim_names, expressions, max_size=5),
)
def test_no_expression_can_produce_a_reserved_claim(
    mapping_expressions: dict[str, str], scope_expressions: dict[str, str]
) -> None:
    """Whatever a store holds (the API refuses reserved names first), the registered claims are jwtlet's."""
    mapping = ResourceMapping(CALLER.username, "ctx", ("read",), claim_expressions=mapping_expressions)
    scope = ScopeMapping("read", claim_expressions=scope_expressions)
    request = policy.parse_token_request({"grant_type": [policy.GRANT_TYPE_TOKEN_EXCHANGE],
                                          "subject_token": ["t"], "resource": ["ctx"], "scope": ["read"]})
    try:
        terms = policy.mapping_terms(PARAMETERS, Resolution(mapping, {"read": scope}), request, "aud", CALLER,
                                     now=NOW)
    except Refusal as refusal:
        assert refusal.code in ("unauthorized_client", "invalid_scope")
        return
    issued = policy.token_claims(PARAMETERS.issuer, "jwtlet_pc", terms, 1000, "id")
    assert set(terms.claims).isdisjoint(RESERVED)
    assert {name: issued[name] for name in RESERVED} == {
        "iss": "https://jwtlet.test", "sub": "ctx", "jwtlet_pc": "ctx", "aud": "aud", "iat": 1000, "nbf": 1000,
        "exp": 1600, "jti": "id", "act": policy.actor_claim(CALLER)}


def test_a_caller_without_a_clock_cannot_satisfy_an_expression_reading_now() -> None:
    mapping = ResourceMapping("c", "ctx", condition="now > timestamp('2000-01-01T00:00:00Z')")
    request = policy.parse_token_request({"grant_type": [policy.GRANT_TYPE_TOKEN_EXCHANGE],
                                          "subject_token": ["t"], "resource": ["ctx"]})
    with pytest.raises(Refusal) as raised:
        policy.mapping_terms(PARAMETERS, Resolution(mapping), request, "aud", CALLER)
    assert raised.value.log_fields["rule_outcome"] == "failed"
    assert policy.mapping_terms(PARAMETERS, Resolution(mapping), request, "aud", CALLER, now=NOW).audience == "aud"
    # The activation kept for CALLER by that exchange lends its clock to no later exchange without one.
    with pytest.raises(Refusal):
        policy.mapping_terms(PARAMETERS, Resolution(mapping), request, "aud", CALLER)


def counted_evaluations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    evaluated: list[str] = []
    real = cel.evaluate

    def counting(expression: cel.Expression, activation: object) -> Any:
        evaluated.append(expression.source)
        return real(expression, activation)

    monkeypatch.setattr(cel, "evaluate", counting)
    return evaluated


def terms_for(mapping: ResourceMapping, subject: Identity, now: float = NOW) -> policy.Terms:
    request = policy.parse_token_request({"grant_type": [policy.GRANT_TYPE_TOKEN_EXCHANGE],
                                          "subject_token": ["t"], "resource": [mapping.participant_context]})
    return policy.mapping_terms(PARAMETERS, Resolution(mapping), request, "aud", subject, now=now)


def test_a_callers_values_of_expressions_not_reading_now_are_computed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    evaluated = counted_evaluations(monkeypatch)
    subject = attrs.evolve(CALLER)  # a caller no other test has kept
    mapping = ResourceMapping("c", "memo", condition="subject.namespace != ''",
                              claim_expressions={"ns": "subject.namespace", "at": "string(now)"})
    first = terms_for(mapping, subject)
    second = terms_for(mapping, subject, now=NOW + 61)
    assert sorted(evaluated) == sorted(["subject.namespace != ''", "subject.namespace", "string(now)", "string(now)"])
    assert first.claims["ns"] == second.claims["ns"] == subject.namespace
    assert first.claims["at"] != second.claims["at"], "an expression reading now is evaluated at every exchange"
    terms_for(mapping, attrs.evolve(CALLER))
    assert len(evaluated) == 7, "another identity object (a token validated again) computes its own"


def test_lists_and_maps_are_computed_for_every_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """No two tokens' claims share a list or a map one of them could change."""
    evaluated = counted_evaluations(monkeypatch)
    subject = attrs.evolve(CALLER)
    mapping = ResourceMapping("c", "memo", claim_expressions={"scopes": "request.scopes", "m": "{'a': 1}"})
    first, second = terms_for(mapping, subject), terms_for(mapping, subject)
    assert len(evaluated) == 4
    assert first.claims == second.claims
    assert first.claims["scopes"] is not second.claims["scopes"] and first.claims["m"] is not second.claims["m"]


def test_a_failed_evaluation_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    evaluated = counted_evaluations(monkeypatch)
    subject = attrs.evolve(CALLER)
    mapping = ResourceMapping("c", "memo", condition="subject.claims.missing == 'x'")
    for _ in range(2):
        with pytest.raises(Refusal) as raised:
            terms_for(mapping, subject)
        assert raised.value.log_fields["rule_outcome"] == "failed"
    assert len(evaluated) == 2


def test_audiences_a_client_makes_up_keep_nothing_of_it() -> None:
    """A client varying refused audiences, exchange after exchange, must not fill the daemon's memory."""
    subject = attrs.evolve(CALLER)
    mapping = ResourceMapping("c", "memo", condition="subject.namespace != ''", audiences=("allowed",))
    kept_before = len(claims._prepared)
    for index in range(50):
        request = policy.parse_token_request({
            "grant_type": [policy.GRANT_TYPE_TOKEN_EXCHANGE], "subject_token": ["t"], "resource": ["memo"],
            "audience": [f"made-up-{index}"]})
        with pytest.raises(Refusal) as raised:
            policy.mapping_terms(PARAMETERS, Resolution(mapping), request, "aud", subject, now=NOW)
        assert raised.value.code == "unauthorized_client"
    assert len(claims._prepared) == kept_before


def test_the_callers_kept_fit_a_memory_budget() -> None:
    """Callers with large tokens are kept fewer at a time: what is kept is bounded in bytes, not in entries."""
    mapping = ResourceMapping("c", "memo", condition="subject.namespace != ''")
    large = {f"claim-{index}": "x" * 1000 for index in range(200)}  # about 200 KB of claims
    for _ in range(60):
        terms_for(mapping, attrs.evolve(CALLER, claims=large))
    assert claims._prepared.currsize <= claims.PREPARED_BYTES
    assert len(claims._prepared) < 60


def test_a_caller_keeps_a_bounded_number_of_values() -> None:
    subject = attrs.evolve(CALLER)
    for index in range(claims.KNOWN_VALUES + 10):
        terms_for(ResourceMapping("c", "memo", claim_expressions={"n": f"{index}"}), subject)
    kept = claims.Caller(subject, "memo", (), (), NOW)
    assert len(kept._prepare().known) == claims.KNOWN_VALUES


# -- the validators --------------------------------------------------------------------------


def test_the_bound_objects_of_a_token_become_tokenreview_extra() -> None:
    token = {"jti": "j-1", "kubernetes.io": {"namespace": "ns", "pod": {"name": "p", "uid": "pu"},
                                             "node": {"name": "n", "uid": "nu"}}}
    assert bound_object_extra(token) == {
        "authentication.kubernetes.io/pod-name": ["p"], "authentication.kubernetes.io/pod-uid": ["pu"],
        "authentication.kubernetes.io/node-name": ["n"], "authentication.kubernetes.io/node-uid": ["nu"],
        "authentication.kubernetes.io/credential-id": ["JTI=j-1"],
    }
    assert bound_object_extra({"kubernetes.io": {"pod": "not-an-object", "node": {"name": 3}}}) == {}
    assert bound_object_extra({"kubernetes.io": "odd"}) == {}


def build_validator(kind: str, tmp_path: Path, cluster: Cluster, clock: Clock) -> Any:
    context = plugin_context(tmp_path, cluster, clock)
    if kind == "kubernetes-tokenreview":
        return kubernetes_tokenreview.build({}, context)
    bearer = tmp_path / "bearer"
    bearer.write_text("jwtlet-own-token")
    return kubernetes_oidc.build({"issuers": [{"issuer": cluster.fake.issuer, "bearer_token_file": str(bearer)}]},
                                 context)


@pytest.mark.parametrize("kind", ["kubernetes-oidc", "kubernetes-tokenreview"])
@pytest_twisted.ensureDeferred
async def test_both_validators_hand_the_expressions_what_claims_md_lists(
    tmp_path: Path, cluster: Cluster, clock: Clock, kind: str
) -> None:
    validator = build_validator(kind, tmp_path, cluster, clock)
    uid = cluster.fake.add_service_account("payments", "api")
    claims_of_token = cluster.fake.projected_claims("payments", "api", [CLIENT_AUDIENCE], pod="api-0")
    subject = await validator.validate(cluster.fake.sign(claims_of_token), CLIENT_AUDIENCE)
    seen = claims.variables(subject, "payments", ["read"], [], NOW)["subject"]
    assert isinstance(seen, dict)
    pod_uid = claims_of_token["kubernetes.io"]["pod"]["uid"]
    assert seen == {
        "username": "system:serviceaccount:payments:api", "namespace": "payments", "serviceAccount": "api",
        "uid": uid, "issuer": cluster.fake.issuer,
        "claims": claims_of_token if kind == "kubernetes-oidc" else {},
        "extra": {POD_NAME: ["api-0"], "authentication.kubernetes.io/pod-uid": [pod_uid],
                  "authentication.kubernetes.io/credential-id": [f"JTI={claims_of_token['jti']}"]},
    }
    assert seen["issuer"] == policy.actor_claim(subject)["iss"]
    # The example of claims.md holds for a pod-bound token whichever validator vouched for it.
    assert claims.Caller(subject, "payments", ["read"], [], NOW).value("condition", EXAMPLE["condition"]) is True


def test_extra_of_another_shape_is_left_out_of_what_expressions_see() -> None:
    odd = attrs.evolve(CALLER, extra={"tier": 3, "ok": ["a"], "mixed": ["a", 1], "tuple": ("b",)})
    assert claims.string_lists(odd.extra) == {"ok": ["a"], "tuple": ["b"]}


# -- every store keeps the fields ------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@pytest_twisted.ensureDeferred
async def test_every_store_keeps_conditions_and_claim_expressions(tmp_path: Path, kind: str) -> None:
    from twisted.internet import reactor

    from jwtlet.plugins.memory_store import MemoryStore
    from jwtlet.plugins.sqlite_store import SQLiteStore

    store: Any = MemoryStore(reactor) if kind == "memory" else SQLiteStore(tmp_path / "s.sqlite3", reactor, reactor)
    try:
        await round_trip(store)
    finally:
        if kind == "sqlite":
            await store.stopService()


async def round_trip(store: Any) -> None:
    """Written, read, listed, resolved, updated and cleared: the fields come back as they went in."""
    mapping = ResourceMapping(CALLER.username, "payments", ("read",), condition=EXAMPLE["condition"],
                              claim_expressions=EXAMPLE["claimExpressions"])
    scope = ScopeMapping("read", {"role": "reader"}, claim_expressions={"sa": "subject.serviceAccount"})
    await store.add_mapping(mapping)
    await store.add_scope(scope)
    assert await store.get_mapping(*mapping.key) == mapping
    assert await store.list_mappings() == [mapping]
    assert await store.get_scope("read") == scope
    assert await store.resolve(*mapping.key, ["read"]) == Resolution(mapping, {"read": scope})
    cleared = attrs.evolve(mapping, condition=None, claim_expressions={})
    await store.update_mapping(cleared)
    await store.update_scope(attrs.evolve(scope, claim_expressions={"sa": "'x'"}))
    assert (await store.resolve(*mapping.key, ["read"])) == Resolution(
        cleared, {"read": attrs.evolve(scope, claim_expressions={"sa": "'x'"})})


# -- the documents say what the code does -----------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs"
OPENAPI = Path(__file__).resolve().parent.parent / "openapi"


def doc_examples() -> list[dict[str, Any]]:
    """The jwtlet JSON examples of docs/claims.md (the Kubernetes ones are YAML)."""
    text = (DOCS / "claims.md").read_text()
    return [json.loads(block) for block in text.split("```json\n")[1:] for block in [block.split("```")[0]]]


def test_every_recipe_of_claims_md_compiles_and_behaves() -> None:
    examples = doc_examples()
    assert len(examples) == 4
    team_a = attrs.evolve(service_account("team-a", "api"), extra=CALLER.extra)
    outcomes = []
    for example in examples:
        mapping = ResourceMapping(
            team_a.username, "ctx", ("read",), example.get("audiences", ("team-a.orders",)),
            condition=example.get("condition") and claims.check_condition(example["condition"]),
            claim_expressions={name: claims.check_expression(name, source)
                               for name, source in example.get("claimExpressions", {}).items()})
        form = {"grant_type": [policy.GRANT_TYPE_TOKEN_EXCHANGE], "subject_token": ["t"], "resource": ["ctx"],
                "audience": ["team-a.orders"]}
        terms = policy.mapping_terms(PARAMETERS, Resolution(mapping), policy.parse_token_request(form),
                                     "default", team_a, now=NOW)
        outcomes.append(dict(terms.claims))
    assert outcomes[0] == {"k8s_ns": "team-a", "pod": "api-7d9f-x2"}
    assert outcomes[3] == {"team": "team-a"}
    wrong_team = policy.parse_token_request({"grant_type": [policy.GRANT_TYPE_TOKEN_EXCHANGE],
                                             "subject_token": ["t"], "resource": ["ctx"],
                                             "audience": ["team-b.orders"]})
    per_team = ResourceMapping(team_a.username, "ctx", (), ("team-a.orders", "team-b.orders"),
                               condition=examples[3]["condition"])
    with pytest.raises(Refusal):
        policy.mapping_terms(PARAMETERS, Resolution(per_team), wrong_team, "default", team_a, now=NOW)


def test_the_management_document_describes_the_fields() -> None:
    import jsonschema
    import yaml

    spec = yaml.safe_load((OPENAPI / "management.yaml").read_text())
    schemas = spec["components"]["schemas"]
    for name, value in (("ResourceMapping", dict(EXAMPLE, audiences=[])),
                        ("ScopeMapping", {"scope": "s", "claims": {}, "claimExpressions": {"a": "subject.uid"}})):
        strict = dict(schemas[name], additionalProperties=False)
        jsonschema.validate(value, {"components": spec["components"], **strict})
