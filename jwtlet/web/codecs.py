"""
The JSON shapes of the management API: checking request bodies into model
objects and rendering model objects, with the identifier rules of
``management-api.md``.  Pure functions; errors are ``ValueError`` messages.
"""

from __future__ import annotations

import json
from typing import Callable, Mapping

from jwtlet.model import ApiKeyRecord, Integration, JSONObject, JSONValue, ResourceMapping, ScopeMapping

MAX_IDENTIFIER = 1024


def parse_json(body: bytes) -> JSONValue:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
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


def mapping_from_json(value: JSONValue) -> ResourceMapping:
    body = _object(value)
    return ResourceMapping(
        client_identifier=check_identifier(body.get("clientIdentifier"), "clientIdentifier"),
        participant_context=check_identifier(body.get("participantContext"), "participantContext"),
        scopes=_list(body, "scopes", check_scope_name, required=True),
        audiences=_list(body, "audiences", check_identifier, required=False),
    )


def mapping_to_json(mapping: ResourceMapping) -> JSONObject:
    return {
        "clientIdentifier": mapping.client_identifier,
        "participantContext": mapping.participant_context,
        "scopes": sorted(mapping.scopes),
        "audiences": sorted(mapping.audiences),
    }


def scope_from_json(value: JSONValue, reserved: frozenset[str]) -> ScopeMapping:
    body = _object(value)
    scope = check_scope_name(body.get("scope"))
    claims = body.get("claims", {})
    if not isinstance(claims, dict):
        raise ValueError("claims must be a JSON object")
    for name in claims:
        if name in reserved:
            raise ValueError(f"claim '{name}' is reserved")
        check_identifier(name, "claim names")
    return ScopeMapping(scope=scope, claims=claims)


def scope_to_json(scope: ScopeMapping) -> JSONObject:
    return {"scope": scope.scope, "claims": dict(scope.claims)}


def key_to_json(record: ApiKeyRecord) -> JSONObject:
    """A key as listed: never its secret or digest."""
    return {
        "keyId": record.key_id,
        "tier": record.tier,
        "description": record.description,
        "status": record.status,
    }


def integration_to_json(integration: Integration) -> JSONObject:
    return {
        "integrationId": integration.integration_id,
        "description": integration.description,
        "keys": [key_to_json(key) for key in integration.keys],
    }
