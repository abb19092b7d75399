"""The memory store passes the store conformance suite."""

from __future__ import annotations

from pathlib import Path

import pytest
from k8s_fixtures import jwtlet_config
from twisted.internet.task import Clock

from jwtlet.interfaces import PluginContext
from jwtlet.plugins.memory_store import MemoryStore, memory
from jwtlet.testing.conformance.store import StoreConformance


class TestMemoryStore(StoreConformance):
    @pytest.fixture
    def store(self, clock: Clock, tmp_path: Path) -> MemoryStore:
        return memory.build({}, PluginContext(reactor=clock, clock=clock, http_client=None,
                                              config=jwtlet_config("kubernetes-oidc"), data_dir=tmp_path))
