"""
The ``memory`` store: everything in dictionaries, gone when the process
ends.  For tests and throwaway instances; the embedded default is ``sqlite``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.plugin import IPlugin
from zope.interface import implementer

from jwtlet.interfaces import (
    Conflict,
    IChangeNotifier,
    IMappingStore,
    IMappingStoreFactory,
    IReplayRecord,
    NotFound,
    PluginConfigError,
    PluginContext,
)
from jwtlet.model import ApiKeyRecord, Integration, Resolution, ResourceMapping, ScopeMapping


@implementer(IMappingStore, IReplayRecord, IChangeNotifier)
@attrs.define
class MemoryStore:
    clock: Any
    mappings: dict[tuple[str, str], ResourceMapping] = attrs.field(factory=dict)
    scopes: dict[str, ScopeMapping] = attrs.field(factory=dict)
    integrations: dict[str, Integration] = attrs.field(factory=dict)
    keys: dict[tuple[str, str], ApiKeyRecord] = attrs.field(factory=dict)
    token_ids: dict[tuple[str, str], float] = attrs.field(factory=dict)
    listeners: list[Callable[[], None]] = attrs.field(factory=list)

    def _changed(self) -> None:
        for listener in list(self.listeners):
            listener()

    # -- mappings -----------------------------------------------------------

    def add_mapping(self, mapping: ResourceMapping) -> Deferred[None]:
        if mapping.key in self.mappings:
            return fail(Conflict(mapping.key))
        self.mappings[mapping.key] = mapping
        self._changed()
        return succeed(None)

    def get_mapping(self, client_identifier: str, participant_context: str) -> Deferred[ResourceMapping]:
        found = self.mappings.get((client_identifier, participant_context))
        return succeed(found) if found is not None else fail(NotFound(client_identifier))

    def list_mappings(self, client_identifier: Optional[str] = None) -> Deferred[list[ResourceMapping]]:
        return succeed(
            [m for key, m in sorted(self.mappings.items())
             if client_identifier is None or key[0] == client_identifier]
        )

    def update_mapping(self, mapping: ResourceMapping) -> Deferred[None]:
        if mapping.key not in self.mappings:
            return fail(NotFound(mapping.key))
        self.mappings[mapping.key] = mapping
        self._changed()
        return succeed(None)

    def delete_mapping(self, client_identifier: str, participant_context: str) -> Deferred[bool]:
        existed = self.mappings.pop((client_identifier, participant_context), None) is not None
        self._changed()
        return succeed(existed)

    def delete_client_mappings(self, client_identifier: str) -> Deferred[int]:
        doomed = [key for key in self.mappings if key[0] == client_identifier]
        for key in doomed:
            del self.mappings[key]
        self._changed()
        return succeed(len(doomed))

    # -- scopes ---------------------------------------------------------------

    def add_scope(self, scope: ScopeMapping) -> Deferred[None]:
        if scope.scope in self.scopes:
            return fail(Conflict(scope.scope))
        self.scopes[scope.scope] = scope
        self._changed()
        return succeed(None)

    def get_scope(self, scope: str) -> Deferred[ScopeMapping]:
        found = self.scopes.get(scope)
        return succeed(found) if found is not None else fail(NotFound(scope))

    def list_scopes(self) -> Deferred[list[ScopeMapping]]:
        return succeed([self.scopes[name] for name in sorted(self.scopes)])

    def update_scope(self, scope: ScopeMapping) -> Deferred[None]:
        if scope.scope not in self.scopes:
            return fail(NotFound(scope.scope))
        self.scopes[scope.scope] = scope
        self._changed()
        return succeed(None)

    def delete_scope(self, scope: str) -> Deferred[bool]:
        existed = self.scopes.pop(scope, None) is not None
        self._changed()
        return succeed(existed)

    def resolve(
        self, client_identifier: str, participant_context: str, scopes: Iterable[str]
    ) -> Deferred[Resolution]:
        mapping = self.mappings.get((client_identifier, participant_context))
        if mapping is None:
            return fail(NotFound(client_identifier))
        found = {name: self.scopes[name] for name in scopes if name in self.scopes}
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
        return succeed(
            [
                attrs.evolve(
                    integration,
                    keys=tuple(record for key, record in sorted(self.keys.items()) if key[0] == name),
                )
                for name, integration in sorted(self.integrations.items())
            ]
        )

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
        return succeed(found) if found is not None else fail(NotFound(key_id))

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

    def subscribe(self, callback: Callable[[], None]) -> None:
        self.listeners.append(callback)


@implementer(IPlugin, IMappingStoreFactory)
@attrs.frozen
class MemoryStoreFactory:
    name: str = "memory"
    description: str = "keeps everything in memory (tests; lost when the process ends)"

    def build(self, options: Mapping[str, Any], context: PluginContext) -> MemoryStore:
        if options:
            raise PluginConfigError(*(f"{key}: unknown key" for key in sorted(options)))
        return MemoryStore(clock=context.clock)


memory = MemoryStoreFactory()
