"""Let providers answer with a Deferred, a coroutine or a plain value."""

from __future__ import annotations

import inspect
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred, succeed

T = TypeVar("T")


def as_deferred(result: Any) -> Deferred[Any]:
    """Wrap whatever a provider method returned in a ``Deferred``."""
    if isinstance(result, Deferred):
        return result
    if inspect.isawaitable(result):
        return ensureDeferred(result)
    return succeed(result)
