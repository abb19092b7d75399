"""
The exchange policy as pure functions: what a token request means, whether the
mapping allows it, which claims and audience the issued token gets.  No I/O
here; every rule is tested without a reactor.
"""

from __future__ import annotations

import functools
from typing import Iterable, Mapping, Optional, Sequence, Union

import attrs

from jwtlet import claims as caller_claims
from jwtlet.model import Identity, JSONObject, JSONValue, Resolution, ResourceMapping

GRANT_TYPE_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
TOKEN_TYPE_ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
TOKEN_TYPE_API_KEY = "urn:jwtlet:params:oauth:token-type:api-key"
SUBJECT_TOKEN_TYPES = frozenset({TOKEN_TYPE_JWT, TOKEN_TYPE_ID_TOKEN, TOKEN_TYPE_ACCESS_TOKEN})
REQUESTED_TOKEN_TYPES = frozenset({TOKEN_TYPE_JWT, TOKEN_TYPE_ACCESS_TOKEN})

RESERVED_CLAIMS = frozenset({"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "act"})
#: What an API-key token says of its key (the M-Lab contract): a profile's static claims never replace them.
API_KEY_CLAIMS = frozenset({"int_id", "key_id", "tier"})

Audience = Union[str, list[str]]


# -- the errors of the decision: what went wrong, never how a port says it --------


@attrs.define(auto_exc=True)
class Refusal(Exception):
    """
    The request is refused: ``code`` is the RFC 6749 ``error``; ``log_fields``
    say more to the log, never to the client.
    """

    code: str
    description: str = ""
    log_fields: Mapping[str, JSONValue] = attrs.field(factory=dict)


@attrs.define(auto_exc=True)
class RateLimited(Exception):
    """Over a rate limit: the client may try again after ``retry_after`` seconds."""

    retry_after: int


class ServerError(Exception):
    """
    A store or signer failed other than by being unavailable.  What failed is
    logged where it happened; the client learns nothing more.
    """


def invalid_request(description: str) -> Refusal:
    return Refusal("invalid_request", description)


def invalid_grant(description: str = "subject token rejected") -> Refusal:
    return Refusal("invalid_grant", description)


def invalid_target(description: str) -> Refusal:
    return Refusal("invalid_target", description)


def unauthorized_client(description: str) -> Refusal:
    return Refusal("unauthorized_client", description)


def invalid_scope(description: str) -> Refusal:
    return Refusal("invalid_scope", description)


# -- the request ----------------------------------------------------------------


@attrs.frozen
class ExchangeRequest:
    """
    A well-formed exchange request: RFC 8693 as the form of ``POST /token``
    said it, or an API key for a profile (``resource``).
    """

    subject_token: str = attrs.field(repr=False)
    subject_token_type: Optional[str]
    resource: str
    scopes: tuple[str, ...] = ()
    audiences: tuple[str, ...] = ()
    actor_token: Optional[str] = attrs.field(default=None, repr=False)
    actor_token_type: Optional[str] = None

    @property
    def is_api_key(self) -> bool:
        return self.subject_token_type == TOKEN_TYPE_API_KEY


def parse_scope(value: Optional[str]) -> tuple[str, ...]:
    """Space-separated scopes, duplicates dropped, sorted."""
    if not value:
        return ()
    return tuple(sorted(set(value.split())))


def parse_token_request(
    fields: Mapping[str, Sequence[str]], require_subject_token_type: bool = False
) -> ExchangeRequest:
    """
    Check the form of ``POST /token`` (``fields`` maps each name to every
    value sent) and return what it asks for, or raise :class:`Refusal`.
    """
    for name, values in fields.items():
        if name != "audience" and len(values) > 1:
            if name == "resource":
                raise invalid_target("only one resource may be requested")
            raise invalid_request(f"parameter '{name}' sent more than once")

    def single(name: str) -> Optional[str]:
        values = fields.get(name)
        return values[0] if values else None

    def required(name: str) -> str:
        value = single(name)
        if not value:
            raise invalid_request(f"missing parameter '{name}'")
        return value

    grant_type = required("grant_type")
    if grant_type != GRANT_TYPE_TOKEN_EXCHANGE:
        raise Refusal("unsupported_grant_type", "only token exchange is supported")
    subject_token = required("subject_token")
    subject_token_type = single("subject_token_type") or None
    if subject_token_type is None:
        if require_subject_token_type:
            raise invalid_request("missing parameter 'subject_token_type'")
    elif subject_token_type not in SUBJECT_TOKEN_TYPES and subject_token_type != TOKEN_TYPE_API_KEY:
        raise invalid_request("unsupported subject_token_type")
    resource = required("resource")
    requested_type = single("requested_token_type")
    if requested_type is not None and requested_type not in REQUESTED_TOKEN_TYPES:
        raise invalid_request("unsupported requested_token_type")
    audiences = tuple(dict.fromkeys(a for a in fields.get("audience", ()) if a))
    actor_token = single("actor_token") or None
    actor_token_type = single("actor_token_type") or None
    if actor_token is not None and actor_token_type is None:
        raise invalid_request("missing parameter 'actor_token_type'")
    if actor_token is None and actor_token_type is not None:
        raise invalid_request("actor_token_type sent without actor_token")
    if actor_token_type is not None and actor_token_type not in SUBJECT_TOKEN_TYPES:
        raise invalid_request("unsupported actor_token_type")
    return ExchangeRequest(
        subject_token=subject_token,
        subject_token_type=subject_token_type,
        resource=resource,
        scopes=parse_scope(single("scope")),
        audiences=audiences,
        actor_token=actor_token,
        actor_token_type=actor_token_type,
    )


# -- the decision ---------------------------------------------------------------


def check_scopes_allowed(mapping: ResourceMapping, requested: Iterable[str]) -> None:
    """Step 2: every requested scope must be in the mapping's scopes."""
    if not set(requested) <= set(mapping.scopes):
        raise unauthorized_client("scope not allowed for this client and resource")


@functools.lru_cache(maxsize=8)
def reserved_claims(participant_context_claim: str) -> frozenset[str]:
    return RESERVED_CLAIMS | {participant_context_claim}


def merge_claims(layers: Iterable[caller_claims.Layer], reserved: frozenset[str]) -> JSONObject:
    """
    Step 3: the claims of every layer in one object.  Two layers giving one
    claim different values is ``invalid_scope``; reserved names are never
    taken, whatever the store holds.
    """
    try:
        return caller_claims.merge(layers, reserved)
    except caller_claims.ClaimConflict as conflict:
        raise invalid_scope(str(conflict)) from None


def rule_refusal(mapping: ResourceMapping, failed: caller_claims.RuleFailed) -> Refusal:
    """
    A mapping's condition or claim expression refused the caller: 403, and
    the log names the mapping, the rule and how it refused (never a value of
    the caller's token; a compile error quotes only the stored expression).
    """
    fields: JSONObject = {"mapping": list(mapping.key), "rule": failed.rule, "rule_outcome": failed.outcome}
    if failed.reason:
        fields["rule_error"] = failed.reason
    return Refusal("unauthorized_client", "the mapping does not apply to this caller", fields)


def choose_audience(
    requested: Sequence[str], allowed: Sequence[str], default: str
) -> Audience:
    """Step 4: the ``aud`` of the issued token, or ``unauthorized_client``."""
    if not requested:
        if not allowed or default in allowed:
            return default
        raise unauthorized_client("audience not allowed")
    for audience in requested:
        permitted = audience in allowed if allowed else audience == default
        if not permitted:
            raise unauthorized_client("audience not allowed")
    return requested[0] if len(requested) == 1 else list(requested)


def actor_claim(subject: Identity, actor: Optional[Identity] = None) -> JSONObject:
    """
    ``act``: the service account that asked; with an actor token, the actor is
    the current one and the service account is nested (RFC 8693 §4.1).
    """
    service_account: JSONObject = {"sub": subject.username, "iss": subject.issuer}
    if subject.uid:
        service_account["k8s_uid"] = subject.uid
    if actor is None:
        return service_account
    current: JSONObject = {"sub": actor.username, "iss": actor.issuer}
    if actor.uid:
        current["k8s_uid"] = actor.uid
    current["act"] = service_account
    return current


@attrs.frozen
class IssueParameters:
    """The fixed parts of every token issued for a resource mapping."""

    issuer: str
    participant_context_claim: str
    ttl_secs: int


@attrs.frozen
class Terms:
    """
    What the checks granted, whatever the credential: the token's audience,
    lifetime and the claims it carries beyond the registered ones.
    """

    audience: Audience
    ttl_secs: int
    #: Granted claims (a scope mapping's, an API key's ``int_id``...), never a
    #: reserved name: :func:`token_claims` writes those after them.
    claims: Mapping[str, JSONValue]
    participant_context: Optional[str] = None
    act: Optional[JSONObject] = None
    scopes: tuple[str, ...] = ()
    #: the token's ``iss`` when not the daemon's (an API-key profile's own ``issuer``)
    issuer: Optional[str] = None


def mapping_terms(
    parameters: IssueParameters,
    resolution: Resolution,
    request: ExchangeRequest,
    default_audience: str,
    subject: Identity,
    actor: Optional[Identity] = None,
    now: Optional[float] = None,
) -> Terms:
    """
    Steps 2 to 4 of an RFC 8693 exchange, over the mapping the store
    resolved.  The mapping's ``condition`` belongs to step 2; its claims are
    the scopes' static claims, then the scopes' expressions, then the
    mapping's (claims.md).  ``now`` is the exchange's clock, for expressions.
    """
    mapping = resolution.mapping
    check_scopes_allowed(mapping, request.scopes)
    reserved = reserved_claims(parameters.participant_context_claim)
    # The audience is decided first but refused after the condition (the
    # order clients see): a refused exchange keeps nothing of its caller, so
    # audiences a client makes up cannot fill the prepared callers.
    try:
        audience = choose_audience(request.audiences, mapping.audiences, default_audience)
        refused: Optional[Refusal] = None
    except Refusal as refusal:
        refused = refusal
    caller = caller_claims.Caller(subject, request.resource, request.scopes, request.audiences, now,
                                  keep=refused is None)
    try:
        caller_claims.require_condition(mapping, caller)
        if refused is not None:
            raise refused
        layers = caller_claims.static_layers(request.scopes, resolution.scopes) + caller_claims.expression_layers(
            request.scopes, resolution.scopes, mapping, caller, reserved)
    except caller_claims.RuleFailed as failed:
        raise rule_refusal(mapping, failed) from None
    return Terms(
        audience=audience,
        ttl_secs=parameters.ttl_secs,
        claims=merge_claims(layers, reserved),
        participant_context=request.resource,
        act=actor_claim(subject, actor),
        scopes=request.scopes,
    )


def api_key_terms(
    audience: str, ttl_secs: int, key: Identity, issuer: Optional[str] = None,
    static_claims: Optional[Mapping[str, JSONValue]] = None,
) -> Terms:
    """
    An API-key profile's token (the M-Lab contract): the profile's audience,
    lifetime, ``iss`` and static claims (``org``), and which key of which
    integration, with its tier, written over them.
    """
    claims = {name: value for name, value in (static_claims or {}).items()
              if name not in RESERVED_CLAIMS | API_KEY_CLAIMS}
    claims.update({"int_id": key.extra["int_id"], "key_id": key.extra["key_id"], "tier": int(key.extra["tier"])})
    return Terms(audience=audience, ttl_secs=ttl_secs, claims=claims, issuer=issuer)


def token_claims(
    issuer: str, participant_context_claim: str, terms: Terms, now: int, token_id: str
) -> JSONObject:
    """
    The claims of an issued token.  The registered claims are written last so
    that nothing granted can replace them.
    """
    claims = dict(terms.claims)
    claims["iss"] = terms.issuer or issuer
    if terms.participant_context is not None:
        claims["sub"] = terms.participant_context
        claims[participant_context_claim] = terms.participant_context
    claims.update({"aud": terms.audience, "iat": now, "nbf": now, "exp": now + terms.ttl_secs, "jti": token_id})
    if terms.act is not None:
        claims["act"] = terms.act
    return claims


def granted_scope(scopes: tuple[str, ...]) -> Optional[str]:
    """
    The ``scope`` member of the response, or ``None`` when empty; ``scopes``
    come from :func:`parse_scope`, sorted and without duplicates already.
    """
    return " ".join(scopes) or None
