"""
The conformance suite every IMappingStore must pass, unchanged (plugin
authors: subclass it for yours).  A test module subclasses
:class:`StoreConformance` and provides a ``store`` pytest fixture that yields
a started, empty store and a ``clock`` whose ``seconds()`` the store uses.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from jwtlet.interfaces import Conflict, IMappingStore, IReplayRecord, NotFound
from jwtlet.model import ApiKeyRecord, Integration, ResourceMapping, ScopeMapping
from jwtlet.providers import as_deferred

CLIENT = "system:serviceaccount:ns:client"
DIGEST = bytes(range(32))


async def _raises(kind: type[Exception], result: Any) -> None:
    with pytest.raises(kind):
        await as_deferred(result)


class StoreConformance:
    """Behaviour every store shares; subclasses supply the ``store`` fixture."""

    def test_provides_the_interface(self, store: Any) -> None:
        verifyObject(IMappingStore, store)

    @pytest_twisted.ensureDeferred
    async def test_mapping_create_read_update_delete(self, store: Any) -> None:
        mapping = ResourceMapping(CLIENT, "ctx", scopes=("write", "read", "read"), audiences=("b", "a"))
        await as_deferred(store.add_mapping(mapping))
        await _raises(Conflict, store.add_mapping(mapping))
        found = await as_deferred(store.get_mapping(CLIENT, "ctx"))
        assert found == mapping
        assert found.scopes == ("read", "write") and found.audiences == ("a", "b")
        await as_deferred(store.update_mapping(ResourceMapping(CLIENT, "ctx", scopes=("read",))))
        assert (await as_deferred(store.get_mapping(CLIENT, "ctx"))).scopes == ("read",)
        await _raises(NotFound, store.update_mapping(ResourceMapping(CLIENT, "other")))
        await _raises(NotFound, store.get_mapping(CLIENT, "other"))
        assert await as_deferred(store.delete_mapping(CLIENT, "ctx")) is True
        assert await as_deferred(store.delete_mapping(CLIENT, "ctx")) is False
        await _raises(NotFound, store.get_mapping(CLIENT, "ctx"))

    @pytest_twisted.ensureDeferred
    async def test_listing_filters_and_order(self, store: Any) -> None:
        for client, context in (("b", "2"), ("a", "9"), ("b", "1"), ("c", "1")):
            await as_deferred(store.add_mapping(ResourceMapping(client, context)))
        everything = await as_deferred(store.list_mappings())
        assert [m.key for m in everything] == [("a", "9"), ("b", "1"), ("b", "2"), ("c", "1")]
        only_b = await as_deferred(store.list_mappings("b"))
        assert [m.key for m in only_b] == [("b", "1"), ("b", "2")]
        assert await as_deferred(store.list_mappings("nobody")) == []
        assert await as_deferred(store.delete_client_mappings("b")) == 2
        assert await as_deferred(store.delete_client_mappings("b")) == 0
        assert [m.key for m in await as_deferred(store.list_mappings())] == [("a", "9"), ("c", "1")]

    @pytest_twisted.ensureDeferred
    async def test_identifiers_keep_every_character(self, store: Any) -> None:
        prefix = "system:serviceaccount:ns:ünïcødé/😀"
        client = prefix + "x" * (1024 - len(prefix))
        context = "ctx with spaces, 'quotes' and \"more\"; DROP TABLE resource_mappings;--"
        await as_deferred(store.add_mapping(ResourceMapping(client, context, scopes=("s",))))
        assert len(client) == 1024
        assert (await as_deferred(store.get_mapping(client, context))).client_identifier == client
        assert [m.key for m in await as_deferred(store.list_mappings(client))] == [(client, context)]

    @pytest_twisted.ensureDeferred
    async def test_scopes_round_trip_nested_claims(self, store: Any) -> None:
        claims = {"role": "reader", "nested": {"list": [1, 2.5, None, True], "text": "ü"}, "n": 0}
        await as_deferred(store.add_scope(ScopeMapping("read", claims)))
        await _raises(Conflict, store.add_scope(ScopeMapping("read", {})))
        assert (await as_deferred(store.get_scope("read"))).claims == claims
        await as_deferred(store.add_scope(ScopeMapping("admin", {})))
        assert [s.scope for s in await as_deferred(store.list_scopes())] == ["admin", "read"]
        await as_deferred(store.update_scope(ScopeMapping("read", {"role": "r2"})))
        assert (await as_deferred(store.get_scope("read"))).claims == {"role": "r2"}
        await _raises(NotFound, store.update_scope(ScopeMapping("missing", {})))
        assert await as_deferred(store.delete_scope("read")) is True
        assert await as_deferred(store.delete_scope("read")) is False
        await _raises(NotFound, store.get_scope("read"))

    @pytest_twisted.ensureDeferred
    async def test_resolve_returns_the_mapping_and_existing_scopes(self, store: Any) -> None:
        await as_deferred(store.add_mapping(ResourceMapping(CLIENT, "ctx", scopes=("a", "b", "c"))))
        await as_deferred(store.add_scope(ScopeMapping("a", {"x": 1})))
        await as_deferred(store.add_scope(ScopeMapping("b", {"y": 2})))
        resolution = await as_deferred(store.resolve(CLIENT, "ctx", ["a", "c", "zz"]))
        assert resolution.mapping.key == (CLIENT, "ctx")
        assert dict(resolution.scopes) == {"a": ScopeMapping("a", {"x": 1})}
        empty = await as_deferred(store.resolve(CLIENT, "ctx", []))
        assert dict(empty.scopes) == {}
        await _raises(NotFound, store.resolve(CLIENT, "other", ["a"]))
        await as_deferred(store.delete_mapping(CLIENT, "ctx"))
        await _raises(NotFound, store.resolve(CLIENT, "ctx", ["a"]))

    @pytest_twisted.ensureDeferred
    async def test_integrations_and_api_keys(self, store: Any) -> None:
        await as_deferred(store.add_integration(Integration("acme", "Acme Corp")))
        await _raises(Conflict, store.add_integration(Integration("acme")))
        record = ApiKeyRecord("acme", "k1", DIGEST, tier=3, description="ci")
        await as_deferred(store.add_api_key(record))
        await _raises(Conflict, store.add_api_key(ApiKeyRecord("acme", "k1", DIGEST)))
        await _raises(NotFound, store.add_api_key(ApiKeyRecord("ghost", "k1", DIGEST)))
        found = await as_deferred(store.get_api_key("acme", "k1"))
        assert (found.secret_sha256, found.tier, found.description, found.status) == (DIGEST, 3, "ci", "active")
        assert isinstance(found.secret_sha256, bytes)
        await _raises(NotFound, store.get_api_key("acme", "k2"))
        await as_deferred(store.add_integration(Integration("beta")))
        listed = await as_deferred(store.list_integrations())
        assert [(i.integration_id, [k.key_id for k in i.keys]) for i in listed] == [("acme", ["k1"]), ("beta", [])]
        assert listed[0].description == "Acme Corp"
        assert await as_deferred(store.revoke_api_key("acme", "k1")) is True
        assert (await as_deferred(store.get_api_key("acme", "k1"))).status == "revoked"
        assert await as_deferred(store.revoke_api_key("acme", "nope")) is False

    @pytest_twisted.ensureDeferred
    async def test_replay_record(self, store: Any, clock: Any) -> None:
        if not IReplayRecord.providedBy(store):
            pytest.skip("this store keeps no replay record")
        now = clock.seconds()
        assert await as_deferred(store.record_token_id("iss", "jti-1", now + 60)) is True
        assert await as_deferred(store.record_token_id("iss", "jti-1", now + 60)) is False
        assert await as_deferred(store.record_token_id("other-iss", "jti-1", now + 60)) is True
        assert await as_deferred(store.record_token_id("iss", "old", now - 1)) is True
        assert await as_deferred(store.record_token_id("iss", "old", now + 60)) is True, "expired ids are forgotten"
