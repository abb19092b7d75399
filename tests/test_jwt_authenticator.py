"""
The ``jwt-authenticator`` validator (workload-identity.md): the Kubernetes
``AuthenticationConfiguration`` shape read exactly, with Kubernetes'
semantics for every field; tokens shaped like GitHub Actions', GitLab CI's,
a second cluster's and SPIFFE JWT-SVIDs, issued by fake issuers served in
memory at their own URLs.  The token checks it shares with kubernetes-oidc
are the attack catalogue's (test_jwt_attacks.py), run against both.
"""

from __future__ import annotations

import copy
import datetime
import re
from pathlib import Path
from typing import Any, Optional

import pytest
import pytest_twisted
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from k8s_fixtures import jwtlet_config
from test_docs_config_reference import keys_read_by, section_text
from twisted.internet.task import Clock

from jwtlet import claims as claim_rules
from jwtlet.authenticator import overlapping_prefix_problems
from jwtlet.extauthz.trust import prefixes_across_validators
from jwtlet.interfaces import (
    DependencyUnavailable,
    ITrustedIssuers,
    PluginConfigError,
    PluginContext,
    TokenRejected,
    TrustedIssuer,
)
from jwtlet.model import Identity
from jwtlet.plugins.jwt_authenticator import JWTAuthenticator, jwt_authenticator
from jwtlet.testing.kubernetes import SigningKey
from jwtlet.testing.memory import MemoryNetwork
from jwtlet.testing.oidc import CLUSTER_B_ISSUER, GITHUB_ISSUER, GITLAB_ISSUER, SPIFFE_ISSUER, FakeOIDCIssuer

AUDIENCE = "https://jwtlet.example.com"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "workload-identity.md"


