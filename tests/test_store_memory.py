"""The memory store passes the store conformance suite."""

from __future__ import annotations

import types
from typing import Any

import pytest
from twisted.internet.task import Clock

from jwtlet.plugins.memory_store import memory
from jwtlet.testing.store_conformance import StoreConformance


class TestMemoryStore(StoreConformance):
    @pytest.fixture
    def store(self, clock: Clock) -> Any:
        return memory.build({}, types.SimpleNamespace(clock=clock))
