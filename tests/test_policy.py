"""The exchange policy, without I/O: request form rules, scopes, audiences, claims."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jwtlet import claims, policy
from jwtlet.model import Identity, Resolution, ResourceMapping, ScopeMapping
from jwtlet.policy import IssueParameters, Refusal, Terms

GRANT = policy.GRANT_TYPE_TOKEN_EXCHANGE
JWT = policy.TOKEN_TYPE_JWT


def form(**fields: Any) -> dict[str, list[str]]:
    base: dict[str, Any] = {"grant_type": GRANT, "subject_token": "t", "resource": "ctx"}
    base.update(fields)
    return {k: v if isinstance(v, list) else [v] for k, v in base.items() if v is not None}


def refusal(fields: dict[str, list[str]], **kwargs: Any) -> tuple[str, str]:
    with pytest.raises(Refusal) as raised:
        policy.parse_token_request(fields, **kwargs)
    error = raised.value
    return error.code, error.description


def test_edc_style_request_without_subject_token_type_is_accepted() -> None:
    request = policy.parse_token_request(
        form(scope="write read read", audience="edc", client_id="edc-connector")
    )
    assert request.scopes == ("read", "write")
    assert request.audiences == ("edc",)
    assert request.subject_token_type is None
    assert request.resource == "ctx"


@pytest.mark.parametrize("missing", ["grant_type", "subject_token", "resource"])
def test_missing_required_parameters_are_named(missing: str) -> None:
    assert refusal(form(**{missing: None})) == ("invalid_request", f"missing parameter '{missing}'")
    assert refusal(form(**{missing: ""})) == ("invalid_request", f"missing parameter '{missing}'")


def test_grant_type_other_than_token_exchange() -> None:
    assert refusal(form(grant_type="client_credentials"))[:1] == ("unsupported_grant_type",)


def test_duplicates_are_invalid_except_audience() -> None:
    assert refusal(form(scope=["a", "b"]))[0] == "invalid_request"
    assert refusal(form(subject_token=["a", "b"]))[0] == "invalid_request"
    assert refusal(form(resource=["a", "b"]))[0] == "invalid_target"
    assert policy.parse_token_request(form(audience=["a", "b", "a"])).audiences == ("a", "b")


def test_subject_token_type_rules() -> None:
    assert refusal(form(), require_subject_token_type=True)[1] == "missing parameter 'subject_token_type'"
    assert refusal(form(subject_token_type="urn:x"))[0] == "invalid_request"
    for accepted in sorted(policy.SUBJECT_TOKEN_TYPES):
        assert policy.parse_token_request(form(subject_token_type=accepted)).subject_token_type == accepted
    assert policy.parse_token_request(form(subject_token_type=policy.TOKEN_TYPE_API_KEY)).is_api_key


def test_requested_token_type_and_actor_token_rules() -> None:
    assert refusal(form(requested_token_type="urn:ietf:params:oauth:token-type:saml2"))[0] == "invalid_request"
    assert policy.parse_token_request(form(requested_token_type=JWT)).resource == "ctx"
    assert refusal(form(actor_token="a"))[1] == "missing parameter 'actor_token_type'"
    assert refusal(form(actor_token_type=JWT))[1] == "actor_token_type sent without actor_token"
    assert policy.parse_token_request(form(actor_token="a", actor_token_type=JWT)).actor_token == "a"


MAPPING = ResourceMapping("system:serviceaccount:ns:sa", "ctx", scopes=("read", "write"), audiences=())


def test_scopes_must_be_allowed_by_the_mapping() -> None:
    policy.check_scopes_allowed(MAPPING, ["read"])
    with pytest.raises(Refusal) as raised:
        policy.check_scopes_allowed(MAPPING, ["read", "admin"])
    assert raised.value.code == "unauthorized_client"


def expand_scopes(requested: list[str], scopes: dict[str, ScopeMapping], reserved: frozenset[str]) -> Any:
    """Step 3 for static claims, as mapping_terms runs it."""
    return policy.merge_claims(claims.static_layers(requested, scopes), reserved)


def test_scope_expansion_merges_and_detects_conflicts() -> None:
    reserved = policy.reserved_claims("jwtlet_pc")
    scopes = {
        "read": ScopeMapping("read", {"role": "reader", "tier": 1}),
        "write": ScopeMapping("write", {"role": "writer"}),
        "same": ScopeMapping("same", {"tier": 1}),
    }
    assert expand_scopes(["read", "same"], scopes, reserved) == {"role": "reader", "tier": 1}
    assert expand_scopes(["read", "read"], scopes, reserved) == {"role": "reader", "tier": 1}
    assert expand_scopes(["unmapped"], scopes, reserved) == {}
    with pytest.raises(Refusal) as raised:
        expand_scopes(["read", "write"], scopes, reserved)
    assert raised.value.code == "invalid_scope"


@pytest.mark.parametrize(
    "requested, allowed, result",
    [
        ([], [], "default"),
        ([], ["default", "other"], "default"),
        ([], ["other"], None),
        (["default"], [], "default"),
        (["other"], [], None),
        (["other"], ["other"], "other"),
        (["default"], ["other"], None),
        (["a", "b"], ["a", "b", "c"], ["a", "b"]),
        (["a", "x"], ["a", "b"], None),
    ],
)
def test_audience_choice_table(requested: list[str], allowed: list[str], result: Any) -> None:
    if result is None:
        with pytest.raises(Refusal) as raised:
            policy.choose_audience(requested, allowed, "default")
        assert raised.value.code == "unauthorized_client"
    else:
        assert policy.choose_audience(requested, allowed, "default") == result


SA = Identity(username="system:serviceaccount:ns:sa", issuer="https://k8s", uid="u-1")
ROBOT = Identity(username="system:serviceaccount:ops:robot", issuer="https://k8s")


def test_act_claim_with_and_without_actor() -> None:
    assert policy.actor_claim(SA) == {"sub": SA.username, "iss": "https://k8s", "k8s_uid": "u-1"}
    assert policy.actor_claim(SA, ROBOT) == {
        "sub": ROBOT.username,
        "iss": "https://k8s",
        "act": {"sub": SA.username, "iss": "https://k8s", "k8s_uid": "u-1"},
    }


PARAMETERS = IssueParameters(issuer="https://jwtlet.test", participant_context_claim="jwtlet_pc", ttl_secs=600)


def mapping_token(scope_claims: dict[str, Any], token_id: str) -> dict[str, Any]:
    terms = Terms(audience="svc", ttl_secs=PARAMETERS.ttl_secs, claims=scope_claims, participant_context="ctx",
                  act=policy.actor_claim(SA))
    return policy.token_claims(PARAMETERS.issuer, PARAMETERS.participant_context_claim, terms, 1000, token_id)


def test_token_claims_table() -> None:
    claims = mapping_token({"role": "reader"}, "id-1")
    assert claims == {
        "role": "reader",
        "iss": "https://jwtlet.test",
        "sub": "ctx",
        "jwtlet_pc": "ctx",
        "aud": "svc",
        "iat": 1000,
        "nbf": 1000,
        "exp": 1600,
        "jti": "id-1",
        "act": {"sub": SA.username, "iss": "https://k8s", "k8s_uid": "u-1"},
    }


def test_granted_scope_is_sorted_deduplicated_or_absent() -> None:
    assert policy.granted_scope(policy.parse_scope("write read read")) == "read write"
    assert policy.granted_scope(policy.parse_scope("")) is None


def test_mapping_terms_apply_steps_two_to_four_in_order() -> None:
    """Scopes are checked before they expand, and the audience comes from the mapping."""
    mapping = ResourceMapping(SA.username, "ctx", scopes=("read",), audiences=("edc",))
    resolution = Resolution(mapping, {"read": ScopeMapping("read", {"role": "reader", "sub": "forged"})})
    request = policy.parse_token_request(form(scope="read", audience="edc"))
    terms = policy.mapping_terms(PARAMETERS, resolution, request, "default", SA, ROBOT)
    assert terms == Terms(audience="edc", ttl_secs=600, claims={"role": "reader"}, participant_context="ctx",
                          act=policy.actor_claim(SA, ROBOT), scopes=("read",))
    with pytest.raises(Refusal) as raised:
        policy.mapping_terms(PARAMETERS, resolution, policy.parse_token_request(form(scope="write")), "edc", SA)
    assert raised.value.code == "unauthorized_client"


KEY = Identity(username="apikey:acme:k1", issuer="jwtlet:api-key",
               extra={"int_id": "acme", "key_id": "k1", "tier": 2})


def test_api_key_terms_give_the_m_lab_claims_and_nothing_of_a_mapping() -> None:
    terms = policy.api_key_terms("autojoin", 3600, KEY)
    claims = policy.token_claims("https://jwtlet.test", "jwtlet_pc", terms, 1000, "id-1")
    assert claims == {"iss": "https://jwtlet.test", "aud": "autojoin", "iat": 1000, "nbf": 1000, "exp": 4600,
                      "jti": "id-1", "int_id": "acme", "key_id": "k1", "tier": 2}
    assert policy.granted_scope(terms.scopes) is None


# -- properties -------------------------------------------------------------------

claim_names = st.one_of(
    st.sampled_from(sorted(policy.RESERVED_CLAIMS | {"jwtlet_pc"})), st.text(min_size=1, max_size=8)
)
claim_values = st.one_of(st.integers(), st.text(max_size=8), st.booleans(), st.none(),
                         st.lists(st.integers(), max_size=3))
scope_claims = st.dictionaries(claim_names, claim_values, max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), scope_claims, max_size=3))
def test_no_scope_mapping_can_override_a_reserved_claim(stored: dict[str, dict[str, Any]]) -> None:
    reserved = policy.reserved_claims("jwtlet_pc")
    mappings = {name: ScopeMapping(name, claims) for name, claims in stored.items()}
    try:
        merged = expand_scopes(list(stored), mappings, reserved)
    except Refusal as error:
        assert error.code == "invalid_scope"
        return
    claims = mapping_token(merged, "id")
    assert claims["iss"] == "https://jwtlet.test"
    assert claims["sub"] == claims["jwtlet_pc"] == "ctx"
    registered = (claims["aud"], claims["iat"], claims["nbf"], claims["exp"], claims["jti"])
    assert registered == ("svc", 1000, 1000, 1600, "id")
    assert claims["act"] == policy.actor_claim(SA)
    assert set(merged) & reserved == set()


@settings(max_examples=300, deadline=None)
@given(
    requested_scopes=st.lists(st.sampled_from(["read", "write", "admin", "x"]), max_size=4),
    allowed_scopes=st.lists(st.sampled_from(["read", "write", "admin"]), max_size=3),
    requested_audiences=st.lists(st.sampled_from(["default", "a", "b"]), max_size=3, unique=True),
    allowed_audiences=st.lists(st.sampled_from(["default", "a", "b"]), max_size=3),
)
def test_a_decision_either_refuses_or_satisfies_every_rule(
    requested_scopes: list[str],
    allowed_scopes: list[str],
    requested_audiences: list[str],
    allowed_audiences: list[str],
) -> None:
    """No token is decided when any check fails; a decided one obeys every check."""
    mapping = ResourceMapping("c", "ctx", scopes=allowed_scopes, audiences=allowed_audiences)
    try:
        policy.check_scopes_allowed(mapping, requested_scopes)
        audience = policy.choose_audience(requested_audiences, mapping.audiences, "default")
    except Refusal as error:
        assert error.code == "unauthorized_client"
        scopes_ok = set(requested_scopes) <= set(allowed_scopes)
        if allowed_audiences:
            audience_ok = all(a in allowed_audiences for a in requested_audiences) and (
                bool(requested_audiences) or "default" in allowed_audiences
            )
        else:
            audience_ok = all(a == "default" for a in requested_audiences)
        assert not (scopes_ok and audience_ok)
        return
    assert set(requested_scopes) <= set(allowed_scopes)
    granted = [audience] if isinstance(audience, str) else audience
    for value in granted:
        assert value in allowed_audiences if allowed_audiences else value == "default"
