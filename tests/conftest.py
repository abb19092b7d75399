"""Fixtures shared by the test modules (pytest-twisted runs the reactor)."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock()
