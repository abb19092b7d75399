"""The api-key validator's options: checked by the plugin, reported together."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import attrs
import pytest
from k8s_fixtures import jwtlet_config
from twisted.internet.task import Clock

from jwtlet.config.schema import ApiKeysConfig
from jwtlet.interfaces import IMappingStore, PluginConfigError, PluginContext
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
