"""
The JSON shapes of the management API: checking request bodies into model
objects and rendering model objects, with the identifier rules of
``management-api.md``.  Pure functions; errors are ``ValueError`` messages.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

from jwtlet import claims, strictjson
from jwtlet.model import ApiKeyRecord, Integration, JSONObject, JSONValue, ResourceMapping, ScopeMapping

MAX_IDENTIFIER = 1024


def parse_json(body: bytes) -> JSONValue:
    try:
        return strictjson.loads(body)
    except ValueError:
        raise ValueError("malformed JSON") from None


def _object(value: JSONValue) -> Mapping[str, JSONValue]:
    if not isinstance(value, dict):
        raise ValueError("the body must be a JSON object")
    return value


def check_identifier(value: JSONValue, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string")
    if not value:
        raise ValueError(f"{field} must not be empty")
    if len(value) > MAX_IDENTIFIER:
        raise ValueError(f"{field} must be at most {MAX_IDENTIFIER} characters")
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in value):
        raise ValueError(f"{field} must not contain control characters")
    return value


def check_scope_name(value: JSONValue, field: str = "scope") -> str:
    name = check_identifier(value, field)
    if any(ch.isspace() for ch in name):
        raise ValueError(f"{field} must not contain whitespace")
    return name


def _list(
    body: Mapping[str, JSONValue], field: str, check: Callable[[JSONValue, str], str], required: bool
) -> list[str]:
    value = body.get(field)
    if value is None:
        if required:
            raise ValueError(f"{field} is required")
        return []
    if not isinstance(value, list):
        raise ValueError(f"{field} must be an array of strings")
    return [check(item, f"{field} entries") for item in value]


def check_claim_names(names: Mapping[str, JSONValue], reserved: frozenset[str]) -> None:
    for name in names:
        if name in reserved:
            raise ValueError(f"claim '{name}' is reserved")
        check_identifier(name, "claim names")


def _claim_expressions(body: Mapping[str, JSONValue], reserved: frozenset[str]) -> dict[str, str]:
    """``claimExpressions`` (claims.md): reserved names refused, every expression compiled."""
    field = claims.MAPPING_EXPRESSIONS
    given = body.get(field)
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise ValueError(f"{field} must be a JSON object")
    check_claim_names(given, reserved)
    return {name: claims.check_expression(f"{field}.{name}", source) for name, source in given.items()}


def _condition(body: Mapping[str, JSONValue]) -> Optional[str]:
    given = body.get("condition")
    return None if given is None else claims.check_condition(given)


def mapping_from_json(value: JSONValue, reserved: frozenset[str]) -> ResourceMapping:
    body = _object(value)
    return ResourceMapping(
        client_identifier=check_identifier(body.get("clientIdentifier"), "clientIdentifier"),
        participant_context=check_identifier(body.get("participantContext"), "participantContext"),
        scopes=_list(body, "scopes", check_scope_name, required=True),
        audiences=_list(body, "audiences", check_identifier, required=False),
        condition=_condition(body),
        claim_expressions=_claim_expressions(body, reserved),
    )


def _with_expressions(shown: JSONObject, expressions: Mapping[str, str]) -> JSONObject:
    # Absent when empty: a mapping or scope without expressions looks exactly
    # as it did before they existed (the Rust jwtlet's shape).
    if expressions:
        shown[claims.MAPPING_EXPRESSIONS] = dict(sorted(expressions.items()))
    return shown


def mapping_to_json(mapping: ResourceMapping) -> JSONObject:
    shown: JSONObject = {
        "clientIdentifier": mapping.client_identifier,
        "participantContext": mapping.participant_context,
        "scopes": sorted(mapping.scopes),
        "audiences": sorted(mapping.audiences),
    }
    if mapping.condition is not None:
        shown["condition"] = mapping.condition
    return _with_expressions(shown, mapping.claim_expressions)


def scope_from_json(value: JSONValue, reserved: frozenset[str]) -> ScopeMapping:
    body = _object(value)
    scope = check_scope_name(body.get("scope"))
    static = body.get("claims", {})
    if not isinstance(static, dict):
        raise ValueError("claims must be a JSON object")
    check_claim_names(static, reserved)
    return ScopeMapping(scope=scope, claims=static, claim_expressions=_claim_expressions(body, reserved))


def scope_to_json(scope: ScopeMapping) -> JSONObject:
    return _with_expressions({"scope": scope.scope, "claims": dict(scope.claims)}, scope.claim_expressions)


def key_to_json(record: ApiKeyRecord) -> JSONObject:
    """A key as listed: never its secret or digest."""
    return {
        "keyId": record.key_id,
        "tier": record.tier,
        "description": record.description,
        "status": record.status,
    }


def integration_to_json(integration: Integration) -> JSONObject:
    shown: JSONObject = {
        "integrationId": integration.integration_id,
        "description": integration.description,
        "keys": [key_to_json(key) for key in integration.keys],
    }
    # Absent: bound to no profile in particular (stored before integrations were bound, or no
    # profiles configured), so its keys get every profile's tokens.
    if integration.profiles is not None:
        shown["profiles"] = list(integration.profiles)
    return shown
