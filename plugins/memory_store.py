"""
The ``memory`` store: everything in dictionaries, gone when the process
ends.  For tests and throwaway instances; the embedded default is ``sqlite``.
The rules every store follows (order of listings, what a resolve asks for,
integrations with their keys) are :mod:`jwtlet.plugins.store_rules`'s.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.plugin import IPlugin
from zope.interface import implementer

from jwtlet.config.reader import SectionReader
from jwtlet.interfaces import (
    Conflict,
    IMappingStore,
    IMappingStoreFactory,
    IReplayRecord,
    NotFound,
    PluginConfigError,
    PluginContext,
)
from jwtlet.model import ApiKeyRecord, Integration, Resolution, ResourceMapping, ScopeMapping
from jwtlet.plugins.store_rules import sorted_mappings, sorted_scopes, wanted_scopes, with_keys


@implementer(IMappingStore, IReplayRecord)
@attrs.define
class MemoryStore:
    clock: IReactorTime
    mappings: dict[tuple[str, str], ResourceMapping] = attrs.field(factory=dict)
    scopes: dict[str, ScopeMapping] = attrs.field(factory=dict)
    integrations: dict[str, Integration] = attrs.field(factory=dict)
    keys: dict[tuple[str, str], ApiKeyRecord] = attrs.field(factory=dict)
    token_ids: dict[tuple[str, str], float] = attrs.field(factory=dict)

    # -- mappings -----------------------------------------------------------

    def add_mapping(self, mapping: ResourceMapping) -> Deferred[None]:
        if mapping.key in self.mappings:
            return fail(Conflict(mapping.key))
        self.mappings[mapping.key] = mapping
        return succeed(None)

    def get_mapping(self, client_identifier: str, participant_context: str) -> Deferred[ResourceMapping]:
        found = self.mappings.get((client_identifier, participant_context))
        return succeed(found) if found is not None else fail(NotFound(client_identifier))

    def list_mappings(self, client_identifier: Optional[str] = None) -> Deferred[list[ResourceMapping]]:
        return succeed(sorted_mappings(
            mapping for mapping in self.mappings.values()
            if client_identifier is None or mapping.client_identifier == client_identifier
        ))

    def update_mapping(self, mapping: ResourceMapping) -> Deferred[None]:
        if mapping.key not in self.mappings:
            return fail(NotFound(mapping.key))
        self.mappings[mapping.key] = mapping
        return succeed(None)

    def delete_mapping(self, client_identifier: str, participant_context: str) -> Deferred[bool]:
        existed = self.mappings.pop((client_identifier, participant_context), None) is not None
        return succeed(existed)

    def delete_client_mappings(self, client_identifier: str) -> Deferred[int]:
        doomed = [key for key in self.mappings if key[0] == client_identifier]
        for key in doomed:
            del self.mappings[key]
        return succeed(len(doomed))

    # -- scopes ---------------------------------------------------------------

    def add_scope(self, scope: ScopeMapping) -> Deferred[None]:
        if scope.scope in self.scopes:
            return fail(Conflict(scope.scope))
        self.scopes[scope.scope] = scope
        return succeed(None)

    def get_scope(self, scope: str) -> Deferred[ScopeMapping]:
        found = self.scopes.get(scope)
        return succeed(found) if found is not None else fail(NotFound(scope))

    def list_scopes(self) -> Deferred[list[ScopeMapping]]:
        return succeed(sorted_scopes(self.scopes.values()))

    def update_scope(self, scope: ScopeMapping) -> Deferred[None]:
        if scope.scope not in self.scopes:
            return fail(NotFound(scope.scope))
        self.scopes[scope.scope] = scope
        return succeed(None)

    def delete_scope(self, scope: str) -> Deferred[bool]:
        existed = self.scopes.pop(scope, None) is not None
        return succeed(existed)

    def resolve(
        self, client_identifier: str, participant_context: str, scopes: Iterable[str]
    ) -> Deferred[Resolution]:
        mapping = self.mappings.get((client_identifier, participant_context))
        if mapping is None:
            return fail(NotFound(client_identifier))
        found = {name: self.scopes[name] for name in wanted_scopes(scopes) if name in self.scopes}
        return succeed(Resolution(mapping=mapping, scopes=found))

    # -- integrations and keys --------------------------------------------

    def add_integration(self, integration: Integration) -> Deferred[None]:
        if integration.integration_id in self.integrations:
            return fail(Conflict(integration.integration_id))
        self.integrations[integration.integration_id] = attrs.evolve(
            integration, created_at=self.clock.seconds(), keys=()
        )
        return succeed(None)

    def list_integrations(self) -> Deferred[list[Integration]]:
        return succeed(with_keys(self.integrations.values(), self.keys.values()))

    def add_api_key(self, record: ApiKeyRecord) -> Deferred[None]:
        if record.integration_id not in self.integrations:
            return fail(NotFound(record.integration_id))
        key = (record.integration_id, record.key_id)
        if key in self.keys:
            return fail(Conflict(key))
        self.keys[key] = attrs.evolve(record, created_at=self.clock.seconds())
        return succeed(None)

    def get_api_key(self, integration_id: str, key_id: str) -> Deferred[ApiKeyRecord]:
        found = self.keys.get((integration_id, key_id))
        if found is None:
            return fail(NotFound(key_id))
        return succeed(attrs.evolve(found, profiles=self.integrations[integration_id].profiles))

    def revoke_api_key(self, integration_id: str, key_id: str) -> Deferred[bool]:
        key = (integration_id, key_id)
        if key not in self.keys:
            return succeed(False)
        self.keys[key] = attrs.evolve(self.keys[key], status="revoked")
        return succeed(True)

    # -- optional interfaces ----------------------------------------------

    def record_token_id(self, issuer: str, token_id: str, expires_at: float) -> Deferred[bool]:
        now = self.clock.seconds()
        for key in [k for k, until in self.token_ids.items() if until <= now]:
            del self.token_ids[key]
        key = (issuer, token_id)
        if key in self.token_ids:
            return succeed(False)
        self.token_ids[key] = expires_at
        return succeed(True)


@implementer(IPlugin, IMappingStoreFactory)
@attrs.frozen
class MemoryStoreFactory:
    name: str = "memory"
    description: str = "keeps everything in memory (tests; lost when the process ends)"

    def build(self, options: Mapping[str, Any], context: PluginContext) -> MemoryStore:
        problems: list[str] = []
        SectionReader(options, "", problems).finish()  # it takes no options
        if problems:
            raise PluginConfigError(*problems)
        return MemoryStore(clock=context.clock)


memory = MemoryStoreFactory()