def documented_validator() -> dict[str, Any]:
    """The ``validator`` table of the page's "All four in one validator" section."""
    text = DOCS.read_text()
    section = text[text.index("## All four in one validator"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert block is not None
    validator: dict[str, Any] = yaml.safe_load(block.group(1))["validator"]
    return validator


def entry(url: str = GITHUB_ISSUER, **changes: Any) -> dict[str, Any]:
    """One ``jwt[]`` entry: the documented one for ``url``, with ``changes`` replacing its top-level keys."""
    (found,) = [item for item in documented_validator()["jwt"] if item["issuer"]["url"] == url]
    return {**copy.deepcopy(found), **changes}


class World:
    """The fake issuers, served in memory at their own URLs, and a validator built over them."""

    def __init__(self, tmp_path: Path, clock: Clock) -> None:
        self.tmp_path = tmp_path
        self.clock = clock
        self.network = MemoryNetwork()
        # GitHub signs with RS256; the others here with ES256, so both key types are exercised.
        self.issuers = {url: self.serve(url, algorithm="RS256" if url == GITHUB_ISSUER else "ES256")
                        for url in (GITHUB_ISSUER, GITLAB_ISSUER, CLUSTER_B_ISSUER, SPIFFE_ISSUER)}

    def serve(self, url: str, served_at: Optional[str] = None, algorithm: str = "RS256") -> FakeOIDCIssuer:
        fake = FakeOIDCIssuer(issuer=url, url=served_at, clock=self.clock, keys=[SigningKey.generate(algorithm)])
        self.network.serve(served_at or url, fake.resource())
        return fake

    def context(self, dev: bool = False, check_only: bool = False, max_age: int = 86400) -> PluginContext:
        return PluginContext(reactor=self.clock, clock=self.clock, http_client=self.network.client(),
                             config=jwtlet_config("jwt-authenticator", dev=dev, max_age=max_age),
                             data_dir=self.tmp_path, check_only=check_only)

    def build(self, *entries: dict[str, Any], **options: Any) -> JWTAuthenticator:
        return jwt_authenticator.build({"jwt": list(entries), **options}, self.context())

    def token(self, url: str, claims: dict[str, Any]) -> str:
        return self.issuers[url].sign(claims)

    @property
    def github(self) -> FakeOIDCIssuer:
        return self.issuers[GITHUB_ISSUER]


@pytest.fixture
def world(tmp_path: Path, clock: Clock) -> World:
    return World(tmp_path, clock)


async def validate(validator: JWTAuthenticator, token: str, audience: Optional[str] = AUDIENCE) -> Identity:
    identity: Identity = await validator.validate(token, audience)
    return identity


async def refused(
    validator: JWTAuthenticator, token: str, match: Optional[str] = None, audience: Optional[str] = AUDIENCE
) -> str:
    with pytest.raises(TokenRejected, match=match) as raised:
        await validate(validator, token, audience)
    return str(raised.value)


def problems(world: World, *entries: Any, **options: Any) -> tuple[str, ...]:
    with pytest.raises(PluginConfigError) as raised:
        jwt_authenticator.build({"jwt": list(entries), **options}, world.context())
    return raised.value.messages


# -- the documented recipes ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_documented_recipes_map_each_workload_to_its_own_caller(world: World) -> None:
    """
    The page's combined validator, unchanged: a GitHub Actions job, a GitLab
    CI job, a pod of a second cluster and a SPIFFE workload each become the
    caller the recipe says, with the verified claims and the mapped extra
    that mappings' expressions see.
    """
    validator = jwt_authenticator.build(
        {k: v for k, v in documented_validator().items() if k != "type"}, world.context())
    github_claims = world.github.github_actions(AUDIENCE, environment="production")
    github = await validate(validator, world.token(GITHUB_ISSUER, github_claims))
    assert (github.username, github.issuer, github.groups, github.uid) == (
        "github:acme/app", GITHUB_ISSUER, ("acme",), "repo:acme/app:environment:production")
    assert github.extra == {"github.com/ref": ["refs/heads/main"], "github.com/environment": ["production"]}
    assert github.claims == github_claims
    assert github.expires_at == github_claims["exp"] and github.token_id == github_claims["jti"]

    gitlab = await validate(validator, world.token(GITLAB_ISSUER, world.issuers[GITLAB_ISSUER].gitlab_ci(AUDIENCE)))
    assert (gitlab.username, gitlab.uid, gitlab.extra) == ("gitlab:acme/app", "20", {"gitlab.com/ref": ["main"]})

    pod = world.issuers[CLUSTER_B_ISSUER].service_account(AUDIENCE)
    cluster_b = await validate(validator, world.token(CLUSTER_B_ISSUER, pod))
    assert cluster_b.username == "cluster-b:system:serviceaccount:payments:api"
    assert cluster_b.uid == pod["kubernetes.io"]["serviceaccount"]["uid"]
    assert cluster_b.extra == {"cluster-b.acme.example/pod-name": ["api-7c9d-x2x4q"]}
    assert (cluster_b.namespace, cluster_b.name) == (None, None), "not this cluster's service account"

    spiffe = await validate(validator, world.token(SPIFFE_ISSUER, world.issuers[SPIFFE_ISSUER].spiffe_svid(AUDIENCE)))
    assert (spiffe.username, spiffe.groups, spiffe.extra) == ("spiffe://acme.example/ns/payments/sa/api", (), {})


@pytest_twisted.ensureDeferred
async def test_the_caller_reaches_the_subject_variables_of_mapping_expressions(world: World) -> None:
    """claims.md: subject.username, .issuer, .claims and .extra come from the mapped user and the verified token."""
    validator = world.build(entry())
    identity = await validate(validator, world.token(GITHUB_ISSUER, world.github.github_actions(
        AUDIENCE, environment="production")))
    subject = claim_rules.variables(identity, "deployments", ["deploy"], [], world.clock.seconds())["subject"]
    assert subject["username"] == "github:acme/app" and subject["issuer"] == GITHUB_ISSUER
    assert subject["claims"]["repository"] == "acme/app"
    assert subject["extra"]["github.com/ref"] == ["refs/heads/main"]
    assert (subject["namespace"], subject["serviceAccount"]) == ("", "")


# -- claimValidationRules and userValidationRules --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_false_claim_rule_refuses_the_token_with_its_message_for_the_log(world: World) -> None:
    """An attacker's own repository outside acme gets a real GitHub token: the owner rule refuses it."""
    validator = world.build(entry())
    reason = await refused(validator, world.token(GITHUB_ISSUER, world.github.github_actions(
        AUDIENCE, repository="mallory/app")), match="only acme's repositories")
    assert "mallory" not in reason, "the log names the rule, not the token's contents"


@pytest_twisted.ensureDeferred
async def test_a_required_claim_must_be_present_with_its_exact_string_value(world: World) -> None:
    """A job on a self-hosted runner (or a token without runner_environment) is refused by claim + requiredValue."""
    validator = world.build(entry())
    await refused(validator, world.token(GITHUB_ISSUER, world.github.github_actions(
        AUDIENCE, runner_environment="self-hosted")), match="required value")
    claims = world.github.github_actions(AUDIENCE)
    del claims["runner_environment"]
    await refused(validator, world.token(GITHUB_ISSUER, claims), match="not present")
    await refused(validator, world.token(GITHUB_ISSUER, world.github.github_actions(
        AUDIENCE, runner_environment=["github-hosted"])), match="required value")


@pytest_twisted.ensureDeferred
async def test_a_required_claim_without_required_value_must_be_the_empty_string(world: World) -> None:
    validator = world.build(entry(claimValidationRules=[{"claim": "head_ref"}]))
    assert (await validate(validator, world.token(GITHUB_ISSUER, world.github.github_actions(AUDIENCE)))).username
    await refused(validator, world.token(GITHUB_ISSUER, world.github.github_actions(AUDIENCE, head_ref="feature")))


@pytest_twisted.ensureDeferred
async def test_an_expression_that_fails_to_evaluate_refuses_the_token(world: World) -> None:
    """A token lacking the claim a rule or a mapping reads is refused, never mapped with a hole in it."""
    validator = world.build(entry())
    claims = world.github.github_actions(AUDIENCE)
    del claims["repository_owner"]
    await refused(validator, world.token(GITHUB_ISSUER, claims), match="failed to evaluate")
    rule_is_not_bool = world.build(entry(claimValidationRules=[{"expression": "claims.repository"}]))
    await refused(rule_is_not_bool, world.token(GITHUB_ISSUER, world.github.github_actions(AUDIENCE)),
                  match="not bool")


@pytest_twisted.ensureDeferred
async def test_a_false_user_rule_refuses_a_caller_posing_as_a_kubernetes_user(world: World) -> None:
    """A SPIFFE-ish issuer signs sub=system:admin: mapped with prefix "", the user rule refuses it."""
    validator = world.build(entry(SPIFFE_ISSUER, claimValidationRules=[], userValidationRules=[
        {"expression": '!user.username.startsWith("system:")', "message": "no Kubernetes users"},
        {"expression": "user.groups.size() == 0 && user.uid == '' && user.extra.size() == 0"}]))
    spire = world.issuers[SPIFFE_ISSUER]
    await refused(validator, world.token(SPIFFE_ISSUER, spire.spiffe_svid(AUDIENCE, spiffe_id="system:admin")),
                  match="no Kubernetes users")
    assert (await validate(validator, world.token(SPIFFE_ISSUER, spire.spiffe_svid(AUDIENCE)))).username


# -- claimMappings -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_username_from_a_claim_gets_its_prefix_and_must_be_a_nonempty_string(world: World) -> None:
    validator = world.build(entry(claimValidationRules=[], claimMappings={"username": {"claim": "sub",
                                                                                         "prefix": "github:"}}))
    identity = await validate(validator, world.token(GITHUB_ISSUER, world.github.github_actions(
        AUDIENCE, environment="production")))
    assert identity.username == "github:repo:acme/app:environment:production"
    for sub in (None, 7, ["repo:acme/app"]):
        claims = world.github.github_actions(AUDIENCE, sub=sub)
        if sub is None:
            del claims["sub"]
        await refused(validator, world.token(GITHUB_ISSUER, claims), match="claimMappings.username")
    empty = world.build(entry(claimValidationRules=[], claimMappings={"username": {"claim": "sub", "prefix": ""}}))
    await refused(empty, world.token(GITHUB_ISSUER, world.github.github_actions(AUDIENCE, sub="")), match="empty")
    not_a_string = world.build(entry(claimMappings={"username": {"expression": "claims.run_attempt == '1'"}}))
    await refused(not_a_string, world.token(GITHUB_ISSUER, world.github.github_actions(AUDIENCE)),
                  match="must evaluate to a string")


@pytest_twisted.ensureDeferred
async def test_an_email_username_needs_the_issuer_not_to_deny_it_was_verified(world: World) -> None:
    """Kubernetes: with username.claim email, email_verified must be true when present."""
    validator = world.build(entry(GITLAB_ISSUER, claimValidationRules=[],
                                  claimMappings={"username": {"claim": "user_email", "prefix": "gitlab:"}}))
    gitlab = world.issuers[GITLAB_ISSUER]
    assert (await validate(validator, world.token(GITLAB_ISSUER, gitlab.gitlab_ci(AUDIENCE)))).username
    email = world.build(entry(GITLAB_ISSUER, claimValidationRules=[],
                              claimMappings={"username": {"claim": "email", "prefix": ""}}))
    for verified, accepted in ((None, True), (True, True), (False, False), ("true", False)):
        claims = gitlab.gitlab_ci(AUDIENCE, email="alice@acme.example")
        if verified is not None:
            claims["email_verified"] = verified
        token = world.token(GITLAB_ISSUER, claims)
        if accepted:
            assert (await validate(email, token)).username == "alice@acme.example"
        else:
            await refused(email, token, match="email not verified")


@pytest_twisted.ensureDeferred
async def test_groups_uid_and_extra_follow_kubernetes_conversions(world: World) -> None:
    """
    groups from a claim: a string or a list of strings, prefixed; from an
    expression: "", [] and null are none.  extra: "", [] and null drop the
    key, empty strings in a list are dropped.  uid: a string.
    """
    mappings = {"username": {"expression": '"github:" + claims.repository'},
                "groups": {"claim": "teams", "prefix": "gh:"},
                "uid": {"expression": "claims.repository_id"},
                "extra": [{"key": "acme.example/list", "valueExpression": '["a", "", "b"]'},
                          {"key": "acme.example/empty", "valueExpression": '""'},
                          {"key": "acme.example/null", "valueExpression": "null"}]}
    validator = world.build(entry(claimValidationRules=[], claimMappings=mappings))
    for teams, groups in (("ops", ("gh:ops",)), (["ops", "dev"], ("gh:ops", "gh:dev")), (None, ())):
        claims = world.github.github_actions(AUDIENCE, teams=teams)
        if teams is None:
            del claims["teams"]
        identity = await validate(validator, world.token(GITHUB_ISSUER, claims))
        assert identity.groups == groups
        assert identity.uid == "690123456"
        assert identity.extra == {"acme.example/list": ["a", "b"]}
    await refused(validator, world.token(GITHUB_ISSUER, world.github.github_actions(AUDIENCE, teams=[1])),
                  match="groups")
    bad = {**mappings, "groups": {"expression": "[1]"}}
    await refused(world.build(entry(claimValidationRules=[], claimMappings=bad)),
                  world.token(GITHUB_ISSUER, world.github.github_actions(AUDIENCE)), match="groups")
    bad = {**mappings, "uid": {"expression": "1"}}
    await refused(world.build(entry(claimValidationRules=[], claimMappings=bad)),
                  world.token(GITHUB_ISSUER, world.github.github_actions(AUDIENCE)), match="uid")
    bad = {**mappings, "extra": [{"key": "acme.example/map", "valueExpression": "{'a': 'b'}"}]}
    await refused(world.build(entry(claimValidationRules=[], claimMappings=bad)),
                  world.token(GITHUB_ISSUER, world.github.github_actions(AUDIENCE)), match="extra")
    no_uid = {**mappings, "uid": {"claim": "missing_claim"}}
    await refused(world.build(entry(claimValidationRules=[], claimMappings=no_uid)),
                  world.token(GITHUB_ISSUER, world.github.github_actions(AUDIENCE)), match="uid")


# -- the issuer table --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_audience_must_be_one_of_the_configured_ones_and_the_ports(world: World) -> None:
    """
    audienceMatchPolicy MatchAny: ``aud`` must contain one of ``audiences``;
    the port's own audience must be in it too, so a token for the token port
    is no management credential.
    """
    validator = world.build(entry(issuer={"url": GITHUB_ISSUER, "audiences": [AUDIENCE, "jwtlet-management"],
                                          "audienceMatchPolicy": "MatchAny"}))
    for_management = world.token(GITHUB_ISSUER, world.github.github_actions("jwtlet-management"))
    assert (await validate(validator, for_management, "jwtlet-management")).username == "github:acme/app"
    await refused(validator, for_management, match="audience", audience=AUDIENCE)
    elsewhere = world.token(GITHUB_ISSUER, world.github.github_actions("https://github.com/acme"))
    await refused(validator, elsewhere, match="audiences", audience=None)
    both = world.github.github_actions(AUDIENCE)
    both["aud"] = ["https://github.com/acme", AUDIENCE, {"not": "a string"}]
    assert (await validate(validator, world.token(GITHUB_ISSUER, both))).username == "github:acme/app"


@pytest_twisted.ensureDeferred
async def test_discovery_url_is_read_and_must_name_the_configured_issuer(world: World) -> None:
    """
    discoveryURL: the document is read there (not under issuer.url), and a
    document naming another issuer vouches for nothing: 503, never a token
    accepted with keys someone else published.
    """
    internal = "https://oidc.github-mirror.internal"
    mirror = world.serve(GITHUB_ISSUER, served_at=internal)
    validator = world.build(entry(issuer={"url": GITHUB_ISSUER, "audiences": [AUDIENCE],
                                          "discoveryURL": f"{internal}/.well-known/openid-configuration"}))
    assert (await validate(validator, mirror.sign(mirror.github_actions(AUDIENCE)))).username == "github:acme/app"
    assert mirror.requests["discovery"] == 1 and world.github.requests["discovery"] == 0

    mirror.discovery_issuer = "https://attacker.example"
    impostor = world.build(entry(issuer={"url": GITHUB_ISSUER, "audiences": [AUDIENCE],
                                         "discoveryURL": f"{internal}/.well-known/openid-configuration"}))
    with pytest.raises(DependencyUnavailable):
        await validate(impostor, mirror.sign(mirror.github_actions(AUDIENCE)))
    assert mirror.requests["jwks"] == 1, "the impostor's JWKS is never fetched"


@pytest_twisted.ensureDeferred
async def test_jwks_are_cached_and_an_unknown_kid_refetches_at_most_every_10_s(world: World) -> None:
    validator = world.build(entry())
    for _ in range(3):
        await validate(validator, world.token(GITHUB_ISSUER, world.github.github_actions(AUDIENCE)))
    assert world.github.requests["jwks"] == 1
    stranger = FakeOIDCIssuer(issuer=GITHUB_ISSUER, clock=world.clock)
    for _ in range(5):
        await refused(validator, stranger.sign(stranger.github_actions(AUDIENCE)), match="no key")
    assert world.github.requests["jwks"] == 2, "one refetch for an unknown kid, not one per token"


@pytest_twisted.ensureDeferred
async def test_its_issuer_down_makes_a_good_token_unavailable_not_rejected(world: World) -> None:
    validator = world.build(entry())
    world.github.failure_status = 503
    with pytest.raises(DependencyUnavailable):
        await validate(validator, world.token(GITHUB_ISSUER, world.github.github_actions(AUDIENCE)))
    with pytest.raises(DependencyUnavailable):
        await validator.check_ready()


def self_signed_ca() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "acme issuer CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                   .sign(key, hashes.SHA256()))
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def test_certificate_authority_is_pem_text_kept_in_the_data_directory(world: World) -> None:
    """certificateAuthority, as in Kubernetes, is the PEM itself; check-config writes nothing."""
    pem = self_signed_ca()
    options = {"jwt": [entry(issuer={"url": GITHUB_ISSUER, "audiences": [AUDIENCE], "certificateAuthority": pem})]}
    jwt_authenticator.build(options, world.context(check_only=True))
    assert not (world.tmp_path / "jwt-authenticator").exists()
    jwt_authenticator.build(options, world.context())
    (kept,) = (world.tmp_path / "jwt-authenticator").iterdir()
    assert kept.read_text() == pem and kept.stat().st_mode & 0o777 == 0o600
    garbage = entry(issuer={"url": GITHUB_ISSUER, "audiences": [AUDIENCE], "certificateAuthority": "not PEM"})
    assert problems(world, garbage) == ("jwt[0].issuer.certificateAuthority: must be PEM-encoded CA certificates",)


# -- the configuration: the Kubernetes shape, every CEL expression compiled at load ------------------------


def test_a_cel_mistake_is_a_config_error_naming_its_field_path(world: World) -> None:
    """Every expression of every field is compiled when the config loads; each mistake names where it is."""
    broken = entry(
        claimValidationRules=[{"expression": "claims.(", "message": "x"}],
        claimMappings={"username": {"expression": "secrets.password"},
                       "groups": {"expression": "user.groups"},
                       "uid": {"expression": ""},
                       "extra": [{"key": "acme.example/x", "valueExpression": "claims.a +"}]},
        userValidationRules=[{"expression": "claims.sub == ''"}],
    )
    messages = problems(world, entry(GITLAB_ISSUER), broken)
    assert [message.split(":")[0] for message in messages] == [
        "jwt[1].claimValidationRules[0].expression",
        "jwt[1].claimMappings.username.expression",
        "jwt[1].claimMappings.groups.expression",
        "jwt[1].claimMappings.extra[0].valueExpression",
        "jwt[1].userValidationRules[0].expression",
    ], messages
    assert "undeclared reference to 'secrets'" in messages[1]
    assert "undeclared reference to 'claims'" in messages[4], "user rules see user, not claims"


@pytest.mark.parametrize(("changes", "expected"), [
    ({"issuer": {"audiences": [AUDIENCE]}}, ["jwt[0].issuer.url: required"]),
    ({"issuer": {"url": "http://issuer.example", "audiences": [AUDIENCE]}},
     ["jwt[0].issuer.url: must be https (http is allowed only for loopback hosts or with --dev)"]),
    ({"issuer": {"url": "https://user:pw@issuer.example", "audiences": [AUDIENCE]}},
     ["jwt[0].issuer.url: must not contain a username or password"]),
    ({"issuer": {"url": "https://issuer.example?x=1", "audiences": [AUDIENCE]}},
     ["jwt[0].issuer.url: must not contain a query or a fragment"]),
    ({"issuer": {"url": "https://issuer.example", "discoveryURL": "https://issuer.example/", "audiences": [AUDIENCE]}},
     ["jwt[0].issuer.discoveryURL: must be different from url"]),
    ({"issuer": {"url": "https://issuer.example"}}, ["jwt[0].issuer.audiences: required"]),
    ({"issuer": {"url": "https://issuer.example", "audiences": []}},
     ["jwt[0].issuer.audiences: at least one audience is required"]),
    ({"issuer": {"url": "https://issuer.example", "audiences": ["a", "a", ""], "audienceMatchPolicy": "MatchAny"}},
     ["jwt[0].issuer.audiences[1]: 'a' is listed twice", "jwt[0].issuer.audiences[2]: must be a non-empty string"]),
    ({"issuer": {"url": "https://issuer.example", "audiences": ["a", "b"]}},
     ["jwt[0].issuer.audienceMatchPolicy: must be MatchAny for multiple audiences"]),
    ({"issuer": {"url": "https://issuer.example", "audiences": ["a"], "audienceMatchPolicy": "MatchAll"}},
     ["jwt[0].issuer.audienceMatchPolicy: must be empty or MatchAny for a single audience"]),
    ({"issuer": {"url": "https://issuer.example", "audiences": ["a"], "egressSelectorType": "cluster"}},
     ["jwt[0].issuer.egressSelectorType: unknown key"]),
    ({"claimValidationRules": [{"claim": "a", "expression": "true"}, {}, {"claim": "b", "message": "m"},
                               {"expression": "true", "requiredValue": "v"}, {"claim": "b"}]},
     ["jwt[0].claimValidationRules[0]: claim and expression can't both be set",
      "jwt[0].claimValidationRules[1]: claim or expression is required",
      "jwt[0].claimValidationRules[2].message: may not be specified when claim is set",
      "jwt[0].claimValidationRules[3].requiredValue: may not be specified when expression is set",
      "jwt[0].claimValidationRules[4].claim: 'b' has a rule already"]),
    ({"claimMappings": {}}, ["jwt[0].claimMappings.username: claim or expression is required"]),
    ({"claimMappings": {"username": {"claim": "sub"}}},
     ['jwt[0].claimMappings.username.prefix: required when claim is set (it may be "" to add none)']),
    ({"claimMappings": {"username": {"claim": "sub", "expression": "claims.sub", "prefix": ""}}},
     ["jwt[0].claimMappings.username: claim and expression can't both be set"]),
    ({"claimMappings": {"username": {"expression": "claims.sub", "prefix": "x:"},
                        "groups": {"claim": "groups"}, "uid": {"claim": "sub", "prefix": "u:"}}},
     ["jwt[0].claimMappings.username.prefix: may not be specified when expression is set",
      'jwt[0].claimMappings.groups.prefix: required when claim is set (it may be "" to add none)',
      "jwt[0].claimMappings.uid.prefix: unknown key"]),
    ({"claimMappings": {"username": {"claim": "sub", "prefix": ""}, "extra": [
        {"key": "Acme.example/x", "valueExpression": "'v'"}, {"key": "no-domain", "valueExpression": "'v'"},
        {"key": "authentication.kubernetes.io/pod-name", "valueExpression": "'forged'"},
        {"key": "k8s.io/x", "valueExpression": "'v'"},
        {"key": "acme.example/x", "valueExpression": "'v'"}, {"key": "acme.example/x", "valueExpression": "'w'"},
        {"key": "acme.example/y"}]}},
     ["jwt[0].claimMappings.extra[0].key: must be lowercase",
      "jwt[0].claimMappings.extra[1].key: must be a domain-prefixed path (example.org/foo)",
      "jwt[0].claimMappings.extra[2].key: k8s.io, kubernetes.io and their subdomains are reserved for Kubernetes use",
      "jwt[0].claimMappings.extra[3].key: k8s.io, kubernetes.io and their subdomains are reserved for Kubernetes use",
      "jwt[0].claimMappings.extra[5].key: 'acme.example/x' is mapped twice",
      "jwt[0].claimMappings.extra[6].valueExpression: required"]),
    ({"claimMappings": {"username": {"expression": "claims.email"}}},
     ["jwt[0].claimMappings.username.expression: claims.email_verified must be used in claimMappings.username."
      "expression, claimMappings.extra[*].valueExpression or claimValidationRules[*].expression when "
      "claims.email is used in claimMappings.username.expression"]),
    ({"userValidationRules": [{"message": "m"}]}, ["jwt[0].userValidationRules[0].expression: required"]),
    ({"claimMappings": {"username": {"claim": "sub", "prefix": ""}}, "typo": 1}, ["jwt[0].typo: unknown key"]),
])
def test_the_kubernetes_shape_is_read_exactly(world: World, changes: dict[str, Any], expected: list[str]) -> None:
    base = {"issuer": {"url": "https://issuer.example", "audiences": [AUDIENCE]},
            "claimMappings": {"username": {"expression": "claims.sub"}}}
    assert list(problems(world, {**base, **changes})) == expected


def test_an_email_username_expression_checking_email_verified_is_accepted(world: World) -> None:
    world.build({"issuer": {"url": "https://issuer.example", "audiences": [AUDIENCE]},
                 "claimValidationRules": [{"expression": "claims.email_verified == true"}],
                 "claimMappings": {"username": {"expression": "claims.email"}}})


def test_the_validator_table_itself(world: World) -> None:
    assert jwt_authenticator.build.__name__  # the factory exists; its own keys:
    assert problems(world) == ("jwt: must list at least one authenticator",)
    with pytest.raises(PluginConfigError) as raised:
        jwt_authenticator.build({"leeway_secs": 301, "jwks_cache_ttl_secs": 0}, world.context())
    assert raised.value.messages == ("jwks_cache_ttl_secs: must be greater than 0",
                                     "leeway_secs: must be between 0 and 300", "jwt: required")
    assert problems(world, "not a table") == ("jwt[0]: must be a table",)


def test_issuer_and_discovery_urls_are_unique_across_authenticators(world: World) -> None:
    shared = "https://discovery.acme.example/.well-known/openid-configuration"
    first = entry(issuer={"url": GITHUB_ISSUER, "audiences": [AUDIENCE], "discoveryURL": shared})
    second = entry(GITLAB_ISSUER, issuer={"url": GITHUB_ISSUER, "audiences": [AUDIENCE], "discoveryURL": shared})
    assert problems(world, first, second) == (
        "jwt[1].issuer.url: also the url of jwt[0]", "jwt[1].issuer.discoveryURL: also the discoveryURL of jwt[0]")


@pytest.mark.parametrize(("prefixes", "clash"), [
    (["github:", "gitlab:"], False),
    (["github:", "github:"], True),
    (["github:", "github:acme/"], True),
    (["", "spiffe:"], True),
    (["cluster-b:", "cluster-c:", "cluster-"], True),
])
def test_overlapping_username_claim_prefixes_are_refused(prefixes: list[str], clash: bool) -> None:
    """Two issuers whose claim-mapped usernames could coincide would be one caller: refused at load."""
    found = overlapping_prefix_problems([(f"jwt[{index}]", prefix) for index, prefix in enumerate(prefixes)])
    assert bool(found) == clash


def test_check_config_names_overlaps_and_cel_mistakes_where_they_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    ``jwtlet check-config`` builds the validator: two authenticators mapping
    ``sub`` with prefixes one of which starts the other, and a CEL mistake,
    are reported under ``validator.``; usernames made by expressions are not
    compared (the operator's responsibility).
    """
    from test_check_config import check, write

    spiffe = entry(SPIFFE_ISSUER)
    second_cluster = entry(CLUSTER_B_ISSUER, claimMappings={"username": {"claim": "sub", "prefix": "cluster-b:"}})
    github = entry(claimMappings={"username": {"expression": '"github:" + claims.repository +'}})
    path = write(tmp_path, validator={"type": "jwt-authenticator", "jwt": [spiffe, second_cluster, github,
                                                                           entry(GITLAB_ISSUER)]})
    status, lines = check(capsys, "--config", str(path))
    assert status == 1
    joined = "\n".join(lines)
    assert "validator.jwt[2].claimMappings.username.expression:" in joined
    assert "validator.jwt[1].claimMappings.username.prefix: 'cluster-b:' overlaps the prefix '' of jwt[0]" in joined
    assert "jwt[3]" not in joined


def test_every_option_is_in_the_configuration_reference(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    read = keys_read_by(lambda: world.build(*documented_validator()["jwt"]), monkeypatch)
    assert {"jwt", "url", "discoveryURL", "audienceMatchPolicy", "certificateAuthority", "requiredValue",
            "valueExpression", "leeway_secs", "jwks_cache_ttl_secs"} <= read
    text = section_text("validator")
    assert not {key for key in read if not re.search(rf"\b{key}\b", text)}


def test_http_issuers_only_to_loopback_hosts_or_in_dev(world: World) -> None:
    """security.md's outbound rule, as for kubernetes-oidc (Kubernetes itself allows https only)."""
    plain = {"issuer": {"url": "http://issuer.example", "audiences": [AUDIENCE]},
             "claimMappings": {"username": {"expression": "claims.sub"}}}
    jwt_authenticator.build({"jwt": [plain]}, world.context(dev=True))
    loopback = {**plain, "issuer": {"url": "http://127.0.0.1:9", "discoveryURL": "http://[::1]:9/discovery",
                                    "audiences": [AUDIENCE]}}
    jwt_authenticator.build({"jwt": [loopback]}, world.context())
    discovery = {**plain, "issuer": {"url": "https://issuer.example", "discoveryURL": "http://issuer.example/d",
                                     "audiences": [AUDIENCE]}}
    assert problems(world, discovery) == (
        "jwt[0].issuer.discoveryURL: must be https (http is allowed only for loopback hosts or with --dev)",)


@pytest_twisted.ensureDeferred
async def test_exp_nbf_and_iat_are_checked_on_the_injected_clock_with_leeway(world: World) -> None:
    """A token a little early or late passes within leeway_secs; past it, it is refused."""
    validator = world.build(entry(), leeway_secs=30)
    now = int(world.clock.seconds())
    for changes, accepted in (({"nbf": now + 20}, True), ({"nbf": now + 40}, False),
                              ({"exp": now - 20}, True), ({"exp": now - 40}, False),
                              ({"iat": now + 20, "nbf": now}, True), ({"iat": now + 40, "nbf": now}, False)):
        token = world.token(GITHUB_ISSUER, {**world.github.github_actions(AUDIENCE), **changes})
        if accepted:
            assert (await validate(validator, token)).username == "github:acme/app", changes
        else:
            await refused(validator, token)


def test_it_tells_the_ext_authz_front_whom_it_trusts(world: World) -> None:
    """security.md's front rules see every issuer; an expression-made username has no prefix to compare."""
    validator = world.build(*documented_validator()["jwt"])
    assert ITrustedIssuers.providedBy(validator) and validator.needs_explicit_audience is False
    trusted = {entry.issuer: entry for entry in validator.trusted_issuers()}
    assert set(trusted) == {GITHUB_ISSUER, GITLAB_ISSUER, CLUSTER_B_ISSUER, SPIFFE_ISSUER}
    for entry in trusted.values():
        assert entry.key_path.startswith("jwt[") and entry.key_path.endswith(".claimMappings.username.prefix")
    spiffe = trusted[SPIFFE_ISSUER]
    assert spiffe.username_prefix == ""  # username: {claim: sub, prefix: ""}
    assert trusted[GITHUB_ISSUER].username_prefix is None  # username: {expression: ...}
    assert prefixes_across_validators(
        [TrustedIssuer("https://kubernetes.default.svc", "", "issuers[0].username_prefix")],
        [trusted[GITHUB_ISSUER]]) == []
