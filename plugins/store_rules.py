"""
The rules every built-in store follows, whatever keeps its data: the order
of listings, the one form of the scopes a resolve asks for, integrations
listed with their keys.  Pure.  (This module declares no plugin factory:
discovery imports it and finds none.)
"""

from __future__ import annotations

from typing import Iterable

import attrs

from jwtlet.model import ApiKeyRecord, Integration, ResourceMapping, ScopeMapping


def wanted_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """The scopes a resolve asks for, in the one form a cache key may take."""
    return tuple(sorted(set(scopes)))


def sorted_mappings(mappings: Iterable[ResourceMapping]) -> list[ResourceMapping]:
    """Listings are in code point order of the key, whatever a database's collation would say."""
    return sorted(mappings, key=lambda mapping: mapping.key)


def sorted_scopes(scopes: Iterable[ScopeMapping]) -> list[ScopeMapping]:
    return sorted(scopes, key=lambda scope: scope.scope)


def with_keys(integrations: Iterable[Integration], keys: Iterable[ApiKeyRecord]) -> list[Integration]:
    """Each integration with its keys, both sorted by id."""
    grouped: dict[str, list[ApiKeyRecord]] = {}
    for record in sorted(keys, key=lambda record: (record.integration_id, record.key_id)):
        grouped.setdefault(record.integration_id, []).append(record)
    return [
        attrs.evolve(integration, keys=tuple(grouped.get(integration.integration_id, ())))
        for integration in sorted(integrations, key=lambda integration: integration.integration_id)
    ]
