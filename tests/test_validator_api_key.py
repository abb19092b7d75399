"""The api-key validator's options: checked by the plugin, reported together."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import attrs
import pytest
from k8s_fixtures import jwtlet_config
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from jwtlet.apikeys.keys import make_key
from jwtlet.config.schema import ApiKeysConfig
from jwtlet.exchange.apikeys import key_identity
from jwtlet.interfaces import IMappingStore, PluginConfigError, PluginContext, TokenRejected
from jwtlet.model import ApiKeyRecord, Identity, Integration
from jwtlet.plugins.api_key import api_key
from jwtlet.plugins.memory_store import MemoryStore


def context(tmp_path: Path, store: Optional[IMappingStore], prefix: Optional[str] = None) -> PluginContext:
    config = jwtlet_config("api-key")
    if prefix is not None:
        config = attrs.evolve(config, api_keys=ApiKeysConfig(prefix=prefix))
    clock = Clock()
    return PluginContext(reactor=clock, clock=clock, http_client=None, config=config, data_dir=tmp_path, store=store)


def test_the_prefix_defaults_to_api_keys_prefix(tmp_path: Path) -> None:
    store = MemoryStore(Clock())
    assert api_key.build({}, context(tmp_path, store)).verifier.prefix == "jwtk"
    assert api_key.build({}, context(tmp_path, store, prefix="acmek")).verifier.prefix == "acmek"
    assert api_key.build({"prefix": "own"}, context(tmp_path, store, prefix="acmek")).verifier.prefix == "own"


def test_option_problems_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(PluginConfigError) as raised:
        api_key.build({"prefix": "a.b", "colour": 1}, context(tmp_path, store=None))
    assert sorted(raised.value.messages) == [
        "colour: unknown key",
        "prefix: must not contain '.'",
        "type: the api-key validator needs a store",
    ]


def test_a_key_is_the_same_identity_as_on_the_api_key_exchange(tmp_path: Path) -> None:
    """One pipeline: the plugin's identity carries int_id and key_id like the exchange's, so claims agree."""
    store = MemoryStore(Clock())
    new = make_key("jwtk", "acme", "k1", lambda n: bytes(range(n)))
    record = ApiKeyRecord("acme", "k1", new.secret_sha256, tier=3)
    store.add_integration(Integration("acme"))
    store.add_api_key(record)
    validator = api_key.build({}, context(tmp_path, store))
    assert settled(validator.validate(new.text, None)) == key_identity(record)
    wrong = settled(validator.validate(new.text + "x", None))
    assert isinstance(wrong, Failure) and wrong.check(TokenRejected)


def settled(deferred: Deferred[Identity]) -> Union[Identity, Failure]:
    """What an already fired Deferred fired with (the memory store answers at once)."""
    results: list[Union[Identity, Failure]] = []
    deferred.addBoth(results.append)
    return results[0]
